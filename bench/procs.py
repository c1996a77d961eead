"""Subprocesses of the stack: started in their own process group, always stopped.

Every process started here is registered; `stop_all()` (called from the CLI's
finally and from signal handlers) kills whatever is left, group by group.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from bench import config

_running: list["Proc"] = []


class Proc:
    def __init__(self, name: str, args: list[str], env: dict, log: Path) -> None:
        self.name = name
        self.args = args
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = log.open("ab")
        self.popen = subprocess.Popen(
            args,
            cwd=config.ROOT,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own group: killpg reaches its children too
        )
        self.pid = self.popen.pid
        _running.append(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the group, wait, then SIGKILL whatever is left."""
        if self.alive():
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                try:
                    self.popen.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        else:
            # The leader is gone; its group may not be.
            self._signal(signal.SIGKILL)
        self._log_file.close()
        if self in _running:
            _running.remove(self)
        return self.popen.returncode

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_problems(self) -> dict:
        """What this process logged as errors: ERROR lines, and exceptions by their last line."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return {}
        error_lines = sum(1 for line in lines if " ERROR " in line)
        exceptions: dict[str, int] = {}
        for prev, line in zip(lines, lines[1:]):
            if (
                prev.startswith("    ")
                and line[:1].isalpha()
                and ("Error" in line.split(":")[0] or "Exception" in line.split(":")[0])
            ):
                key = line[:160]
                exceptions[key] = exceptions.get(key, 0) + 1
        return {"error_lines": error_lines, "exceptions": exceptions} if error_lines or exceptions else {}

    def rss_kb(self) -> int:
        """VmRSS of the leader process, in kB."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for {self.pid}")


def stop_all() -> None:
    for proc in list(reversed(_running)):
        proc.stop(timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_http(port: int, proc: Proc, timeout: float = 60.0) -> None:
    """Until the server answers an HTTP request on 127.0.0.1:port (or dies, or time is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), 2
            )
            writer.write(b"GET /login/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            if line.startswith(b"HTTP/"):
                return
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{proc.name} did not answer on port {port} within {timeout} s")


def daphne(port: int, env: dict, log: Path, *, app: str = "dashboard.asgi:application",
           name: str = "daphne") -> Proc:
    return Proc(
        name,
        [str(config.VENV_BIN / "daphne"), "-b", "127.0.0.1", "-p", str(port), app],
        env,
        log,
    )


def worker(env: dict, log: Path) -> Proc:
    return Proc(
        "worker",
        [str(config.VENV_BIN / "python"), "manage.py", "runworker", "pinecall"],
        env,
        log,
    )


def manage(args: list[str], env: dict, log: Path, timeout: float = 300) -> None:
    """A one-off manage.py command (migrate), bounded in time."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        result = subprocess.run(
            [str(config.VENV_BIN / "python"), "manage.py", *args],
            cwd=config.ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
        )
    if result.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} failed; see {log}")
