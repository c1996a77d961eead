"""Operators as a browser would be: a logged-in session, a live WebSocket, HTTP with CSRF."""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.cookies import SimpleCookie
from urllib.parse import urlencode

from websockets.asyncio.client import connect as ws_connect


@dataclass
class Operator:
    pk: int
    username: str
    name: str  # as the dashboard displays it
    sessionid: str


def create_operators(count: int, *, prefix: str = "op") -> list[Operator]:
    """Users in the Operators group (take over, send, hand back) with a live session each.

    Sync (ORM): run it in the harness's ORM thread. Bulk: 1,000 take well under a second.
    """
    from datetime import timedelta

    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.auth.models import Group, Permission, User
    from django.contrib.sessions.backends.db import SessionStore
    from django.contrib.sessions.models import Session
    from django.utils import timezone
    from django.utils.crypto import get_random_string

    users = User.objects.bulk_create(
        [
            User(username=f"{prefix}{i}", first_name="Bench", last_name=f"{prefix.title()}{i}",
                 password="!bench-unusable")
            for i in range(count)
        ]
    )
    group = Group.objects.filter(name="Operators").first()
    if group is not None:
        User.groups.through.objects.bulk_create(
            [User.groups.through(user_id=u.pk, group_id=group.pk) for u in users]
        )
    else:  # no migration-made groups: the permission directly
        perm = Permission.objects.get(
            content_type__app_label="conversations", codename="take_over_conversation"
        )
        User.user_permissions.through.objects.bulk_create(
            [User.user_permissions.through(user_id=u.pk, permission_id=perm.pk) for u in users]
        )
    store = SessionStore()
    expire = timezone.now() + timedelta(days=1)
    operators, sessions = [], []
    for user in users:
        key = get_random_string(32, "abcdefghijklmnopqrstuvwxyz0123456789")
        data = {
            SESSION_KEY: str(user.pk),
            BACKEND_SESSION_KEY: "django.contrib.auth.backends.ModelBackend",
            HASH_SESSION_KEY: user.get_session_auth_hash(),
        }
        sessions.append(Session(session_key=key, session_data=store.encode(data), expire_date=expire))
        operators.append(Operator(user.pk, user.username, user.get_full_name(), key))
    Session.objects.bulk_create(sessions)
    return operators


# ---------------------------------------------------------------- the live socket


