"""The simulated Pinecall server: WebSocket endpoint, command routing, events.

It follows ``/work/shared/pinecall-protocol.md`` (the WhatsApp and
human-takeover part of the Pinecall wire protocol) and
``/work/shared/pinecall-voice-protocol.md`` (phone calls, on the same
connection; how a call plays out is in ``voice.py``). Where those documents
are silent, the simulator makes the choices below. They are behaviour of this
simulator, not facts about the real server.

Our choices
-----------
* Path: only ``/client`` (a query string is ignored). Any other path gets the
  WebSocket opened and immediately closed with 1008 ("Unknown path").
* Handshake: the first frame must be ``connect`` with a non-empty string
  ``api_key`` (and, if ``api_keys`` is given, one of them), within 10 s.
  Anything else: ``error`` ``UNAUTHORIZED`` then close 1008 "Unauthorized".
  A second ``connect`` on an authenticated connection is answered with
  ``connected`` again. The server never sends ``authenticated``.
* Compression (permessage-deflate) is off; the server's own protocol-level
  keepalive (WebSocket ping frames) stays on with the websockets defaults.
* ``agent.create``: the new agent gets ``agent.created``. ``agent.resumed`` is
  sent when the server still holds the agent: it is re-registered within
  ``resume_grace`` seconds after its connection went away (dropped or closed),
  or it takes the agent over from a live connection ("displace" mode), or the
  same connection registers it again (then no replay). A resumed agent first
  receives the last ``replay_last`` events it was sent before, then the events
  buffered while it had no connection, in order. ``agent.created`` after the
  grace period also delivers the buffered events (nothing is thrown away;
  the buffer holds at most ``max_buffer`` events, oldest dropped first).
  Events for an agent id that never registered are buffered the same way.
* Only *events* are buffered and replayed: ``whatsapp.*``, ``session.paused``
  and ``session.resumed`` (which are state). A call's frames are sent live only:
  a call ends with its agent's connection, so nothing of it is kept or replayed. Replies to a command
  (``session.sent``, ``error``, ``pong``, ``agent.*``) go to the connection that
  sent it and are neither buffered nor replayed.
* Displacement: the old connection gets ``agent.displaced`` (reason
  "Displaced by a new connection") and is closed with 4000 and the same
  reason; any other agents it held count as dropped. Conflict mode answers
  ``AGENT_CONFLICT`` with ``retry_after_s`` (5) and ``holder_alive`` (true).
* Capacity counts agents currently held by a live connection.
* ``channel.add`` is answered by ``channel.added`` (``agent_id``, ``type``,
  ``ref``), as the JavaScript SDK expects; it is validated first (``type`` must
  be "whatsapp" or "phone"; for WhatsApp ``ref`` and ``accessToken`` non-empty
  strings, ``verifyToken`` / ``appSecret`` / ``phone`` strings when present)
  and repeated adds replace the channel.
* Phone numbers: ``channel.add`` with ``type: "phone"`` and ``ref`` an E.164
  number or a ``sip:`` URI (else INVALID_COMMAND); ``ringing`` a boolean,
  ``language`` a string, ``config`` an object, ``voice`` / ``stt`` / ``llm`` a
  string or an object, when present. An agent may add several numbers. A number
  another *connected* agent holds is refused with ``error`` ``PHONE_IN_USE``
  (``phone``, ``agent_id``); an offline agent's number moves to the new one.
  Calls come only to numbers added this way (``place_call``); a number whose
  agent is offline gets no call (the call is recorded as ended, reason
  ``agent_offline``, and nothing is sent, as the real server hangs those up).
* Per-call commands (``bot.reply``, ``bot.cancel``, ``call.forward``,
  ``call.hold`` / ``call.unhold``, ``call.mute`` / ``call.unmute``,
  ``call.hangup``) name the call by ``call_id`` (no ``agent_id``): a call
  that is unknown, of an agent not on this connection, or already ended is
  ``error`` ``CALL_NOT_FOUND`` with ``call_id`` (and the call's ``agent_id``
  when it has one); a call still ringing is INVALID_COMMAND. ``call.accept`` /
  ``call.reject`` (with ``agent_id``, ``reason`` "busy" or "rejected") answer a
  ringing call only. ``call.forward`` needs ``to`` (E.164 or ``sip:``);
  ``bot.reply`` needs ``text`` and ``message_id`` (non-empty strings),
  ``in_reply_to`` a string and ``add_to_history`` a boolean when present. Their
  answers: see ``voice.py``.
* ``history.get`` / ``history.set`` / ``history.add`` name the session by
  ``call_id`` (a WhatsApp ``session_id``) and are answered by ``history.data``
  (``messages``: the session's chat history, ``{role, content}``, customer
  messages with role "user") / ``history.updated``, echoing ``call_id`` and,
  when given, ``request_id``. Only live sessions of the agent are known: any
  other ``call_id`` gets the same reply with an ``error`` key (no
  ``messages``). ``history.set`` replaces the history the AI sees (and the
  ``transcript`` of ``session_ended``), ``history.add`` appends to it; their
  ``messages`` must be ``{role, content}`` objects with string values, else
  INVALID_COMMAND. A missing ``call_id`` is INVALID_COMMAND.
* Commands other than ``connect`` / ``ping`` / ``pong`` / ``agent.create``
  must name an agent registered on the same connection, else INVALID_COMMAND.
  A target key present with ``null`` or a non-string value is INVALID_COMMAND
  (a null ``session_id`` must never silently become an agent-level pause).
* Pause levels are independent: resuming a session or a contact clears only
  that level; ``session.resume`` with neither clears every level. A pause or
  resume with both ``session_id`` and ``contact`` acts on the session. The
  confirmations echo exactly the target keys given (``contact`` as given).
  Pause state belongs to the agent id and survives reconnects.
* ``session.send``: the live session named by ``session_id`` (of this agent);
  if that one is unknown or ended, or only ``contact`` is given, the contact's
  live session with this agent; failing both, a direct send to ``contact``:
  ``session.sent`` (echoing the given targets), then ``whatsapp.response``
  with ``to``, ``text``, ``source: "human"`` and *no* ``session_id`` (there is
  no session; the text enters no history), then the statuses.
  ``session.sent`` always echoes the targets given, not the one resolved.
* Activity, for ``idle_timeout``, is any message in the session (customer,
  AI or human). ``window_expired`` ends a session ``window`` seconds (24 h)
  after the customer's last message if nothing ended it before.
* The AI answers every unpaused customer message after ``ai_delay`` (with
  ``ai_delay <= 0`` immediately, inside ``customer_says``); it re-checks the
  pause and the session when the delay is over, so a pause arriving during
  the delay stops the answer. Statuses are sent, delivered, read for every
  outgoing message, ``status_delay`` apart (``receipt_limits`` can make a
  recipient stop at "sent"/"delivered", or fail).
* ``session_ended``: ``started_at`` / ``ended_at`` are Unix epoch seconds
  (numbers, 3 decimals, as the JavaScript SDK expects) and ``duration`` is
  seconds as a float; ``transcript`` is the chat history ``{role, content}``;
  ``messages`` entries are ``{role, content}`` plus the message's record
  ``message_id``, ``source`` ("customer", "ai" or "human"), ``type``, ``text``
  and ``timestamp`` (ISO-8601 UTC with milliseconds). ``session_history``
  entries for customer messages have ``source: "customer"``.
* Frames are JSON with non-ASCII characters as they are, except lone
  surrogates, which are escaped (``\\ud800``) as JavaScript's JSON.stringify
  does: they cannot be encoded in a UTF-8 text frame.
* Error frames: ``{"event":"error","code","message"}`` plus ``agent_id`` /
  ``session_id`` when the command named them (and ``retry_after_s`` /
  ``holder_alive`` for AGENT_CONFLICT, ``used`` / ``limit`` for
  SERVER_AT_CAPACITY, the ``request_id`` of a ``history.*`` command). A
  failure inside the simulator itself answers ``INTERNAL_ERROR`` and keeps
  the connection.
* Demo sessions (``demo=True``) end after ``min(idle_timeout,
  demo_idle_timeout)`` (3 minutes by default); see ``demo.py``. The demo also
  places a phone call every ``demo_call_interval`` seconds or so (the first a
  few seconds after a connected agent added a phone number).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from typing import Any, Iterable
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from . import ai
from .state import (
    END_REASONS,
    MESSAGE_TYPES,
    AgentState,
    Call,
    Session,
    is_phone_ref,
    new_call_id,
    new_session_id,
    new_wamid,
    normalize_phone,
    parse_script,
    utcnow,
)
from .demo import run_demo, run_voice_demo
from .voice import CallPlayer

log = logging.getLogger("pinecall_sdk.simulator")

CLIENT_PATH = "/client"
DISPLACED_REASON = "Displaced by a new connection"
DISPLACED_CLOSE_CODE = 4000
AUTH_TIMEOUT = 10.0
CONFLICT_RETRY_AFTER_S = 5
WINDOW_SECONDS = 24 * 3600.0
STATUS_ORDER = ("sent", "delivered", "read")

_LOG_LIMIT = 600  # characters of a frame shown in the log


class CommandError(Exception):
    """A command the server refuses: becomes an ``error`` frame, the connection stays."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.frame: dict[str, Any] = {"event": "error", "code": code, "message": message}
        self.frame.update({k: v for k, v in extra.items() if v is not None})


