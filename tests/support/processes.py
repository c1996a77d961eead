"""Real processes for the fault and failover tests: the worker, Daphne, the test database.

Shared by tests/conversations/test_faults.py and test_leadership.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.db import connection

from pinecall_sdk.simulator import Simulator
from tests.support.tcp_proxy import TcpProxy

ROOT = Path(__file__).resolve().parents[2]


def _test_db() -> dict:
    return connection.settings_dict


def _is_postgres() -> bool:
    return "postgresql" in _test_db()["ENGINE"]


def require_postgres() -> None:
    if _is_postgres():
        return
    url = os.environ.get("DATABASE_URL", "")
    if os.environ.get("CI") == "true" and url.startswith(("postgres", "pgsql")):
        pytest.fail(f"CI with DATABASE_URL={url!r}, but the tests run on {_test_db()['ENGINE']}")
    pytest.skip(
        "needs PostgreSQL: set DATABASE_URL=postgres://... (a TCP proxy in front of "
        "SQLite, a local file, means nothing)"
    )


def database_url(*, via_port: int | None = None) -> str:
    """The URL of the test database pytest-django created; through 127.0.0.1:via_port if given."""
    db = _test_db()
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    host, port = db["HOST"] or "127.0.0.1", db["PORT"] or 5432
    if via_port is not None:
        host, port = "127.0.0.1", via_port
    return f"postgres://{auth}@{host}:{port}/{db['NAME']}"


def start_worker(sim: Simulator, log: Path, db_url: str | None = None, **extra_env: str):
    """`manage.py runworker pinecall` against `sim`, logging to `log`.

    Its spool is `<log's folder>/spool`: a worker restarted with the same log finds what
    the previous one left (as on a real host), and no test sees another's leftovers
    (the default, BASE_DIR/var/spool, is shared by every worker run from this checkout).
    """
    env = {
        **os.environ,
        "WORKER_SPOOL_DIR": str(log.parent / "spool"),
        **extra_env,
        "DATABASE_URL": db_url or database_url(),
        "PINECALL_URL": sim.url,
        "PINECALL_API_KEY": "test-key",
        "PYTHONUNBUFFERED": "1",
    }
    return subprocess.Popen(
        [sys.executable, "manage.py", "runworker", "pinecall"],
        cwd=ROOT,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def start_daphne(port: int, log: Path, db_url: str) -> subprocess.Popen:
    env = {**os.environ, "DATABASE_URL": db_url, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
         "dashboard.asgi:application"],
        cwd=ROOT,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def stop_process(process: subprocess.Popen | None, timeout: float = 20) -> int | None:
    """SIGTERM, then SIGKILL if it does not go within `timeout`."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(10)


async def astop(process: subprocess.Popen | None) -> int | None:
    return await asyncio.to_thread(stop_process, process)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def wait_until(check, timeout: float = 30.0, what: str = "condition"):
    """Poll a sync check (ORM allowed) until it returns something truthy; return that."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await sync_to_async(check)()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not true within {timeout} s")
        await asyncio.sleep(0.1)


def open_pg_proxy() -> TcpProxy:
    """A started TcpProxy in front of the test database's PostgreSQL (PostgreSQL only)."""
    require_postgres()
    db = _test_db()
    return TcpProxy(db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432)).start()