class LiveClient:
    """One operator's `/ws/live/` socket; every text frame is timestamped on arrival.

    `on_frame(client, t, text)` is called for each frame (t = time.perf_counter()
    taken as the frame is handed to the harness); the last `keep` frames are kept.
    """

    def __init__(
        self,
        port: int,
        operator: Operator,
        *,
        conversation: int | None = None,
        call: int | None = None,
        keep: int = 200,
        on_frame: Callable | None = None,
    ) -> None:
        self.port = port
        self.operator = operator
        params = {"conversation": conversation} if conversation else {}
        if call:
            params["call"] = call  # a call's page: its lines and live captions
        self.url = f"ws://127.0.0.1:{port}/ws/live/" + (f"?{urlencode(params)}" if params else "")
        self.frames: deque[tuple[float, str]] = deque(maxlen=keep)
        self.count = 0
        self.on_frame = on_frame
        self.ws = None
        self._reader: asyncio.Task | None = None
        self.closed = asyncio.Event()
        self._waiters: list[tuple] = []
        self.close_code: int | None = None

    async def connect(self, timeout: float = 15.0) -> "LiveClient":
        self.ws = await ws_connect(
            self.url,
            additional_headers={"Cookie": f"sessionid={self.operator.sessionid}"},
            origin=f"http://127.0.0.1:{self.port}",
            compression=None,
            open_timeout=timeout,
            ping_interval=None,
            max_size=None,
            max_queue=None,
            close_timeout=2,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        try:
            async for text in self.ws:
                t = time.perf_counter()
                self.count += 1
                self.frames.append((t, text))
                if self.on_frame is not None:
                    self.on_frame(self, t, text)
                if self._waiters:
                    self._wake(t, text)
        except Exception:
            pass
        finally:
            for _, _, future in self._waiters:
                if not future.done():
                    future.set_exception(ConnectionError("socket closed"))
            self.close_code = self.ws.close_code if self.ws is not None else None
            self.closed.set()

    async def wait_frame(
        self, predicate: Callable[[str], bool], *, since: float, timeout: float
    ) -> tuple[float, str]:
        """The first kept frame that arrived at or after `since` and matches, waiting for it."""
        for t, text in list(self.frames):
            if t >= since and predicate(text):
                return t, text
        if self.closed.is_set():
            raise ConnectionError(f"socket closed ({self.close_code})")
        future = asyncio.get_running_loop().create_future()
        waiter = (predicate, since, future)
        self._waiters.append(waiter)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake(self, t: float, text: str) -> None:
        for predicate, since, future in list(self._waiters):
            if not future.done() and t >= since and predicate(text):
                future.set_result((t, text))

    async def close(self) -> None:
        if self.ws is not None:
            try:
                await asyncio.wait_for(self.ws.close(), 3)
            except Exception:
                pass
        if self._reader is not None:
            self._reader.cancel()


async def connect_many(clients: list[LiveClient], *, concurrency: int = 20, timeout: float = 120) -> None:
    """Open sockets a few at a time (as browsers would arrive), bounded in time."""
    sem = asyncio.Semaphore(concurrency)

    async def one(client: LiveClient) -> None:
        async with sem:
            await client.connect()

    await asyncio.wait_for(asyncio.gather(*(one(c) for c in clients)), timeout)


async def close_many(clients: list[LiveClient]) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


# ---------------------------------------------------------------- HTTP, as htmx does it


class Http:
    """A keep-alive HTTP/1.1 connection to Daphne with one operator's cookies.

    Sync, one request at a time (a lock): call it through `asyncio.to_thread`.
    POSTs carry the CSRF cookie and header and an Origin, like htmx in a browser.
    """

    def __init__(self, port: int, operator: Operator | None = None) -> None:
        self.port = port
        self.operator = operator
        self.cookies: dict[str, str] = {}
        if operator is not None:
            self.cookies["sessionid"] = operator.sessionid
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        return self._conn

    def request(
        self, method: str, path: str, *, form: dict | None = None, htmx: bool = True
    ) -> tuple[int, str, float]:
        """(status, body, seconds) for one request; cookies it sets are kept."""
        origin = f"http://127.0.0.1:{self.port}"
        headers = {"Host": f"127.0.0.1:{self.port}"}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if htmx:
            headers["HX-Request"] = "true"
        body = None
        if method == "POST":
            body = urlencode(form or {})
            headers.update(
                {
                    "Content-Type": "application/x-www-form-urlencoded",
                    "Origin": origin,
                    "Referer": origin + "/",
                    "X-CSRFToken": self.cookies.get("csrftoken", ""),
                }
            )
        with self._lock:
            for attempt in (1, 2):
                conn = self._connection()
                t0 = time.perf_counter()
                try:
                    conn.request(method, path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read().decode("utf-8", "replace")
                except (http.client.HTTPException, ConnectionError, OSError):
                    conn.close()
                    self._conn = None
                    if attempt == 2:
                        raise
                    continue
                elapsed = time.perf_counter() - t0
                for value in response.headers.get_all("Set-Cookie") or []:
                    cookie = SimpleCookie(value)
                    for key, morsel in cookie.items():
                        self.cookies[key] = morsel.value
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
                    self._conn = None
                return response.status, data, elapsed
        raise RuntimeError("unreachable")

    def fetch_csrf(self) -> str:
        """A CSRF cookie, as Django would set it: a 32-character secret (sent unmasked)."""
        import secrets
        import string

        alphabet = string.ascii_letters + string.digits
        self.cookies["csrftoken"] = "".join(secrets.choice(alphabet) for _ in range(32))
        return self.cookies["csrftoken"]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
