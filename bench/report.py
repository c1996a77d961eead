"""latest.json, the summary table, and bench/README.md."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata

from bench import config, db, findings, profiling

LATEST = config.RESULTS / "latest.json"
# The faults section's floor after kill -9 (as tests/conversations/test_faults.py).
KILL9_MIN_STORED = 990
README = config.BENCH / "README.md"
# The project's README carries the same table, between these two lines.
PROJECT_README = config.ROOT / "README.md"
TABLE_START, TABLE_END = "<!-- bench table: written by `python -m bench` -->", "<!-- /bench table -->"


# ---------------------------------------------------------------- the machine


def machine() -> tuple[str, dict]:
    detail: dict = {"cores": os.cpu_count()}
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        detail["memory_gib"] = round(kb / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    detail["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    detail["python"] = platform.python_version()
    for package in ("django", "channels", "daphne", "channels-redis", "redis", "psycopg",
                    "websockets", "twisted"):
        try:
            detail[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    try:
        detail["postgresql"] = db.server_version()
    except Exception:
        pass
    try:
        detail["redis_server"] = db.redis_version()
    except Exception:
        pass
    try:
        detail["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=config.ROOT, capture_output=True,
            text=True, timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=config.ROOT,
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        if dirty:
            detail["commit"] += " (with uncommitted changes)"
    except Exception:
        pass
    text = (
        f"{detail.get('cores')} cores, {detail.get('memory_gib')} GiB, {detail.get('cpu', '?')}; "
        f"Python {detail['python']}, Django {detail.get('django')}, channels {detail.get('channels')}, "
        f"daphne {detail.get('daphne')}, channels-redis {detail.get('channels-redis')}, "
        f"redis-py {detail.get('redis')}, psycopg {detail.get('psycopg')}; "
        f"PostgreSQL {detail.get('postgresql')}, Redis {detail.get('redis_server')}"
    )
    return text, detail


# ---------------------------------------------------------------- targets


def _get(doc, *path):
    value = doc
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def targets(doc: dict) -> dict:
    """Each target: what it is, the measured value, met or not (None: not measured)."""

    def check(value, ok):
        return None if value is None else bool(ok(value))

    ratio = _get(doc, "fanout", "100", "ratio_p99")
    n1_p50 = _get(doc, "fanout", "1", "p50_ms")
    n100 = [_get(doc, "fanout", "100", "p50_ms"), _get(doc, "fanout", "100", "p99_ms")]
    scale = doc.get("scale") if isinstance(doc.get("scale"), dict) else {}
    scale_p99, scale_floor = scale.get("p99_ms"), scale.get("floor_p99_ms")
    idle_cpu = doc.get("worker_idle_cpu_percent")
    take_p99 = _get(doc, "round_trip", "take_over", "p99_ms")
    send_p99 = _get(doc, "round_trip", "send", "p99_ms")
    ingest_rate = _get(doc, "ingest", "per_second")
    stored, messages = _get(doc, "ingest", "stored"), _get(doc, "ingest", "messages")
    take, send = _get(doc, "round_trip", "take_over", "p50_ms"), _get(doc, "round_trip", "send", "p50_ms")
    inbox, conv = _get(doc, "pages", "inbox", "p50_ms"), _get(doc, "pages", "conversation", "p50_ms")
    reports_p50 = _get(doc, "pages", "reports", "p50_ms")
    q = [
        (_get(doc, "pages", k, "queries"), _get(doc, "pages", k, "queries_small"))
        for k in ("inbox", "conversation", "reports")
    ]
    kb = _get(doc, "memory", "kb_per_socket")
    cut, kill = _get(doc, "faults", "pg_cut") or {}, _get(doc, "faults", "kill9") or {}
    failover = _get(doc, "faults", "failover") or {}
    faults_value = (
        None if not (cut.get("sent") and kill.get("sent")) else
        {"pg_cut": [cut.get("stored"), cut.get("sent"), cut.get("duplicates")],
         "kill9": [kill.get("stored"), kill.get("sent"), kill.get("duplicates")]}
    )
    return {
        "fanout": {"target": "p99 at N=100 within 1.5x the floor's p99", "value": ratio,
                   "met": check(ratio, lambda v: v <= 1.5)},
        "fanout_n1": {"target": "p50 <= 5 ms", "value": n1_p50, "met": check(n1_p50, lambda v: v <= 5)},
        "fanout_n100": {"target": "p50 <= 15 ms, p99 <= 40 ms", "value": n100,
                        "met": None if None in n100 else n100[0] <= 15 and n100[1] <= 40},
        "scale": {"target": "p99 <= 200 ms and within 1.5x the floor's p99 (same run)",
                  "value": scale_p99,
                  "met": None if scale_p99 is None or not scale_floor
                  else scale_p99 <= 200 and scale_p99 <= 1.5 * scale_floor},
        "scale_memory": {"target": "<= 50 KB per idle socket", "value": scale.get("kb_per_socket"),
                         "met": check(scale.get("kb_per_socket"), lambda v: v <= 50)},
        "worker_idle": {"target": "< 1 % of a core", "value": idle_cpu,
                        "met": check(idle_cpu, lambda v: v < 1)},
        "ingest": {"target": ">= 2,000 messages/s", "value": ingest_rate,
                   "met": check(ingest_rate, lambda v: v >= 2000)},
        "ingest_exact": {"target": "stored count exact", "value": stored,
                         "met": None if stored is None else stored == messages and bool(_get(doc, "ingest", "exact"))},
        "round_trip_take_over": {"target": "p50 <= 25 ms, p99 <= 60 ms", "value": take,
                                 "met": check(take, lambda v: v <= 25 and (take_p99 or 0) <= 60)},
        "round_trip_send": {"target": "p50 <= 25 ms, p99 <= 60 ms", "value": send,
                            "met": check(send, lambda v: v <= 25 and (send_p99 or 0) <= 60)},
        "pages_inbox": {"target": "p50 <= 50 ms", "value": inbox, "met": check(inbox, lambda v: v <= 50)},
        "pages_conversation": {"target": "p50 <= 50 ms", "value": conv, "met": check(conv, lambda v: v <= 50)},
        "pages_reports": {"target": "p50 <= 150 ms", "value": reports_p50,
                          "met": check(reports_p50, lambda v: v <= 150)},
        "pages_queries_constant": {
            "target": "queries per page the same at 1,000 and 100,000 conversations",
            "value": q,
            "met": None if any(a is None for pair in q for a in pair) else all(a == b for a, b in q),
        },
        "memory": {"target": "<= 100 KB per idle socket", "value": kb, "met": check(kb, lambda v: v <= 100)},
        "faults": {
            "target": "through a 10 s PostgreSQL cut every message stored once; after kill -9 "
            f"(replay window 3) >= {KILL9_MIN_STORED:,} of 1,000 stored, no duplicates",
            "value": faults_value,
            "met": check(faults_value, lambda v: (
                cut.get("stored") == cut.get("sent") and cut.get("duplicates") == 0
                and (kill.get("stored") or 0) >= KILL9_MIN_STORED and kill.get("duplicates") == 0
            )),
        },
        "failover": {
            "target": "a standby confirms the next command within 10 s of kill -9 of the active worker (p50 of 5)",
            "value": (
                f"p50 {failover['p50_s']} s, max {failover['max_s']} s over {failover['kills']} kills"
                if failover.get("p50_s") is not None else None
            ),
            "met": failover.get("p50_s") is not None and failover["max_s"] <= 10,
        },
    }


# ---------------------------------------------------------------- the document


def document(results: dict, *, sections: list[str], quick: bool, machine_info=None) -> dict:
    """This run's results merged over the previous latest.json (sections not run are kept)."""
    previous = {}
    if LATEST.exists():
        try:
            previous = json.loads(LATEST.read_text())
        except ValueError:
            previous = {}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    text, detail = now_info = machine()
    if machine_info is not None:  # as it was when the run started
        text, detail = machine_info
        if now_info[1] != detail:  # someone changed the environment meanwhile
            detail = {**detail, "changed_during_run": now_info[1]}
    doc = {"at": now, "machine": text}
    measured_at = dict(_get(previous, "run", "measured_at") or {})
    for name in ("fanout", "ingest", "round_trip", "pages", "memory", "scale", "captions", "faults"):
        if name in results:
            doc[name] = results[name]
            measured_at[name] = now + (" (quick)" if quick else "")
        elif name in previous:
            doc[name] = previous[name]
    # The failover (p50 of five kill -9s of the active worker), also at the top level.
    doc["failover_s"] = _get(doc, "faults", "failover_s")
    # Measured in the scale section (the worker connected, nothing happening).
    doc["worker_idle_cpu_percent"] = _get(doc, "scale", "worker_idle_cpu_percent")
    doc["targets"] = targets(doc)
    doc["machine_detail"] = detail
    doc["run"] = {"sections": sections, "quick": quick, "measured_at": measured_at,
                  "py_spy": profiling.available()}
    return doc


