"""The whole product running for real: Daphne and the worker as processes, the
simulator in this process (on a thread of its own), Chromium driven by Playwright.

The stack gets a database of its own (PostgreSQL when DATABASE_URL is set, a
temporary SQLite file otherwise) and the channel layer of REDIS_URL when set.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import pytest
from playwright.sync_api import expect

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PASSWORD = "e2e-password-1"


def pytest_collection_modifyitems(items):
    """Mark the browser tests and run them last: Playwright's sync API keeps an event
    loop on the main thread until the session ends, which async tests cannot share."""
    browser_tests = [item for item in items if "tests/e2e/" in str(item.fspath)]
    for item in browser_tests:
        item.add_marker(pytest.mark.e2e)
        items.remove(item)
    items.extend(browser_tests)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SimulatorThread:
    """The Pinecall simulator on its own event loop, callable from sync tests."""

    def __init__(self, **options) -> None:
        from pinecall_sdk.simulator import Simulator

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sim = Simulator(host="127.0.0.1", port=0, **options)
        self.call(self.sim.start())

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def customer_says(self, **kwargs) -> dict:
        return self.call(self.sim.customer_says(**kwargs))

    def place_call(self, **kwargs) -> str:
        return self.call(self.sim.place_call(**kwargs))

    def wait_for(self, event: str, timeout: float = 15.0, **match) -> dict:
        return self.call(self.sim.wait_for(event, timeout=timeout, **match), timeout + 5)

    def stop(self) -> None:
        self.call(self.sim.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _e2e_database(tmp_dir: Path) -> tuple[str, callable]:
    """A database for the stack alone, and how to drop it."""
    base = os.environ.get("DATABASE_URL", "")
    if not base.startswith("postgres"):
        return f"sqlite:///{tmp_dir / 'e2e.sqlite3'}", lambda: None
    import psycopg

    name = f"e2e_{uuid.uuid4().hex[:10]}"
    parts = urlparse(base)
    admin_url = urlunparse(parts._replace(path="/postgres"))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return urlunparse(parts._replace(path=f"/{name}")), drop


@dataclass
class Stack:
    base_url: str
    env: dict
    sim: SimulatorThread
    processes: list[subprocess.Popen] = field(default_factory=list)
    logs: Path | None = None

    def manage(self, *args: str, input: str | None = None) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env,
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result.stdout

    def shell(self, code: str) -> str:
        """Run Python in the stack's Django (for setup and for checking the database)."""
        return self.manage("shell", "--no-imports", "-c", code).strip()

    def create_user(self, username: str, *, role: str = "Operators", first_name: str = "") -> str:
        self.shell(
            "from django.contrib.auth.models import Group, User\n"
            f"u = User.objects.create_user({username!r}, password={PASSWORD!r}, "
            f"first_name={first_name or username.title()!r})\n"
            f"u.groups.add(*Group.objects.filter(name={role!r}))\n"
        )
        return username


def _wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    database_url, drop_database = _e2e_database(tmp)
    sim = SimulatorThread(ai_delay=0.2, status_delay=0.05)
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "PINECALL_URL": sim.sim.url,
        "PINECALL_API_KEY": "e2e-key",
        "PINECALL_PHONE_NUMBERS": "+14155550100",
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        # Collected like a deployment (hashed, compressed), from this checkout's files.
        "DJANGO_STATIC_ROOT": str(tmp / "static"),
        "WORKER_SPOOL_DIR": str(tmp / "spool"),
        "PYTHONUNBUFFERED": "1",
    }
    if os.environ.get("REDIS_URL"):
        # A Redis database of its own, next to the suite's (two runs side by side must
        # not hear each other's broadcasts: their conversations share ids).
        base = urlparse(os.environ["REDIS_URL"])
        suite_db = int((base.path or "/0").strip("/") or 0)
        env["REDIS_URL"] = urlunparse(base._replace(path=f"/{(suite_db + 3) % 16}"))
    stack = Stack(base_url=f"http://127.0.0.1:{port}", env=env, sim=sim, logs=tmp)
    try:
        stack.manage("migrate", "--noinput", "-v0")
        stack.manage("collectstatic", "--noinput", "-v0")
        if env.get("REDIS_URL"):
            import redis

            redis.Redis.from_url(env["REDIS_URL"]).flushdb()
        if env.get("REDIS_URL"):
            # Production's shape: Daphne and the worker as separate processes over Redis.
            commands = {
                "daphne": [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                           "dashboard.asgi:application"],
                "worker": [sys.executable, "manage.py", "runworker", "pinecall"],
            }
        else:
            # Embedded: one process, so the in-process channel layer reaches every socket.
            commands = {
                "serve": [sys.executable, "manage.py", "serve", "--port", str(port),
                          "--no-simulator"],
            }
        for name, command in commands.items():
            log = (tmp / f"{name}.log").open("wb")
            stack.processes.append(
                subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
        _wait_http(f"{stack.base_url}/login/")
        sim.wait_for("channel.add", timeout=30)
        yield stack
    finally:
        for process in stack.processes:
            process.terminate()
        for process in stack.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        sim.stop()
        drop_database()


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        message = "Debian's chromium is needed for the browser tests (make test installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def new_page(browser, stack):
    """A fresh browser context (its own cookies) per call: one per operator."""
    contexts = []

    def make(*, username: str | None = None, width: int = 1400, height: int = 900):
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15_000)
        dialogs = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
        page.dialogs = dialogs
        if username:
            page.goto(f"{stack.base_url}/login/")
            page.fill("input[name=username]", username)
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit], input[type=submit]")
            page.wait_for_url(f"{stack.base_url}/")
            # Logged in and live: what happens from here on reaches this page.
            expect(page.locator("#live-status")).to_have_attribute("data-state", "live")
        return page

    yield make
    for context in contexts:
        context.close()
