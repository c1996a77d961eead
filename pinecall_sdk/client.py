"""The asyncio Pinecall client: one WebSocket, agents, WhatsApp channels, human takeover.

Quick tour::

    pc = Pinecall(api_key="...", url="ws://127.0.0.1:8765")
    support = pc.agent("support", language="en", llm="openai/gpt-4.1-mini", prompt="...")
    support.add_whatsapp(phone_number_id="123", access_token="EAA...")

    @support.on("whatsapp.message")
    async def on_message(event):          # plain functions work too
        print(event.session_id, event.from_, event.text, event.paused)

    await pc.connect()                    # returns once the server said `connected`
    await support.wait_registered(timeout=10)
    await support.pause("wa-abc123")      # returns the session.paused confirmation
    await support.send_message(session_id="wa-abc123", contact="34612345678", text="Hi")
    await support.resume("wa-abc123")
    history = await support.get_history("wa-abc123")   # [{"role": "user", "content": ...}, ...]
    await pc.close()

Delivery guarantees of commands (``pause``, ``resume``, ``send_message``):

* A command issued while the client is disconnected, or before its agent is
  registered, waits in a per-agent queue and is sent once, in order, right after
  the agent is (re-)registered and its channels re-added. If the caller's timeout
  expires while the command still waits, it is withdrawn and never sent.
* A command that was already written to the socket when the connection dropped is
  **not** resent (it may or may not have been executed): the call fails at once
  with ``PinecallError(code="CONNECTION_LOST")``. The caller decides whether to
  retry (pause/resume are idempotent; a resent ``send_message`` may duplicate).
* Frames carry no request id: confirmations (``session.paused``, ``session.resumed``,
  ``session.sent``) and ``error`` frames are matched to commands by event and target,
  first in first out, per agent. ``session.paused``/``session.resumed`` only match a
  command with exactly that target (they also arrive unsolicited, as state);
  ``session.sent`` falls back to the oldest send in flight (the server may answer a
  contact send with the session it used). An ``error`` goes to the oldest command in
  flight for its ``session_id``, else to the oldest command in flight; an error no
  command is waiting for goes to the ``"error"`` handlers.
  Caveat: a server that *repeats* earlier events after a reconnect (the simulator
  replays the last few, ``session.paused`` included) can make an old confirmation
  with the same event and target confirm a command flushed right after re-registration
  a little early; the state it reports is the same.
* Timeouts: ``command_timeout`` (or ``timeout=`` per call) covers the wait in the
  queue and for the confirmation: :class:`PinecallTimeout` (code ``TIMEOUT``).
* ``get_history`` follows the same rules (queued, not resent, timed out). Its answer,
  ``history.data``, is matched by the ``request_id`` the server echoes; from a server
  that echoes none, by ``call_id`` and else first in first out.

Connection: ``connect()`` tries once and raises (``UNAUTHORIZED``, ``CONNECTION_TIMEOUT``,
``CONNECTION_FAILED``). After that, any unexpected close is followed by reconnects,
forever, ``min(1 s * 2**attempt, 30 s)`` + 0-25 % jitter apart, and by a full
re-registration (``agent.create``, ``channel.add``, queued commands). The client stops
for good (``"disconnected"`` with ``reconnect=False`` and a fatal ``"error"``) after
``close()``, a rejected key (``UNAUTHORIZED`` / close 1008) or a displacement (close
reason containing "Displaced", or ``agent.displaced`` for all its agents); a later
explicit ``connect()`` starts again. Registration refusals: ``AGENT_CONFLICT`` /
``AGENT_IN_USE`` are retried with backoff (at least ``retry_after_s``) for
``conflict_give_up_after`` (90 s), then reported; ``AGENT_CONFLICT_FATAL`` and
``SERVER_AT_CAPACITY`` are reported at once. A refused agent stays unregistered on that
connection (its commands fail with the refusal's code) until the next connection or
``agent.reregister()``.

After a reconnect, events may be missing or repeated (the protocol promises at most
once per connection): deduplicate by ``message_id``; the client does not.

Events are handed to handlers in arrival order by one dispatch task, so a slow
handler delays later handlers but never the socket reader (pings and confirmations
keep flowing). Exceptions in handlers are logged and swallowed.

Hostile or odd frames never stop the client: a frame that cannot be decoded or is not
a JSON object with an ``event`` string (invalid UTF-8, not JSON, nesting deep enough
for a RecursionError, ``[]``, ``null``...) is logged in one line (truncated) and
skipped; a known field of the wrong type is read leniently (see ``parse_event``) and
the event is delivered. Frames are parsed whatever their size up to ``max_frame_size``
(16 MiB; nothing in this protocol comes near it, a WhatsApp text is at most 4096
characters), so a large but valid frame, such as a long transcript, is delivered, not
set aside. A bigger frame makes websockets close the connection (1009) and the client
reconnects; that limit only bounds the memory one frame may take.

Crash-only: if an unexpected exception escapes the client's own loops (reading and
handling frames, dispatching, registering, pinging; a bug, never a handler's
exception), the client does not idle on. It stops for good: ``failure`` is that
exception, every pending command fails with ``PinecallError(code="INTERNAL")``, the
socket is closed, ``"disconnected"`` (``reconnect=False``) and a fatal ``"error"``
are delivered after the events already received, and then the ``"fatal"`` handlers
are called with the exception and ``wait_failed()`` returns it. The process should
exit and be restarted (the server keeps the agent's events meanwhile).

The client is not thread-safe: use it from the event loop that called ``connect()``
(from another thread, go through ``asyncio.run_coroutine_threadsafe``).
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import itertools
import json
import logging
import os
import random
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Union

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.protocol import State
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
)

from .errors import PinecallError, PinecallInvalidArgument, PinecallTimeout
from .events import (
    AgentDisplacedEvent,
    DisconnectedEvent,
    ErrorEvent,
    Event,
    EVENT_CLASSES,
    HistoryDataEvent,
    ReconnectingEvent,
    RegisteredEvent,
    parse_event,
)

__all__ = ["Pinecall", "Agent", "reconnect_delay", "DEFAULT_URL"]

logger = logging.getLogger("pinecall_sdk")

DEFAULT_URL = "wss://voice.pinecall.io"

Handler = Callable[[Event], Union[None, Awaitable[None]]]

#: registration refusals that are retried with backoff
CONFLICT_RETRY_CODES = frozenset({"AGENT_CONFLICT", "AGENT_IN_USE"})
#: registration refusals that stop the registration of that agent
REGISTRATION_FATAL_CODES = frozenset({"AGENT_CONFLICT_FATAL", "SERVER_AT_CAPACITY"})

_CONFIRMATIONS = {
    "session.paused": "session.pause",
    "session.resumed": "session.resume",
    "session.sent": "session.send",
}

_LOG_TEXT_MAX = 200


def reconnect_delay(
    attempt: int,
    *,
    base: float = 1.0,
    cap: float = 30.0,
    jitter: float = 0.25,
    rand: Callable[[], float] = random.random,
) -> float:
    """Delay before reconnect attempt number ``attempt`` (0 for the first one).

    ``min(base * 2**attempt, cap)`` plus 0 to ``jitter`` (25 %) of that, at random.
    """
    exponent = min(max(int(attempt), 0), 64)  # 2.0**64 is plenty; avoids overflow
    delay = min(base * (2.0**exponent), cap)
    return delay + delay * jitter * rand()


def _truncate(text: str | bytes, limit: int = _LOG_TEXT_MAX) -> str:
    """At most ``limit`` characters of a frame for a log line (bytes shown escaped)."""
    head = text[:limit]
    shown = head if isinstance(head, str) else repr(bytes(head))
    if len(text) <= limit:
        return shown
    return f"{shown}... ({len(text)} {'chars' if isinstance(text, str) else 'bytes'})"


class _EscapeUnprintable(logging.Filter):
    """Escape NUL and lone surrogates in this logger's lines.

    Wire text may hold both (they are delivered as sent); a lone surrogate cannot be
    written to a UTF-8 log stream, so the line would be lost in a logging error.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True  # a bad format string: let the handler report it as usual
        safe = _escape_unprintable(message)
        if safe != message:
            record.msg, record.args = safe, ()
        if record.exc_info and not record.exc_text:
            trace = logging.Formatter().formatException(record.exc_info)
            if _escape_unprintable(trace) != trace:  # else leave it to the handler's formatter
                record.exc_text = _escape_unprintable(trace)
        return True