def write(doc: dict) -> None:
    config.RESULTS.mkdir(parents=True, exist_ok=True)
    LATEST.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    write_readmes(doc)


def write_readmes(doc: dict) -> None:
    """bench/README.md, and the table in the project's README, from one document."""
    README.write_text(readme(doc))
    text = PROJECT_README.read_text()
    if TABLE_START in text and TABLE_END in text:
        head, rest = text.split(TABLE_START, 1)
        tail = rest.split(TABLE_END, 1)[1]
        run = (f"Run at {doc['at']} on {doc['machine']}; a figure marked *contended* was measured "
               "while other processes used the machine.")
        PROJECT_README.write_text(f"{head}{TABLE_START}\n{run}\n\n{markdown_table(doc)}\n{TABLE_END}{tail}")


# ---------------------------------------------------------------- text


def _fmt(v, unit=""):
    if v is None:
        return "—"
    if isinstance(v, float):
        v = f"{v:,.1f}" if abs(v) >= 100 else f"{v:.2f}".rstrip("0").rstrip(".")
    return f"{v}{unit}"


def _met(flag) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[flag]


def rows(doc: dict) -> list[tuple[str, str, str, str]]:
    t = doc.get("targets") or targets(doc)
    out = []
    for n in ("1", "10", "100"):
        f = _get(doc, "fanout", n)
        if not isinstance(f, dict) or "p50_ms" not in f:
            out.append((f"Fan-out, N={n}", _get(doc, "fanout", "error") or "—", "", ""))
            continue
        target, met = {
            "1": (t["fanout_n1"]["target"], _met(t["fanout_n1"]["met"])),
            "100": (f"{t['fanout_n100']['target']}; {t['fanout']['target']}",
                    f"{_met(t['fanout_n100']['met'])}; ratio {_met(t['fanout']['met'])}"),
        }.get(n, ("", ""))
        out.append((
            f"Fan-out, N={n} operators: p50 / p95 / p99",
            _live_figures(f) + _contended_mark(doc, "fanout", {"1": "1.p50_ms", "100": "100.p99_ms"}.get(n, "none")),
            target,
            met,
        ))
    sc = doc.get("scale") or {}
    out.append((
        "Scale: 1,000 operators on one conversation over 2 Daphne processes: p50 / p95 / p99",
        (_live_figures(sc) + f"; {_fmt(sc.get('kb_per_socket'))} KB per idle socket"
         + _contended_mark(doc, "scale")) if "p50_ms" in sc else sc.get("error", "—"),
        f"{t['scale']['target']}; {t['scale_memory']['target']}",
        f"{_met(t['scale']['met'])}; memory {_met(t['scale_memory']['met'])}",
    ))
    out.append((
        "Worker idle (connected, nothing happening, 20 s): CPU",
        f"{_fmt(doc.get('worker_idle_cpu_percent'))} % of a core" + _contended_mark(doc, "scale", "none"),
        t["worker_idle"]["target"],
        _met(t["worker_idle"]["met"]),
    ))
    ing = doc.get("ingest") or {}
    out.append((
        "Ingest: 10,000 messages / 1,000 conversations, 10 operators",
        f"{_fmt(ing.get('per_second'))} messages/s; stored {_fmt(ing.get('stored'))} of "
        f"{_fmt(ing.get('messages'))}" + (f" ({ing['error']})" if "error" in ing else "")
        + _contended_mark(doc, "ingest"),
        ">= 2,000/s, exact count",
        f"rate {_met(t['ingest']['met'])}; count {_met(t['ingest_exact']['met'])}",
    ))
    for key, label in (("take_over", "Take over"), ("send", "Send")):
        r = _get(doc, "round_trip", key) or {}
        out.append((
            f"Round trip: {label}, p50 / p99",
            f"{_fmt(r.get('p50_ms'))} / {_fmt(r.get('p99_ms'))} ms"
            + (f" ({_get(doc, 'round_trip', 'error')})" if _get(doc, "round_trip", "error") else "")
            + _contended_mark(doc, "round_trip", f"{key}.p50_ms"),
            t[f"round_trip_{key}"]["target"],
            _met(t[f"round_trip_{key}"]["met"]),
        ))
    for key, label in (("inbox", "Inbox page"), ("conversation", "Long conversation page")):
        p = _get(doc, "pages", key) or {}
        out.append((
            f"{label} (100k conversations, 1M messages): p50 / p99, queries",
            f"{_fmt(p.get('p50_ms'))} / {_fmt(p.get('p99_ms'))} ms, {_fmt(p.get('queries'))} queries "
            f"(1k conversations: {_fmt(p.get('p50_ms_small'))} / {_fmt(p.get('p99_ms_small'))} ms, "
            f"{_fmt(p.get('queries_small'))} queries)",
            "p50 <= 50 ms; queries constant",
            f"p50 {_met(t[f'pages_{key}']['met'])}; queries {_met(t['pages_queries_constant']['met'])}",
        ))
    p = _get(doc, "pages", "reports") or {}
    out.append((
        "Reports page over 30 days (100k conversations, 17.5k takeover episodes): p50 / p99, queries",
        f"{_fmt(p.get('p50_ms'))} / {_fmt(p.get('p99_ms'))} ms, {_fmt(p.get('queries'))} queries "
        f"(1k conversations: {_fmt(p.get('p50_ms_small'))} ms, {_fmt(p.get('queries_small'))} queries)"
        + _contended_mark(doc, "pages"),
        "p50 <= 150 ms; queries constant",
        f"p50 {_met(t['pages_reports']['met'])}; queries {_met(t['pages_queries_constant']['met'])}",
    ))
    m = doc.get("memory") or {}
    out.append((
        "Memory: one Daphne, 1,000 idle sockets",
        f"{_fmt(m.get('kb_per_socket'))} KB per socket (RSS {_fmt(m.get('rss_before_kb'))} -> "
        f"{_fmt(m.get('rss_after_kb'))} kB)",
        "<= 100 KB per socket",
        _met(t["memory"]["met"]),
    ))
    for n in ("1", "10"):
        c = _get(doc, "captions", n)
        out.append((
            f"Captions: a call's bot.word until on {n} watching operator{'s' if n != '1' else ''}: "
            "p50 / p95 / p99",
            (_live_figures(c) + f"; {_fmt(c.get('words'))} words, lost {_fmt(_get(c, 'lost', 'real'))}"
             + _contended_mark(doc, "captions")) if isinstance(c, dict) and "p50_ms" in c
            else (_get(doc, "captions", "error") or "not measured"),
            "measured (no target set)",
            "",
        ))
    cut, kill = _get(doc, "faults", "pg_cut") or {}, _get(doc, "faults", "kill9") or {}
    failover = _get(doc, "faults", "failover") or {}
    out.append((
        "Faults: PostgreSQL cut 10 s mid-burst; kill -9 mid-burst (replay window "
        f"{_fmt(kill.get('replay_window'))})",
        f"cut: {_fmt(cut.get('stored'))} of {_fmt(cut.get('sent'))} stored, "
        f"{_fmt(cut.get('duplicates'))} duplicates; kill -9: {_fmt(kill.get('stored'))} of "
        f"{_fmt(kill.get('sent'))} stored, {_fmt(kill.get('duplicates'))} duplicates"
        + "".join(f" ({k}: {v['error']})" for k, v in (("cut", cut), ("kill -9", kill)) if "error" in v),
        f"cut: all, once; kill -9: >= {KILL9_MIN_STORED:,}, no duplicates",
        _met(t["faults"]["met"]),
    ))
    out.append((
        "Failover: kill -9 of the active worker until a standby confirms the next command",
        t["failover"]["value"] or "not measured",
        "within 10 s",
        _met(t["failover"]["met"]),
    ))
    return out