def _dumps(frame: dict[str, Any]) -> str:
    text = json.dumps(frame, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: escape it, as JSON.stringify does
        text = json.dumps(frame, separators=(",", ":"))
    return text


def _short(text: str | bytes) -> str:
    shown = text[:_LOG_LIMIT] if isinstance(text, str) else repr(text[:_LOG_LIMIT])
    return shown if len(text) <= _LOG_LIMIT else shown + "…"


class _Connection:
    """One client WebSocket: an ordered outgoing queue drained by a writer task."""

    def __init__(self, sim: "Simulator", ws: ServerConnection, number: int) -> None:
        self.sim = sim
        self.ws = ws
        self.name = f"conn#{number}"
        self.authenticated = False
        self.agents: set[str] = set()
        self.closing = False
        self.done = asyncio.Event()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.writer = asyncio.create_task(self._write_loop(), name=f"sim-writer-{number}")

    # Everything goes through the queue, so frames leave in the order produced.
    def send(self, frame: dict[str, Any] | str | bytes, text: str | None = None) -> None:
        """Queue a frame: a dict, a str sent verbatim, or bytes sent as a binary frame.

        ``text`` is the dict pre-encoded.
        """
        if self.closing or self.writer.done():
            return
        data: str | bytes
        if isinstance(frame, bytes):
            data, frame = frame, {"_raw": frame.decode("utf-8", errors="replace"), "_binary": True}
        elif isinstance(frame, str):
            data, frame = frame, _parse_or_raw(frame)
        else:
            data = _dumps(frame) if text is None else text
        self._queue.put_nowait(data)
        self.sim.sent.append(frame)
        self.sim._notify()

    def close(self, code: int, reason: str) -> None:
        """Send what is queued, then close with ``code`` / ``reason``."""
        if not self.closing:
            self.closing = True
            self._queue.put_nowait(("close", code, reason))

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything queued so far has been handed to the socket."""
        if self.writer.done():
            return
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(("flush", fut))
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            log.warning("%s: flush timed out", self.name)

    async def _write_loop(self) -> None:
        ws = self.ws
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, (str, bytes)):
                    if log.isEnabledFor(logging.INFO):
                        log.info("%s -> %s", self.name, _short(item))
                    await ws.send(item)
                elif item[0] == "flush":
                    if not item[1].done():
                        item[1].set_result(None)
                else:
                    _, code, reason = item
                    log.info("%s closing: %s %s", self.name, code, reason)
                    await ws.close(code, reason)
                    return
        except ConnectionClosed:
            pass
        finally:
            # Nobody will drain the queue any more: release pending flushes.
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if isinstance(item, tuple) and item[0] == "flush" and not item[1].done():
                    item[1].set_result(None)


def _parse_or_raw(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested too deep to parse
        return {"_raw": text}
    return value if isinstance(value, dict) else {"_raw": text}


class Simulator:
    """A local stand-in for the Pinecall server (WhatsApp + human takeover).

    See the module docstring for the choices it makes where the protocol is silent.

    Beyond the agreed API there are a few extras for tests and demos:
    keyword-only ``window`` (the 24 h customer-service window, in seconds),
    ``demo_idle_timeout`` / ``demo_speed``, ``max_buffer`` and ``auth_timeout``;
    ``sent`` (every frame handed to a client), ``receipt_limits``,
    ``agent(agent_id)`` (the server's record: config, channel, pause levels),
    ``pause()`` / ``resume()`` (server-side state changes, confirmed to the
    agent), ``inject()`` (any frame, hostile ones included: a str sent verbatim,
    bytes as a binary frame), ``close_connections()`` (clean close with a code) and
    ``customer_says(..., idle_timeout=)`` (per-session override).

    Voice: ``place_call()`` (a caller rings a number an agent added), ``calls`` (the
    server's record of every call), ``caller_says()`` (one more line of the caller,
    now), ``end_call()`` (the caller hangs up), ``call_player()``,
    ``wait_sent()`` (like ``wait_for``, on the frames sent); ``voice_pace`` (seconds
    per word, 0 in tests), ``call_idle_timeout``, ``call_max_duration``,
    ``ring_timeout``, ``demo_call_interval``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        api_keys: Iterable[str] | None = None,
        ai_delay: float = 0.0,
        status_delay: float = 0.0,
        idle_timeout: float = 7200.0,
        resume_grace: float = 60.0,
        replay_last: int = 3,
        on_duplicate_agent: str = "displace",
        capacity: int | None = None,
        demo: bool = False,
        *,
        window: float = WINDOW_SECONDS,
        demo_idle_timeout: float = 180.0,
        demo_speed: float = 1.0,
        max_buffer: int = 100_000,
        auth_timeout: float = AUTH_TIMEOUT,
        voice_pace: float = 0.3,
        call_idle_timeout: float = 30.0,
        call_max_duration: float = 1800.0,
        ring_timeout: float = 5.0,
        demo_call_interval: float = 60.0,
    ) -> None:
        if on_duplicate_agent not in ("displace", "conflict"):
            raise ValueError("on_duplicate_agent must be 'displace' or 'conflict'")
        self.host = host
        self._requested_port = port
        self.api_keys: frozenset[str] | None = None if api_keys is None else frozenset(api_keys)
        self.ai_delay = ai_delay
        self.status_delay = status_delay
        self.idle_timeout = idle_timeout
        self.resume_grace = resume_grace
        self.replay_last = replay_last
        self.on_duplicate_agent = on_duplicate_agent
        self.capacity = capacity
        self.demo = demo
        self.window = window
        self.demo_idle_timeout = demo_idle_timeout
        self.demo_speed = demo_speed
        self.max_buffer = max_buffer
        self.auth_timeout = auth_timeout
        self.voice_pace = voice_pace
        self.call_idle_timeout = call_idle_timeout
        self.call_max_duration = call_max_duration
        self.ring_timeout = ring_timeout
        self.demo_call_interval = demo_call_interval

        #: Every frame received from clients, in order, parsed ({"_raw": text} if not an object).
        self.received: list[dict[str, Any]] = []
        #: Every frame handed to a client connection, in order.
        self.sent: list[dict[str, Any]] = []
        #: session_id -> Session (ended ones stay, with ``ended=True``).
        self.sessions: dict[str, Session] = {}
        #: recipient phone -> last status it reaches ("sent", "delivered", "read" or "failed").
        self.receipt_limits: dict[str, str] = {}
        #: call_id -> Call (ended ones stay, with ``state == "ended"``).
        self.calls: dict[str, Call] = {}

        self._agents: dict[str, AgentState] = {}
        self._active: dict[tuple[str, str], Session] = {}  # (agent_id, phone) -> live session
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._conns: set[_Connection] = set()
        self._conn_counter = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._server: Server | None = None
        self._demo_task: asyncio.Task[None] | None = None
        self._voice_demo_task: asyncio.Task[None] | None = None
        self._players: dict[str, CallPlayer] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._commands = {
            "connect": self._cmd_connect,
            "ping": self._cmd_ping,
            "pong": self._cmd_pong,
            "agent.create": self._cmd_agent_create,
            "channel.add": self._cmd_channel_add,
            "session.pause": self._cmd_pause,
            "session.resume": self._cmd_resume,
            "session.send": self._cmd_send,
            "history.get": self._cmd_history_get,
            "history.set": self._cmd_history_set,
            "history.add": self._cmd_history_add,
            "bot.reply": self._cmd_bot_reply,
            "bot.cancel": self._cmd_bot_cancel,
            "call.forward": self._cmd_call_forward,
            "call.hold": self._cmd_call_hold,
            "call.unhold": self._cmd_call_unhold,
            "call.mute": self._cmd_call_mute,
            "call.unmute": self._cmd_call_unmute,
            "call.hangup": self._cmd_call_hangup,
            "call.accept": self._cmd_call_accept,
            "call.reject": self._cmd_call_reject,
        }

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> "Simulator":
        if self._server is not None:
            return self
        self._loop = asyncio.get_running_loop()
        self._server = await serve(
            self._handle,
            self.host,
            self._requested_port,
            compression=None,
            close_timeout=2,
            max_queue=None,
        )
        log.info("Pinecall simulator listening on %s%s", self.url, CLIENT_PATH)
        if self.demo:
            self._demo_task = asyncio.create_task(
                run_demo(self, speed=self.demo_speed), name="sim-demo"
            )
            self._voice_demo_task = asyncio.create_task(
                run_voice_demo(self, interval=self.demo_call_interval, speed=self.demo_speed),
                name="sim-voice-demo",
            )
        return self

    async def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        for name in ("_demo_task", "_voice_demo_task"):
            task = getattr(self, name)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                setattr(self, name, None)
        call_tasks = []
        for player in list(self._players.values()):
            call_tasks += player.tasks
            player.end("simulator_stopped", notify=False)
        if call_tasks:
            await asyncio.wait(call_tasks, timeout=2)  # cancelled: they end at once
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        server.close()
        await server.wait_closed()
        log.info("Pinecall simulator stopped")

    async def __aenter__(self) -> "Simulator":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the simulator is not running")
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    @property
    def connected_agents(self) -> set[str]:
        return {a.agent_id for a in self._agents.values() if a.conn is not None}

    # ------------------------------------------------------------------ connections

    async def _handle(self, ws: ServerConnection) -> None:
        self._conn_counter += 1
        conn = _Connection(self, ws, self._conn_counter)
        self._conns.add(conn)
        log.info("%s opened from %s path %s", conn.name, ws.remote_address, ws.request.path)
        try:
            if urlsplit(ws.request.path).path != CLIENT_PATH:
                conn.close(1008, f"Unknown path; connect to {CLIENT_PATH}")
                await conn.writer
                return
            if not await self._authenticate(conn):
                await conn.writer
                return
            async for message in ws:
                self._on_message(conn, message)
        except ConnectionClosed:
            pass
        finally:
            self._detach(conn)
            if conn.closing and not conn.writer.done():
                try:
                    await asyncio.wait_for(conn.writer, 3)
                except (TimeoutError, asyncio.CancelledError):
                    pass
            conn.writer.cancel()
            conn.done.set()
            log.info("%s closed (code %s)", conn.name, ws.close_code)

    async def _authenticate(self, conn: _Connection) -> bool:
        try:
            message = await asyncio.wait_for(conn.ws.recv(), self.auth_timeout)
        except TimeoutError:
            return self._reject(conn, f"no connect frame within {self.auth_timeout:g} s")
        except ConnectionClosed:
            return False
        frame = self._record(conn, message)
        if frame.get("event") != "connect":
            return self._reject(
                conn, 'the first frame must be {"event":"connect","api_key":"..."}'
            )
        key = frame.get("api_key")
        if not isinstance(key, str) or not key:
            return self._reject(conn, "missing api_key")
        if self.api_keys is not None and key not in self.api_keys:
            return self._reject(conn, "invalid API key")
        conn.authenticated = True
        conn.send({"event": "connected"})
        return True

    def _reject(self, conn: _Connection, message: str) -> bool:
        conn.send({"event": "error", "code": "UNAUTHORIZED", "message": message})
        conn.close(1008, "Unauthorized")
        return False

    def _detach(self, conn: _Connection) -> None:
        """The connection is gone (or going): its agents become offline."""
        self._conns.discard(conn)
        now = time.monotonic()
        for agent_id in conn.agents:
            agent = self._agents.get(agent_id)
            if agent is not None and agent.conn is conn:
                agent.conn = None
                agent.dropped_at = now
                log.info("agent %s offline (was on %s)", agent_id, conn.name)
                self._end_calls_of(agent_id)
        conn.agents.clear()

    def _end_calls_of(self, agent_id: str) -> None:
        """The agent's connection went away: its calls end, and no call.ended is sent."""
        for player in list(self._players.values()):
            if player.call.agent_id == agent_id and not player.call.ended:
                player.end("agent_disconnected", notify=False)

    def _record(self, conn: _Connection, message: str | bytes) -> dict[str, Any]:
        if isinstance(message, bytes):
            text = message.decode("utf-8", errors="replace")
            frame = {"_raw": text, "_binary": True}
        else:
            text = message
            frame = _parse_or_raw(text)
        if log.isEnabledFor(logging.INFO):
            log.info("%s <- %s", conn.name, _short(text))
        self.received.append(frame)
        self._notify()
        return frame

    def _notify(self) -> None:
        """Wake ``wait_for`` / ``wait_sent``: a frame was received or sent."""
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def _on_message(self, conn: _Connection, message: str | bytes) -> None:
        frame = self._record(conn, message)
        try:
            if frame.get("_binary"):
                raise CommandError("INVALID_COMMAND", "binary frames are not supported")
            if "_raw" in frame:
                raise CommandError("INVALID_COMMAND", "a frame must be one JSON object")
            event = frame.get("event")
            if not isinstance(event, str) or not event:
                raise CommandError("INVALID_COMMAND", 'a frame needs an "event" string')
            handler = self._commands.get(event)
            if handler is None:
                raise CommandError("UNKNOWN_EVENT", f"unknown event {event!r}")
            handler(conn, frame)
        except CommandError as exc:
            conn.send(exc.frame)
        except Exception:  # never let a bad frame kill the connection
            log.exception("%s: error handling %r", conn.name, frame)
            conn.send({"event": "error", "code": "INTERNAL_ERROR", "message": "internal error"})

    # ------------------------------------------------------------------ delivery

    def _agent_state(self, agent_id: str) -> AgentState:
        agent = self._agents.get(agent_id)
        if agent is None:
            agent = self._agents[agent_id] = AgentState(agent_id, self.replay_last)
        return agent

    def _deliver(self, agent_id: str, frame: dict[str, Any]) -> None:
        """Send an event to the agent's connection, or keep it until the agent is back."""
        agent = self._agent_state(agent_id)
        text = _dumps(frame)
        if agent.conn is not None:
            agent.conn.send(frame, text)
            agent.recent.append(text)
            return
        agent.buffer.append(text)
        if len(agent.buffer) > self.max_buffer:
            agent.buffer.popleft()
            log.warning("agent %s: offline buffer full, oldest event dropped", agent_id)
        elif log.isEnabledFor(logging.INFO):
            log.info("agent %s offline, buffered: %s", agent_id, _short(text))

    def _deliver_live(self, agent_id: str, frame: dict[str, Any]) -> None:
        """A call's frame: to the agent's connection now, or nowhere. Calls are live media:
        they end with their connection, and their frames are neither kept nor replayed."""
        agent = self._agents.get(agent_id)
        if agent is not None and agent.conn is not None:
            agent.conn.send(frame)
        else:
            log.info("agent %s offline, call frame dropped: %s", agent_id, _short(_dumps(frame)))

    # ------------------------------------------------------------------ commands

    def _cmd_connect(self, conn: _Connection, frame: dict[str, Any]) -> None:
        conn.send({"event": "connected"})

    def _cmd_ping(self, conn: _Connection, frame: dict[str, Any]) -> None:
        conn.send({"event": "pong"})

    def _cmd_pong(self, conn: _Connection, frame: dict[str, Any]) -> None:
        pass  # the answer to our ping; nothing to say back

    @staticmethod
    def _agent_id_of(frame: dict[str, Any]) -> str:
        agent_id = frame.get("agent_id")
        if not isinstance(agent_id, str) or not agent_id:
            raise CommandError("INVALID_COMMAND", "agent_id must be a non-empty string")
        return agent_id

    def _own_agent(self, conn: _Connection, frame: dict[str, Any]) -> AgentState:
        agent_id = self._agent_id_of(frame)
        if agent_id not in conn.agents:
            raise CommandError(
                "INVALID_COMMAND",
                f"agent {agent_id!r} is not registered on this connection "
                "(send agent.create first)",
                agent_id=agent_id,
            )
        return self._agents[agent_id]

    @staticmethod
    def _opt_str(frame: dict[str, Any], key: str, agent_id: str | None = None) -> str | None:
        if key not in frame:
            return None
        value = frame[key]
        if not isinstance(value, str) or not value:
            raise CommandError(
                "INVALID_COMMAND", f"{key} must be a non-empty string when present",
                agent_id=agent_id,
            )
        return value

    def _cmd_agent_create(self, conn: _Connection, frame: dict[str, Any]) -> None:
        agent_id = self._agent_id_of(frame)
        config = {k: v for k, v in frame.items() if k not in ("event", "agent_id")}
        agent = self._agents.get(agent_id)

        if agent is not None and agent.conn is conn:  # same connection, again
            agent.config.update(config)
            conn.send({"event": "agent.resumed", "agent_id": agent_id})
            return

        if agent is not None and agent.conn is not None:  # held by another live connection
            if self.on_duplicate_agent == "conflict":
                raise CommandError(
                    "AGENT_CONFLICT",
                    f"agent {agent_id!r} is held by another connection",
                    agent_id=agent_id,
                    retry_after_s=CONFLICT_RETRY_AFTER_S,
                    holder_alive=True,
                )
            self._displace(agent.conn, agent_id)
            resumed = True
        else:
            if self.capacity is not None:
                used = sum(1 for a in self._agents.values() if a.conn is not None)
                if used >= self.capacity:
                    raise CommandError(
                        "SERVER_AT_CAPACITY",
                        "the server is at capacity",
                        agent_id=agent_id,
                        used=used,
                        limit=self.capacity,
                    )
            resumed = (
                agent is not None
                and agent.registered
                and agent.dropped_at is not None
                and time.monotonic() - agent.dropped_at <= self.resume_grace
            )

        agent = self._agent_state(agent_id)
        agent.registered = True
        agent.config = config
        agent.conn = conn
        agent.dropped_at = None
        conn.agents.add(agent_id)
        conn.send({"event": "agent.resumed" if resumed else "agent.created", "agent_id": agent_id})
        if resumed:
            for text in agent.recent:  # the last few sent before: the client may have missed them
                conn.send(text)
        else:
            agent.recent.clear()
        buffered, agent.buffer = agent.buffer, deque()
        for text in buffered:
            conn.send(text)
            agent.recent.append(text)

    def _displace(self, old: _Connection, agent_id: str) -> None:
        log.info("agent %s displaced from %s", agent_id, old.name)
        old.agents.discard(agent_id)
        old.send({"event": "agent.displaced", "agent_id": agent_id, "reason": DISPLACED_REASON})
        old.close(DISPLACED_CLOSE_CODE, DISPLACED_REASON)
        self._detach(old)

    def _cmd_channel_add(self, conn: _Connection, frame: dict[str, Any]) -> None:
        agent = self._own_agent(conn, frame)
        aid = agent.agent_id
        if frame.get("type") == "phone":
            self._add_phone(conn, agent, frame)
            return
        if frame.get("type") != "whatsapp":
            raise CommandError("INVALID_COMMAND", 'channel type must be "whatsapp" or "phone"',
                               agent_id=aid)
        for key in ("ref", "accessToken"):
            if not isinstance(frame.get(key), str) or not frame[key]:
                raise CommandError("INVALID_COMMAND", f"channel.add needs {key}", agent_id=aid)
        for key in ("verifyToken", "appSecret", "phone"):
            self._opt_str(frame, key, aid)
        agent.whatsapp = {k: v for k, v in frame.items() if k != "event"}
        log.info("agent %s: WhatsApp channel %s added", aid, frame["ref"])
        conn.send({"event": "channel.added", "agent_id": aid, "type": "whatsapp",
                   "ref": frame["ref"]})

    _PHONE_OPTIONS: dict[str, tuple[type, ...]] = {
        "ringing": (bool,), "language": (str,), "config": (dict,),
        "voice": (str, dict), "stt": (str, dict), "llm": (str, dict),
    }

    def _add_phone(self, conn: _Connection, agent: AgentState, frame: dict[str, Any]) -> None:
        aid = agent.agent_id
        ref = frame.get("ref")
        if not is_phone_ref(ref):
            raise CommandError("INVALID_COMMAND",
                               "a phone channel's ref must be an E.164 number or a sip: URI",
                               agent_id=aid)
        for key, kinds in self._PHONE_OPTIONS.items():
            if key in frame and not isinstance(frame[key], kinds):
                raise CommandError("INVALID_COMMAND", f"channel.add: bad {key}", agent_id=aid)
        for other in self._agents.values():
            if other is agent or ref not in other.phones:
                continue
            if other.conn is not None:
                raise CommandError(
                    "PHONE_IN_USE", f"{ref} is in use by another agent", agent_id=aid, phone=ref,
                )
            del other.phones[ref]  # its agent is gone: the number moves over
        agent.phones[ref] = {k: v for k, v in frame.items() if k != "event"}
        log.info("agent %s: phone number %s added", aid, ref)
        conn.send({"event": "channel.added", "agent_id": aid, "type": "phone", "ref": ref})

    # -- voice: per-call commands (call_id, no agent_id)

    def _player(self, conn: _Connection, frame: dict[str, Any], *, ringing: bool = False) -> CallPlayer:
        """The live call a per-call command names (``ringing``: a call still ringing)."""
        call_id = frame.get("call_id")
        if not isinstance(call_id, str) or not call_id:
            raise CommandError("INVALID_COMMAND", f"{frame['event']} needs call_id")
        player = self._players.get(call_id)
        if player is None or player.call.agent_id not in conn.agents:
            raise CommandError("CALL_NOT_FOUND", f"no call {call_id!r} for this connection's agents",
                               call_id=call_id)
        call = player.call
        if call.ended:
            raise CommandError("CALL_NOT_FOUND", f"call {call_id!r} has ended ({call.end_reason})",
                               call_id=call_id, agent_id=call.agent_id)
        if ringing and call.state != "ringing":
            raise CommandError("CALL_NOT_FOUND", f"call {call_id!r} is not ringing",
                               call_id=call_id, agent_id=call.agent_id)
        if not ringing and call.state == "ringing":
            raise CommandError("INVALID_COMMAND", f"call {call_id!r} is still ringing (call.accept it)",
                               call_id=call_id, agent_id=call.agent_id)
        return player

    def _cmd_bot_reply(self, conn: _Connection, frame: dict[str, Any]) -> None:
        player = self._player(conn, frame)
        call_id = player.call.id
        for key in ("message_id", "text"):
            value = frame.get(key)
            if not isinstance(value, str) or not value.strip():
                raise CommandError("INVALID_COMMAND", f"bot.reply needs {key} (a non-empty string)",
                                   call_id=call_id)
        in_reply_to = frame.get("in_reply_to", "")
        add_to_history = frame.get("add_to_history", False)
        if not isinstance(in_reply_to, str) or not isinstance(add_to_history, bool):
            raise CommandError("INVALID_COMMAND", "bot.reply: in_reply_to is a string and "
                               "add_to_history a boolean", call_id=call_id)
        player.reply(frame["message_id"], frame["text"], in_reply_to, add_to_history)

    def _cmd_bot_cancel(self, conn: _Connection, frame: dict[str, Any]) -> None:
        player = self._player(conn, frame)
        message_id = frame.get("message_id")
        if message_id is not None and not isinstance(message_id, str):
            raise CommandError("INVALID_COMMAND", "bot.cancel: message_id is a string",
                               call_id=player.call.id)
        player.cancel(message_id or None)

    def _cmd_call_forward(self, conn: _Connection, frame: dict[str, Any]) -> None:
        player = self._player(conn, frame)
        if not is_phone_ref(frame.get("to")):
            raise CommandError("INVALID_COMMAND", "call.forward needs to (an E.164 number or a sip: URI)",
                               call_id=player.call.id)
        player.forward(frame["to"])

    def _cmd_call_hold(self, conn: _Connection, frame: dict[str, Any]) -> None:
        self._player(conn, frame).hold(True)

    def _cmd_call_unhold(self, conn: _Connection, frame: dict[str, Any]) -> None:
        self._player(conn, frame).hold(False)

    def _cmd_call_mute(self, conn: _Connection, frame: dict[str, Any]) -> None:
        self._player(conn, frame).mute(True)

    def _cmd_call_unmute(self, conn: _Connection, frame: dict[str, Any]) -> None:
        self._player(conn, frame).mute(False)

    def _cmd_call_hangup(self, conn: _Connection, frame: dict[str, Any]) -> None:
        self._player(conn, frame).end("client_hangup")

    def _cmd_call_accept(self, conn: _Connection, frame: dict[str, Any]) -> None:
        self._own_agent(conn, frame)
        self._player(conn, frame, ringing=True).answer(True)

    def _cmd_call_reject(self, conn: _Connection, frame: dict[str, Any]) -> None:
        self._own_agent(conn, frame)
        player = self._player(conn, frame, ringing=True)
        reason = frame.get("reason", "rejected")
        if reason not in ("busy", "rejected"):
            raise CommandError("INVALID_COMMAND", 'call.reject: reason is "busy" or "rejected"',
                               call_id=player.call.id)
        player.answer(False, reason)

    # -- per-session requests (history.*): correlated by call_id and an echoed request_id

    def _history_request(
        self, conn: _Connection, frame: dict[str, Any], answer: str
    ) -> tuple[dict[str, Any], Session | None]:
        """The reply to fill in, and the live session named by ``call_id`` (None: unknown).

        An unknown session is answered here, with ``error``.
        """
        agent = self._own_agent(conn, frame)
        aid = agent.agent_id
        reply: dict[str, Any] = {"event": answer, "agent_id": aid}
        if "request_id" in frame:
            reply["request_id"] = frame["request_id"]
        call_id = frame.get("call_id")
        if not isinstance(call_id, str) or not call_id:
            raise CommandError(
                "INVALID_COMMAND", f"{frame['event']} needs call_id (a session_id)",
                agent_id=aid, request_id=frame.get("request_id"),
            )
        reply["call_id"] = call_id
        session = self._live_session(agent, call_id)
        if session is None:
            reply["error"] = f"no active session {call_id!r} for agent {aid!r}"
            conn.send(reply)
        return reply, session

    def _cmd_history_get(self, conn: _Connection, frame: dict[str, Any]) -> None:
        reply, session = self._history_request(conn, frame, "history.data")
        if session is not None:
            reply["messages"] = session.transcript()
            conn.send(reply)

    def _history_entries(self, frame: dict[str, Any]) -> list[dict[str, str]]:
        messages = frame.get("messages")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"]
            and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise CommandError(
                "INVALID_COMMAND", "messages must be a list of {role, content} objects of strings",
                agent_id=frame.get("agent_id"), request_id=frame.get("request_id"),
            )
        # "api": written through the protocol, neither the customer nor the AI nor a human
        return [{"role": m["role"], "content": m["content"], "source": "api"} for m in messages]

    def _cmd_history_set(self, conn: _Connection, frame: dict[str, Any]) -> None:
        reply, session = self._history_request(conn, frame, "history.updated")
        if session is not None:
            session.history = self._history_entries(frame)
            conn.send(reply)

    def _cmd_history_add(self, conn: _Connection, frame: dict[str, Any]) -> None:
        reply, session = self._history_request(conn, frame, "history.updated")
        if session is not None:
            session.history.extend(self._history_entries(frame))
            conn.send(reply)

    def _targets(self, agent: AgentState, frame: dict[str, Any]) -> tuple[str | None, str | None]:
        aid = agent.agent_id
        session_id = self._opt_str(frame, "session_id", aid)
        contact = self._opt_str(frame, "contact", aid)
        if contact is not None and not normalize_phone(contact):
            raise CommandError("INVALID_COMMAND", "contact must be a phone number", agent_id=aid)
        return session_id, contact

    def _live_session(self, agent: AgentState, session_id: str) -> Session | None:
        session = self.sessions.get(session_id)
        if session is None or session.ended or session.agent_id != agent.agent_id:
            return None
        return session

    def _pause_or_resume(self, conn: _Connection, frame: dict[str, Any], pause: bool) -> None:
        agent = self._own_agent(conn, frame)
        session_id, contact = self._targets(agent, frame)
        if session_id is not None and self._live_session(agent, session_id) is None:
            raise CommandError(
                "SESSION_NOT_FOUND",
                f"no active session {session_id!r} for agent {agent.agent_id!r}",
                agent_id=agent.agent_id,
                session_id=session_id,
            )
        self._set_pause(agent, session_id, contact, pause)

    def _set_pause(
        self, agent: AgentState, session_id: str | None, contact: str | None, pause: bool
    ) -> None:
        if pause:
            agent.pause(session_id, contact)
        else:
            agent.resume(session_id, contact)
        confirmation: dict[str, Any] = {
            "event": "session.paused" if pause else "session.resumed",
            "agent_id": agent.agent_id,
        }
        if session_id is not None:
            confirmation["session_id"] = session_id
        if contact is not None:
            confirmation["contact"] = contact
        self._deliver(agent.agent_id, confirmation)

    def _cmd_pause(self, conn: _Connection, frame: dict[str, Any]) -> None:
        self._pause_or_resume(conn, frame, pause=True)

    def _cmd_resume(self, conn: _Connection, frame: dict[str, Any]) -> None:
        self._pause_or_resume(conn, frame, pause=False)

    def _cmd_send(self, conn: _Connection, frame: dict[str, Any]) -> None:
        agent = self._own_agent(conn, frame)
        aid = agent.agent_id
        session_id, contact = self._targets(agent, frame)
        text = frame.get("text")
        if not isinstance(text, str) or not text.strip():
            raise CommandError("INVALID_COMMAND", "text must be a non-empty string", agent_id=aid,
                               session_id=session_id)
        if session_id is None and contact is None:
            raise CommandError("INVALID_COMMAND", "session.send needs session_id or contact",
                               agent_id=aid)
        session = self._live_session(agent, session_id) if session_id is not None else None
        if session is None and contact is not None:
            session = self._active.get((aid, normalize_phone(contact)))
        if session is None and contact is None:
            raise CommandError(
                "SESSION_NOT_FOUND",
                f"no active session {session_id!r} for agent {aid!r} "
                "and no contact to fall back to",
                agent_id=aid,
                session_id=session_id,
            )
        ack: dict[str, Any] = {"event": "session.sent", "agent_id": aid}
        if session_id is not None:
            ack["session_id"] = session_id
        if contact is not None:
            ack["contact"] = contact
        conn.send(ack)
        if session is not None:
            self._outgoing(session, text, source="human")
        else:
            self._direct_send(aid, normalize_phone(contact or ""), text)

    # ------------------------------------------------------------------ messages

    def _default_agent_id(self) -> str:
        whatsapp = [a for a in self._agents.values() if a.registered and a.whatsapp]
        for agent in whatsapp:
            if agent.conn is not None:
                return agent.agent_id
        if whatsapp:
            return whatsapp[0].agent_id
        for agent in self._agents.values():
            if agent.registered:
                return agent.agent_id
        return "support"

    async def customer_says(
        self,
        phone: str,
        name: str | None = None,
        text: str | None = None,
        type: str = "text",
        agent_id: str | None = None,
        *,
        idle_timeout: float | None = None,
    ) -> dict[str, str]:
        """A customer writes on WhatsApp. Returns ``{"session_id", "message_id"}``.

        ``type="audio"``: ``text`` is the voice note's transcript. For image,
        video and document it is the caption (may be empty). ``idle_timeout``
        overrides the simulator's for a session this message opens.
        """
        return self._customer_message(phone, name, text, type, agent_id, idle_timeout)

    def _customer_message(
        self,
        phone: str,
        name: str | None,
        text: str | None,
        type: str,
        agent_id: str | None,
        idle_timeout: float | None,
    ) -> dict[str, str]:
        contact = normalize_phone(phone or "")
        if not contact:
            raise ValueError(f"not a phone number: {phone!r}")
        if type not in MESSAGE_TYPES:
            raise ValueError(f"type must be one of {sorted(MESSAGE_TYPES)}")
        text = text or ""
        if type == "text" and not text:
            raise ValueError("a text message needs text")
        aid = agent_id or self._default_agent_id()
        agent = self._agent_state(aid)
        now, mono = utcnow(), time.monotonic()

        session = self._active.get((aid, contact))
        if session is None:
            session = Session(
                id=new_session_id(self.sessions),
                agent_id=aid,
                contact_phone=contact,
                contact_name=name or contact,
                started_at=now,
                last_activity=now,
                idle_timeout=self.idle_timeout if idle_timeout is None else idle_timeout,
                last_activity_mono=mono,
                last_customer_mono=mono,
            )
            self.sessions[session.id] = session
            self._active[(aid, contact)] = session
            self._arm_timer(session, min(session.idle_timeout, self.window))
            self._deliver(aid, {
                "event": "whatsapp.session_started",
                "agent_id": aid,
                "session_id": session.id,
                "contact_phone": contact,
                "contact_name": session.contact_name,
            })

        message_id = new_wamid()
        session.add_message(role="user", source="customer", text=text, message_id=message_id,
                            type=type, now=now, mono=mono)
        paused = agent.is_paused(session)
        self._deliver(aid, {
            "event": "whatsapp.message",
            "agent_id": aid,
            "session_id": session.id,
            "from": contact,
            "name": name or session.contact_name,
            "type": type,
            "text": text,
            "message_id": message_id,
            "paused": paused,
        })
        if not paused:
            if self.ai_delay <= 0:
                self._ai_answer(session, text, type)
            else:
                self._spawn(self._ai_answer_later(session, text, type))
        return {"session_id": session.id, "message_id": message_id}

    async def _ai_answer_later(self, session: Session, text: str, type: str) -> None:
        await asyncio.sleep(self.ai_delay)
        self._ai_answer(session, text, type)

    def _ai_answer(self, session: Session, text: str, type: str) -> None:
        agent = self._agents[session.agent_id]
        if session.ended or agent.is_paused(session):
            return  # a human took over (or the session ended) while the AI was thinking
        reply = ai.compose_reply(session, text, type)
        self._outgoing(session, reply, source="ai")

    def _outgoing(self, session: Session, text: str, source: str) -> None:
        """A reply into a live session (AI or human): history, response event, statuses."""
        message_id = new_wamid()
        session.add_message(role="assistant", source=source, text=text, message_id=message_id,
                            now=utcnow(), mono=time.monotonic())
        frame: dict[str, Any] = {
            "event": "whatsapp.response",
            "agent_id": session.agent_id,
            "session_id": session.id,
            "to": session.contact_phone,
            "text": text,
        }
        if source == "human":
            frame["source"] = "human"
        self._deliver(session.agent_id, frame)
        self._statuses(session.agent_id, session.contact_phone, message_id)

    def _direct_send(self, agent_id: str, phone: str, text: str) -> None:
        """A human message to a contact without a live session (see module docstring)."""
        self._deliver(agent_id, {
            "event": "whatsapp.response",
            "agent_id": agent_id,
            "to": phone,
            "text": text,
            "source": "human",
        })
        self._statuses(agent_id, phone, new_wamid())

    def _status_sequence(self, recipient: str) -> list[str]:
        limit = self.receipt_limits.get(recipient, "read")
        if limit == "failed":
            return ["sent", "failed"]
        return list(STATUS_ORDER[: STATUS_ORDER.index(limit) + 1])

    def _statuses(self, agent_id: str, recipient: str, message_id: str) -> None:
        statuses = self._status_sequence(recipient)
        if self.status_delay <= 0:
            for status in statuses:
                self._deliver(agent_id, self._status_frame(agent_id, recipient, message_id, status))
        else:
            self._spawn(self._statuses_later(agent_id, recipient, message_id, statuses))

    async def _statuses_later(
        self, agent_id: str, recipient: str, message_id: str, statuses: list[str]
    ) -> None:
        for status in statuses:
            await asyncio.sleep(self.status_delay)
            self._deliver(agent_id, self._status_frame(agent_id, recipient, message_id, status))

    @staticmethod
    def _status_frame(
        agent_id: str, recipient: str, message_id: str, status: str
    ) -> dict[str, Any]:
        return {
            "event": "whatsapp.status",
            "agent_id": agent_id,
            "status": status,
            "recipient": recipient,
            "message_id": message_id,
        }

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ session end

    def _arm_timer(self, session: Session, delay: float) -> None:
        loop = self._loop or asyncio.get_running_loop()
        self._timers[session.id] = loop.call_later(max(0.0, delay), self._check_session, session)

    def _check_session(self, session: Session) -> None:
        self._timers.pop(session.id, None)
        if session.ended:
            return
        idle_due = session.last_activity_mono + session.idle_timeout
        window_due = session.last_customer_mono + self.window
        due = min(idle_due, window_due)
        remaining = due - time.monotonic()
        if remaining > 0.001:
            self._arm_timer(session, remaining)
            return
        self._end(session, "window_expired" if window_due < idle_due else "idle_timeout")

    def _end(self, session: Session, reason: str) -> None:
        session.ended = True
        session.ended_at = utcnow()
        session.end_reason = reason
        handle = self._timers.pop(session.id, None)
        if handle is not None:
            handle.cancel()
        key = (session.agent_id, session.contact_phone)
        if self._active.get(key) is session:
            del self._active[key]
        log.info("session %s ended (%s)", session.id, reason)
        self._deliver(session.agent_id, session.ended_frame())

    async def end_session(self, session_id: str, reason: str = "idle_timeout") -> None:
        """End a session now (``reason`` "idle_timeout" or "window_expired"); no-op if ended."""
        if reason not in END_REASONS:
            raise ValueError(f"reason must be one of {sorted(END_REASONS)}")
        session = self.sessions[session_id]
        if not session.ended:
            self._end(session, reason)

    # ------------------------------------------------------------------ voice calls

    def phone_numbers(self, *, connected: bool = True) -> dict[str, str]:
        """Number -> agent id, for every phone channel added (``connected``: of agents
        on a live connection only)."""
        return {
            ref: agent.agent_id
            for agent in self._agents.values()
            if agent.conn is not None or not connected
            for ref in agent.phones
        }

    async def place_call(
        self,
        to: str | None = None,
        from_: str = "+14155550123",
        script: Any = (),
        *,
        language: str = "en",
        metadata: dict[str, Any] | None = None,
    ) -> str:
        """A caller rings ``to``, a number an agent added with ``channel.add`` type phone
        (None: the first number of a connected agent), and follows ``script`` (see
        ``state.parse_script``). Returns the call id at once; the call plays out in the
        background (``calls[call_id]`` follows it).

        Raises ``ValueError`` for a number no agent added, or a bad ``from_``/script.
        A number whose agent is offline gets the call hung up at once (recorded, ended
        with reason ``agent_offline``; nothing is sent).
        """
        steps = parse_script(script)
        if not is_phone_ref(from_):
            raise ValueError(f"from_ must be an E.164 number or a sip: URI, not {from_!r}")
        numbers = self.phone_numbers(connected=False)
        if to is None:
            live = self.phone_numbers()
            if not live:
                raise ValueError("no connected agent has added a phone number (channel.add type phone)")
            to = next(iter(live))
        ref = to if to in numbers else next(
            (r for r in numbers if normalize_phone(r) and normalize_phone(r) == normalize_phone(to)), None)
        if ref is None:
            raise ValueError(f"no agent added the number {to!r} (channel.add type phone)")
        agent = self._agents[numbers[ref]]
        call = Call(
            id=new_call_id(self.calls), agent_id=agent.agent_id, from_=from_, to=ref, script=steps,
            language=language, metadata=dict(metadata or {}),
            ringing=bool(agent.phones[ref].get("ringing")),
        )
        self.calls[call.id] = call
        player = self._players[call.id] = CallPlayer(self, call)
        if agent.conn is None:
            log.warning("call %s to %s: agent %s is offline, hung up", call.id, ref, agent.agent_id)
            player.end("agent_offline", notify=False)
            return call.id
        log.info("call %s from %s to %s (agent %s)", call.id, from_, ref, agent.agent_id)
        player.start()
        return call.id

    async def caller_says(self, call_id: str, text: str, *, barge_in: int | None = None) -> None:
        """The caller says ``text`` now, outside its script, as a script line would (it
        waits until the bot is silent, or talks over the AI's last answer after
        ``barge_in`` words; while held it waits for ``call.unhold``; while muted it is only
        collected). Returns once the line is said (the AI's answer, if any, follows)."""
        player = self._players[call_id]
        if player.call.state != "live":
            raise ValueError(f"call {call_id!r} is not live ({player.call.state})")
        step = parse_script([{"say": text, "barge_in": barge_in} if barge_in is not None else text])[0]
        task = player.spawn(player.caller_line(step), f"{call_id}-says")
        await asyncio.wait((task,))  # a call that ends meanwhile cancels the line, not us
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()

    async def end_call(self, call_id: str, reason: str = "hangup") -> None:
        """The caller hangs up now (``call.ended`` with ``reason``); no-op if it ended."""
        self._players[call_id].end(reason)

    def call_player(self, call_id: str) -> CallPlayer:
        """The player of a call (what the bot is saying: ``lines``)."""
        return self._players[call_id]

    # ------------------------------------------------------------------ inspection

    def session_history(self, session_id: str) -> list[dict[str, str]]:
        """The AI's history of a session: ``{"role", "content", "source"}`` dicts (a copy)."""
        return [dict(entry) for entry in self.sessions[session_id].history]

    def session_for(self, phone: str, agent_id: str | None = None) -> str | None:
        """The id of the contact's live session (with ``agent_id``, or any agent), or None."""
        contact = normalize_phone(phone)
        if agent_id is not None:
            session = self._active.get((agent_id, contact))
            return session.id if session else None
        latest: Session | None = None
        for (_, phone_), session in self._active.items():
            if phone_ == contact and (latest is None or session.started_at > latest.started_at):
                latest = session
        return latest.id if latest else None

    def is_paused(self, session_id: str) -> bool:
        """Whether the AI is paused for this session, all three levels considered."""
        session = self.sessions[session_id]
        return self._agents[session.agent_id].is_paused(session)

    def agent(self, agent_id: str) -> AgentState | None:
        """The server's record of an agent (config, WhatsApp channel, pause levels), if any."""
        return self._agents.get(agent_id)

    async def wait_for(
        self, event: str | None = None, timeout: float = 5.0, after: int = 0, **match: Any
    ) -> dict[str, Any]:
        """The first received frame at index >= ``after`` with this event and these fields.

        Waits up to ``timeout`` seconds for it; raises ``TimeoutError``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        index = after
        while True:
            received = self.received
            while index < len(received):
                frame = received[index]
                index += 1
                if event is not None and frame.get("event") != event:
                    continue
                if all(k in frame and frame[k] == v for k, v in match.items()):
                    return frame
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no frame event={event!r} {match!r} within {timeout} s")
            fut = loop.create_future()
            self._waiters.append(fut)
            try:
                await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                pass

    async def wait_sent(
        self, event: str | None = None, timeout: float = 5.0, after: int = 0, **match: Any
    ) -> dict[str, Any]:
        """Like :meth:`wait_for`, for the frames the simulator sent (``sent``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        index = after
        while True:
            sent = self.sent
            while index < len(sent):
                frame = sent[index]
                index += 1
                if event is not None and frame.get("event") != event:
                    continue
                if all(k in frame and frame[k] == v for k, v in match.items()):
                    return frame
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no sent frame event={event!r} {match!r} within {timeout} s")
            fut = loop.create_future()
            self._waiters.append(fut)
            try:
                await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                pass

    # ------------------------------------------------------------------ test controls

    def _connections_of(self, agent_id: str | None) -> list[_Connection]:
        if agent_id is None:
            return [c for c in self._conns if not c.closing]
        agent = self._agents.get(agent_id)
        return [agent.conn] if agent is not None and agent.conn is not None else []

    async def inject(self, frame: dict[str, Any] | str | bytes, agent_id: str | None = None) -> int:
        """Send a raw frame to the agent's connection, or to all: a dict as JSON, a str
        verbatim as a text frame (anything, JSON or not), bytes as a binary frame
        (invalid UTF-8 included). For hostile-input tests.

        Waits until it has been written; returns the number of connections. A str
        must be encodable as UTF-8 (no lone surrogates: escape them as JSON does).
        """
        targets = self._connections_of(agent_id)
        if isinstance(frame, str):
            frame.encode("utf-8")  # fail here, not in the connection's writer
            data: str | bytes = frame
        else:
            data = frame if isinstance(frame, bytes) else _dumps(frame)
        for conn in targets:
            conn.send(data)
        await asyncio.gather(*(c.flush() for c in targets))
        return len(targets)

    async def ping_clients(self) -> int:
        """Send ``{"event":"ping"}`` to every authenticated connection; returns how many."""
        targets = [c for c in self._conns if c.authenticated and not c.closing]
        for conn in targets:
            conn.send({"event": "ping"})
        await asyncio.gather(*(c.flush() for c in targets))
        return len(targets)

    async def drop_connections(self, agent_id: str | None = None, flush: bool = True) -> int:
        """Cut connections like a network failure: no close frame, the TCP socket just dies.

        With ``flush`` (default) the frames already produced are written first,
        so tests are deterministic. Returns when the server has noticed.
        """
        targets = self._connections_of(agent_id)
        if flush:
            await asyncio.gather(*(c.flush() for c in targets))
        for conn in targets:
            log.info("%s: dropping (no close frame)", conn.name)
            conn.ws.transport.abort()
        await asyncio.wait_for(asyncio.gather(*(c.done.wait() for c in targets)), 5)
        return len(targets)

    async def close_connections(
        self, code: int = 1000, reason: str = "", agent_id: str | None = None
    ) -> int:
        """Close connections cleanly with ``code`` / ``reason``; returns how many."""
        targets = self._connections_of(agent_id)
        for conn in targets:
            conn.close(code, reason)
            self._detach(conn)
        await asyncio.wait_for(asyncio.gather(*(c.done.wait() for c in targets)), 5)
        return len(targets)

    async def pause(
        self, session_id: str | None = None, contact: str | None = None, agent_id: str | None = None
    ) -> None:
        """Change pause state from the server side (someone else did it): emits session.paused."""
        self._server_side_pause(session_id, contact, agent_id, True)

    async def resume(
        self, session_id: str | None = None, contact: str | None = None, agent_id: str | None = None
    ) -> None:
        """Server-side resume (neither target: every level); emits session.resumed."""
        self._server_side_pause(session_id, contact, agent_id, False)

    def _server_side_pause(
        self, session_id: str | None, contact: str | None, agent_id: str | None, pause: bool
    ) -> None:
        if session_id is not None:
            session = self.sessions[session_id]
            agent_id = agent_id or session.agent_id
        agent = self._agent_state(agent_id or self._default_agent_id())
        self._set_pause(agent, session_id, contact, pause)