def _escape_unprintable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


logger.addFilter(_EscapeUnprintable())


def _copy_error(err: PinecallError) -> PinecallError:
    """A fresh exception of the same kind (raising one instance many times grows its traceback)."""
    if isinstance(err, PinecallTimeout):
        return PinecallTimeout(err.message, code=err.code, frame=err.frame)
    return PinecallError(err.message, code=err.code, frame=err.frame)


def _mark_retrieved(fut: asyncio.Future) -> None:
    # Keep asyncio quiet about exceptions nobody awaited (e.g. a caller gone).
    if not fut.cancelled():
        fut.exception()


def _check_target(session_id: Any, contact: Any) -> None:
    for name, value in (("session_id", session_id), ("contact", contact)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise PinecallInvalidArgument(f"{name} must be a non-empty string, not {value!r}")


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
    ):
        raise PinecallInvalidArgument(f"timeout must be a positive number or None, not {timeout!r}")


@dataclass(eq=False)
class _Command:
    seq: int
    agent: "Agent"
    kind: str  # "session.pause" | "session.resume" | "session.send" | "history.get"
    frame: dict[str, Any]
    session_id: str | None  # for history.get: the call_id
    contact: str | None
    future: asyncio.Future | None  # None: fire-and-forget frame (a late channel.add)
    request_id: str | None = None
    sent: bool = False

    def describe(self) -> str:
        if self.session_id and self.contact:
            target = f"session {self.session_id!r} / contact {self.contact!r}"
        elif self.session_id:
            target = f"session {self.session_id!r}"
        elif self.contact:
            target = f"contact {self.contact!r}"
        else:
            target = "the whole agent"
        return f"{self.kind} for {target} (agent {self.agent.agent_id!r})"


