"""Is anything else using this 2-core machine while we measure?

CPU time is read from /proc for every process: the harness and its children
(Daphne, the worker, py-spy), the shared services (postgres, redis-server: they
serve us, and possibly others), and everything else. Each section records the
CPU that *other* processes used while it ran; a section measured while they
used more than a fifth of a core is flagged as contended.
"""

from __future__ import annotations

import os
import time

TICK = os.sysconf("SC_CLK_TCK")
SERVICES = ("postgres", "redis-server")
CONTENDED = 0.2  # cores used by others


def _stat(pid: int | str) -> tuple[str, int, int]:
    """(comm, ppid, utime + stime in ticks) of one process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    # comm is in parentheses and may hold spaces
    comm = data[data.index("(") + 1 : data.rindex(")")]
    fields = data[data.rindex(")") + 2 :].split()
    return comm, int(fields[1]), int(fields[11]) + int(fields[12])


def _processes() -> dict[int, tuple[str, int, int]]:
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            out[int(name)] = _stat(name)
        except OSError:
            continue
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) one process has used so far."""
    return _stat(pid)[2] / TICK


def _ours(procs: dict) -> set[int]:
    me = os.getpid()
    ours = {me}
    changed = True
    while changed:
        changed = False
        for pid, (_, ppid, _) in procs.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                changed = True
    return ours


class Meter:
    """CPU seconds by ours / services / others between start() and stop().

    /proc is sampled every second on a thread, so processes that come and go
    (a Daphne that is stopped, another session's test run) are counted too,
    give or take their last second.
    """

    INTERVAL = 1.0

    def start(self) -> "Meter":
        import threading

        self.t0 = time.monotonic()
        self.last = _processes()
        self.sums = {"ours": 0, "services": 0, "others": 0}
        self.top: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-load", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            self._sample()

    def _sample(self) -> None:
        now = _processes()
        ours = _ours(now)
        for pid, (comm, _, ticks) in now.items():
            prev = self.last.get(pid)
            delta = ticks - (prev[2] if prev and prev[0] == comm else 0)
            if delta <= 0:
                continue
            if pid in ours:
                self.sums["ours"] += delta
            elif comm in SERVICES:
                self.sums["services"] += delta
            else:
                self.sums["others"] += delta
                self.top[comm] = self.top.get(comm, 0) + delta
        self.last = now

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(5)
        self._sample()
        wall = max(1e-6, time.monotonic() - self.t0)
        cores = {k: round(v / TICK / wall, 2) for k, v in self.sums.items()}
        top = sorted(self.top.items(), key=lambda kv: -kv[1])[:5]
        return {
            "wall_seconds": round(wall, 1),
            "cores_used": cores,
            "others_top": {k: round(v / TICK / wall, 2) for k, v in top},
            "contended": cores["others"] > CONTENDED,
            "loadavg": _loadavg(),
        }


def _loadavg() -> list[str]:
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def others_cores(seconds: float = 2.0) -> float:
    meter = Meter()
    meter.INTERVAL = seconds / 2
    meter.start()
    time.sleep(seconds)
    return meter.stop()["cores_used"]["others"]


def wait_for_quiet(log, *, limit: float) -> dict:
    """Wait (at most `limit` s) until other processes use less than CONTENDED cores."""
    t0 = time.monotonic()
    used = others_cores()
    while used > CONTENDED and time.monotonic() - t0 < limit:
        log(f"other processes use {used:.2f} cores: waiting for a quieter machine...")
        time.sleep(5)
        used = others_cores()
    return {"others_cores_at_start": used, "waited_seconds": round(time.monotonic() - t0, 1)}
