"""The connection: one WebSocket at a time, kept up; the protocol core does the talking.

:class:`Connection` opens the socket and does the handshake, then runs, per
connection, a reader (frames into :meth:`ProtocolCore.receive`), a writer (frames
out of :meth:`ProtocolCore.next_frame`), a pinger and the core's timers. After a
close, :func:`classify` decides: reconnect with backoff (forever, the counter reset
after each ``connected``) or stop for good. Its whole state is one :class:`State`.
"""

from __future__ import annotations

import asyncio
import enum
import json
from dataclasses import dataclass
from typing import Any, Awaitable, Iterable, Protocol

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.protocol import State as SocketState

from ._logging import logger
from .errors import PinecallError, PinecallTimeout
from .events import DisconnectedEvent, Event, ReconnectingEvent
from .protocol import (
    FATAL_REFUSALS,
    Deliver,
    Effect,
    Policy,
    ProtocolCore,
    Timer,
    connect_frame,
    copy_error,
    handshake,
)

__all__ = ["Connection", "State", "Verdict", "Close", "classify", "failure_code", "FATAL_CODES"]


class State(enum.Enum):
    IDLE = "idle"  # not started (or the first connect() failed): connect() may be called
    CONNECTING = "connecting"  # the first connect(): opening, waiting for `connected`
    REGISTERING = "registering"  # connected; some agent is not registered yet
    READY = "ready"  # connected; every agent registered (or refused, or displaced)
    RECONNECTING = "reconnecting"  # the connection dropped: waiting out the backoff, reopening
    STOPPED = "stopped"  # stopped for good by the server (rejected key, displaced); connect() restarts
    CLOSED = "closed"  # the application closed the client
    FAILED = "failed"  # a bug stopped the client (crash-only: restart the process)


CONNECTED = (State.REGISTERING, State.READY)


class Verdict(enum.Enum):
    RETRY = "retry"  # reconnect, with backoff
    FATAL = "fatal"  # stop for good


@dataclass(frozen=True)
class Close:
    """How a connection ended: the close code and reason received (None: none received)."""

    code: int | None
    reason: str | None = None

    @classmethod
    def of(cls, exc: ConnectionClosed) -> "Close":
        return cls(exc.rcvd.code, exc.rcvd.reason) if exc.rcvd is not None else cls(None)


#: error codes that stop the client (or, for registration refusals, that agent) for good
FATAL_CODES = frozenset({"UNAUTHORIZED", "DISPLACED", "CLOSED", "INTERNAL"}) | FATAL_REFUSALS


def failure_code(failure: BaseException | Close) -> str:
    """The error code a failure is reported with."""
    if isinstance(failure, Close):
        if failure.code == 1008:
            return "UNAUTHORIZED"
        if failure.reason and "displaced" in failure.reason.lower():
            return "DISPLACED"
        return "CONNECTION_LOST"
    if isinstance(failure, PinecallError):
        return failure.code or "CONNECTION_FAILED"
    if isinstance(failure, ConnectionClosed):
        return failure_code(Close.of(failure))
    if isinstance(failure, InvalidStatus):
        return "UNAUTHORIZED" if failure.response.status_code in (401, 403) else "CONNECTION_FAILED"
    if isinstance(failure, TimeoutError):
        return "CONNECTION_TIMEOUT"
    return "CONNECTION_FAILED"  # OSError, a bad handshake or URI, a proxy's error...


def classify(failure: BaseException | Close) -> Verdict:
    """Fatal or retry, for an exception or a close.

    Fatal: a rejected key (``UNAUTHORIZED``, close 1008, HTTP 401/403), a displacement
    (close reason containing "Displaced"), ``AGENT_CONFLICT_FATAL``, ``SERVER_AT_CAPACITY``,
    a closed or failed client. Everything else (network errors, timeouts, abnormal or
    ordinary closes, ``AGENT_CONFLICT``) is worth another try.
    """
    return Verdict.FATAL if failure_code(failure) in FATAL_CODES else Verdict.RETRY