def _live_figures(f: dict) -> str:
    """p50 / p95 / p99 of the real path, of both floors, and the ratios to them."""
    text = (f"{_fmt(f['p50_ms'])} / {_fmt(f['p95_ms'])} / {_fmt(f['p99_ms'])} ms; "
            f"floor {_fmt(f['floor_p50_ms'])} / {_fmt(f.get('floor_p95_ms'))} / {_fmt(f['floor_p99_ms'])} ms")
    if f.get("transport_floor_p50_ms") is not None:
        text += (f"; transport floor {_fmt(f['transport_floor_p50_ms'])} / "
                 f"{_fmt(f.get('transport_floor_p95_ms'))} / {_fmt(f['transport_floor_p99_ms'])} ms")
    text += f"; ratio p50 {_fmt(f.get('ratio_p50'))}x, p99 {_fmt(f.get('ratio_p99'))}x"
    if f.get("transport_ratio_p99") is not None:
        text += (f" (to the transport floor: p50 {_fmt(f.get('transport_ratio_p50'))}x, "
                 f"p99 {_fmt(f.get('transport_ratio_p99'))}x)")
    return text


def _contended_mark(doc: dict, section: str, figure: str = "") -> str:
    """Whether other processes disturbed the section, and with several runs the range
    of `figure` (default: the section's headline) over them."""
    load = _get(doc, section, "load") or {}
    runs = load.get("runs") or []
    mark = f" (contended: others used {_fmt(_get(load, 'cores_used', 'others'))} cores)" if load.get("contended") else ""
    if len(runs) > 1:
        mark += f" (quietest of {len(runs)} runs{_runs_range(runs, figure)})"
    return mark


