"""The Pinecall protocol, sans I/O: frames in, effects and frames out.

:class:`ProtocolCore` knows no sockets, tasks or futures. The connection feeds it
what the server sent (:meth:`~ProtocolCore.receive`: raw text, bytes or a decoded
dict) and tells it when a connection opens or is lost; the facade hands it commands
(:meth:`~ProtocolCore.submit`). It answers with *effects*, plain data the caller
carries out in order:

* :class:`Deliver`  hand an event to the handlers (of ``agent_id``, and the client's);
* :class:`Confirm` / :class:`Reject`  a command got its confirmation / failed;
* :class:`Registered` / :class:`AgentDown`  an agent is registered / gave up (waiters);
* :class:`Later`  call :meth:`~ProtocolCore.timer_fired` with this timer after a delay
  (a conflict retry, a late registration answer);
* :class:`HangUp`  close this connection and do not reconnect (the error says why).

Frames to write are pulled one at a time with :meth:`~ProtocolCore.next_frame`: a
command counts as sent (in flight) only once its frame has been taken.

Extending the protocol: an event the client only delivers needs a class in
``events.EVENT_CLASSES`` and nothing here; an event the client acts on gets a row in
:meth:`ProtocolCore._actions`; a command gets a frame builder below, and the event
that confirms it a row in :data:`CONFIRMATIONS`.

Voice calls (``pinecall-voice-protocol.md``):

* Phone numbers (:meth:`ProtocolCore.set_phone`) are re-added after every
  registration, after the WhatsApp channel, one ``channel.add`` each; ``channel.added``
  marks one added, an ``error`` ``PHONE_IN_USE`` refuses it (forgotten until added
  again, as the JavaScript SDK does) and is delivered as an ``error`` event of the
  agent; it never fails a command.
* Per-call commands carry ``call_id`` and no ``agent_id``; their answers carry no
  request id and are matched by event and ``call_id`` (and ``message_id`` for
  ``bot.reply`` / ``bot.cancel``), first in first out. An ``error`` naming a
  ``call_id`` fails only a command of that call. ``call.ended`` / ``call.error``
  confirm a ``call.hangup`` of that call and fail every other command of it still
  waiting (``CALL_ENDED``).
* The core keeps a small record of the calls it sees (:class:`CallTrack`: whose they
  are, what the bot is saying), to route a call event that lacks ``agent_id`` and to
  know whether anything is being said (``call_cancel_speech``). When the connection is
  lost it ends them locally with a client-made ``call.ended`` (``local=True``, reason
  ``connection_lost``): the server sends none for those calls.
* ``agent_id`` may arrive as ``org_id:slug`` or slugified (:func:`resolve_agent`).
"""

from __future__ import annotations

import collections
import enum
import itertools
import json
import random
import re
import reprlib
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Union

from ._logging import logger, truncate
from .errors import PinecallError, PinecallTimeout
from .events import (
    VOICE_EVENTS,
    AgentDisplacedEvent,
    CallEndedEvent,
    ErrorEvent,
    Event,
    EVENT_CLASSES,
    RegisteredEvent,
    parse_event,
)

__all__ = [
    "ProtocolCore",
    "AgentState",
    "PhoneChannel",
    "CallTrack",
    "Phase",
    "Command",
    "Policy",
    "Handshake",
    "Deliver",
    "Confirm",
    "Reject",
    "Registered",
    "AgentDown",
    "Later",
    "HangUp",
    "Timer",
    "Effect",
    "CONFIRMATIONS",
    "RETRYABLE_REFUSALS",
    "FATAL_REFUSALS",
    "reconnect_delay",
    "decode",
    "handshake",
    "copy_error",
    "check_phone_ref",
    "phone_frame",
    "say_frame",
    "call_frame",
    "forward_frame",
    "cancel_frame",
    "accept_frame",
    "reject_frame",
    "resolve_agent",
    "slug",
]

#: registration refusals retried with backoff (for ``conflict_give_up_after`` at most)
RETRYABLE_REFUSALS = frozenset({"AGENT_CONFLICT", "AGENT_IN_USE"})
#: registration refusals that stop the registration of that agent at once
FATAL_REFUSALS = frozenset({"AGENT_CONFLICT_FATAL", "SERVER_AT_CAPACITY"})


# --- timing ---------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Policy:
    """The timing knobs of the client's decisions; read afresh at each decision.

    The field names are those of :class:`~pinecall_sdk.Pinecall`'s options:
    ``Policy.of(pc)`` is a snapshot of a client's current settings.
    """

    command_timeout: float | None = 10.0
    reconnect_base_delay: float = 1.0
    reconnect_max_delay: float = 30.0
    reconnect_jitter: float = 0.25
    conflict_base_delay: float = 1.0
    conflict_max_delay: float = 15.0
    conflict_give_up_after: float = 90.0
    conflict_retry_after_cap: float | None = None

    @classmethod
    def of(cls, settings: Any) -> "Policy":
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

    def reconnect_delay(self, attempt: int) -> float:
        return reconnect_delay(
            attempt, base=self.reconnect_base_delay, cap=self.reconnect_max_delay,
            jitter=self.reconnect_jitter,
        )

    def conflict_delay(self, retries: int, retry_after_s: float | None) -> float:
        """The backoff, but never less than the server's ``retry_after_s`` (capped if set)."""
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


# --- frames out: one builder per command -------------------------------------------------

PING: dict[str, Any] = {"event": "ping"}
PONG: dict[str, Any] = {"event": "pong"}


def connect_frame(api_key: str | None) -> dict[str, Any]:
    return {"event": "connect", "api_key": api_key or ""}


def create_frame(agent_id: str, config: dict[str, Any]) -> dict[str, Any]:
    """``agent.create``; config keys that are not set are left out, never sent as null."""
    frame: dict[str, Any] = {"event": "agent.create", "agent_id": agent_id}
    frame.update((k, v) for k, v in config.items() if v is not None)
    return frame