class Agent:
    """One Pinecall agent on the client's connection. Make it with :meth:`Pinecall.agent`."""

    def __init__(self, client: "Pinecall", agent_id: str, config: dict[str, Any]) -> None:
        self._client = client
        self.agent_id = agent_id
        self.config: dict[str, Any] = {k: v for k, v in config.items() if v is not None}
        self._whatsapp: dict[str, Any] | None = None
        self._handlers: dict[str, list[Handler]] = collections.defaultdict(list)
        self._outbox: collections.deque[_Command] = collections.deque()
        self._inflight: list[_Command] = []
        self._wake = asyncio.Event()
        self._registered = False
        self._reg_future: asyncio.Future | None = None
        self._reg_task: asyncio.Task | None = None
        self._failure: PinecallError | None = None
        self._displaced = False
        self._waiters: list[asyncio.Future] = []

    def __repr__(self) -> str:
        return f"<Agent {self.agent_id!r} registered={self._registered}>"

    # -- configuration -------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.agent_id

    @property
    def registered(self) -> bool:
        """True while the agent is registered on the live connection (channels added)."""
        return self._registered

    @property
    def displaced(self) -> bool:
        """True once another connection took this agent over (it is not re-registered)."""
        return self._displaced

    @property
    def whatsapp(self) -> dict[str, Any] | None:
        """The WhatsApp channel settings given to :meth:`add_whatsapp`, if any."""
        return dict(self._whatsapp) if self._whatsapp else None

    def add_whatsapp(
        self,
        phone_number_id: str,
        access_token: str,
        verify_token: str | None = None,
        app_secret: str | None = None,
        *,
        phone: str | None = None,
    ) -> None:
        """Attach the agent to a WhatsApp business number.

        Sent as ``channel.add`` after every (re-)registration; if the agent is
        already registered, it is sent now (after any command already queued).
        ``verify_token``, ``app_secret`` and ``phone`` go out only when set (not None, not "").
        """
        for name, value in (("phone_number_id", phone_number_id), ("access_token", access_token)):
            if not isinstance(value, str) or not value:
                raise PinecallInvalidArgument(f"{name} must be a non-empty string")
        for name, value in (("verify_token", verify_token), ("app_secret", app_secret), ("phone", phone)):
            if value is not None and not isinstance(value, str):
                raise PinecallInvalidArgument(f"{name} must be a string or None")
        # Optional settings are sent only when set; "" (an unset env var) counts as unset.
        self._whatsapp = {
            "phone_number_id": phone_number_id,
            "access_token": access_token,
            "verify_token": verify_token or None,
            "app_secret": app_secret or None,
            "phone": phone or None,
        }
        if self._registered:
            self._outbox.append(
                _Command(
                    seq=next(self._client._seq), agent=self, kind="channel.add",
                    frame=self._channel_frame(), session_id=None, contact=None, future=None,
                )
            )
            self._wake.set()

    def _create_frame(self) -> dict[str, Any]:
        frame: dict[str, Any] = {"event": "agent.create", "agent_id": self.agent_id}
        frame.update((k, v) for k, v in self.config.items() if v is not None)
        return frame

    def _channel_frame(self) -> dict[str, Any]:
        wa = self._whatsapp or {}
        frame: dict[str, Any] = {
            "event": "channel.add",
            "agent_id": self.agent_id,
            "type": "whatsapp",
            "ref": wa["phone_number_id"],
            "accessToken": wa["access_token"],
        }
        if wa.get("verify_token") is not None:
            frame["verifyToken"] = wa["verify_token"]
        if wa.get("app_secret") is not None:
            frame["appSecret"] = wa["app_secret"]
        if wa.get("phone") is not None:
            frame["phone"] = wa["phone"]
        return frame

    # -- handlers ------------------------------------------------------------------

    def on(self, event: str, handler: Handler | None = None) -> Any:
        """Call ``handler(event)`` for this agent's events named ``event`` (``"*"``: all).

        Works as a decorator too: ``@agent.on("whatsapp.message")``.
        """
        return self._client._add_handler(self._handlers, event, handler)

    def off(self, event: str, handler: Handler) -> None:
        """Remove a handler added with :meth:`on`."""
        try:
            self._handlers[event].remove(handler)
        except ValueError:
            pass

    # -- commands ------------------------------------------------------------------

    async def pause(
        self, session_id: str | None = None, *, contact: str | None = None, timeout: float | None = None
    ) -> Event:
        """Pause the AI: one session, every session of ``contact``, or (no arguments) the agent.

        Returns the ``session.paused`` confirmation. Raises :class:`PinecallError` when the
        server answers with ``error``, :class:`PinecallTimeout` without an answer in time.
        """
        return await self._target_command("session.pause", session_id, contact, timeout)

    async def resume(
        self, session_id: str | None = None, *, contact: str | None = None, timeout: float | None = None
    ) -> Event:
        """Hand back to the AI; same three shapes as :meth:`pause`.

        ``resume()`` with no target clears every pause level on the server.
        """
        return await self._target_command("session.resume", session_id, contact, timeout)

    async def send_message(
        self,
        session_id: str | None = None,
        contact: str | None = None,
        text: str | None = None,
        *,
        timeout: float | None = None,
    ) -> Event:
        """Send ``text`` on WhatsApp as a human; returns the ``session.sent`` confirmation.

        Needs ``session_id`` or ``contact``; give both so the server can fall back to a
        direct send when the session has ended.
        """
        _check_target(session_id, contact)
        if session_id is None and contact is None:
            raise PinecallInvalidArgument("send_message needs session_id or contact")
        if not isinstance(text, str) or not text.strip():
            raise PinecallInvalidArgument("send_message needs a non-empty text")
        _check_timeout(timeout)
        frame: dict[str, Any] = {"event": "session.send", "agent_id": self.agent_id}
        if session_id is not None:
            frame["session_id"] = session_id
        if contact is not None:
            frame["contact"] = contact
        frame["text"] = text
        return await self._command("session.send", frame, session_id, contact, timeout)

    async def get_history(self, session_id: str, timeout: float | None = None) -> list[dict[str, Any]]:
        """The server's chat history of a WhatsApp session, oldest first.

        Entries are ``{"role": "user"|"assistant", "content": "..."}`` (customer messages
        have role ``user``; servers may add keys). Sends ``history.get`` with
        ``call_id=session_id`` and a fresh ``request_id``. Raises :class:`PinecallError`
        with code ``SESSION_NOT_FOUND`` when the server has no such session, and
        :class:`PinecallTimeout` without an answer in time. Entries that are not
        objects are left out (``history.data`` handlers still see them in ``raw``).
        """
        _check_target(session_id, None)
        if session_id is None:
            raise PinecallInvalidArgument("get_history needs a session_id")
        _check_timeout(timeout)
        request_id = uuid.uuid4().hex
        frame = {
            "event": "history.get",
            "agent_id": self.agent_id,
            "call_id": session_id,
            "request_id": request_id,
        }
        reply = await self._command("history.get", frame, session_id, None, timeout, request_id)
        return [entry for entry in reply.messages or () if isinstance(entry, dict)]

    async def _target_command(
        self, kind: str, session_id: str | None, contact: str | None, timeout: float | None
    ) -> Event:
        _check_target(session_id, contact)
        if session_id is not None and contact is not None:
            raise PinecallInvalidArgument(
                f"{kind.split('.')[1]}: give session_id or contact, not both"
            )
        _check_timeout(timeout)
        frame: dict[str, Any] = {"event": kind, "agent_id": self.agent_id}
        if session_id is not None:
            frame["session_id"] = session_id
        if contact is not None:
            frame["contact"] = contact
        return await self._command(kind, frame, session_id, contact, timeout)

    async def _command(
        self,
        kind: str,
        frame: dict[str, Any],
        session_id: str | None,
        contact: str | None,
        timeout: float | None,
        request_id: str | None = None,
    ) -> Event:
        client = self._client
        client._raise_if_unusable()
        if self._failure is not None:
            raise _copy_error(self._failure)
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_mark_retrieved)
        cmd = _Command(
            seq=next(client._seq), agent=self, kind=kind, frame=frame,
            session_id=session_id, contact=contact, future=fut, request_id=request_id,
        )
        self._outbox.append(cmd)
        self._wake.set()
        limit = client.command_timeout if timeout is None else timeout
        try:
            await asyncio.wait((fut,), timeout=limit)
        except asyncio.CancelledError:
            self._withdraw(cmd)
            raise
        if not fut.done():
            was_sent = cmd.sent
            self._withdraw(cmd)
            state = (
                "sent, but the server did not confirm it"
                if was_sent
                else "never sent (agent not registered yet); it has been withdrawn"
            )
            raise PinecallTimeout(f"{cmd.describe()}: no answer within {limit} s ({state})")
        return fut.result()

    def _withdraw(self, cmd: _Command) -> None:
        if cmd.future is not None and not cmd.future.done():
            cmd.future.cancel()
        try:
            self._outbox.remove(cmd)
        except ValueError:
            pass
        try:
            self._inflight.remove(cmd)
        except ValueError:
            pass

    def _fail_all(self, err: PinecallError, *, queued: bool = True) -> None:
        """Fail in-flight commands (and, with ``queued``, the queued ones) with ``err``."""
        cmds = list(self._inflight)
        self._inflight.clear()
        if queued:
            cmds.extend(self._outbox)
            self._outbox.clear()
        for cmd in cmds:
            if cmd.future is not None and not cmd.future.done():
                cmd.future.set_exception(_copy_error(err))

    # -- registration --------------------------------------------------------------

    async def wait_registered(self, timeout: float | None = None) -> None:
        """Wait until the agent is registered (again) on a live connection.

        Raises :class:`PinecallTimeout` after ``timeout`` seconds, and
        :class:`PinecallError` when registration was given up (conflict, capacity,
        displaced, rejected key, client closed).
        """
        if self._registered:
            return
        err = self._client._unusable_error() or self._failure
        if err is not None:
            raise _copy_error(err)
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_mark_retrieved)
        self._waiters.append(fut)
        try:
            await asyncio.wait((fut,), timeout=timeout)
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)
        if not fut.done():
            fut.cancel()
            raise PinecallTimeout(f"agent {self.agent_id!r} not registered within {timeout} s")
        fut.result()

    def reregister(self) -> None:
        """Try to register again after a registration was given up or the agent displaced.

        Registration happens now if the client is connected, else on the next connection.
        (Registering a displaced agent takes it back from the other connection.)
        """
        self._failure = None
        self._displaced = False
        client = self._client
        if client._ws is not None and client._connected and not self._registered:
            self._start_registration(client._ws)

    def _resolve_waiters(self, err: PinecallError | None) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if fut.done():
                continue
            if err is None:
                fut.set_result(None)
            else:
                fut.set_exception(_copy_error(err))

    def _start_registration(self, ws: ClientConnection) -> None:
        if self._reg_task is not None and not self._reg_task.done():
            self._reg_task.cancel()
        self._registered = False
        task = asyncio.get_running_loop().create_task(
            self._client._guard(self._register(ws), f"registration of agent {self.agent_id!r}"),
            name=f"pinecall-register-{self.agent_id}",
        )
        self._reg_task = task
        self._client._conn_tasks.add(task)
        task.add_done_callback(self._client._conn_tasks.discard)

    async def _register(self, ws: ClientConnection) -> None:
        client = self._client
        loop = asyncio.get_running_loop()
        first_refusal: float | None = None
        retries = 0
        while True:
            fut = loop.create_future()
            self._reg_future = fut
            logger.debug("registering agent %r", self.agent_id)
            await client._send(ws, self._create_frame())
            done, _ = await asyncio.wait((fut,), timeout=client.command_timeout)
            if not done:
                logger.warning(
                    "agent %r: no agent.created/agent.resumed after %s s; still waiting",
                    self.agent_id, client.command_timeout,
                )
                await fut
            self._reg_future = None
            answer: Event = fut.result()
            if not isinstance(answer, ErrorEvent):
                break
            code = answer.code
            if code in CONFLICT_RETRY_CODES:
                now = loop.time()
                if first_refusal is None:
                    first_refusal = now
                elapsed = now - first_refusal
                remaining = client.conflict_give_up_after - elapsed
                if remaining <= 0:
                    self._registration_failed(
                        PinecallError(
                            f"agent {self.agent_id!r}: gave up registering after {elapsed:.1f} s"
                            f" of {code} ({answer.message or 'held by another connection'})",
                            code=code,
                            frame=answer.raw,
                        ),
                        answer,
                    )
                    return
                delay = client._conflict_delay(retries, answer.retry_after_s)
                delay = min(delay, remaining)
                retries += 1
                logger.warning(
                    "agent %r refused with %s (%s; holder_alive=%s); retry %d in %.2f s",
                    self.agent_id, code, answer.message, answer.holder_alive, retries, delay,
                )
                await asyncio.sleep(delay)
                continue
            # AGENT_CONFLICT_FATAL, SERVER_AT_CAPACITY, or any other refusal: stop here.
            message = answer.message or "registration refused"
            if code == "SERVER_AT_CAPACITY" and (answer.used is not None or answer.limit is not None):
                message = f"{message} (used {answer.used} of {answer.limit})"
            self._registration_failed(
                PinecallError(
                    f"agent {self.agent_id!r}: {message}", code=code or "REGISTRATION_FAILED",
                    frame=answer.raw,
                ),
                answer,
            )
            return

        logger.info("agent %r %s", self.agent_id, "resumed" if answer.event == "agent.resumed" else "created")
        if self._whatsapp is not None:
            await client._send(ws, self._channel_frame())
        self._registered = True
        self._resolve_waiters(None)
        client._enqueue(
            RegisteredEvent(agent_id=self.agent_id, resumed=answer.event == "agent.resumed"), self
        )
        # Pump: queued commands first, in order, then new ones as they come.
        while True:
            while self._outbox:
                if ws.state is not State.OPEN:
                    # The socket is closing: nothing more is written; what is still
                    # queued waits for the next connection.
                    return
                cmd = self._outbox.popleft()
                if cmd.future is not None:
                    if cmd.future.done():
                        continue  # withdrawn or failed while queued
                    cmd.sent = True
                    self._inflight.append(cmd)
                await client._send(ws, cmd.frame)
            self._wake.clear()
            await self._wake.wait()

    def _registration_failed(self, err: PinecallError, answer: ErrorEvent) -> None:
        logger.error("%s", err)
        self._failure = err
        self._registered = False
        self._fail_all(err)
        self._resolve_waiters(err)
        report = ErrorEvent(
            event="error",
            agent_id=self.agent_id,
            code=err.code,
            message=err.message,
            session_id=answer.session_id,
            retry_after_s=answer.retry_after_s,
            holder_alive=answer.holder_alive,
            used=answer.used,
            limit=answer.limit,
            fatal=True,
            raw=answer.raw,
        )
        self._client._enqueue(report, self)

    def _connection_lost(self) -> None:
        self._registered = False
        if self._reg_future is not None and not self._reg_future.done():
            self._reg_future.cancel()
        self._reg_future = None
        if self._inflight:
            self._fail_all(
                PinecallError(
                    "connection lost after the command was sent; it may or may not have been"
                    " executed, and it is not resent",
                    code="CONNECTION_LOST",
                ),
                queued=False,
            )

    def _set_displaced(self, event: AgentDisplacedEvent | None, reason: str | None) -> None:
        if self._displaced:
            return
        self._displaced = True
        self._registered = False
        if self._reg_task is not None and not self._reg_task.done():
            self._reg_task.cancel()
        if self._reg_future is not None and not self._reg_future.done():
            self._reg_future.cancel()
        self._reg_future = None
        err = PinecallError(
            f"agent {self.agent_id!r} was displaced by another connection"
            + (f": {reason}" if reason else ""),
            code="DISPLACED",
            frame=event.raw if event is not None else None,
        )
        logger.error("%s", err)
        self._failure = err
        self._fail_all(err)
        self._resolve_waiters(err)
        self._client._enqueue(
            ErrorEvent(
                event="error", agent_id=self.agent_id, code="DISPLACED", message=err.message,
                fatal=True, raw=event.raw if event is not None else {},
            ),
            self,
        )