def _runs_range(runs: list[dict], figure: str = "") -> str:
    """A figure's range over the runs: how much the machine moved it."""
    key = figure or next((k for k in runs[0] if k not in ("kept", "others_cores", "error")), None)
    values = [r[key] for r in runs if isinstance(r.get(key), (int, float))] if key else []
    if len(values) < 2:
        return ""
    parts = key.removesuffix("_ms").split(".")
    label = " ".join(f"N={p}" if p.isdigit() else p.replace("per_second", "rate").replace("_", " ") for p in parts)
    unit = " ms" if key.endswith("_ms") else "/s" if key.endswith("per_second") else ""
    return f"; {label} over the runs {_fmt(min(values))}-{_fmt(max(values))}{unit}"


def table(doc: dict) -> str:
    lines = [f"Benchmarks at {doc['at']} on {doc['machine']}", ""]
    for name, value, target, met in rows(doc):
        lines.append(f"* {name}")
        lines.append(f"    {value}")
        if target:
            lines.append(f"    target: {target} -> {met}")
    return "\n".join(lines)


def markdown_table(doc: dict) -> str:
    out = ["| Measure | Result | Target | |", "|---|---|---|---|"]
    for name, value, target, met in rows(doc):
        out.append(f"| {name} | {value} | {target} | {met} |")
    return "\n".join(out)


