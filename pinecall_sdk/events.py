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

Voice calls (``/work/shared/pinecall-voice-protocol.md``): every call event is a
:class:`CallEvent` (``call_id``, ``session_id``, ``seq``, ``ts``) with the fields of the
document's table under their wire names (``from`` as ``from_``). Nested objects
(``tool_calls``, ``messages``, ``line_transcript``, ``metadata``) keep their wire
spelling, as the JavaScript SDK keeps them.
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
    "CallEvent",
    "CallRingingEvent",
    "CallRejectedEvent",
    "CallDialingEvent",
    "CallStartedEvent",
    "CallUpdatedEvent",
    "SpeechStartedEvent",
    "UserSpeakingEvent",
    "SpeechEndedEvent",
    "UserMessageEvent",
    "EagerTurnEvent",
    "TurnPauseEvent",
    "TurnResumedEvent",
    "TurnEndEvent",
    "TurnContinuedEvent",
    "LlmBeforeEvent",
    "LlmPreparingTimeoutEvent",
    "LlmToolCallEvent",
    "BotSpeakingEvent",
    "BotWordEvent",
    "MessageConfirmedEvent",
    "BotFinishedEvent",
    "BotInterruptedEvent",
    "BargeInEvent",
    "ReplyRejectedEvent",
    "MessageAbortedEvent",
    "SkillLoadedEvent",
    "SkillUnloadedEvent",
    "CallDtmfReceivedEvent",
    "AudioMetricsEvent",
    "SessionIdleWarningEvent",
    "SessionTimeoutEvent",
    "CreditsExhaustedEvent",
    "CreditsRejectedEvent",
    "CallForwardedEvent",
    "CallHeldEvent",
    "CallUnheldEvent",
    "CallMutedEvent",
    "CallUnmutedEvent",
    "CallDtmfSentEvent",
    "CallErrorEvent",
    "CallEndedEvent",
    "CallRecordingEvent",
    "VOICE_EVENTS",
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