def channel_frame(agent_id: str, whatsapp: dict[str, Any]) -> dict[str, Any]:
    """``channel.add`` for a WhatsApp number (credentials camelCase, optional ones when set)."""
    frame: dict[str, Any] = {
        "event": "channel.add",
        "agent_id": agent_id,
        "type": "whatsapp",
        "ref": whatsapp["phone_number_id"],
        "accessToken": whatsapp["access_token"],
    }
    for key, wire in (("verify_token", "verifyToken"), ("app_secret", "appSecret"), ("phone", "phone")):
        if whatsapp.get(key) is not None:
            frame[wire] = whatsapp[key]
    return frame


def target_frame(
    kind: str, agent_id: str, session_id: str | None = None, contact: str | None = None
) -> dict[str, Any]:
    """``session.pause`` / ``session.resume``: one session, a contact, or (neither) the agent."""
    frame: dict[str, Any] = {"event": kind, "agent_id": agent_id}
    if session_id is not None:
        frame["session_id"] = session_id
    if contact is not None:
        frame["contact"] = contact
    return frame


def send_frame(agent_id: str, session_id: str | None, contact: str | None, text: str) -> dict[str, Any]:
    return {**target_frame("session.send", agent_id, session_id, contact), "text": text}


def history_frame(agent_id: str, call_id: str, request_id: str | None = None) -> dict[str, Any]:
    """``history.get`` for a WhatsApp session (``call_id``), with a fresh ``request_id``."""
    return {
        "event": "history.get",
        "agent_id": agent_id,
        "call_id": call_id,
        "request_id": request_id or uuid.uuid4().hex,
    }


# Voice (pinecall-voice-protocol.md). Per-call commands carry call_id and no agent_id.

#: ``ref`` of a phone channel: E.164 (``+`` and 7-15 digits) or a ``sip:`` URI
_E164 = re.compile(r"\+[0-9]{7,15}")


def check_phone_ref(ref: Any) -> bool:
    """True for an E.164 number or a ``sip:`` URI (as the JavaScript SDK checks it)."""
    if not isinstance(ref, str):
        return False
    if ref.startswith("sip:"):
        return len(ref) > 4 and not any(c.isspace() for c in ref)
    return _E164.fullmatch(ref) is not None


def phone_frame(agent_id: str, ref: str, options: dict[str, Any]) -> dict[str, Any]:
    """``channel.add`` for a phone number; options that are not set are left out."""
    frame: dict[str, Any] = {"event": "channel.add", "agent_id": agent_id, "type": "phone", "ref": ref}
    frame.update((k, v) for k, v in options.items() if v is not None)
    return frame


def call_frame(kind: str, call_id: str) -> dict[str, Any]:
    """``call.hold`` / ``call.unhold`` / ``call.mute`` / ``call.unmute`` / ``call.hangup``."""
    return {"event": kind, "call_id": call_id}


def say_frame(call_id: str, message_id: str, text: str, add_to_history: bool) -> dict[str, Any]:
    """``bot.reply`` of a line of our own (``in_reply_to`` empty: it answers no user turn)."""
    frame: dict[str, Any] = {
        "event": "bot.reply", "call_id": call_id, "message_id": message_id, "text": text,
        "in_reply_to": "",
    }
    if add_to_history:
        frame["add_to_history"] = True
    return frame


def forward_frame(call_id: str, to: str) -> dict[str, Any]:
    """``call.forward``; the JavaScript SDK always sends ``message`` and ``announce``."""
    return {"event": "call.forward", "call_id": call_id, "to": to, "message": "", "announce": False}


def cancel_frame(call_id: str, message_id: str | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"event": "bot.cancel", "call_id": call_id}
    if message_id is not None:
        frame["message_id"] = message_id
    return frame


def accept_frame(agent_id: str, call_id: str) -> dict[str, Any]:
    return {"event": "call.accept", "agent_id": agent_id, "call_id": call_id}


def reject_frame(agent_id: str, call_id: str, reason: str) -> dict[str, Any]:
    return {"event": "call.reject", "agent_id": agent_id, "call_id": call_id, "reason": reason}


def slug(name: str) -> str:
    """An agent name as the server may slugify it: lowercase, ``_`` and spaces as ``-``."""
    return re.sub(r"[_\s]", "-", name.lower())


def resolve_agent(agent_id: str, agents: dict[str, Any]) -> Any:
    """The agent (a value of ``agents``) an ``agent_id`` from the server names, or None.

    Exactly; else the part after ``org_id:``; else by slug (``Support_Team`` is
    ``support-team``).
    """
    found = agents.get(agent_id)
    if found is not None:
        return found
    tail = agent_id.split(":", 1)[1] if ":" in agent_id else agent_id
    found = agents.get(tail)
    if found is not None:
        return found
    wanted = slug(tail)
    return next((state for name, state in agents.items() if slug(name) == wanted), None)


# --- frames in: decoding ------------------------------------------------------------------


def decode(data: str | bytes | bytearray | memoryview | dict[str, Any]) -> Event | None:
    """One frame (text, UTF-8 JSON in a binary frame, or already decoded) as its event.

    None: skip it. Whatever reading a frame raises (ValueError, RecursionError from deep
    nesting, UnicodeError, MemoryError...) is about that frame alone: one WARNING line.
    """
    try:
        if isinstance(data, dict):
            return parse_event(data)
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data).decode("utf-8")
        return parse_event(json.loads(data))
    except Exception as exc:
        shown = data if isinstance(data, (str, bytes)) else reprlib.repr(data)  # bounded, even if deep
        logger.warning(
            "skipping a frame that is not a readable event (%s: %s): %s",
            type(exc).__name__, truncate(str(exc)), truncate(shown),
        )
        return None


@dataclass(frozen=True)
class Handshake:
    """What to do with one frame before ``connected``: reply, done, or refused."""

    connected: Event | None = None
    reply: dict[str, Any] | None = None
    error: PinecallError | None = None