def _profile_block(title: str, prof: dict | None) -> str:
    if not prof:
        return ""
    if "error" in prof and len(prof) == 1:
        return f"{title}: {prof['error']}\n"
    parts = []
    procs = ["worker", "daphne"] + sorted(k for k in prof if k.startswith("daphne-"))
    for proc in procs:
        if prof.get(proc):
            parts.append(profiling.excerpt(prof[proc], f"{title}, {proc}"))
    return "```\n" + "\n\n".join(parts) + "\n```\n" if parts else ""


def _section_summary(doc: dict, section: str) -> str:
    if section == "fanout":
        parts = []
        for n in ("1", "10", "100"):
            f = _get(doc, "fanout", n)
            if isinstance(f, dict) and "p50_ms" in f:
                parts.append(f"N={n}: p50 {_fmt(f['p50_ms'])} / p99 {_fmt(f['p99_ms'])} ms "
                             f"(floor {_fmt(f['floor_p50_ms'])} / {_fmt(f['floor_p99_ms'])}"
                             + (f"; transport floor {_fmt(f['transport_floor_p50_ms'])} / "
                                f"{_fmt(f['transport_floor_p99_ms'])}" if f.get("transport_floor_p50_ms") else "")
                             + ")")
        return "; ".join(parts)
    if section == "round_trip":
        return "; ".join(
            f"{k.replace('_', ' ')}: p50 {_fmt(_get(doc, 'round_trip', k, 'p50_ms'))} / "
            f"p99 {_fmt(_get(doc, 'round_trip', k, 'p99_ms'))} ms"
            for k in ("take_over", "send") if _get(doc, "round_trip", k)
        )
    if section == "ingest":
        return f"{_fmt(_get(doc, 'ingest', 'per_second'))} messages/s"
    if section == "pages":
        return "; ".join(f"{k}: p50 {_fmt(_get(doc, 'pages', k, 'p50_ms'))} ms" for k in ("inbox", "conversation"))
    if section == "memory":
        return f"{_fmt(_get(doc, 'memory', 'kb_per_socket'))} KB/socket"
    if section == "scale":
        return (f"N=1000: p50 {_fmt(_get(doc, 'scale', 'p50_ms'))} / p99 {_fmt(_get(doc, 'scale', 'p99_ms'))} ms "
                f"(floor p99 {_fmt(_get(doc, 'scale', 'floor_p99_ms'))})")
    return ""


