"""Typed events of the Pinecall wire protocol.

Every frame the server sends is parsed by :func:`parse_event` into a dataclass.
Attributes carry the wire's own (snake_case) names; ``from`` is a Python keyword,
so it is exposed as ``from_``. The original frame is kept, unchanged, in
``event.raw`` (keys the client does not know stay there; ``event.get(key)``
reads them).

Unknown event names parse into the generic :class:`Event`.

:class:`DisconnectedEvent`, :class:`ReconnectingEvent` and :class:`RegisteredEvent`
are not wire events: the client makes them for its lifecycle handlers.
"""

from __future__ import annotations

import keyword
from dataclasses import dataclass, field
from typing import Any, ClassVar

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
    "DisconnectedEvent",
    "ReconnectingEvent",
    "RegisteredEvent",
    "EVENT_CLASSES",
    "parse_event",
]

# Accepted JSON types of a field. Booleans are never accepted as numbers.
_STR = (str,)
_BOOL = (bool,)
_INT = (int,)
_NUM = (int, float)
_LIST = (list,)
_DICT = (dict,)
_TIME = (str, int, float)  # ISO 8601 string or a Unix timestamp

_TYPE_NAMES = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    list: "a list",
    dict: "an object",
}


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

    #: wire key -> accepted JSON types (checked by parse_event; None is always accepted)
    _schema: ClassVar[dict[str, tuple[type, ...]]] = {"agent_id": _STR}
    #: wire keys that must be present and not null. Empty everywhere on purpose: an
    #: event missing a field is still delivered (with None) rather than lost; e.g. a
    #: ``whatsapp.response`` for a direct send to a contact has no ``session_id``.
    _required: ClassVar[tuple[str, ...]] = ()

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
        "agent_id": _STR,
        "code": _STR,
        "message": _STR,
        "session_id": _STR,
        "contact": _STR,
        "retry_after_s": _NUM,
        "holder_alive": _BOOL,
        "used": _NUM,
        "limit": _NUM,
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

    _schema: ClassVar = {"agent_id": _STR, "reason": _STR}


@dataclass(kw_only=True)
class WhatsAppSessionStartedEvent(Event):
    """``whatsapp.session_started``: the first message of a new session."""

    session_id: str | None = None
    contact_phone: str | None = None
    contact_name: str | None = None

    _schema: ClassVar = {
        "agent_id": _STR,
        "session_id": _STR,
        "contact_phone": _STR,
        "contact_name": _STR,
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
        "agent_id": _STR,
        "session_id": _STR,
        "from": _STR,
        "name": _STR,
        "type": _STR,
        "text": _STR,
        "message_id": _STR,
        "paused": _BOOL,
    }


@dataclass(kw_only=True)
class WhatsAppResponseEvent(Event):
    """``whatsapp.response``: a reply went out; ``source == "human"`` for operator sends."""

    session_id: str | None = None
    to: str | None = None
    text: str | None = None
    source: str | None = None

    _schema: ClassVar = {
        "agent_id": _STR,
        "session_id": _STR,
        "to": _STR,
        "text": _STR,
        "source": _STR,
    }


@dataclass(kw_only=True)
class WhatsAppStatusEvent(Event):
    """``whatsapp.status``: a delivery receipt (``sent``/``delivered``/``read``/``failed``)."""

    status: str | None = None
    recipient: str | None = None
    message_id: str | None = None
    session_id: str | None = None

    _schema: ClassVar = {
        "agent_id": _STR,
        "status": _STR,
        "recipient": _STR,
        "message_id": _STR,
        "session_id": _STR,
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
        "agent_id": _STR,
        "session_id": _STR,
        "contact_phone": _STR,
        "contact_name": _STR,
        "reason": _STR,
        "started_at": _TIME,
        "ended_at": _TIME,
        "duration": _NUM,
        "message_count": _INT,
        "transcript": _LIST,
        "messages": _LIST,
    }


@dataclass(kw_only=True)
class _SessionTargetEvent(Event):
    session_id: str | None = None
    contact: str | None = None

    _schema: ClassVar = {"agent_id": _STR, "session_id": _STR, "contact": _STR}


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
}


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def _describe(types: tuple[type, ...]) -> str:
    if types == _NUM:
        return "a number"
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def parse_event(frame: dict[str, Any]) -> Event:
    """Turn one decoded frame into its typed event.

    Raises ``ValueError`` with a clear message when the frame is not a dict, has no
    string ``event``, or a known key has the wrong JSON type
    (e.g. ``paused`` not a boolean, ``text`` not a string). ``null`` is accepted
    for any known key and read as "absent".
    """
    if not isinstance(frame, dict):
        raise ValueError(f"frame must be a JSON object, not {type(frame).__name__}")
    if "event" not in frame:
        raise ValueError("frame has no 'event' key")
    name = frame["event"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"'event' must be a non-empty string, not {name!r}")
    cls = EVENT_CLASSES.get(name, Event)
    kwargs: dict[str, Any] = {}
    for key, types in cls._schema.items():
        value = frame.get(key)
        if value is None:
            continue
        if not _type_ok(value, types):
            raise ValueError(
                f"{name}: {key!r} must be {_describe(types)}, not {type(value).__name__} ({value!r:.60})"
            )
        kwargs[_attr_name(key)] = value
    for key in cls._required:
        if frame.get(key) is None:
            raise ValueError(f"{name}: missing {key!r}")
    if cls is ErrorEvent and "message" not in kwargs:
        legacy = frame.get("error")
        if isinstance(legacy, str):
            kwargs["message"] = legacy
        elif isinstance(legacy, dict):
            if isinstance(legacy.get("message"), str):
                kwargs["message"] = legacy["message"]
            if "code" not in kwargs and isinstance(legacy.get("code"), str):
                kwargs["code"] = legacy["code"]
    return cls(event=name, raw=frame, **kwargs)
