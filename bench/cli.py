"""`python -m bench [--only fanout,ingest,...] [--fresh] [--quick] [--no-profile]`."""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import sys
import time
import traceback
from datetime import UTC, datetime

from bench import config, db, load, procs

SECTIONS = ("fanout", "round_trip", "ingest", "pages", "memory", "scale", "captions", "faults")


class Harness:
    """What every section gets: where to log, how many samples, whether to profile."""

    def __init__(self, args) -> None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        self.logs = config.LOGS / stamp
        self.logs.mkdir(parents=True, exist_ok=True)
        self.profile_dir = self.logs / "profiles"
        self.scale = 0.25 if args.quick else 1.0
        self.profile = not args.no_profile
        self.fresh = args.fresh
        self.quick = args.quick
        self.wait_quiet = args.wait_quiet
        self.runs = max(1, args.runs)
        self.started = time.monotonic()

    def log(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[bench {elapsed:6.1f}s] {text}", flush=True)


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--only", default="", help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})"
    )
    parser.add_argument("--fresh", action="store_true", help="rebuild the cached pages datasets")
    parser.add_argument("--quick", action="store_true", help="a quarter of the samples (a smoke run)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiles of missed targets")
    parser.add_argument(
        "--wait-quiet", type=float, default=90.0, metavar="SECONDS",
        help="before each section, wait up to this long for other processes to go quiet (default 90)",
    )
    parser.add_argument(
        "--runs", type=int, default=3, metavar="N",
        help="run a section measured while other processes used the machine again, up to N "
        "runs in all, and keep the quietest (default 3)",
    )
    parser.add_argument(
        "--variant",
        default="",
        help="run the stack with bench/variants/NAME.py settings (a proposed fix); results go to "
        "bench/results/variant-NAME.json, latest.json and README.md are left alone",
    )
    parser.add_argument(
        "--report", action="store_true",
        help="measure nothing: rewrite README.md from bench/results/latest.json",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave latest.json and README.md alone"
    )
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s): {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    args.sections = [s for s in SECTIONS if s in chosen]
    return args


def _raise_fd_limit(want: int = 8192) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


def _on_signal(signum, frame):
    procs.stop_all()
    raise SystemExit(128 + signum)


async def _run_sections(h: Harness, sections: list[str]) -> dict:
    from bench import captions, fanout, faults, ingest, memory, pages, round_trip, scale

    modules = {
        "fanout": fanout,
        "round_trip": round_trip,
        "ingest": ingest,
        "pages": pages,
        "memory": memory,
        "scale": scale,
        "captions": captions,
        "faults": faults,
    }
    results: dict = {}
    for name in sections:
        runs = []
        for attempt in range(1, h.runs + 1):
            runs.append(await _run_section(h, name, modules[name], attempt))
            if not _contended(runs[-1]):
                break
            if attempt < h.runs:
                h.log(f"{name} was contended: running it again ({attempt + 1} of at most {h.runs})")
        # The quietest run is kept; the others are summarised beside it.
        kept = min(runs, key=_others_cores)
        if len(runs) > 1 and isinstance(kept, dict):
            kept["load"]["runs"] = [_run_summary(name, run, run is kept) for run in runs]
        results[name] = kept
    return results


async def _run_section(h: Harness, name: str, module, attempt: int):
    h.log(f"--- {name}" + (f" (run {attempt})" if attempt > 1 else ""))
    quiet = await asyncio.to_thread(load.wait_for_quiet, h.log, limit=h.wait_quiet)
    meter = load.Meter().start()
    t0 = time.monotonic()
    try:
        result = await asyncio.wait_for(module.run(h), timeout=900)
    except Exception as error:  # one broken section must not lose the others
        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {error}"}
    finally:
        procs.stop_all()
    if isinstance(result, dict):
        result["section_seconds"] = round(time.monotonic() - t0, 1)
        result["load"] = {**meter.stop(), **quiet}
        if result["load"]["contended"]:
            h.log(f"warning: other processes used {result['load']['cores_used']['others']} "
                  f"cores during {name}: {result['load']['others_top']}")
    h.log(f"--- {name} done in {time.monotonic() - t0:.1f} s")
    return result


def _contended(result) -> bool:
    return isinstance(result, dict) and "error" not in result and bool(
        (result.get("load") or {}).get("contended")
    )


def _others_cores(result) -> float:
    if not isinstance(result, dict) or "error" in result:
        return float("inf")
    return (result.get("load") or {}).get("cores_used", {}).get("others", float("inf"))


# Each section's headline figure, to show the range of its runs.
# Per section, the figures each run is summarised by (the first is its headline).
_HEADLINE = {
    "fanout": [("100", "p99_ms"), ("1", "p50_ms")],
    "round_trip": [("take_over", "p50_ms"), ("send", "p50_ms")],
    "ingest": [("per_second",)],
    "pages": [("inbox", "p50_ms")],
    "memory": [("kb_per_socket",)],
    "scale": [("p99_ms",)],
    "captions": [("10", "p99_ms")],
}


def _run_summary(name: str, result, kept: bool) -> dict:
    summary = {"kept": kept, "others_cores": _others_cores(result)}
    if isinstance(result, dict) and "error" in result:
        summary["error"] = result["error"]
        return summary
    for path in _HEADLINE.get(name, ()):
        value = result
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        summary[".".join(path)] = value
    return summary


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    _raise_fd_limit()
    signal.signal(signal.SIGTERM, _on_signal)
    if args.variant:
        config.SETTINGS_MODULE = f"bench.variants.{args.variant}"
    config.setup_django()
    from bench import report

    if args.report:
        doc = json.loads(report.LATEST.read_text())
        doc["targets"] = report.targets(doc)
        print(report.table(doc))
        report.write_readmes(doc)
        return 0

    h = Harness(args)
    h.log(f"sections: {', '.join(args.sections)}; logs in {h.logs.relative_to(config.ROOT)}")
    results: dict = {}
    machine_at_start = report.machine()
    try:
        db.migrated_template(h.logs / "migrate.log")
        # As `make run` does: Daphne serves hashed static files from STATIC_ROOT.
        procs.manage(
            ["collectstatic", "--noinput", "-v0"],
            config.stack_env(database=config.DB_TEMPLATE),
            h.logs / "collectstatic.log",
        )
        results = asyncio.run(_run_sections(h, args.sections))
    except KeyboardInterrupt:
        h.log("interrupted")
        return 130
    finally:
        procs.stop_all()

    document = report.document(
        results, sections=args.sections, quick=args.quick, machine_info=machine_at_start
    )
    print()
    print(report.table(document))
    if args.variant:
        config.RESULTS.mkdir(parents=True, exist_ok=True)
        out = config.RESULTS / f"variant-{args.variant}.json"
        document["variant"] = {"name": args.variant, "settings": config.SETTINGS_MODULE}
        if not args.no_write:
            out.write_text(dump(document) + "\n")
            h.log(f"wrote {out.relative_to(config.ROOT)}")
    elif not args.no_write:
        report.write(document)
        h.log(f"wrote {config.RESULTS.relative_to(config.ROOT)}/latest.json and bench/README.md")
    errors = [name for name, value in results.items() if isinstance(value, dict) and "error" in value]
    if errors:
        h.log(f"sections with errors: {', '.join(errors)}")
        return 1
    return 0


def dump(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