def handshake(data: Any) -> Handshake:
    """The handshake step for a frame received after ``connect`` and before ``connected``.

    ``authenticated`` and anything else is ignored; an ``error`` is the refusal of the key.
    """
    ev = decode(data)
    if ev is None:
        return Handshake()
    if ev.event == "connected":
        return Handshake(connected=ev)
    if ev.event == "error":
        err = PinecallError.from_frame(ev.raw)
        if err.code is None:
            err.code = "UNAUTHORIZED"
        return Handshake(error=err)
    if ev.event == "ping":
        return Handshake(reply=PONG)
    return Handshake()


# --- commands and agents ------------------------------------------------------------------


def copy_error(err: PinecallError) -> PinecallError:
    """A fresh exception of the same kind (raising one instance many times grows its traceback)."""
    if isinstance(err, PinecallTimeout):
        return PinecallTimeout(err.message, code=err.code, frame=err.frame)
    return PinecallError(err.message, code=err.code, frame=err.frame)


@dataclass(eq=False)
class Command:
    """One command of the application, from the queue to its confirmation."""

    seq: int
    agent_id: str
    kind: str  # the frame's event: "session.pause", "history.get", ...
    frame: dict[str, Any]
    session_id: str | None = None  # for history.get: the call_id
    contact: str | None = None
    request_id: str | None = None
    expects_reply: bool = True  # False: fire-and-forget (a late channel.add)
    sent: bool = False
    call_id: str | None = None  # per-call commands: the call they act on
    message_id: str | None = None  # bot.reply / bot.cancel: the line

    def describe(self) -> str:
        if self.call_id is not None:
            line = f" message {self.message_id!r}" if self.message_id is not None else ""
            return f"{self.kind} for call {self.call_id!r}{line} (agent {self.agent_id!r})"
        if self.session_id and self.contact:
            target = f"session {self.session_id!r} / contact {self.contact!r}"
        elif self.session_id:
            target = f"session {self.session_id!r}"
        elif self.contact:
            target = f"contact {self.contact!r}"
        else:
            target = "the whole agent"
        return f"{self.kind} for {target} (agent {self.agent_id!r})"


class Phase(enum.Enum):
    """Where an agent's registration stands on the current connection."""

    OFFLINE = "offline"  # no connection (or not registered on it yet): registers on the next
    REGISTERING = "registering"  # agent.create sent, its answer awaited
    BACKING_OFF = "backing_off"  # refused with a conflict: agent.create again after a delay
    REGISTERED = "registered"  # created/resumed, channels added, commands flowing
    REFUSED = "refused"  # given up on this connection (``failure`` says why)
    DISPLACED = "displaced"  # another connection took it: not registered again until asked


_LIVE = (Phase.REGISTERING, Phase.BACKING_OFF, Phase.REGISTERED)


@dataclass(eq=False)
class PhoneChannel:
    """A phone number of an agent (:meth:`Agent.add_phone`) and where it stands.

    ``status``: ``"pending"`` (sent, or to be sent, on the current connection, no answer
    yet), ``"added"`` (``channel.added``) or ``"refused"`` (``PHONE_IN_USE``: not sent
    again until it is added again; ``error`` says why).
    """

    ref: str
    options: dict[str, Any] = field(default_factory=dict)
    status: str = "pending"
    error: PinecallError | None = None

    def copy(self) -> "PhoneChannel":
        return PhoneChannel(self.ref, dict(self.options), self.status, self.error)


@dataclass(eq=False)
class CallTrack:
    """What the core knows of a live call: whose it is and what the bot is saying.

    ``speaking`` is the ``message_id`` of the line being spoken (``""`` for one without
    an id), None when the bot is silent; ``speech_known`` is False until the core has
    seen the call start or a ``bot.*`` event (then ``speaking`` is a fact).
    """

    call_id: str
    agent_id: str
    speaking: str | None = None
    speech_known: bool = False


@dataclass(eq=False)
class AgentState:
    """The core's record of one agent: configuration, queue, commands in flight."""

    agent_id: str
    config: dict[str, Any]
    whatsapp: dict[str, Any] | None = None
    phones: dict[str, PhoneChannel] = field(default_factory=dict)
    phase: Phase = Phase.OFFLINE
    failure: PinecallError | None = None  # set while REFUSED or DISPLACED
    outbox: collections.deque[Command] = field(default_factory=collections.deque)
    inflight: list[Command] = field(default_factory=list)
    attempt: int = 0  # agent.create frames sent (a timer of an older attempt is stale)
    first_refusal: float | None = None
    retries: int = 0


# --- effects --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deliver:
    event: Event
    agent_id: str | None  # whose handlers get it (besides the client's); None: the client's only


@dataclass(frozen=True)
class Confirm:
    command: Command
    event: Event


@dataclass(frozen=True)
class Reject:
    command: Command
    error: PinecallError


@dataclass(frozen=True)
class Registered:
    agent_id: str


@dataclass(frozen=True)
class AgentDown:
    agent_id: str
    error: PinecallError


@dataclass(frozen=True)
class Timer:
    kind: str  # RETRY_REGISTRATION | REGISTRATION_OVERDUE
    agent_id: str
    epoch: int  # the connection it belongs to
    attempt: int


RETRY_REGISTRATION = "retry-registration"
REGISTRATION_OVERDUE = "registration-overdue"


@dataclass(frozen=True)
class Later:
    delay: float
    timer: Timer


@dataclass(frozen=True)
class HangUp:
    error: PinecallError


Effect = Union[Deliver, Confirm, Reject, Registered, AgentDown, Later, HangUp]


# --- confirmations: which event answers which command ------------------------------------
#
# Frames carry no request id (history.* aside): a confirmation is matched to a command
# in flight by event and target, first in first out. ``match`` gets the in-flight
# commands of that kind, oldest first, and picks one (or None: the event is only state).


def _exact_target(ev: Event, cmds: list[Command]) -> Command | None:
    """``session.paused`` / ``session.resumed``: only a command with exactly that target
    (they are also state changes made by others)."""
    sid, contact = getattr(ev, "session_id", None), getattr(ev, "contact", None)
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