class Pinecall:
    """The Pinecall client: one WebSocket to ``{url}/client`` shared by all agents.

    Args:
        api_key: the API key; default: env ``PINECALL_API_KEY``.
        url: server base URL; default: env ``PINECALL_URL``, else ``wss://voice.pinecall.io``.
        command_timeout: seconds a command waits for its confirmation (per call: ``timeout=``).
        connect_timeout: seconds to open the socket and get ``connected``.
        ping_interval: seconds between keep-alive ``ping`` frames (None or 0: off).

    Backoff constants are instance attributes (also keyword options) so tests can
    shrink them: ``reconnect_base_delay`` (1 s), ``reconnect_max_delay`` (30 s),
    ``reconnect_jitter`` (0.25), ``conflict_base_delay`` (1 s), ``conflict_max_delay``
    (15 s), ``conflict_give_up_after`` (90 s), ``conflict_retry_after_cap`` (None: the
    server's ``retry_after_s`` is honoured in full), ``close_timeout`` (5 s); and
    ``max_frame_size`` (16 MiB), the largest frame read (see the module docstring).

    Lifecycle handlers (``pc.on(name, handler)``): ``"connected"`` (the wire event),
    ``"disconnected"`` (:class:`DisconnectedEvent`, ``reconnect`` says whether the client
    will try again), ``"reconnecting"`` (:class:`ReconnectingEvent` with ``attempt``
    (from 1) and ``delay``), ``"error"`` (:class:`ErrorEvent`: server errors not tied to
    a command, and failures the client gives up on, with ``fatal=True``),
    ``"registered"`` (:class:`RegisteredEvent`, per agent, after every (re-)registration;
    also on ``agent.on("registered")``), ``"fatal"`` (called with the exception, not an
    event, when the client failed for good; see :meth:`wait_failed`; never called for
    a wire frame named "fatal", and not part of ``"*"``). ``pc.on`` with any other event
    name gets that event of every agent; ``"*"`` gets every event.
    """

    reconnect_base_delay: float = 1.0
    reconnect_max_delay: float = 30.0
    reconnect_jitter: float = 0.25
    conflict_base_delay: float = 1.0
    conflict_max_delay: float = 15.0
    conflict_give_up_after: float = 90.0
    conflict_retry_after_cap: float | None = None
    close_timeout: float = 5.0
    max_frame_size: int = 16 * 2**20

    def __init__(
        self,
        api_key: str | None = None,
        url: str | None = None,
        *,
        command_timeout: float | None = 10.0,
        connect_timeout: float | None = 10.0,
        ping_interval: float | None = 30.0,
        reconnect_base_delay: float | None = None,
        reconnect_max_delay: float | None = None,
        reconnect_jitter: float | None = None,
        conflict_base_delay: float | None = None,
        conflict_max_delay: float | None = None,
        conflict_give_up_after: float | None = None,
        conflict_retry_after_cap: float | None = None,
        close_timeout: float | None = None,
    ) -> None:
        self.api_key = api_key if api_key is not None else os.environ.get("PINECALL_API_KEY")
        base = url or os.environ.get("PINECALL_URL") or DEFAULT_URL
        self.url = base.rstrip("/")
        self.command_timeout = command_timeout
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        for name, value in (
            ("reconnect_base_delay", reconnect_base_delay),
            ("reconnect_max_delay", reconnect_max_delay),
            ("reconnect_jitter", reconnect_jitter),
            ("conflict_base_delay", conflict_base_delay),
            ("conflict_max_delay", conflict_max_delay),
            ("conflict_give_up_after", conflict_give_up_after),
            ("conflict_retry_after_cap", conflict_retry_after_cap),
            ("close_timeout", close_timeout),
        ):
            if value is not None:
                setattr(self, name, value)

        self._agents: dict[str, Agent] = {}
        self._handlers: dict[str, list[Handler]] = collections.defaultdict(list)
        self._seq = itertools.count()
        self._ws: ClientConnection | None = None
        self._connected = False
        self._connected_evt = asyncio.Event()
        self._closing_evt = asyncio.Event()
        self._closing = False
        self._closed = False
        self._fatal: PinecallError | None = None  # the client stopped for good (until connect())
        self._stop_error: PinecallError | None = None  # stop after the current connection
        self._supervisor: asyncio.Task | None = None
        self._dispatcher: asyncio.Task | None = None
        self._queue: asyncio.Queue | None = None
        self._conn_tasks: set[asyncio.Task] = set()
        self._connect_lock: asyncio.Lock | None = None
        self._failure: BaseException | None = None
        self._failed_evt = asyncio.Event()
        self._failure_task: asyncio.Task | None = None
        self.last_pong: float | None = None

    def __repr__(self) -> str:
        return f"<Pinecall {self.url!r} connected={self._connected} agents={list(self._agents)}>"

    @property
    def ws_url(self) -> str:
        return f"{self.url}/client"

    @property
    def connected(self) -> bool:
        """True while the socket is up and the server said ``connected``."""
        return self._connected

    @property
    def agents(self) -> dict[str, Agent]:
        return dict(self._agents)

    @property
    def failure(self) -> BaseException | None:
        """The unexpected exception that stopped the client for good, else None.

        Set as soon as it happens (a rejected key or a displacement is not a failure).
        """
        return self._failure

    async def wait_failed(self) -> BaseException:
        """Wait until the client has failed for good; return the exception.

        Returns once the socket is closed, pending commands have failed and the events
        received before the failure have been handed to handlers (right before the
        ``"fatal"`` handlers are called). Typical use: run it beside the application
        and exit the process when it returns. It never returns for a client that is
        only closed.
        """
        await self._failed_evt.wait()
        assert self._failure is not None
        return self._failure

    # -- public API ----------------------------------------------------------------------

    def agent(self, agent_id: str, **config: Any) -> Agent:
        """Declare an agent (``language``, ``llm``, ``prompt``, ... as keyword options).

        Config keys set to None are left out of ``agent.create``. Asking again for the
        same ``agent_id`` returns the same object (new non-None options are merged in
        and used from the next registration on).
        """
        if not isinstance(agent_id, str) or not agent_id:
            raise PinecallInvalidArgument("agent_id must be a non-empty string")
        existing = self._agents.get(agent_id)
        if existing is not None:
            existing.config.update((k, v) for k, v in config.items() if v is not None)
            return existing
        agent = Agent(self, agent_id, config)
        self._agents[agent_id] = agent
        if self._connected and self._ws is not None:
            agent._start_registration(self._ws)
        return agent

    def on(self, event: str, handler: Handler | None = None) -> Any:
        """Lifecycle and global handlers; also usable as a decorator.

        ``"fatal"`` handlers get the exception (see :meth:`wait_failed`), not an event.
        """
        return self._add_handler(self._handlers, event, handler)

    def off(self, event: str, handler: Handler) -> None:
        try:
            self._handlers[event].remove(handler)
        except ValueError:
            pass

    async def connect(self) -> None:
        """Open the connection; return once the server sent ``connected``.

        Raises ``PinecallError`` with code ``UNAUTHORIZED`` (rejected key: no retry),
        ``CONNECTION_TIMEOUT`` (no ``connected`` within ``connect_timeout``; a
        :class:`PinecallTimeout`) or ``CONNECTION_FAILED`` (socket could not be opened).
        The first connection is tried once; after it succeeded, the client
        reconnects on its own after any unexpected close.
        """
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            await self._connect()

    async def _connect(self) -> None:
        if self._closed:
            raise PinecallError("the client is closed", code="CLOSED")
        if self._failure is not None:
            # Crash-only: a failed client is not restarted in place; the process is.
            raise _copy_error(self._fatal) from self._failure
        if self._supervisor is not None and not self._supervisor.done():
            if self._connected:
                return
            try:
                await asyncio.wait_for(self._connected_evt.wait(), self.connect_timeout)
            except asyncio.TimeoutError:
                raise PinecallTimeout(
                    f"not connected within {self.connect_timeout} s", code="CONNECTION_TIMEOUT"
                ) from None
            return
        if not self.api_key:
            logger.warning("no Pinecall API key (argument or PINECALL_API_KEY); sending an empty one")
        # A fresh start after a terminal stop (displaced, rejected key).
        self._fatal = None
        self._stop_error = None
        for agent in self._agents.values():
            agent._failure = None
            agent._displaced = False
        self._ensure_dispatcher()
        ws, connected = await self._open()
        if self._closed:  # close() was called meanwhile
            await self._discard(ws)
            raise PinecallError("the client is closed", code="CLOSED")
        self._begin_session(ws, connected)
        self._supervisor = asyncio.get_running_loop().create_task(
            self._run(ws), name="pinecall-connection"
        )

    async def close(self) -> None:
        """Close the connection for good: no reconnect; pending commands fail with ``CLOSED``."""
        if self._closed:
            return
        self._closed = True
        self._closing = True
        self._closing_evt.set()
        current = asyncio.current_task()
        ws = self._ws
        if ws is not None:
            await self._discard(ws)
        sup = self._supervisor
        if sup is not None and not sup.done() and sup is not current:
            if ws is None:
                sup.cancel()  # between connections (waiting or opening): nothing to drain
            await asyncio.wait((sup,), timeout=self.close_timeout)
            if not sup.done():
                sup.cancel()
        for task in list(self._conn_tasks):
            task.cancel()
        err = PinecallError("the client was closed", code="CLOSED")
        for agent in self._agents.values():
            agent._registered = False
            agent._fail_all(err)
            agent._resolve_waiters(err)
        self._connected = False
        # Let the dispatcher deliver what is queued (e.g. "disconnected"), then stop it.
        disp = self._dispatcher
        if disp is not None and not disp.done() and self._queue is not None:
            self._queue.put_nowait(None)
            if disp is not current:
                await asyncio.wait((disp,), timeout=self.close_timeout)
                if not disp.done():
                    disp.cancel()
        failing = self._failure_task
        if failing is not None and not failing.done() and failing is not current:
            await asyncio.wait((failing,), timeout=self.close_timeout)  # its "fatal" handlers
        logger.info("pinecall client closed")

    async def __aenter__(self) -> "Pinecall":
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- internals: helpers ------------------------------------------------------------

    @staticmethod
    def _add_handler(table: dict[str, list[Handler]], event: str, handler: Handler | None) -> Any:
        if not isinstance(event, str) or not event:
            raise PinecallInvalidArgument("event name must be a non-empty string")
        if handler is None:
            def decorator(fn: Handler) -> Handler:
                if not callable(fn):
                    raise PinecallInvalidArgument("handler must be callable")
                table[event].append(fn)
                return fn
            return decorator
        if not callable(handler):
            raise PinecallInvalidArgument("handler must be callable")
        table[event].append(handler)
        return handler

    def _unusable_error(self) -> PinecallError | None:
        if self._closed:
            return PinecallError("the client is closed", code="CLOSED")
        return self._fatal

    def _raise_if_unusable(self) -> None:
        err = self._unusable_error()
        if err is not None:
            raise _copy_error(err)

    def _reconnect_delay(self, attempt: int) -> float:
        return reconnect_delay(
            attempt, base=self.reconnect_base_delay, cap=self.reconnect_max_delay,
            jitter=self.reconnect_jitter,
        )

    def _conflict_delay(self, retries: int, retry_after_s: float | None) -> float:
        delay = reconnect_delay(
            retries, base=self.conflict_base_delay, cap=self.conflict_max_delay,
            jitter=self.reconnect_jitter,
        )
        if retry_after_s is not None and retry_after_s > 0:
            wanted = float(retry_after_s)
            if self.conflict_retry_after_cap is not None:
                wanted = min(wanted, self.conflict_retry_after_cap)
            delay = max(delay, wanted)
        return delay

    async def _send(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        await ws.send(json.dumps(frame))

    async def _guard(self, coro: Awaitable[None], what: str) -> None:
        """Run a per-connection task: a closed socket ends it quietly, a bug is fatal."""
        try:
            await coro
        except (ConnectionClosed, asyncio.CancelledError):
            pass
        except Exception as exc:
            self._fail(exc, what)

    async def _discard(self, ws: ClientConnection) -> None:
        try:
            await asyncio.wait_for(ws.close(), self.close_timeout)
        except Exception:
            transport = getattr(ws, "transport", None)
            if transport is not None:
                transport.abort()

    # -- internals: opening --------------------------------------------------------------

    async def _open(self) -> tuple[ClientConnection, Event]:
        """Open the socket, send ``connect``, wait for ``connected``."""
        ws: ClientConnection | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                ws = await ws_connect(
                    self.ws_url,
                    open_timeout=None,
                    close_timeout=self.close_timeout,
                    max_size=self.max_frame_size,
                )
                await self._send(ws, {"event": "connect", "api_key": self.api_key or ""})
                while True:
                    message = await ws.recv()
                    ev = self._decode(message)
                    if ev is None:
                        continue
                    if ev.event == "connected":
                        return ws, ev
                    if ev.event == "error":
                        err = PinecallError.from_frame(ev.raw)
                        if err.code is None:
                            err.code = "UNAUTHORIZED"
                        raise err
                    if ev.event == "ping":
                        await self._send(ws, {"event": "pong"})
                    # `authenticated` and anything else before `connected`: ignored
        except PinecallError:
            if ws is not None:
                await self._discard(ws)
            raise
        except TimeoutError:
            if ws is not None:
                await self._discard(ws)
            raise PinecallTimeout(
                f"no `connected` from {self.ws_url} within {self.connect_timeout} s",
                code="CONNECTION_TIMEOUT",
            ) from None
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            if rcvd is not None and rcvd.code == 1008:
                raise PinecallError(
                    f"connection refused by {self.ws_url} (close 1008: {rcvd.reason or 'policy violation'})",
                    code="UNAUTHORIZED",
                ) from None
            raise PinecallError(
                f"{self.ws_url} closed the connection during the handshake ({exc})",
                code="CONNECTION_FAILED",
            ) from None
        except InvalidStatus as exc:
            status = exc.response.status_code
            code = "UNAUTHORIZED" if status in (401, 403) else "CONNECTION_FAILED"
            raise PinecallError(f"{self.ws_url} refused the WebSocket: HTTP {status}", code=code) from None
        except (OSError, InvalidHandshake, InvalidURI) as exc:
            if ws is not None:
                await self._discard(ws)
            raise PinecallError(f"cannot connect to {self.ws_url}: {exc}", code="CONNECTION_FAILED") from None
        except Exception as exc:  # e.g. a proxy error: still a failed attempt, not a crash
            if ws is not None:
                await self._discard(ws)
            raise PinecallError(
                f"cannot connect to {self.ws_url}: {type(exc).__name__}: {exc}", code="CONNECTION_FAILED"
            ) from exc
        except BaseException:
            if ws is not None:
                await self._discard(ws)
            raise

    def _decode(self, message: str | bytes) -> Event | None:
        """Parse one frame (text, or UTF-8 JSON in a binary frame); None: skip it.

        Whatever reading a frame raises (ValueError, RecursionError from deep nesting,
        UnicodeError, MemoryError...) is about that frame alone: one WARNING line, and
        the reader goes on with the next frame.
        """
        try:
            if isinstance(message, (bytes, bytearray, memoryview)):
                message = bytes(message).decode("utf-8")
            return parse_event(json.loads(message))
        except Exception as exc:
            logger.warning(
                "skipping a frame that is not a readable event (%s: %s): %s",
                type(exc).__name__, _truncate(str(exc)), _truncate(message),
            )
            return None

    # -- internals: the connection loop --------------------------------------------------

    def _begin_session(self, ws: ClientConnection, connected: Event) -> None:
        self._ws = ws
        self._connected = True
        self._connected_evt.set()
        self._stop_error = None
        logger.info("connected to %s", self.ws_url)
        self._enqueue(connected, None)
        loop = asyncio.get_running_loop()
        if self.ping_interval:
            task = loop.create_task(self._guard(self._ping_loop(ws), "ping loop"), name="pinecall-ping")
            self._conn_tasks.add(task)
            task.add_done_callback(self._conn_tasks.discard)
        for agent in list(self._agents.values()):
            if agent._displaced:
                continue
            agent._failure = None  # give up per connection: try again on a new one
            agent._start_registration(ws)

    async def _ping_loop(self, ws: ClientConnection) -> None:
        while True:
            await asyncio.sleep(self.ping_interval)
            await self._send(ws, {"event": "ping"})

    async def _run(self, ws: ClientConnection) -> None:
        """Read the connection; on an unexpected close, reconnect (forever) with backoff."""
        attempt = 0
        try:
            while True:
                code, reason = await self._read(ws)
                if not self._end_session(ws, code, reason):
                    return
                while True:
                    delay = self._reconnect_delay(attempt)
                    attempt += 1
                    logger.info("reconnecting to %s in %.2f s (attempt %d)", self.ws_url, delay, attempt)
                    self._enqueue(ReconnectingEvent(attempt=attempt, delay=delay), None)
                    try:
                        await asyncio.wait_for(self._closing_evt.wait(), delay)
                        return  # closed while waiting
                    except asyncio.TimeoutError:
                        pass
                    try:
                        ws, connected = await self._open()
                    except PinecallError as err:
                        if err.code == "UNAUTHORIZED":
                            self._terminate(err)
                            return
                        logger.warning("reconnect attempt %d failed: %s", attempt, err)
                        continue
                    if self._closing:
                        await self._discard(ws)
                        return
                    attempt = 0
                    self._begin_session(ws, connected)
                    break
        except Exception as exc:  # a bug (in reading, handling or reconnecting): crash-only
            self._fail(exc, "connection loop")

    async def _read(self, ws: ClientConnection) -> tuple[int | None, str | None]:
        # No catch-all here: a frame that cannot be read is skipped by _decode, so an
        # exception out of _handle is a bug of the client and must be fatal (see _fail).
        try:
            async for message in ws:
                ev = self._decode(message)
                if ev is not None:
                    await self._handle(ws, ev)
        except ConnectionClosed:
            pass
        return ws.close_code, ws.close_reason

    def _end_session(self, ws: ClientConnection, code: int | None, reason: str | None) -> bool:
        """Clean up after a close. True when the client should reconnect."""
        self._connected = False
        self._connected_evt.clear()
        if self._ws is ws:
            self._ws = None
        for task in list(self._conn_tasks):
            task.cancel()
        for agent in self._agents.values():
            agent._connection_lost()
        if self._closing or self._failure is not None:
            self._enqueue(DisconnectedEvent(code=code, reason=reason, reconnect=False), None)
            return False
        err = self._stop_error
        displaced_close = False
        if err is None and code == 1008:
            err = PinecallError(
                f"server closed the connection with 1008 ({reason or 'policy violation'})",
                code="UNAUTHORIZED",
            )
        if err is None and reason and "displaced" in reason.lower():
            err = PinecallError(f"connection displaced: {reason}", code="DISPLACED")
            displaced_close = True
        logger.warning(
            "connection closed (code %s, reason %r)%s", code, reason, "" if err is None else "; not reconnecting"
        )
        self._enqueue(DisconnectedEvent(code=code, reason=reason, reconnect=err is None), None)
        if err is None:
            return True
        if displaced_close:
            for agent in self._agents.values():
                agent._set_displaced(None, reason)
        self._terminate(err)
        return False

    def _terminate(self, err: PinecallError) -> None:
        """Stop for good (rejected key, displaced): fail everything pending, report ``error``."""
        logger.error("pinecall client stopped: %s", err)
        self._fatal = err
        for agent in self._agents.values():
            agent._registered = False
            agent._fail_all(err)
            agent._resolve_waiters(err)
        self._enqueue(
            ErrorEvent(event="error", code=err.code, message=err.message, fatal=True, raw=err.frame or {}),
            None,
        )

    def _fail(self, exc: BaseException, where: str) -> None:
        """Crash-only: an unexpected exception escaped one of the client's loops.

        Stop for good at once (pending commands fail now); closing the socket and
        telling the application happen in a task of their own, as the caller may be
        the very loop (reader, dispatcher) that has to be stopped.
        """
        if self._closed or self._failure is not None:
            logger.error("pinecall_sdk: %s failed after the client stopped", where, exc_info=exc)
            return
        logger.critical(
            "pinecall_sdk: %s failed; the client stops for good and will not reconnect", where,
            exc_info=exc,
        )
        self._failure = exc
        err = PinecallError(
            f"the client failed ({where}: {type(exc).__name__}: {exc}); restart the process",
            code="INTERNAL",
        )
        self._fatal = err
        for agent in self._agents.values():
            agent._registered = False
            agent._fail_all(err)
            agent._resolve_waiters(err)
        self._failure_task = asyncio.get_running_loop().create_task(
            self._shut_down_after_failure(exc, err), name="pinecall-failure"
        )

    async def _shut_down_after_failure(self, exc: BaseException, err: PinecallError) -> None:
        supervisor = self._supervisor
        if supervisor is not None and not supervisor.done():
            supervisor.cancel()  # no more reading, no reconnect
            await asyncio.wait((supervisor,))
        for task in list(self._conn_tasks):
            task.cancel()
        ws, self._ws = self._ws, None
        self._connected = False
        self._connected_evt.clear()
        if ws is not None:
            await self._discard(ws)
            self._enqueue(
                DisconnectedEvent(code=ws.close_code, reason=ws.close_reason, reconnect=False), None
            )
        self._enqueue(
            ErrorEvent(event="error", code=err.code, message=err.message, fatal=True), None
        )
        # Hand what was received to the handlers before saying "fatal": the application
        # may exit the process as soon as it hears it.
        dispatcher = self._dispatcher
        if dispatcher is not None and not dispatcher.done() and self._queue is not None:
            self._queue.put_nowait(None)
            await asyncio.wait((dispatcher,))
        self._failed_evt.set()
        for handler in list(self._handlers.get("fatal", [])):
            try:
                result = handler(exc)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("pinecall_sdk: fatal handler %r raised", handler)

    # -- internals: incoming frames -------------------------------------------------------

    def _route(self, ev: Event) -> Agent | None:
        if ev.agent_id is not None:
            return self._agents.get(ev.agent_id)
        if ev.event.startswith("whatsapp."):
            for agent in self._agents.values():
                if agent._whatsapp is not None and not agent._displaced:
                    return agent
            if len(self._agents) == 1:
                return next(iter(self._agents.values()))
        return None

    async def _handle(self, ws: ClientConnection, ev: Event) -> None:
        name = ev.event
        agent = self._route(ev)
        if ev.agent_id is not None and agent is None:
            logger.debug("event %s for an agent this client does not have: %r", name, ev.agent_id)
        deliver = True
        if name == "ping":
            await self._send(ws, {"event": "pong"})
        elif name == "pong":
            self.last_pong = asyncio.get_running_loop().time()
        elif name in ("agent.created", "agent.resumed"):
            if agent is not None and agent._reg_future is not None and not agent._reg_future.done():
                agent._reg_future.set_result(ev)
            else:
                logger.debug("unexpected %s for %r", name, ev.agent_id)
        elif name == "agent.displaced":
            # Deliver the event first, then the client's own "error" reports.
            self._enqueue(ev, agent)
            deliver = False
            targets = [agent] if agent is not None else ([] if ev.agent_id else list(self._agents.values()))
            for target in targets:
                target._set_displaced(ev, getattr(ev, "reason", None))
            if targets and all(a._displaced for a in self._agents.values()):
                # Nothing left to do on this connection: hang up, and do not reconnect.
                self._stop_error = PinecallError(
                    "every agent of this client was displaced by another connection", code="DISPLACED",
                    frame=ev.raw,
                )
                task = asyncio.get_running_loop().create_task(self._discard(ws))
                self._conn_tasks.add(task)
                task.add_done_callback(self._conn_tasks.discard)
        elif name in _CONFIRMATIONS:
            cmd = self._match_confirmation(ev, agent)
            if cmd is not None:
                cmd.agent._inflight.remove(cmd)
                agent = cmd.agent
                if not cmd.future.done():
                    cmd.future.set_result(ev)
        elif name == "history.data":
            cmd = self._match_history(ev, agent)
            if cmd is not None:
                cmd.agent._inflight.remove(cmd)
                agent = cmd.agent
                if not cmd.future.done():
                    if ev.error is None:
                        cmd.future.set_result(ev)
                    else:  # the protocol's only error here: the server has no such session
                        cmd.future.set_exception(PinecallError(
                            f"{cmd.describe()}: {ev.error}", code="SESSION_NOT_FOUND", frame=ev.raw,
                        ))
        elif name == "error":
            deliver = self._handle_error(ws, ev, agent)
        elif name not in EVENT_CLASSES:
            logger.debug("unknown event %r (delivered to '*' handlers)", name)
        if deliver:
            self._enqueue(ev, agent)

    def _candidates(self, agent: Agent | None, kind: str | None = None) -> list[_Command]:
        """In-flight commands of ``agent`` (None: of every agent), oldest first."""
        agents = [agent] if agent is not None else list(self._agents.values())
        cmds = [c for a in agents for c in a._inflight if kind is None or c.kind == kind]
        cmds.sort(key=lambda c: c.seq)
        return cmds

    def _match_confirmation(self, ev: Event, agent: Agent | None) -> _Command | None:
        kind = _CONFIRMATIONS[ev.event]
        cmds = self._candidates(agent, kind)
        if not cmds:
            return None
        sid = getattr(ev, "session_id", None)
        contact = getattr(ev, "contact", None)
        if kind in ("session.pause", "session.resume"):
            # Only exact targets: these events are also state changes made by others.
            for cmd in cmds:
                if cmd.session_id is not None:
                    if sid == cmd.session_id:
                        return cmd
                elif cmd.contact is not None:
                    if contact == cmd.contact:
                        return cmd
                elif sid is None and contact is None:
                    return cmd
            return None
        # session.sent: no unsolicited ones, and the server may answer with the session it
        # used for a contact send: exact target, then compatible target, then oldest.
        for cmd in cmds:
            if (cmd.session_id is not None and sid == cmd.session_id) or (
                cmd.session_id is None and cmd.contact is not None and contact == cmd.contact
            ):
                return cmd
        for cmd in cmds:
            if (sid is None or cmd.session_id is None or sid == cmd.session_id) and (
                contact is None or cmd.contact is None or contact == cmd.contact
            ):
                return cmd
        return cmds[0]

    def _match_history(self, ev: HistoryDataEvent, agent: Agent | None) -> _Command | None:
        """The ``history.get`` this ``history.data`` answers: by ``request_id`` when echoed
        (none matching: a stale answer), else by ``call_id``, else the oldest."""
        cmds = self._candidates(agent, "history.get")
        if ev.request_id is not None:
            return next((c for c in cmds if c.request_id == ev.request_id), None)
        same_session = (c for c in cmds if c.session_id == ev.call_id)
        return next(same_session, cmds[0] if cmds else None)

    def _handle_error(self, ws: ClientConnection, ev: ErrorEvent, agent: Agent | None) -> bool:
        """Route an ``error`` frame. True when it should go to ``error`` handlers."""
        code = ev.code
        if code == "UNAUTHORIZED":
            self._stop_error = PinecallError.from_frame(ev.raw)
            task = asyncio.get_running_loop().create_task(self._discard(ws))
            self._conn_tasks.add(task)
            task.add_done_callback(self._conn_tasks.discard)
            return False  # reported by _terminate when the connection is gone
        registering = [a for a in self._agents.values() if a._reg_future is not None and not a._reg_future.done()]
        if code in CONFLICT_RETRY_CODES or code in REGISTRATION_FATAL_CODES:
            target = None
            if agent is not None and agent in registering:
                target = agent
            elif ev.agent_id is None and registering:
                target = registering[0]
            if target is not None:
                target._reg_future.set_result(ev)
                return False
            return True
        cmds = self._candidates(agent if ev.agent_id is not None else None)
        cmd = None
        if ev.session_id is not None:
            cmd = next((c for c in cmds if c.session_id == ev.session_id), None)
        if cmd is None and ev.contact is not None:
            cmd = next((c for c in cmds if c.contact == ev.contact), None)
        if cmd is None and cmds:
            cmd = cmds[0]
        if cmd is not None:
            cmd.agent._inflight.remove(cmd)
            err = PinecallError.from_frame(ev.raw)
            logger.info("%s failed: %s", cmd.describe(), err)
            if not cmd.future.done():
                cmd.future.set_exception(err)
            return False
        if agent is not None and agent in registering:
            # A refusal of agent.create we do not know (bad config...): stop registering it.
            agent._reg_future.set_result(ev)
            return False
        logger.warning("server error: %s %s", code, ev.message)
        return True

    # -- internals: dispatch --------------------------------------------------------------

    def _ensure_dispatcher(self) -> None:
        if self._dispatcher is None or self._dispatcher.done():
            self._queue = asyncio.Queue()
            self._dispatcher = asyncio.get_running_loop().create_task(
                self._dispatch_loop(self._queue), name="pinecall-dispatch"
            )

    def _enqueue(self, ev: Event, agent: Agent | None) -> None:
        if self._queue is not None:
            self._queue.put_nowait((ev, agent))

    def _handlers_for(self, ev: Event, agent: Agent | None) -> list[Handler]:
        handlers: list[Handler] = []
        if agent is not None:
            handlers += agent._handlers.get(ev.event, [])
            handlers += agent._handlers.get("*", [])
        if ev.event != "fatal":  # the client's "fatal" handlers get exceptions, never a frame
            handlers += self._handlers.get(ev.event, [])
        handlers += self._handlers.get("*", [])
        return handlers

    async def _dispatch_loop(self, queue: asyncio.Queue) -> None:
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                ev, agent = item
                for handler in self._handlers_for(ev, agent):
                    try:
                        result = handler(ev)
                        if inspect.isawaitable(result):
                            await result
                    except Exception:
                        logger.exception("pinecall_sdk: handler %r for %s raised", handler, ev.event)
        except Exception as exc:  # a bug in dispatching (not in a handler): crash-only
            self._fail(exc, "event dispatch")
