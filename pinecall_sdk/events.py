"""Typed events of the Pinecall wire protocol.

Every frame the server sends is parsed by :func:`parse_event` into a dataclass.
Attributes carry the wire's own (snake_case) names; ``from`` is a Python keyword,
so it is exposed as ``from_``. The original frame is kept, unchanged, in
``event.raw`` (keys the client does not know stay there; ``event.get(key)``
reads them).

Unknown event names parse into the generic :class:`Event`.

Parsing is lenient on purpose: a frame is data from the network, and an event
with one odd field is still worth delivering (nothing a customer writes may be
lost). A known field of the wrong JSON type is read as well as it can be (see
:func:`parse_event`) and never makes parsing fail; ``event.raw`` keeps the
value as sent. Strings are kept exactly as decoded (NUL characters and lone
surrogates included): sanitising is the application's job.

:class:`DisconnectedEvent`, :class:`ReconnectingEvent` and :class:`RegisteredEvent`
are not wire events: the client makes them for its lifecycle handlers.
"""

from __future__ import annotations

import json
import keyword
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

__all__ = [
    "Event",
    "ConnectedEvent",
    "AuthenticatedEvent",
    "PingEvent",
    "PongEvent",
    "ErrorEvent",
    "AgentCreatedEvent",
    "AgentResumedEvent",
    "AgentDisplacedEvent",
    "WhatsAppSessionStartedEvent",
    "WhatsAppMessageEvent",
    "WhatsAppResponseEvent",
    "WhatsAppStatusEvent",
    "WhatsAppSessionEndedEvent",
    "SessionPausedEvent",
    "SessionResumedEvent",
    "SessionSentEvent",
    "ChannelAddedEvent",
    "HistoryDataEvent",
    "DisconnectedEvent",
    "ReconnectingEvent",
    "RegisteredEvent",
    "EVENT_CLASSES",
    "parse_event",
]

logger = logging.getLogger("pinecall_sdk")

_TRUE_WORDS = frozenset({"true", "yes", "1"})
_FALSE_WORDS = frozenset({"false", "no", "0"})


# Readers of a field: the value as its documented type, or None when it has no
# sensible reading. None (JSON null) never reaches them: it always means "absent".


def _as_str(value: Any) -> str | None:
    """A string as is; a number or boolean as its JSON text (12 -> "12"); else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return None  # an object or a list has no sensible text; ``raw`` still has it


def _as_bool(value: Any) -> bool | None:
    """A boolean as is; 0/1 and "true"/"false"/"yes"/"no"/"1"/"0" as booleans; else None."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    return None


def _as_number(value: Any) -> int | float | None:
    """A finite number, also from a numeric string ("3.5"); booleans are not numbers."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            value = float(text)  # ValueError: no reading (_read makes it None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _as_int(value: Any) -> int | None:
    number = _as_number(value)
    if isinstance(number, float):
        return int(number) if number.is_integer() else None
    return number


def _as_time(value: Any) -> str | int | float | None:
    """An ISO 8601 string as is, or a number (Unix epoch seconds)."""
    if isinstance(value, str):
        return value
    return _as_number(value)


def _as_list(value: Any) -> list[Any] | None:
    return value if isinstance(value, list) else None


def _as_error(value: Any) -> str | None:
    """The text of an ``error`` key: a string, an object's "message", else "error"; false: none."""
    if value is False:
        return None
    if isinstance(value, str):
        return value or "error"
    if isinstance(value, dict) and isinstance(value.get("message"), str):
        return value["message"]
    return "error"


Reader = Callable[[Any], Any]

#: (event class, key, JSON type) already reported as read leniently: one warning each, not per frame
_reported_readings: set[tuple[str, str, str]] = set()


def _attr_name(key: str) -> str:
    return key + "_" if keyword.iskeyword(key) else key