def _send_target(ev: Event, cmds: list[Command]) -> Command | None:
    """``session.sent``: never unsolicited, and the server may answer a contact send with
    the session it used: exact target, then a compatible one, then the oldest."""
    sid, contact = getattr(ev, "session_id", None), getattr(ev, "contact", None)
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
    return cmds[0] if cmds else None


def _history_request(ev: Event, cmds: list[Command]) -> Command | None:
    """``history.data``: by the echoed ``request_id`` (none matching: a stale answer),
    else by ``call_id``, else the oldest."""
    request_id = getattr(ev, "request_id", None)
    if request_id is not None:
        return next((c for c in cmds if c.request_id == request_id), None)
    call_id = getattr(ev, "call_id", None)
    return next((c for c in cmds if c.session_id == call_id), cmds[0] if cmds else None)


def _history_error(ev: Event, cmd: Command) -> PinecallError | None:
    error = getattr(ev, "error", None)
    if error is None:
        return None
    # the protocol's only error here: the server has no such session
    return PinecallError(f"{cmd.describe()}: {error}", code="SESSION_NOT_FOUND", frame=ev.raw)


def _no_error(ev: Event, cmd: Command) -> PinecallError | None:
    return None


def _call_of(ev: Event) -> str | None:
    """The call an event is about: ``call_id``, else ``session_id`` (the same in captures)."""
    return getattr(ev, "call_id", None) or getattr(ev, "session_id", None)


def _same_call(ev: Event, cmds: list[Command]) -> Command | None:
    """A per-call confirmation (``call.held``, ``call.forwarded``...): the oldest command
    of that call. None without a call id: these are never matched blindly."""
    call_id = _call_of(ev)
    return next((c for c in cmds if c.call_id == call_id), None) if call_id else None


def _same_line(ev: Event, cmds: list[Command]) -> Command | None:
    """``bot.speaking`` / ``reply.rejected`` / ``message.aborted``: the ``bot.reply`` of
    that call with that ``message_id``."""
    call_id, message_id = _call_of(ev), getattr(ev, "message_id", None)
    if not call_id or message_id is None:
        return None
    return next((c for c in cmds if c.call_id == call_id and c.message_id == message_id), None)


def _cancelled_line(ev: Event, cmds: list[Command]) -> Command | None:
    """``bot.interrupted`` (or ``bot.finished``: it ended by itself meanwhile): a
    ``bot.cancel`` of that call, for that line or for whatever was being said."""
    call_id, message_id = _call_of(ev), getattr(ev, "message_id", None)
    if not call_id:
        return None
    return next((c for c in cmds if c.call_id == call_id
                 and (c.message_id is None or message_id is None or c.message_id == message_id)), None)


def _line_refused(code: str) -> Callable[[Event, Command], PinecallError | None]:
    def error(ev: Event, cmd: Command) -> PinecallError | None:
        reason = getattr(ev, "reason", None)
        return PinecallError(
            f"{cmd.describe()}: {ev.event}" + (f" ({reason})" if reason else ""), code=code, frame=ev.raw,
        )

    return error


@dataclass(frozen=True)
class Confirmation:
    command: str  # the kind of command it answers
    match: Callable[[Event, list[Command]], Command | None]
    error: Callable[[Event, Command], PinecallError | None] = _no_error  # an answer that is a failure


#: event -> the rule (or rules, tried in order: one event may answer two commands)
CONFIRMATIONS: dict[str, Confirmation | tuple[Confirmation, ...]] = {
    "session.paused": Confirmation("session.pause", _exact_target),
    "session.resumed": Confirmation("session.resume", _exact_target),
    "session.sent": Confirmation("session.send", _send_target),
    "history.data": Confirmation("history.get", _history_request, _history_error),
    # voice: by call_id (and message_id), first in first out
    "bot.speaking": Confirmation("bot.reply", _same_line),
    "reply.rejected": Confirmation("bot.reply", _same_line, _line_refused("REPLY_REJECTED")),
    # a line dropped before it was said: its reply fails, the cancel that dropped it is done
    "message.aborted": (Confirmation("bot.reply", _same_line, _line_refused("MESSAGE_ABORTED")),
                        Confirmation("bot.cancel", _cancelled_line)),
    "bot.interrupted": Confirmation("bot.cancel", _cancelled_line),
    "bot.finished": Confirmation("bot.cancel", _cancelled_line),
    "call.forwarded": Confirmation("call.forward", _same_call),
    "call.held": Confirmation("call.hold", _same_call),
    "call.unheld": Confirmation("call.unhold", _same_call),
    "call.muted": Confirmation("call.mute", _same_call),
    "call.unmuted": Confirmation("call.unmute", _same_call),
    "call.started": Confirmation("call.accept", _same_call),
    "call.rejected": Confirmation("call.reject", _same_call),
}
# call.ended / call.error are actions (ProtocolCore._on_call_over): they confirm a
# call.hangup and fail whatever else waits on that call.


# --- the core -----------------------------------------------------------------------------