def variant_rows(doc: dict) -> list[str]:
    rows_out = []
    for path in sorted(config.RESULTS.glob("variant-*.json")):
        try:
            var = json.loads(path.read_text())
        except ValueError:
            continue
        name = path.stem.removeprefix("variant-")
        module = config.BENCH / "variants" / f"{name}.py"
        what = ""
        if module.exists():
            text = module.read_text()
            what = text.split('"""')[1].strip().splitlines()[0] if '"""' in text else ""
        for section in (var.get("run") or {}).get("sections", []):
            if section not in var:
                continue
            contended = _get(var, section, "load", "contended")
            rows_out.append(
                f"| `{name}` | {what} | {section} | {_section_summary(doc, section)} | "
                f"{_section_summary(var, section)}{' (contended)' if contended else ''} |"
            )
    return rows_out


def readme(doc: dict) -> str:
    t = doc["targets"]
    measured = (doc.get("run") or {}).get("measured_at") or {}
    sections = [findings.INTRO.strip(), "", "## Latest results", "",
                f"Run at {doc['at']} on {doc['machine']}"
                + (f" (commit {doc['machine_detail'].get('commit')})" if doc.get("machine_detail", {}).get("commit") else "")
                + ".", "", markdown_table(doc), ""]
    if measured:
        sections += ["Sections measured at: " + "; ".join(f"{k} {v}" for k, v in measured.items()) + ".", ""]
    contended = [
        f"{name} (other processes used {_get(doc, name, 'load', 'cores_used', 'others')} cores: "
        f"{', '.join(_get(doc, name, 'load', 'others_top') or {})})"
        for name in ("fanout", "round_trip", "ingest", "pages", "memory", "scale", "captions", "faults")
        if _get(doc, name, "load", "contended")
    ]
    if contended:
        sections += ["Measured while other processes used this machine (figures less reliable): "
                     + "; ".join(contended) + ".", ""]

    missed = [k for k, v in t.items() if v["met"] is False]
    sections += ["## Where the time goes, and what would fix it", ""]
    if not missed:
        sections += ["Every target is met.", ""]
    # A fan-out target's profile and breakdown are shown once, under the first one missed.
    first_fanout = next((k for k in missed if k.startswith("fanout")), None)
    for key in missed:
        text = findings.MISSED.get(key)
        sections += [f"### {findings.TITLES.get(key, key)}: missed", ""]
        if text:
            sections += [text.strip(), ""]
        prof = None
        if key == first_fanout:
            prof = _get(doc, "fanout", "profile")
            bd = _get(doc, "fanout", "breakdown_n100")
            if bd:
                sections += [
                    f"Breakdown at N=100 ({bd['samples']} samples): send to row created in the worker "
                    f"p50 {_fmt(_get(bd, 'send_to_row_created_ms', 'p50_ms'))} ms; send to all 100 sockets "
                    f"p50 {_fmt(_get(bd, 'send_to_all_sockets_ms', 'p50_ms'))} ms.", ""]
        elif key == "scale":
            prof = _get(doc, "scale", "profile")
        elif key.startswith("ingest"):
            prof = _get(doc, "ingest", "profile")
        elif key.startswith("round_trip"):
            prof = _get(doc, "round_trip", "profile")
            for action in ("take_over", "send"):
                steps = _get(doc, "round_trip", action, "steps") or {}
                if steps:
                    sections += [f"Steps of {action.replace('_', ' ')} (p50 / p99 from the POST): " + "; ".join(
                        f"{name.replace('_', ' ')} {_fmt(v.get('p50_ms'))} / {_fmt(v.get('p99_ms'))} ms"
                        for name, v in steps.items()) + ".", ""]
        elif key.startswith("pages"):
            page = "conversation" if "conversation" in key else "inbox"
            text = _get(doc, "pages", "big", "pages", page, "profile")
            bd = _get(doc, "pages", "render_breakdown")
            if bd:
                sections += ["Render breakdown (median ms, in-process, big dataset): " + "; ".join(
                    f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in bd.items()) + ".", ""]
            if text:
                sections += ["pyinstrument, 10 requests:", "", "```", text.rstrip(), "```", ""]
        block = _profile_block(findings.TITLES.get(key, key), prof)
        if block:
            sections += [block]

    variants = variant_rows(doc)
    if variants:
        sections += ["## Proposed changes, measured (`--variant`)", "",
                     "Each variant is a settings module in `bench/variants/` that imports "
                     "`dashboard.settings` and changes one thing; `python -m bench --only SECTION "
                     "--variant NAME` runs the same section with it (results in "
                     "`bench/results/variant-NAME.json`). Compare with the table above; note "
                     "whether either run was contended (other processes' CPU is in each "
                     "section's `load`).", "",
                     "| Variant | What it changes | Section | Baseline (latest.json) | With the variant |",
                     "|---|---|---|---|---|", *variants, ""]
    sections += ["## Other findings (outside the targets)", "", findings.OTHER.strip(), ""]
    sections += [findings.METHOD.strip(), ""]
    return "\n".join(sections).rstrip() + "\n"