def _as_dict(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


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
    #: attribute -> an older wire key it is read from when its own key is absent
    _fallbacks: ClassVar[dict[str, str]] = {}

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
    ``used`` / ``limit`` with ``SERVER_AT_CAPACITY``, ``phone`` with ``PHONE_IN_USE``
    (a ``channel.add`` of a phone number another agent holds), ``call_id`` with the
    errors about one call (the simulator's ``CALL_NOT_FOUND``).
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
    call_id: str | None = None
    phone: str | None = None
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
        "call_id": _as_str,
        "phone": _as_str,
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


# --- voice calls ------------------------------------------------------------------
#
# The table "Events: server to client" of pinecall-voice-protocol.md, one class per
# event, fields under their wire names. Every one carries ``call_id`` (and, in the
# captures, ``session_id``, ``seq``, ``ts``): they are on the base class.

_CALL: dict[str, Reader] = {
    "agent_id": _as_str,
    "call_id": _as_str,
    "session_id": _as_str,
    "seq": _as_int,
    "ts": _as_time,
}


@dataclass(kw_only=True)
class CallEvent(Event):
    """Any event of a voice call (every class below is one).

    ``call_id`` names the call (Twilio ``CA…``, WebRTC ``wrt_…``); ``session_id``,
    ``seq`` and ``ts`` are in the captured frames too (``session_id`` had the same
    value as ``call_id``). :attr:`call` is ``call_id``, else ``session_id``.
    """

    call_id: str | None = None
    session_id: str | None = None
    seq: int | None = None
    ts: str | int | float | None = None

    _schema: ClassVar = dict(_CALL)

    @property
    def call(self) -> str | None:
        return self.call_id or self.session_id


@dataclass(kw_only=True)
class CallRingingEvent(CallEvent):
    """``call.ringing``: only for a number added with ``ringing=True``; answer with
    :meth:`Agent.call_accept` / :meth:`Agent.call_reject` (else accepted after about 5 s)."""

    from_: str | None = None
    to: str | None = None
    direction: str | None = None

    _schema: ClassVar = {**_CALL, "from": _as_str, "to": _as_str, "direction": _as_str}


@dataclass(kw_only=True)
class CallRejectedEvent(CallEvent):
    """``call.rejected``: follows our ``call.reject``."""

    reason: str | None = None

    _schema: ClassVar = {**_CALL, "reason": _as_str}


@dataclass(kw_only=True)
class CallDialingEvent(CallEvent):
    """``call.dialing``: an outbound call is being placed."""

    to: str | None = None
    from_: str | None = None

    _schema: ClassVar = {**_CALL, "to": _as_str, "from": _as_str}


@dataclass(kw_only=True)
class CallStartedEvent(CallEvent):
    """``call.started``: the call is connected.

    ``from_`` / ``to`` are E.164 numbers on the phone (``"webrtc"`` in the browser);
    ``direction`` ``inbound``/``outbound``; ``transport`` ``phone``/``webrtc``. Calls
    through a phone line also have ``extension``, ``owner``, ``routed_from`` and
    ``line_transcript`` (``[{who, text, at}]``).
    """

    from_: str | None = None
    to: str | None = None
    direction: str | None = None
    metadata: dict[str, Any] | None = None
    language: str | None = None
    transport: str | None = None
    extension: str | None = None
    owner: str | None = None
    routed_from: str | None = None
    line_transcript: list[Any] | None = None

    _schema: ClassVar = {
        **_CALL,
        "from": _as_str,
        "to": _as_str,
        "direction": _as_str,
        "metadata": _as_dict,
        "language": _as_str,
        "transport": _as_str,
        "extension": _as_str,
        "owner": _as_str,
        "routed_from": _as_str,
        "line_transcript": _as_list,
    }


@dataclass(kw_only=True)
class CallUpdatedEvent(CallEvent):
    """``call.updated``: the session language changed mid-call."""

    language: str | None = None

    _schema: ClassVar = {**_CALL, "language": _as_str}


@dataclass(kw_only=True)
class SpeechStartedEvent(CallEvent):
    """``speech.started``: the VAD heard the caller start."""

    turn_id: int | None = None
    confidence: int | float | None = None
    timestamp: str | int | float | None = None

    _schema: ClassVar = {**_CALL, "turn_id": _as_int, "confidence": _as_number, "timestamp": _as_time}


@dataclass(kw_only=True)
class UserSpeakingEvent(CallEvent):
    """``user.speaking``: an interim transcript (the live draft); each one replaces the
    previous. Never match it to the final ``user.message`` by id (captures had no
    ``message_id`` and ``turn_id`` 0): the next ``user.message`` closes the draft."""

    text: str | None = None
    confidence: int | float | None = None
    message_id: str | None = None
    confirmed_text: str | None = None
    turn_id: int | None = None

    _schema: ClassVar = {
        **_CALL,
        "text": _as_str,
        "confidence": _as_number,
        "message_id": _as_str,
        "confirmed_text": _as_str,
        "turn_id": _as_int,
    }


@dataclass(kw_only=True)
class SpeechEndedEvent(CallEvent):
    """``speech.ended``: the VAD heard the caller stop."""

    turn_id: int | None = None
    duration_ms: int | float | None = None
    timestamp: str | int | float | None = None

    _schema: ClassVar = {**_CALL, "turn_id": _as_int, "duration_ms": _as_number, "timestamp": _as_time}


@dataclass(kw_only=True)
class UserMessageEvent(CallEvent):
    """``user.message``: the caller's final text of a turn (may arrive twice: deduplicate
    by ``message_id``). ``phone_number`` is the caller's number."""

    message_id: str | None = None
    text: str | None = None
    confidence: int | float | None = None
    turn_id: int | None = None
    language: str | None = None
    lag_ms: int | float | None = None
    phone_number: str | None = None

    _schema: ClassVar = {
        **_CALL,
        "message_id": _as_str,
        "text": _as_str,
        "confidence": _as_number,
        "turn_id": _as_int,
        "language": _as_str,
        "lag_ms": _as_number,
        "phone_number": _as_str,
    }


@dataclass(kw_only=True)
class EagerTurnEvent(CallEvent):
    """``eager.turn``: an early guess that the caller finished."""

    turn_id: int | None = None
    message_id: str | None = None
    text: str | None = None
    probability: int | float | None = None
    latency_ms: int | float | None = None

    _schema: ClassVar = {
        **_CALL,
        "turn_id": _as_int,
        "message_id": _as_str,
        "text": _as_str,
        "probability": _as_number,
        "latency_ms": _as_number,
    }


@dataclass(kw_only=True)
class TurnPauseEvent(CallEvent):
    """``turn.pause``: the caller may go on (SmartTurn only)."""

    turn_id: int | None = None
    probability: int | float | None = None
    latency_ms: int | float | None = None

    _schema: ClassVar = {**_CALL, "turn_id": _as_int, "probability": _as_number, "latency_ms": _as_number}


@dataclass(kw_only=True)
class TurnResumedEvent(CallEvent):
    """``turn.resumed``: the caller spoke again after a pause."""

    turn_id: int | None = None
    timestamp: str | int | float | None = None

    _schema: ClassVar = {**_CALL, "turn_id": _as_int, "timestamp": _as_time}


@dataclass(kw_only=True)
class TurnEndEvent(CallEvent):
    """``turn.end``: the turn is over and the reply starts. ``text`` / ``message_id`` are
    optional: without them, take those of the last ``user.message``."""

    turn_id: int | None = None
    probability: int | float | None = None
    latency_ms: int | float | None = None
    text: str | None = None
    message_id: str | None = None

    _schema: ClassVar = {
        **_CALL,
        "turn_id": _as_int,
        "probability": _as_number,
        "latency_ms": _as_number,
        "text": _as_str,
        "message_id": _as_str,
    }


@dataclass(kw_only=True)
class TurnContinuedEvent(CallEvent):
    """``turn.continued``: the caller kept talking after a turn signal."""

    turn_id: int | None = None
    timestamp: str | int | float | None = None

    _schema: ClassVar = {**_CALL, "turn_id": _as_int, "timestamp": _as_time}


@dataclass(kw_only=True)
class LlmBeforeEvent(CallEvent):
    """``llm.before``: only with ``preparing`` on; the server waits for ``llm.ready``."""

    turn: int | None = None

    _schema: ClassVar = {**_CALL, "turn": _as_int}


@dataclass(kw_only=True)
class LlmPreparingTimeoutEvent(CallEvent):
    """``llm.preparing_timeout``: the wait for ``llm.ready`` ran out."""

    turn: int | None = None
    waited_ms: int | float | None = None
    budget_ms: int | float | None = None

    _schema: ClassVar = {**_CALL, "turn": _as_int, "waited_ms": _as_number, "budget_ms": _as_number}


@dataclass(kw_only=True)
class LlmToolCallEvent(CallEvent):
    """``llm.tool_call`` (the wire name; the JavaScript SDK calls it ``llm.toolCall``).

    ``msg_id`` ties it to its ``llm.tool_result`` (older servers send ``message_id``:
    then ``msg_id`` is read from it); it may be re-sent, deduplicate by ``msg_id``.
    ``tool_calls`` is as sent; :attr:`calls` reads both shapes
    (``{id, name, arguments}`` and OpenAI's ``{id, function: {name, arguments}}``).
    """

    msg_id: str | None = None
    message_id: str | None = None
    tool_calls: list[Any] | None = None

    _schema: ClassVar = {**_CALL, "msg_id": _as_str, "message_id": _as_str, "tool_calls": _as_list}
    _fallbacks: ClassVar = {"msg_id": "message_id"}

    @property
    def calls(self) -> list[dict[str, Any]]:
        """``[{"id", "name", "arguments"}]`` for each tool call that is an object."""
        out = []
        for item in self.tool_calls or ():
            if not isinstance(item, dict):
                continue
            function = item.get("function")
            source = function if isinstance(function, dict) else item
            out.append({"id": item.get("id"), "name": source.get("name"),
                        "arguments": source.get("arguments")})
        return out


@dataclass(kw_only=True)
class BotSpeakingEvent(CallEvent):
    """``bot.speaking``: the bot started a line. ``text`` is the whole line for a
    ``bot.reply`` (:meth:`Agent.call_say`), empty for a streamed server-LLM reply. A new
    ``bot.speaking`` starts a new caption line."""

    message_id: str | None = None
    text: str | None = None

    _schema: ClassVar = {**_CALL, "message_id": _as_str, "text": _as_str}


@dataclass(kw_only=True)
class BotWordEvent(CallEvent):
    """``bot.word``: one word, as the audio plays it (``start_time``/``end_time`` in s)."""

    message_id: str | None = None
    word: str | None = None
    word_index: int | None = None
    start_time: int | float | None = None
    end_time: int | float | None = None

    _schema: ClassVar = {
        **_CALL,
        "message_id": _as_str,
        "word": _as_str,
        "word_index": _as_int,
        "start_time": _as_number,
        "end_time": _as_number,
    }


@dataclass(kw_only=True)
class MessageConfirmedEvent(CallEvent):
    """``message.confirmed``: the line's final wording (may arrive twice)."""

    message_id: str | None = None
    text: str | None = None

    _schema: ClassVar = {**_CALL, "message_id": _as_str, "text": _as_str}


@dataclass(kw_only=True)
class BotFinishedEvent(CallEvent):
    """``bot.finished``: the line's audio finished playing."""

    message_id: str | None = None
    duration_ms: int | float | None = None

    _schema: ClassVar = {**_CALL, "message_id": _as_str, "duration_ms": _as_number}


@dataclass(kw_only=True)
class BotInterruptedEvent(CallEvent):
    """``bot.interrupted``: the bot was cut off (``reason`` ``user_spoke``, ``cancelled``,
    ``continuation``, ``early``...) after ``words_spoken`` words / ``played_ms``."""

    message_id: str | None = None
    played_ms: int | float | None = None
    words_spoken: int | None = None
    last_word: str | None = None
    reason: str | None = None

    _schema: ClassVar = {
        **_CALL,
        "message_id": _as_str,
        "played_ms": _as_number,
        "words_spoken": _as_int,
        "last_word": _as_str,
        "reason": _as_str,
    }


@dataclass(kw_only=True)
class BargeInEvent(CallEvent):
    """``barge_in``: the caller talked over the bot's ``cancelled_message_id``."""

    cancelled_message_id: str | None = None

    _schema: ClassVar = {**_CALL, "cancelled_message_id": _as_str}


@dataclass(kw_only=True)
class ReplyRejectedEvent(CallEvent):
    """``reply.rejected``: a ``bot.reply`` answered a stale user message; not spoken."""

    message_id: str | None = None
    in_reply_to: str | None = None
    expected_reply_to: str | None = None
    reason: str | None = None

    _schema: ClassVar = {
        **_CALL,
        "message_id": _as_str,
        "in_reply_to": _as_str,
        "expected_reply_to": _as_str,
        "reason": _as_str,
    }


@dataclass(kw_only=True)
class MessageAbortedEvent(CallEvent):
    """``message.aborted``: a bot line was dropped before it was confirmed."""

    message_id: str | None = None
    reason: str | None = None

    _schema: ClassVar = {**_CALL, "message_id": _as_str, "reason": _as_str}


@dataclass(kw_only=True)
class _SkillEvent(CallEvent):
    skill: str | None = None
    by: str | None = None

    _schema: ClassVar = {**_CALL, "skill": _as_str, "by": _as_str}


@dataclass(kw_only=True)
class SkillLoadedEvent(_SkillEvent):
    """``skill.loaded``: a skill was switched on for the call."""


@dataclass(kw_only=True)
class SkillUnloadedEvent(_SkillEvent):
    """``skill.unloaded``: a skill was switched off for the call."""


@dataclass(kw_only=True)
class CallDtmfReceivedEvent(CallEvent):
    """``call.dtmf_received``: the caller pressed ``digit`` (``digits``: all so far)."""

    digit: str | None = None
    digits: str | None = None

    _schema: ClassVar = {**_CALL, "digit": _as_str, "digits": _as_str}


@dataclass(kw_only=True)
class AudioMetricsEvent(CallEvent):
    """``audio.metrics``: only with ``config.analysis.send_audio_metrics`` (every ~100 ms)."""

    source: str | None = None
    energy_db: int | float | None = None
    rms: int | float | None = None
    peak: int | float | None = None
    is_speech: bool | None = None
    vad_prob: int | float | None = None
    timestamp: str | int | float | None = None

    _schema: ClassVar = {
        **_CALL,
        "source": _as_str,
        "energy_db": _as_number,
        "rms": _as_number,
        "peak": _as_number,
        "is_speech": _as_bool,
        "vad_prob": _as_number,
        "timestamp": _as_time,
    }


@dataclass(kw_only=True)
class SessionIdleWarningEvent(CallEvent):
    """``session.idle_warning``: the caller has been silent; the call ends in
    ``remaining_seconds`` (of ``idle_timeout_seconds``)."""

    remaining_seconds: int | float | None = None
    idle_timeout_seconds: int | float | None = None

    _schema: ClassVar = {**_CALL, "remaining_seconds": _as_number, "idle_timeout_seconds": _as_number}


@dataclass(kw_only=True)
class SessionTimeoutEvent(CallEvent):
    """``session.timeout``: a session limit was hit (``max_duration``/``idle_timeout``)."""

    reason: str | None = None

    _schema: ClassVar = {**_CALL, "reason": _as_str}


@dataclass(kw_only=True)
class CreditsExhaustedEvent(CallEvent):
    """``credits.exhausted``: the org ran out of credit; the call is ending."""


@dataclass(kw_only=True)
class CreditsRejectedEvent(CallEvent):
    """``credits.rejected``: the call was refused for lack of credit."""


@dataclass(kw_only=True)
class CallForwardedEvent(CallEvent):
    """``call.forwarded``: the call left Pinecall for ``to`` (:meth:`Agent.call_forward`)."""

    to: str | None = None

    _schema: ClassVar = {**_CALL, "to": _as_str}


@dataclass(kw_only=True)
class CallHeldEvent(CallEvent):
    """``call.held``: hold music plays, the caller's mic is muted."""


@dataclass(kw_only=True)
class CallUnheldEvent(CallEvent):
    """``call.unheld``: back from hold."""


@dataclass(kw_only=True)
class CallMutedEvent(CallEvent):
    """``call.muted``: the caller is muted (still transcribed)."""


@dataclass(kw_only=True)
class CallUnmutedEvent(CallEvent):
    """``call.unmuted``: ``muted_transcript`` is what the caller said meanwhile (or None)."""

    muted_transcript: str | None = None

    _schema: ClassVar = {**_CALL, "muted_transcript": _as_str}


@dataclass(kw_only=True)
class CallDtmfSentEvent(CallEvent):
    """``call.dtmf_sent``: the keypad tones ``digits`` were played."""

    digits: str | None = None

    _schema: ClassVar = {**_CALL, "digits": _as_str}


@dataclass(kw_only=True)
class CallErrorEvent(CallEvent):
    """``call.error``: the call failed (``error`` its text, ``code`` optional): an ended call."""

    error: str | None = None
    code: str | None = None

    _schema: ClassVar = {**_CALL, "error": _as_error, "code": _as_str}


@dataclass(kw_only=True)
class CallEndedEvent(CallEvent):
    """``call.ended``: the call is over.

    ``reason`` is free text (``hangup``, ``client_hangup``, ``idle_timeout``, ``forwarded``,
    ...); ``duration_seconds`` a float; ``started_at`` / ``ended_at`` epoch seconds;
    ``messages`` the server's full history (``[{role, content}]``). A call that never
    connected also has ``direction``, ``from_``, ``to``.

    ``local`` is not a wire field: True on the ``call.ended`` the client makes itself,
    for each call it knew live, when the connection is lost (the server sends none for
    those calls; ``reason`` is then ``"connection_lost"``).
    """

    reason: str | None = None
    duration_seconds: int | float | None = None
    started_at: str | int | float | None = None
    ended_at: str | int | float | None = None
    messages: list[Any] | None = None
    direction: str | None = None
    from_: str | None = None
    to: str | None = None
    local: bool = False

    _schema: ClassVar = {
        **_CALL,
        "reason": _as_str,
        "duration_seconds": _as_number,
        "started_at": _as_time,
        "ended_at": _as_time,
        "messages": _as_list,
        "direction": _as_str,
        "from": _as_str,
        "to": _as_str,
    }


@dataclass(kw_only=True)
class CallRecordingEvent(CallEvent):
    """``call.recording``: after the end, with recording on (``audio`` base64 WAV)."""

    audio: str | None = None
    duration_ms: int | float | None = None
    format: str | None = None
    sample_rate: int | None = None

    _schema: ClassVar = {
        **_CALL,
        "audio": _as_str,
        "duration_ms": _as_number,
        "format": _as_str,
        "sample_rate": _as_int,
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

#: wire name -> class, for every voice-call event of the document's table
VOICE_EVENTS: dict[str, type[CallEvent]] = {
    "call.ringing": CallRingingEvent,
    "call.rejected": CallRejectedEvent,
    "call.dialing": CallDialingEvent,
    "call.started": CallStartedEvent,
    "call.updated": CallUpdatedEvent,
    "speech.started": SpeechStartedEvent,
    "user.speaking": UserSpeakingEvent,
    "speech.ended": SpeechEndedEvent,
    "user.message": UserMessageEvent,
    "eager.turn": EagerTurnEvent,
    "turn.pause": TurnPauseEvent,
    "turn.resumed": TurnResumedEvent,
    "turn.end": TurnEndEvent,
    "turn.continued": TurnContinuedEvent,
    "llm.before": LlmBeforeEvent,
    "llm.preparing_timeout": LlmPreparingTimeoutEvent,
    "llm.tool_call": LlmToolCallEvent,
    "bot.speaking": BotSpeakingEvent,
    "bot.word": BotWordEvent,
    "message.confirmed": MessageConfirmedEvent,
    "bot.finished": BotFinishedEvent,
    "bot.interrupted": BotInterruptedEvent,
    "barge_in": BargeInEvent,
    "reply.rejected": ReplyRejectedEvent,
    "message.aborted": MessageAbortedEvent,
    "skill.loaded": SkillLoadedEvent,
    "skill.unloaded": SkillUnloadedEvent,
    "call.dtmf_received": CallDtmfReceivedEvent,
    "audio.metrics": AudioMetricsEvent,
    "session.idle_warning": SessionIdleWarningEvent,
    "session.timeout": SessionTimeoutEvent,
    "credits.exhausted": CreditsExhaustedEvent,
    "credits.rejected": CreditsRejectedEvent,
    "call.forwarded": CallForwardedEvent,
    "call.held": CallHeldEvent,
    "call.unheld": CallUnheldEvent,
    "call.muted": CallMutedEvent,
    "call.unmuted": CallUnmutedEvent,
    "call.dtmf_sent": CallDtmfSentEvent,
    "call.error": CallErrorEvent,
    "call.ended": CallEndedEvent,
    "call.recording": CallRecordingEvent,
}
EVENT_CLASSES.update(VOICE_EVENTS)


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
    for attr, key in cls._fallbacks.items():  # older wire names
        if kwargs.get(attr) is None and frame.get(key) is not None:
            kwargs[attr] = _read(cls, name, key, frame[key])
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