@dataclass(kw_only=True)
class Event:
    """Any event. Unknown event names are parsed into this class.

    Attributes:
        event: the event name (``"whatsapp.message"``, ...).
        agent_id: the agent the event belongs to, when the frame says.
        raw: the frame as received (a dict), including keys the client does not know.
    """

    event: str
    agent_id: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    #: wire key -> reader of its value. Every field is optional: an event missing a
    #: field is still delivered (with None) rather than lost; e.g. a
    #: ``whatsapp.response`` for a direct send to a contact has no ``session_id``.
    _schema: ClassVar[dict[str, Reader]] = {"agent_id": _as_str}

    def get(self, key: str, default: Any = None) -> Any:
        """A key of the raw frame (``event.get("timestamp")``)."""
        return self.raw.get(key, default)


@dataclass(kw_only=True)
class ConnectedEvent(Event):
    """``connected``: the server accepted the API key."""


@dataclass(kw_only=True)
class AuthenticatedEvent(Event):
    """``authenticated``: some servers send it next to ``connected``; the client ignores it."""


@dataclass(kw_only=True)
class PingEvent(Event):
    """``ping`` from the server; the client answers ``pong`` by itself."""


@dataclass(kw_only=True)
class PongEvent(Event):
    """``pong``: the server's answer to the client's keep-alive ``ping``."""


@dataclass(kw_only=True)
class ErrorEvent(Event):
    """``error``.

    ``message`` is read from ``"message"``, or from ``"error"`` on older servers.
    ``retry_after_s`` / ``holder_alive`` come with ``AGENT_CONFLICT``/``AGENT_IN_USE``,
    ``used`` / ``limit`` with ``SERVER_AT_CAPACITY``.
    ``fatal`` is not a wire field: the client sets it on the errors it reports
    when it gave something up (stopped reconnecting, gave up registering an agent).
    """

    code: str | None = None
    message: str | None = None
    session_id: str | None = None
    contact: str | None = None
    retry_after_s: int | float | None = None
    holder_alive: bool | None = None
    used: int | float | None = None
    limit: int | float | None = None
    fatal: bool = False

    _schema: ClassVar = {
        "agent_id": _as_str,
        "code": _as_str,
        "message": _as_str,
        "session_id": _as_str,
        "contact": _as_str,
        "retry_after_s": _as_number,
        "holder_alive": _as_bool,
        "used": _as_number,
        "limit": _as_number,
    }


@dataclass(kw_only=True)
class AgentCreatedEvent(Event):
    """``agent.created``: the agent is registered on this connection."""


@dataclass(kw_only=True)
class AgentResumedEvent(Event):
    """``agent.resumed``: the server still held the agent from an earlier connection."""


@dataclass(kw_only=True)
class AgentDisplacedEvent(Event):
    """``agent.displaced``: another connection took the agent over."""

    reason: str | None = None

    _schema: ClassVar = {"agent_id": _as_str, "reason": _as_str}


@dataclass(kw_only=True)
class WhatsAppSessionStartedEvent(Event):
    """``whatsapp.session_started``: the first message of a new session."""

    session_id: str | None = None
    contact_phone: str | None = None
    contact_name: str | None = None

    _schema: ClassVar = {
        "agent_id": _as_str,
        "session_id": _as_str,
        "contact_phone": _as_str,
        "contact_name": _as_str,
    }


@dataclass(kw_only=True)
class WhatsAppMessageEvent(Event):
    """``whatsapp.message``: an incoming message (paused or not).

    ``from_`` is the wire's ``from`` (the contact's phone). For ``type == "audio"``
    ``text`` is the transcript.
    """

    session_id: str | None = None
    from_: str | None = None
    name: str | None = None
    type: str | None = None
    text: str | None = None
    message_id: str | None = None
    paused: bool | None = None

    _schema: ClassVar = {
        "agent_id": _as_str,
        "session_id": _as_str,
        "from": _as_str,
        "name": _as_str,
        "type": _as_str,
        "text": _as_str,
        "message_id": _as_str,
        "paused": _as_bool,
    }