class ProtocolCore:
    """The protocol state of one client: its agents, their queues, what is in flight.

    ``policy`` is called at each decision for the current timings (default: the
    documented ones); ``clock`` gives the time in seconds (only differences count).
    """

    def __init__(
        self,
        policy: Callable[[], Policy] = Policy,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.agents: dict[str, AgentState] = {}
        self.open = False  # between connection_opened() and connection_lost()
        self.last_pong: float | None = None
        self._epoch = 0
        self._seq = itertools.count()
        self._control: collections.deque[dict[str, Any]] = collections.deque()
        #: call_id -> what the core knows of that live call
        self.calls: dict[str, CallTrack] = {}
        # The events the core acts on, beyond delivering them (confirmations: CONFIRMATIONS).
        self._actions: dict[str, Callable[[Event, AgentState | None], list[Effect]]] = {
            "ping": self._on_ping,
            "pong": self._on_pong,
            "agent.created": self._on_registration_answer,
            "agent.resumed": self._on_registration_answer,
            "agent.displaced": self._on_displaced,
            "error": self._on_error,
            "channel.added": self._on_channel_added,
            "call.ended": self._on_call_over,
            "call.error": self._on_call_over,
        }

    # -- agents and commands (from the application) ----------------------------------------

    def add_agent(self, agent_id: str, config: dict[str, Any]) -> list[Effect]:
        """Declare an agent; on a live connection it registers at once."""
        state = AgentState(agent_id, {k: v for k, v in config.items() if v is not None})
        self.agents[agent_id] = state
        return self._start_registration(state) if self.open else []

    def set_whatsapp(self, agent_id: str, whatsapp: dict[str, Any]) -> None:
        """Attach a WhatsApp number: sent after every registration, and now if registered
        (after the commands already queued)."""
        state = self.agents[agent_id]
        state.whatsapp = dict(whatsapp)
        if state.phase is Phase.REGISTERED:
            state.outbox.append(Command(
                seq=next(self._seq), agent_id=agent_id, kind="channel.add",
                frame=channel_frame(agent_id, state.whatsapp), expects_reply=False,
            ))

    def set_phone(self, agent_id: str, ref: str, options: dict[str, Any]) -> None:
        """Add (or replace) a phone number: sent after every registration, and now if
        registered (after the commands already queued). Clears an earlier refusal."""
        state = self.agents[agent_id]
        phone = PhoneChannel(ref, {k: v for k, v in options.items() if v is not None})
        state.phones.pop(ref, None)  # re-added: to the end, in the order added
        state.phones[ref] = phone
        if state.phase is Phase.REGISTERED:
            state.outbox.append(Command(
                seq=next(self._seq), agent_id=agent_id, kind="channel.add",
                frame=phone_frame(agent_id, ref, phone.options), expects_reply=False,
            ))

    def is_speaking(self, call_id: str, message_id: str | None = None) -> bool | None:
        """Whether the bot is saying something on ``call_id`` (that line, with
        ``message_id``), or a ``bot.reply`` of ours is on its way there; None when the core
        does not know (a call it has not seen start, nor any line of end)."""
        track = self.calls.get(call_id)
        if track is not None and track.speaking is not None and (
            message_id is None or track.speaking in (message_id, "")
        ):
            return True
        for state in self.agents.values():  # a line of ours on its way (queued, or not started)
            for cmd in (*state.outbox, *state.inflight):
                if cmd.kind == "bot.reply" and cmd.call_id == call_id and (
                    message_id is None or cmd.message_id == message_id
                ):
                    return True
        if track is None or not track.speech_known:
            return None
        return False

    def submit(
        self,
        agent_id: str,
        frame: dict[str, Any],
        *,
        session_id: str | None = None,
        contact: str | None = None,
        request_id: str | None = None,
        call_id: str | None = None,
        message_id: str | None = None,
    ) -> Command:
        """Queue a command; it is sent once its agent is registered. Raises the agent's
        refusal (or displacement) while it has one."""
        state = self.agents[agent_id]
        if state.failure is not None:
            raise copy_error(state.failure)
        cmd = Command(
            seq=next(self._seq), agent_id=agent_id, kind=frame["event"], frame=frame,
            session_id=session_id, contact=contact, request_id=request_id,
            call_id=call_id, message_id=message_id,
        )
        state.outbox.append(cmd)
        return cmd

    def withdraw(self, cmd: Command) -> None:
        """Forget a command (its caller gave up): never sent if still queued."""
        state = self.agents[cmd.agent_id]
        if cmd in state.outbox:
            state.outbox.remove(cmd)
        if cmd in state.inflight:
            state.inflight.remove(cmd)

    def reregister(self, agent_id: str) -> list[Effect]:
        """Register again after a refusal or a displacement (now if connected)."""
        state = self.agents[agent_id]
        state.failure = None
        if state.phase in (Phase.REFUSED, Phase.DISPLACED):
            state.phase = Phase.OFFLINE
        if self.open and state.phase is not Phase.REGISTERED:
            return self._start_registration(state)
        return []

    def reset(self) -> None:
        """A fresh start (an explicit ``connect()``): forget refusals and displacements."""
        for state in self.agents.values():
            state.failure = None
            if state.phase in (Phase.REFUSED, Phase.DISPLACED):
                state.phase = Phase.OFFLINE

    def settled(self) -> bool:
        """True when no agent is still on its way to being registered."""
        return all(s.phase not in (Phase.OFFLINE, Phase.REGISTERING, Phase.BACKING_OFF)
                   for s in self.agents.values())

    # -- the connection ---------------------------------------------------------------------

    def connection_opened(self) -> list[Effect]:
        """The server said ``connected``: register every agent that was not displaced."""
        self.open = True
        self._epoch += 1
        self._control.clear()
        effects: list[Effect] = []
        for state in self.agents.values():
            if state.phase is Phase.DISPLACED:
                continue
            state.failure = None  # give up per connection: try again on a new one
            effects += self._start_registration(state)
        return effects

    def connection_lost(self) -> list[Effect]:
        """The connection is gone: commands in flight fail (not resent), queued ones wait."""
        self.open = False
        self._epoch += 1
        self._control.clear()
        effects: list[Effect] = []
        for state in self.agents.values():
            if state.phase in _LIVE:
                state.phase = Phase.OFFLINE
            for phone in state.phones.values():
                if phone.status == "added":
                    phone.status = "pending"  # re-added on the next connection
            if state.inflight:
                effects += self._fail(state, PinecallError(
                    "connection lost after the command was sent; it may or may not have been"
                    " executed, and it is not resent",
                    code="CONNECTION_LOST",
                ), queued=False)
        # No call.ended comes for the calls of a lost connection: end them here.
        calls, self.calls = self.calls, {}
        for track in calls.values():
            raw = {"event": "call.ended", "agent_id": track.agent_id, "call_id": track.call_id,
                   "reason": "connection_lost", "local": True}
            ended = CallEndedEvent(event="call.ended", agent_id=track.agent_id, call_id=track.call_id,
                                   reason="connection_lost", local=True, raw=raw)
            effects.append(Deliver(ended, track.agent_id))
        return effects

    def ping(self) -> None:
        """Queue a keep-alive ``ping``."""
        self._control.append(PING)

    def next_frame(self) -> dict[str, Any] | None:
        """The next frame to write, or None. Protocol frames first (pong, agent.create,
        channel.add...), then the oldest command of a registered agent, which is now
        in flight."""
        if self._control:
            return self._control.popleft()
        heads = [s.outbox[0] for s in self.agents.values() if s.phase is Phase.REGISTERED and s.outbox]
        if not heads:
            return None
        cmd = min(heads, key=lambda c: c.seq)
        state = self.agents[cmd.agent_id]
        state.outbox.popleft()
        if cmd.expects_reply:
            cmd.sent = True
            state.inflight.append(cmd)
        return cmd.frame

    def timer_fired(self, timer: Timer) -> list[Effect]:
        state = self.agents.get(timer.agent_id)
        if state is None or timer.epoch != self._epoch or timer.attempt != state.attempt:
            return []  # stale: another connection, or a newer agent.create
        if timer.kind == RETRY_REGISTRATION and state.phase is Phase.BACKING_OFF:
            return self._send_create(state)
        if timer.kind == REGISTRATION_OVERDUE and state.phase is Phase.REGISTERING:
            logger.warning(
                "agent %r: no agent.created/agent.resumed after %s s; still waiting",
                state.agent_id, self.policy().command_timeout,
            )
        return []

    def displace_all(self, reason: str | None) -> list[Effect]:
        """The server closed the connection as displaced: every agent is."""
        effects: list[Effect] = []
        for state in self.agents.values():
            effects += self._displace(state, None, reason)
        return effects

    def stop_all(self, err: PinecallError, *, report: bool) -> list[Effect]:
        """The client stops (closed, rejected key, displaced, failed): every command and
        waiter fails with ``err``; ``report``: and a fatal ``error`` event says so."""
        effects: list[Effect] = []
        for state in self.agents.values():
            if state.phase in _LIVE:
                state.phase = Phase.OFFLINE
            effects += self._fail(state, err)
            effects.append(AgentDown(state.agent_id, err))
        if report:
            report_event = ErrorEvent(
                event="error", code=err.code, message=err.message, fatal=True, raw=err.frame or {},
            )
            effects.append(Deliver(report_event, None))
        return effects

    # -- frames in --------------------------------------------------------------------------

    def receive(self, data: str | bytes | dict[str, Any]) -> list[Effect]:
        """One frame from the server (raw or decoded): what follows from it."""
        ev = decode(data)
        if ev is None:
            return []
        agent = self.route(ev)
        if ev.agent_id is not None and agent is None:
            logger.debug("event %s for an agent this client does not have: %r", ev.event, ev.agent_id)
        if ev.event in VOICE_EVENTS:
            self._track_call(ev, agent)
        action = self._actions.get(ev.event)
        if action is not None:
            return action(ev, agent)
        if ev.event in CONFIRMATIONS:
            return self._on_confirmation(ev, agent)
        if ev.event not in EVENT_CLASSES:
            logger.debug("unknown event %r (delivered to '*' handlers)", ev.event)
        return [Deliver(ev, _id(agent))]

    def route(self, ev: Event) -> AgentState | None:
        """The agent an event belongs to. ``agent_id`` as ``org_id:slug`` or slugified
        names ours too (:func:`resolve_agent`). ``whatsapp.*`` without ``agent_id``: the
        agent with a WhatsApp channel (or the only agent); a call event without it: the
        agent whose call it is (if the core saw it)."""
        if ev.agent_id is not None:
            return resolve_agent(ev.agent_id, self.agents)
        call_id = _call_of(ev) if ev.event in VOICE_EVENTS else None
        if call_id is not None and call_id in self.calls:
            return self.agents.get(self.calls[call_id].agent_id)
        if ev.event.startswith("whatsapp."):
            for state in self.agents.values():
                if state.whatsapp is not None and state.phase is not Phase.DISPLACED:
                    return state
            if len(self.agents) == 1:
                return next(iter(self.agents.values()))
        return None

    def _on_ping(self, ev: Event, agent: AgentState | None) -> list[Effect]:
        self._control.append(PONG)
        return [Deliver(ev, _id(agent))]

    def _on_pong(self, ev: Event, agent: AgentState | None) -> list[Effect]:
        self.last_pong = self.clock()
        return [Deliver(ev, _id(agent))]

    def _on_registration_answer(self, ev: Event, agent: AgentState | None) -> list[Effect]:
        if agent is None or agent.phase is not Phase.REGISTERING:
            logger.debug("unexpected %s for %r", ev.event, ev.agent_id)
            return [Deliver(ev, _id(agent))]
        resumed = ev.event == "agent.resumed"
        logger.info("agent %r %s", agent.agent_id, "resumed" if resumed else "created")
        if agent.whatsapp is not None:
            self._control.append(channel_frame(agent.agent_id, agent.whatsapp))
        for phone in agent.phones.values():
            if phone.status != "refused":
                phone.status = "pending"
                self._control.append(phone_frame(agent.agent_id, phone.ref, phone.options))
        agent.phase = Phase.REGISTERED
        return [
            Deliver(ev, agent.agent_id),
            Registered(agent.agent_id),
            # just before the commands queued meanwhile go out: a moment to resync state
            Deliver(RegisteredEvent(agent_id=agent.agent_id, resumed=resumed), agent.agent_id),
        ]

    def _on_displaced(self, ev: Event, agent: AgentState | None) -> list[Effect]:
        # The event first, then the client's own "error" reports.
        effects: list[Effect] = [Deliver(ev, _id(agent))]
        if agent is not None:
            targets = [agent]
        else:
            targets = [] if ev.agent_id else list(self.agents.values())
        for target in targets:
            effects += self._displace(target, ev, getattr(ev, "reason", None))
        if targets and all(s.phase is Phase.DISPLACED for s in self.agents.values()):
            # Nothing left to do on this connection: hang up, and do not reconnect.
            effects.append(HangUp(PinecallError(
                "every agent of this client was displaced by another connection", code="DISPLACED",
                frame=ev.raw,
            )))
        return effects

    def _on_confirmation(self, ev: Event, agent: AgentState | None) -> list[Effect]:
        rules = CONFIRMATIONS[ev.event]
        effects: list[Effect] = []
        owner = _id(agent)
        for rule in rules if isinstance(rules, tuple) else (rules,):
            cmd = rule.match(ev, self._in_flight(agent, rule.command))
            if cmd is None:
                continue
            self.agents[cmd.agent_id].inflight.remove(cmd)
            error = rule.error(ev, cmd)
            effects.append(Confirm(cmd, ev) if error is None else Reject(cmd, error))
            if len(effects) == 1:
                owner = cmd.agent_id  # delivered to the agent of the (first) command it answers
        # None matched: state, or a stale answer: an event only
        return [*effects, Deliver(ev, owner)]

    def _on_error(self, ev: ErrorEvent, agent: AgentState | None) -> list[Effect]:
        """An ``error`` goes to: the key's refusal (hang up), a registration, the oldest
        command in flight for its session / contact / at all, else the handlers."""
        code = ev.code
        if code == "UNAUTHORIZED":
            return [HangUp(PinecallError.from_frame(ev.raw))]  # reported once the socket is gone
        registering = [s for s in self.agents.values() if s.phase is Phase.REGISTERING]
        if code in RETRYABLE_REFUSALS or code in FATAL_REFUSALS:
            target = None
            if agent is not None and agent in registering:
                target = agent
            elif ev.agent_id is None and registering:
                target = registering[0]
            return self._on_refusal(target, ev) if target is not None else [Deliver(ev, _id(agent))]
        if code == "PHONE_IN_USE":
            return self._on_phone_refused(ev, agent)
        cmds = self._in_flight(agent)
        if ev.call_id is not None:
            # About one call: only a command of that call (never an unrelated one).
            cmds = [c for c in cmds if ev.call_id in (c.call_id, c.session_id)]
            if not cmds:
                logger.warning("server error for call %r: %s %s", ev.call_id, code, ev.message)
                return [Deliver(ev, _id(agent))]
        cmd = None
        if ev.session_id is not None:
            cmd = next((c for c in cmds if c.session_id == ev.session_id), None)
        if cmd is None and ev.contact is not None:
            cmd = next((c for c in cmds if c.contact == ev.contact), None)
        if cmd is None and cmds:
            cmd = cmds[0]
        if cmd is not None:
            self.agents[cmd.agent_id].inflight.remove(cmd)
            err = PinecallError.from_frame(ev.raw)
            if cmd.call_id is not None:
                err.message = f"{cmd.describe()}: {err.message}"
            logger.info("%s failed: %s", cmd.describe(), err)
            return [Reject(cmd, err)]
        if agent is not None and agent in registering:
            # A refusal of agent.create we do not know (bad config...): stop registering it.
            return self._on_refusal(agent, ev)
        logger.warning("server error: %s %s", code, ev.message)
        return [Deliver(ev, _id(agent))]

    def _on_phone_refused(self, ev: ErrorEvent, agent: AgentState | None) -> list[Effect]:
        """``PHONE_IN_USE``: another agent holds the number. The channel is forgotten (not
        re-added) and the agent's ``error`` handlers hear it; no command fails."""
        ref = ev.phone if ev.phone is not None else ev.get("ref")
        if agent is None and isinstance(ref, str):
            agent = next((s for s in self.agents.values() if ref in s.phones), None)
        if agent is None:
            logger.warning("server error: %s %s", ev.code, ev.message)
            return [Deliver(ev, None)]
        shown = ref if isinstance(ref, str) else "a phone number"
        err = PinecallError(
            f"agent {agent.agent_id!r}: {shown} is in use by another agent, so it was not added"
            f" ({ev.message or 'PHONE_IN_USE'}); add it again once it is free",
            code="PHONE_IN_USE", frame=ev.raw,
        )
        logger.error("%s", err)
        phone = agent.phones.get(ref) if isinstance(ref, str) else None
        if phone is not None:
            phone.status = "refused"
            phone.error = err
        report = ErrorEvent(event="error", agent_id=agent.agent_id, code=err.code, message=err.message,
                            phone=ref if isinstance(ref, str) else None, raw=ev.raw)
        return [Deliver(report, agent.agent_id)]

    def _on_channel_added(self, ev: Event, agent: AgentState | None) -> list[Effect]:
        ref = getattr(ev, "ref", None)
        if agent is not None and ref in agent.phones and getattr(ev, "type", None) in ("phone", None):
            phone = agent.phones[ref]
            phone.status, phone.error = "added", None
        return [Deliver(ev, _id(agent))]

    # -- calls ------------------------------------------------------------------------------

    def _track_call(self, ev: Event, agent: AgentState | None) -> None:
        """Keep :attr:`calls` up to date with a call event (before it is acted on)."""
        call_id = _call_of(ev)
        if call_id is None or ev.event in ("call.ended", "call.error", "call.recording"):
            return  # an ended call is forgotten by _on_call_over
        if ev.event in ("call.rejected", "credits.rejected"):
            self.calls.pop(call_id, None)  # it never connected and is over
            return
        track = self.calls.get(call_id)
        if track is None:
            if agent is None:
                return
            track = self.calls[call_id] = CallTrack(call_id, agent.agent_id)
        if ev.event in ("call.ringing", "call.dialing", "call.started"):
            track.speech_known = True  # a call starts silent
        message_id = getattr(ev, "message_id", None)
        if ev.event == "bot.speaking":
            track.speaking, track.speech_known = message_id or "", True
        elif ev.event in ("bot.finished", "bot.interrupted"):
            if message_id is None or track.speaking in (message_id, ""):
                track.speaking = None
            track.speech_known = True
        elif ev.event == "call.forwarded":
            track.speaking = None  # the call left Pinecall

    def _on_call_over(self, ev: Event, agent: AgentState | None) -> list[Effect]:
        """``call.ended`` / ``call.error``: the call is forgotten; a ``call.hangup`` (and a
        ``bot.cancel``) of it is confirmed, every other command of it still waiting fails
        (``CALL_ENDED``; for ``call.error`` its ``code``, else ``CALL_ERROR``)."""
        call_id = _call_of(ev)
        track = self.calls.pop(call_id, None) if call_id else None
        if agent is None and track is not None:
            agent = self.agents.get(track.agent_id)
        effects: list[Effect] = []
        if call_id is not None:
            for cmd in self._in_flight(agent):
                if cmd.call_id != call_id:
                    continue
                self.agents[cmd.agent_id].inflight.remove(cmd)
                if (cmd.kind == "call.hangup" and ev.event == "call.ended") or cmd.kind == "bot.cancel":
                    effects.append(Confirm(cmd, ev))  # over, and nothing is said any more
                    continue
                reason = getattr(ev, "reason", None) or getattr(ev, "error", None)
                effects.append(Reject(cmd, PinecallError(
                    f"{cmd.describe()}: the call ended" + (f" ({reason})" if reason else "")
                    + " before it was confirmed",
                    code="CALL_ENDED" if ev.event == "call.ended" else (getattr(ev, "code", None) or "CALL_ERROR"),
                    frame=ev.raw,
                )))
        effects.append(Deliver(ev, _id(agent)))
        return effects

    # -- registration -----------------------------------------------------------------------

    def _start_registration(self, state: AgentState) -> list[Effect]:
        state.first_refusal = None
        state.retries = 0
        return self._send_create(state)

    def _send_create(self, state: AgentState) -> list[Effect]:
        state.phase = Phase.REGISTERING
        state.attempt += 1
        logger.debug("registering agent %r", state.agent_id)
        self._control.append(create_frame(state.agent_id, state.config))
        timeout = self.policy().command_timeout
        if not timeout:
            return []
        return [Later(timeout, Timer(REGISTRATION_OVERDUE, state.agent_id, self._epoch, state.attempt))]

    def _on_refusal(self, state: AgentState, answer: ErrorEvent) -> list[Effect]:
        """``agent.create`` refused: retry a conflict with backoff, else give up."""
        code = answer.code
        if code in RETRYABLE_REFUSALS:
            policy = self.policy()
            now = self.clock()
            if state.first_refusal is None:
                state.first_refusal = now
            elapsed = now - state.first_refusal
            remaining = policy.conflict_give_up_after - elapsed
            if remaining <= 0:
                return self._give_up(state, PinecallError(
                    f"agent {state.agent_id!r}: gave up registering after {elapsed:.1f} s"
                    f" of {code} ({answer.message or 'held by another connection'})",
                    code=code, frame=answer.raw,
                ), answer)
            delay = min(policy.conflict_delay(state.retries, answer.retry_after_s), remaining)
            state.retries += 1
            state.phase = Phase.BACKING_OFF
            logger.warning(
                "agent %r refused with %s (%s; holder_alive=%s); retry %d in %.2f s",
                state.agent_id, code, answer.message, answer.holder_alive, state.retries, delay,
            )
            return [Later(delay, Timer(RETRY_REGISTRATION, state.agent_id, self._epoch, state.attempt))]
        # AGENT_CONFLICT_FATAL, SERVER_AT_CAPACITY, or any other refusal: stop here.
        message = answer.message or "registration refused"
        if code == "SERVER_AT_CAPACITY" and (answer.used is not None or answer.limit is not None):
            message = f"{message} (used {answer.used} of {answer.limit})"
        return self._give_up(state, PinecallError(
            f"agent {state.agent_id!r}: {message}", code=code or "REGISTRATION_FAILED", frame=answer.raw,
        ), answer)

    def _give_up(self, state: AgentState, err: PinecallError, answer: ErrorEvent) -> list[Effect]:
        logger.error("%s", err)
        state.phase = Phase.REFUSED
        state.failure = err
        report = ErrorEvent(
            event="error", agent_id=state.agent_id, code=err.code, message=err.message,
            session_id=answer.session_id, retry_after_s=answer.retry_after_s,
            holder_alive=answer.holder_alive, used=answer.used, limit=answer.limit,
            fatal=True, raw=answer.raw,
        )
        return [*self._fail(state, err), AgentDown(state.agent_id, err), Deliver(report, state.agent_id)]

    def _displace(
        self, state: AgentState, ev: AgentDisplacedEvent | None, reason: str | None
    ) -> list[Effect]:
        if state.phase is Phase.DISPLACED:
            return []
        state.phase = Phase.DISPLACED
        err = PinecallError(
            f"agent {state.agent_id!r} was displaced by another connection"
            + (f": {reason}" if reason else ""),
            code="DISPLACED",
            frame=ev.raw if ev is not None else None,
        )
        logger.error("%s", err)
        state.failure = err
        report = ErrorEvent(
            event="error", agent_id=state.agent_id, code="DISPLACED", message=err.message,
            fatal=True, raw=ev.raw if ev is not None else {},
        )
        return [*self._fail(state, err), AgentDown(state.agent_id, err), Deliver(report, state.agent_id)]

    # -- helpers ----------------------------------------------------------------------------

    def _in_flight(self, agent: AgentState | None, kind: str | None = None) -> list[Command]:
        """Commands in flight of ``agent`` (None: of every agent), oldest first."""
        states: Iterable[AgentState] = [agent] if agent is not None else self.agents.values()
        cmds = [c for s in states for c in s.inflight if kind is None or c.kind == kind]
        cmds.sort(key=lambda c: c.seq)
        return cmds

    def _fail(self, state: AgentState, err: PinecallError, *, queued: bool = True) -> list[Effect]:
        """Fail the commands in flight (and, with ``queued``, the queued ones) with ``err``."""
        cmds = list(state.inflight)
        state.inflight.clear()
        if queued:
            cmds.extend(state.outbox)
            state.outbox.clear()
        return [Reject(cmd, copy_error(err)) for cmd in cmds if cmd.expects_reply]


def _id(state: AgentState | None) -> str | None:
    return state.agent_id if state is not None else None