class Owner(Protocol):
    """What the connection reports to (the client's runtime)."""

    def apply(self, effects: Iterable[Effect]) -> None: ...

    def fail(self, exc: BaseException, where: str) -> None: ...


class Connection:
    """The socket side of one client. ``settings`` is read at use time (``ws_url``,
    ``api_key``, ``connect_timeout``, ``close_timeout``, ``ping_interval``,
    ``max_frame_size`` and the :class:`Policy` fields)."""

    def __init__(self, settings: Any, core: ProtocolCore, owner: Owner) -> None:
        self.settings = settings
        self.core = core
        self.owner = owner
        self._state = State.IDLE
        self._changed = asyncio.Event()  # set at every change of state
        self.error: PinecallError | None = None  # why STOPPED or FAILED
        self.ws: ClientConnection | None = None
        self.supervisor: asyncio.Task | None = None  # reads, and reconnects
        self._wake = asyncio.Event()  # the writer has something to take
        self._hangup: PinecallError | None = None  # the core asked to stop after this connection
        self._tasks: set[asyncio.Task] = set()  # this connection's writer, pinger, hang-up
        self._timers: dict[Timer, asyncio.TimerHandle] = {}

    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, new: State) -> None:
        if new is not self._state:
            self._state = new
            self._changed.set()

    @property
    def connected(self) -> bool:
        return self.state in CONNECTED

    @property
    def running(self) -> bool:
        """True while the connection loop (the only code that reconnects) runs."""
        return self.supervisor is not None and not self.supervisor.done()

    def unusable_error(self) -> PinecallError | None:
        if self.state is State.CLOSED:
            return PinecallError("the client is closed", code="CLOSED")
        if self.state in (State.STOPPED, State.FAILED):
            return self.error
        return None

    # -- driven by the runtime ----------------------------------------------------------

    async def start(self) -> None:
        """Open the first connection (tried once: raises), then keep it up in the background."""
        self.state = State.CONNECTING
        self.error = None
        try:
            ws, connected = await self._open()
        except BaseException:
            if self.state is State.CONNECTING:
                self.state = State.IDLE
            raise
        if self.state is not State.CONNECTING:  # closed (or failed) meanwhile
            await self._discard(ws)
            raise copy_error(self.unusable_error() or PinecallError("the client is closed", code="CLOSED"))
        self._begin(ws, connected)
        self.supervisor = asyncio.get_running_loop().create_task(self._run(ws), name="pinecall-connection")

    async def wait_up(self) -> None:
        """Wait until connected (again), for ``connect_timeout`` at most."""
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                while not self.connected:
                    if self.unusable_error() is not None:  # stopped for good meanwhile
                        raise copy_error(self.unusable_error())
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise PinecallTimeout(
                f"not connected within {self.settings.connect_timeout} s", code="CONNECTION_TIMEOUT"
            ) from None

    def wake(self) -> None:
        self._wake.set()

    def refresh(self) -> None:
        """REGISTERING or READY, after the core's agents changed."""
        if self.state in CONNECTED:
            self.state = State.READY if self.core.settled() else State.REGISTERING

    def schedule(self, delay: float, timer: Timer) -> None:
        old = self._timers.pop(timer, None)
        if old is not None:
            old.cancel()
        self._timers[timer] = asyncio.get_running_loop().call_later(delay, self._fire, timer)

    def hang_up(self, err: PinecallError) -> None:
        """Close this connection; it will not be reopened (``err`` is reported)."""
        self._hangup = err
        if self.ws is not None:
            self._spawn(self._discard(self.ws), "hang-up")

    def mark_failed(self, err: PinecallError) -> None:
        self.state = State.FAILED
        self.error = err

    async def close(self) -> None:
        """The application closes: no reconnect. The reader reports "disconnected"."""
        self.state = State.CLOSED
        current = asyncio.current_task()
        ws = self.ws
        if ws is not None:
            await self._discard(ws)
        sup = self.supervisor
        if sup is not None and not sup.done() and sup is not current:
            if ws is None:
                sup.cancel()  # between connections (waiting or opening): nothing to drain
            await asyncio.wait((sup,), timeout=self.settings.close_timeout)
            if not sup.done():
                sup.cancel()
        self._end_tasks()

    async def abort(self) -> Close | None:
        """After a failure: stop reading and reconnecting, close the socket. Returns how
        the socket closed, if there was one."""
        sup = self.supervisor
        if sup is not None and not sup.done() and sup is not asyncio.current_task():
            sup.cancel()
            await asyncio.wait((sup,))
        self._end_tasks()
        self.owner.apply(self.core.connection_lost())
        ws, self.ws = self.ws, None
        if ws is None:
            return None
        await self._discard(ws)
        return Close(ws.close_code, ws.close_reason)

    # -- opening ------------------------------------------------------------------------

    async def _open(self) -> tuple[ClientConnection, Event]:
        """Open the socket, send ``connect``, wait for ``connected``."""
        settings = self.settings
        ws: ClientConnection | None = None
        try:
            async with asyncio.timeout(settings.connect_timeout):
                ws = await ws_connect(
                    settings.ws_url,
                    open_timeout=None,
                    close_timeout=settings.close_timeout,
                    max_size=settings.max_frame_size,
                )
                await ws.send(json.dumps(connect_frame(settings.api_key)))
                while True:
                    step = handshake(await ws.recv())
                    if step.error is not None:
                        raise step.error
                    if step.reply is not None:
                        await ws.send(json.dumps(step.reply))
                    if step.connected is not None:
                        return ws, step.connected
        except BaseException as exc:
            if ws is not None:
                await self._discard(ws)
            if isinstance(exc, PinecallError) or not isinstance(exc, Exception):
                raise
            # A failure we cannot name (e.g. a proxy's error) keeps its cause.
            raise self._open_error(exc) from (None if _known(exc) else exc)

    def _open_error(self, exc: Exception) -> PinecallError:
        url = self.settings.ws_url
        code = failure_code(exc)
        if isinstance(exc, TimeoutError):
            return PinecallTimeout(
                f"no `connected` from {url} within {self.settings.connect_timeout} s", code=code,
            )
        if isinstance(exc, ConnectionClosed):
            close = Close.of(exc)
            if classify(close) is Verdict.FATAL:
                return PinecallError(
                    f"connection refused by {url} (close {close.code}: {close.reason or 'policy violation'})",
                    code=code,
                )
            return PinecallError(
                f"{url} closed the connection during the handshake ({exc})", code="CONNECTION_FAILED"
            )
        if isinstance(exc, InvalidStatus):
            return PinecallError(f"{url} refused the WebSocket: HTTP {exc.response.status_code}", code=code)
        if _known(exc):
            return PinecallError(f"cannot connect to {url}: {exc}", code=code)
        return PinecallError(f"cannot connect to {url}: {type(exc).__name__}: {exc}", code=code)

    # -- one connection -----------------------------------------------------------------

    def _begin(self, ws: ClientConnection, connected: Event) -> None:
        self.ws = ws
        self.state = State.REGISTERING
        self._hangup = None
        logger.info("connected to %s", self.settings.ws_url)
        self.owner.apply([Deliver(connected, None), *self.core.connection_opened()])
        self._spawn(self._write(ws), "writer")
        if self.settings.ping_interval:
            self._spawn(self._ping(self.settings.ping_interval), "ping loop")

    async def _write(self, ws: ClientConnection) -> None:
        while True:
            self._wake.clear()
            # A closing socket takes nothing more: what is queued waits for the next one.
            while ws.state is SocketState.OPEN:
                frame = self.core.next_frame()
                if frame is None:
                    break
                await ws.send(json.dumps(frame))
            await self._wake.wait()

    async def _ping(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.core.ping()
            self.wake()

    async def _read(self, ws: ClientConnection) -> Close:
        # No catch-all: a frame that cannot be read is skipped by the core, so an
        # exception here is a bug of the client and must be fatal (see Runtime.fail).
        try:
            async for message in ws:
                self.owner.apply(self.core.receive(message))
        except ConnectionClosed:
            pass
        return Close(ws.close_code, ws.close_reason)

    def _fire(self, timer: Timer) -> None:
        self._timers.pop(timer, None)
        try:
            self.owner.apply(self.core.timer_fired(timer))
        except Exception as exc:
            self.owner.fail(exc, "timer")

    def _spawn(self, coro: Awaitable[None], what: str) -> None:
        task = asyncio.get_running_loop().create_task(self._guard(coro, what), name=f"pinecall-{what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guard(self, coro: Awaitable[None], what: str) -> None:
        """Run a per-connection task: a closed socket ends it quietly, a bug is fatal."""
        try:
            await coro
        except (ConnectionClosed, asyncio.CancelledError):
            pass
        except Exception as exc:
            self.owner.fail(exc, what)

    def _end_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()

    async def _discard(self, ws: ClientConnection) -> None:
        try:
            await asyncio.wait_for(ws.close(), self.settings.close_timeout)
        except Exception:
            transport = getattr(ws, "transport", None)
            if transport is not None:
                transport.abort()

    # -- the connection loop ------------------------------------------------------------

    async def _run(self, ws: ClientConnection) -> None:
        """Read the connection; on an unexpected close, reconnect (forever) with backoff."""
        attempt = 0
        try:
            while True:
                close = await self._read(ws)
                if not self._ended(ws, close):
                    return
                while True:
                    delay = Policy.of(self.settings).reconnect_delay(attempt)
                    attempt += 1
                    logger.info(
                        "reconnecting to %s in %.2f s (attempt %d)", self.settings.ws_url, delay, attempt
                    )
                    self._tell(ReconnectingEvent(attempt=attempt, delay=delay))
                    await asyncio.sleep(delay)  # close() cancels this task while it waits
                    if self.state is not State.RECONNECTING:
                        return
                    try:
                        ws, connected = await self._open()
                    except PinecallError as err:
                        if classify(err) is Verdict.FATAL:
                            self._stop(err)
                            return
                        logger.warning("reconnect attempt %d failed: %s", attempt, err)
                        continue
                    if self.state is not State.RECONNECTING:
                        await self._discard(ws)
                        return
                    attempt = 0
                    self._begin(ws, connected)
                    break
        except Exception as exc:  # a bug (in reading, handling or reconnecting): crash-only
            self.owner.fail(exc, "connection loop")

    def _ended(self, ws: ClientConnection, close: Close) -> bool:
        """Clean up after a close. True when the client should reconnect."""
        if self.ws is ws:
            self.ws = None
        self._end_tasks()
        self.owner.apply(self.core.connection_lost())
        if self.state not in CONNECTED:  # closed by the application, or failed
            self._tell(DisconnectedEvent(code=close.code, reason=close.reason, reconnect=False))
            return False
        err, displaced = self._hangup, False
        if err is None and classify(close) is Verdict.FATAL:
            if failure_code(close) == "UNAUTHORIZED":
                err = PinecallError(
                    f"server closed the connection with 1008 ({close.reason or 'policy violation'})",
                    code="UNAUTHORIZED",
                )
            else:
                err = PinecallError(f"connection displaced: {close.reason}", code="DISPLACED")
                displaced = True
        logger.warning(
            "connection closed (code %s, reason %r)%s", close.code, close.reason,
            "" if err is None else "; not reconnecting",
        )
        self._tell(DisconnectedEvent(code=close.code, reason=close.reason, reconnect=err is None))
        if err is None:
            self.state = State.RECONNECTING
            return True
        if displaced:
            self.owner.apply(self.core.displace_all(close.reason))
        self._stop(err)
        return False

    def _tell(self, lifecycle: Event) -> None:
        self.owner.apply([Deliver(lifecycle, None)])  # the client's handlers only

    def _stop(self, err: PinecallError) -> None:
        """Stop for good (rejected key, displaced): everything pending fails, ``error`` says why."""
        logger.error("pinecall client stopped: %s", err)
        self.state = State.STOPPED
        self.error = err
        self.owner.apply(self.core.stop_all(err, report=True))


def _known(exc: BaseException) -> bool:
    """A failure to open that has a name of its own (timeouts are OSErrors too)."""
    return isinstance(exc, (OSError, InvalidHandshake, InvalidURI, ConnectionClosed))