@dataclass(kw_only=True)
class WhatsAppResponseEvent(Event):
    """``whatsapp.response``: a reply went out; ``source == "human"`` for operator sends."""

    session_id: str | None = None
    to: str | None = None
    text: str | None = None
    source: str | None = None

    _schema: ClassVar = {
        "agent_id": _as_str,
        "session_id": _as_str,
        "to": _as_str,
        "text": _as_str,
        "source": _as_str,
    }


@dataclass(kw_only=True)
class WhatsAppStatusEvent(Event):
    """``whatsapp.status``: a delivery receipt (``sent``/``delivered``/``read``/``failed``)."""

    status: str | None = None
    recipient: str | None = None
    message_id: str | None = None
    session_id: str | None = None

    _schema: ClassVar = {
        "agent_id": _as_str,
        "status": _as_str,
        "recipient": _as_str,
        "message_id": _as_str,
        "session_id": _as_str,
    }


@dataclass(kw_only=True)
class WhatsAppSessionEndedEvent(Event):
    """``whatsapp.session_ended``: the session is over (``window_expired``, ``idle_timeout``)."""

    session_id: str | None = None
    contact_phone: str | None = None
    contact_name: str | None = None
    reason: str | None = None
    started_at: str | int | float | None = None
    ended_at: str | int | float | None = None
    duration: int | float | None = None
    message_count: int | None = None
    transcript: list[Any] | None = None
    messages: list[Any] | None = None

    _schema: ClassVar = {
        "agent_id": _as_str,
        "session_id": _as_str,
        "contact_phone": _as_str,
        "contact_name": _as_str,
        "reason": _as_str,
        "started_at": _as_time,
        "ended_at": _as_time,
        "duration": _as_number,
        "message_count": _as_int,
        "transcript": _as_list,
        "messages": _as_list,
    }


@dataclass(kw_only=True)
class _SessionTargetEvent(Event):
    session_id: str | None = None
    contact: str | None = None

    _schema: ClassVar = {"agent_id": _as_str, "session_id": _as_str, "contact": _as_str}


@dataclass(kw_only=True)
class SessionPausedEvent(_SessionTargetEvent):
    """``session.paused``: one session, a contact (``contact``) or the whole agent (neither).

    Also arrives when someone else changed the state: it is state, not only an ack.
    """


@dataclass(kw_only=True)
class SessionResumedEvent(_SessionTargetEvent):
    """``session.resumed``: same shapes as ``session.paused``."""


@dataclass(kw_only=True)
class SessionSentEvent(_SessionTargetEvent):
    """``session.sent``: the server accepted a ``session.send``."""


@dataclass(kw_only=True)
class ChannelAddedEvent(Event):
    """``channel.added``: the server took a ``channel.add`` (older servers send nothing)."""

    type: str | None = None
    ref: str | None = None

    _schema: ClassVar = {"agent_id": _as_str, "type": _as_str, "ref": _as_str}


@dataclass(kw_only=True)
class HistoryDataEvent(Event):
    """``history.data``: the answer to ``history.get`` (see :meth:`Agent.get_history`).

    ``call_id`` is the WhatsApp ``session_id``; ``messages`` the chat history,
    ``[{"role": "user"|"assistant", "content": ...}]``. ``error`` is set when the
    server has no such session (its text; an ``error`` object's ``message``).
    """

    request_id: str | None = None
    call_id: str | None = None
    messages: list[Any] | None = None
    error: str | None = None

    _schema: ClassVar = {
        "agent_id": _as_str,
        "request_id": _as_str,
        "call_id": _as_str,
        "messages": _as_list,
        "error": _as_error,
    }


# --- client lifecycle (not on the wire) -------------------------------------


@dataclass(kw_only=True)
class DisconnectedEvent(Event):
    """The connection closed. ``reconnect`` says whether the client will try again."""

    event: str = "disconnected"
    code: int | None = None
    reason: str | None = None
    reconnect: bool = True


