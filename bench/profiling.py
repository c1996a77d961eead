"""Where the time goes: py-spy on the stack's processes, pyinstrument in-process.

py-spy (`pip install py-spy`; it is in no requirements file) samples every
thread of a running process from outside without stopping it
(`--nonblocking`). Its raw output (collapsed stacks) is summarised here into
self time by area (database, templates, channel layer...) and the project's
own functions by inclusive time. Without py-spy the sections say so and skip
the profile.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections import Counter
from pathlib import Path

from bench import config

PYSPY = shutil.which("py-spy", path=str(config.VENV_BIN)) or shutil.which("py-spy")

# Where a sample's innermost frame is, by file path: the first match wins.
AREAS = [
    ("PostgreSQL driver (psycopg)", r"(^|/)psycopg(_binary|_pool)?/"),
    ("Django ORM / db", r"(^|/)django/db/"),
    ("Django templates", r"(^|/)django/template/|(^|/)django/templatetags/|/templatetags/"),
    ("Redis / channels_redis", r"(^|/)(channels_redis|redis|msgpack)/"),
    ("Daphne / Twisted / autobahn", r"(^|/)(twisted|autobahn|daphne|txaio)/"),
    ("websockets (Pinecall link)", r"(^|/)websockets/"),
    ("pinecall_sdk", r"(^|/)pinecall_sdk/"),
    ("asgiref thread hops", r"(^|/)asgiref/"),
    ("channels", r"(^|/)channels/"),
    ("logging", r"(^|/)logging/"),
    ("json", r"(^|/)json/"),
    ("threads, asyncio, selectors (waiting or switching)",
     r"(^|/)(asyncio/|selectors\.py|threading\.py|concurrent/|queue\.py|socket\.py|ssl\.py)"),
    ("Django, other", r"(^|/)django/"),
    ("project code", r"(^|/)(conversations|dashboard)/"),
]
PROJECT = re.compile(r"(^|/)(conversations|dashboard)/")
_frame = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::(?P<line>\d+))?\)$")


def available() -> bool:
    return PYSPY is not None


async def record(
    pid: int, seconds: float, out: Path, rate: int = 200, idle: bool = False
) -> Path | None:
    """py-spy record of `pid` for `seconds` into `out` (raw collapsed stacks)."""
    if PYSPY is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        PYSPY, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
        "--rate", str(rate), "--format", "raw", "--output", str(out), "--nonblocking",
        *(["--idle"] if idle else []),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), seconds + 30)
    except TimeoutError:
        proc.kill()
        return None
    if proc.returncode != 0 or not out.exists():
        (out.with_suffix(".err")).write_bytes(err or b"")
        return None
    return out


def _parse(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = []
        for raw in stack.split(";"):
            m = _frame.match(raw.strip())
            if m:
                frames.append((m.group("func"), m.group("file") or ""))
            else:
                frames.append((raw.strip(), ""))
        stacks.append((frames, n))
    return stacks


def _short(file: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def summarize(path: Path | None, *, top: int = 12) -> dict | None:
    """{"samples", "areas": [(area, pct)], "project": [(function, pct)], "leaf": [(function, pct)]}."""
    if path is None or not path.exists():
        return None
    stacks = _parse(path)
    total = sum(n for _, n in stacks)
    if not total:
        return {"samples": 0, "areas": [], "project": [], "leaf": []}
    areas: Counter = Counter()
    project: Counter = Counter()
    leaf: Counter = Counter()
    for frames, n in stacks:
        # py-spy's raw format lists the outermost frame first.
        inner_func, inner_file = frames[-1]
        for name, pattern in AREAS:
            if re.search(pattern, inner_file):
                areas[name] += n
                break
        else:
            areas["other (C code, interpreter)"] += n
        leaf[f"{inner_func} ({_short(inner_file)})"] += n
        seen = set()
        for func, file in frames:
            if PROJECT.search(file) and "site-packages" not in file:
                key = f"{func} ({_short(file)})"
                if key not in seen:
                    seen.add(key)
                    project[key] += n
    pct = lambda c: [(k, round(100.0 * v / total, 1)) for k, v in c.most_common(top)]  # noqa: E731
    return {"samples": total, "areas": pct(areas), "project": pct(project), "leaf": pct(leaf)}


def excerpt(summary: dict | None, title: str) -> str:
    """A short text block for README.md."""
    if not summary:
        return f"{title}: no profile (py-spy unavailable or failed)."
    lines = [f"{title} — {summary['samples']} samples (py-spy, all threads, idle excluded)"]
    lines.append("  self time by area:")
    lines += [f"    {p:5.1f}%  {k}" for k, p in summary["areas"][:8]]
    lines.append("  project functions, inclusive:")
    lines += [f"    {p:5.1f}%  {k}" for k, p in summary["project"][:10]]
    return "\n".join(lines)