@dataclass(kw_only=True)
class ReconnectingEvent(Event):
    """The client will open a new connection in ``delay`` seconds (``attempt`` counts from 1)."""

    event: str = "reconnecting"
    attempt: int = 0
    delay: float = 0.0


@dataclass(kw_only=True)
class RegisteredEvent(Event):
    """The agent is registered on a (new) connection and its channels are re-added.

    Comes after every ``agent.created`` / ``agent.resumed`` (``resumed`` tells which),
    just before the commands queued meanwhile go out: a good moment to resync state.
    """

    event: str = "registered"
    resumed: bool = False


EVENT_CLASSES: dict[str, type[Event]] = {
    "connected": ConnectedEvent,
    "authenticated": AuthenticatedEvent,
    "ping": PingEvent,
    "pong": PongEvent,
    "error": ErrorEvent,
    "agent.created": AgentCreatedEvent,
    "agent.resumed": AgentResumedEvent,
    "agent.displaced": AgentDisplacedEvent,
    "whatsapp.session_started": WhatsAppSessionStartedEvent,
    "whatsapp.message": WhatsAppMessageEvent,
    "whatsapp.response": WhatsAppResponseEvent,
    "whatsapp.status": WhatsAppStatusEvent,
    "whatsapp.session_ended": WhatsAppSessionEndedEvent,
    "session.paused": SessionPausedEvent,
    "session.resumed": SessionResumedEvent,
    "session.sent": SessionSentEvent,
    "channel.added": ChannelAddedEvent,
    "history.data": HistoryDataEvent,
}


def _read(cls: type[Event], name: str, key: str, value: Any) -> Any:
    """The field's reader applied to ``value``; an unexpected JSON type is reported once."""
    try:
        result = cls._schema[key](value)
    except Exception:  # e.g. a numeric string too long for int(): no reading, not an error
        result = None
    if result is None or type(result) is not type(value):
        # Keyed by class, not event name: unknown names are unbounded, classes are not.
        kind = (cls.__name__, key, type(value).__name__)
        if kind not in _reported_readings:
            _reported_readings.add(kind)
            logger.warning(
                "%s: %r was %s, read as %s (the frame's raw keeps the value as sent;"
                " reported once)", name, key, type(value).__name__,
                "None" if result is None else type(result).__name__,
            )
    return result


def parse_event(frame: Any) -> Event:
    """Turn one decoded frame into its typed event.

    Raises ``ValueError`` only when the frame cannot be an event at all: not a JSON
    object, or no non-empty string ``event``. Known keys never make it fail: ``null``
    or a missing key is None; a value of the wrong JSON type is read leniently
    (a number where a string belongs becomes its text, ``12`` -> ``"12"``; ``"true"``,
    ``"no"``, ``1``, ``0`` are booleans; a numeric string is a number; anything
    without a sensible reading, like an object where text belongs, is None) and
    reported in the log once per event type, key and JSON type.
    """
    if not isinstance(frame, dict):
        raise ValueError(f"frame must be a JSON object, not {type(frame).__name__}")
    if "event" not in frame:
        raise ValueError("frame has no 'event' key")
    name = frame["event"]
    if not isinstance(name, str) or not name:
        raise ValueError("'event' must be a non-empty string")
    cls = EVENT_CLASSES.get(name, Event)
    kwargs: dict[str, Any] = {}
    for key in cls._schema:
        value = frame.get(key)
        if value is not None:
            kwargs[_attr_name(key)] = _read(cls, name, key, value)
    if cls is ErrorEvent and kwargs.get("message") is None:
        legacy = frame.get("error")
        if isinstance(legacy, str):
            kwargs["message"] = legacy
        elif isinstance(legacy, dict):
            if isinstance(legacy.get("message"), str):
                kwargs["message"] = legacy["message"]
            if kwargs.get("code") is None and isinstance(legacy.get("code"), str):
                kwargs["code"] = legacy["code"]
    return cls(event=name, raw=frame, **kwargs)
