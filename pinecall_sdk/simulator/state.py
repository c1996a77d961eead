"""Server-side state of the simulator: agents, sessions, pauses, history, calls.

Nothing in here does I/O. The server module (``server.py``) owns the sockets
and timers and calls into these classes; keeping them free of networking makes
the rules (which levels pause a session, what a session_ended frame holds, ...)
easy to read in one place.
"""

from __future__ import annotations

import re
import secrets
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

MESSAGE_TYPES = frozenset({"text", "audio", "image", "video", "document"})
END_REASONS = frozenset({"idle_timeout", "window_expired"})

_NON_DIGITS = re.compile(r"\D")
_E164 = re.compile(r"\+[0-9]{7,15}")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def iso(dt: datetime) -> str:
    """ISO-8601 in UTC with millisecond precision, e.g. 2025-05-01T09:30:00.123+00:00."""
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def epoch(dt: datetime) -> float:
    """Unix epoch seconds with millisecond precision (what the JavaScript SDK expects)."""
    return round(dt.timestamp(), 3)


def normalize_phone(phone: str) -> str:
    """Phones on the wire are digits only, no ``+`` (``+34 612-345-678`` -> ``34612345678``)."""
    return _NON_DIGITS.sub("", phone)


def new_session_id(taken: dict[str, Any] | None = None) -> str:
    """``wa-`` followed by 12 lowercase hex digits, unique among ``taken``."""
    while True:
        sid = "wa-" + secrets.token_hex(6)
        if not taken or sid not in taken:
            return sid


def new_wamid() -> str:
    """A WhatsApp-style message id (``wamid.`` + 32 random upper-case hex digits)."""
    return "wamid." + secrets.token_hex(16).upper()


def is_phone_ref(ref: Any) -> bool:
    """A phone channel's ``ref`` / a forward target: E.164 (``+`` and 7-15 digits) or ``sip:``."""
    if not isinstance(ref, str):
        return False
    if ref.startswith("sip:"):
        return len(ref) > 4 and not any(c.isspace() for c in ref)
    return _E164.fullmatch(ref) is not None


def new_call_id(taken: dict[str, Any] | None = None) -> str:
    """A Twilio-style call id: ``CA`` + 32 lowercase hex digits."""
    while True:
        call_id = "CA" + secrets.token_hex(16)
        if not taken or call_id not in taken:
            return call_id


def new_message_id(prefix: str = "msg") -> str:
    """A voice message id (``msg_…`` for the bot's lines, ``um_…`` for the caller's)."""
    return f"{prefix}_{secrets.token_hex(8)}"


# --- voice calls --------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One step of a caller's script (see :func:`parse_script`)."""

    say: str | None = None
    barge_in: int | None = None  # talk over the bot's reply after this many of its words
    silence: float = 0.0  # seconds without a word
    hangup: bool = False


def parse_script(script: Iterable[Any]) -> list[Step]:
    """A caller's script: each item is

    * ``"text"`` or ``{"say": "text"}``: the caller says it (and waits for the reply);
    * ``{"say": "text", "barge_in": n}``: the caller talks over the bot's reply to the
      previous line after ``n`` of its words (``barge_in`` + ``bot.interrupted``);
    * ``{"silence": seconds}``: the caller says nothing for that long;
    * ``{"hangup": True}``: the caller hangs up (``call.ended`` reason ``hangup``).

    After the last step the caller stays on the line, silent (the idle timeout ends
    the call, unless a command or :meth:`Simulator.end_call` does first).
    """
    steps: list[Step] = []
    for item in script:
        if isinstance(item, str):
            if not item.strip():
                raise ValueError("a script line must not be empty")
            steps.append(Step(say=item))
            continue
        if not isinstance(item, dict) or not item:
            raise ValueError(f"a script step is a string or a dict, not {item!r}")
        unknown = set(item) - {"say", "barge_in", "silence", "hangup"}
        if unknown:
            raise ValueError(f"unknown script keys {sorted(unknown)} in {item!r}")
        if item.get("hangup"):
            steps.append(Step(hangup=True))
        elif "silence" in item:
            seconds = item["silence"]
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
                raise ValueError(f"silence must be a number of seconds >= 0, not {seconds!r}")
            steps.append(Step(silence=float(seconds)))
        else:
            say, barge_in = item.get("say"), item.get("barge_in")
            if not isinstance(say, str) or not say.strip():
                raise ValueError(f"say must be a non-empty string in {item!r}")
            if barge_in is not None and (isinstance(barge_in, bool) or not isinstance(barge_in, int)
                                         or barge_in < 0):
                raise ValueError(f"barge_in must be a number of words >= 0, not {barge_in!r}")
            steps.append(Step(say=say, barge_in=barge_in))
    return steps


@dataclass(eq=False)
class Call:
    """One phone call, from ringing (or connecting) until it ends.

    ``state`` is ``"ringing"``, ``"live"`` or ``"ended"``. ``history`` is the call's LLM
    history (``{"role", "content", "source"}``; ``source`` ``caller``, ``ai``,
    ``supervisor``, ``greeting``); ``call.ended`` carries it as ``messages`` (``{role,
    content}``). ``muted_transcript`` collects what the caller says while muted.
    """

    id: str
    agent_id: str
    from_: str
    to: str
    script: list[Step]
    direction: str = "inbound"
    language: str = "en"
    metadata: dict[str, Any] = field(default_factory=dict)
    ringing: bool = False
    state: str = "ringing"
    created_at: datetime = field(default_factory=utcnow)
    started_at: datetime | None = None
    ended_at: datetime | None = None
    end_reason: str | None = None
    held: bool = False
    muted: bool = False
    forwarded_to: str | None = None
    muted_transcript: list[str] = field(default_factory=list)
    history: list[dict[str, str]] = field(default_factory=list, repr=False)
    last_user_message_id: str | None = None
    turns: int = 0
    seq: int = 0
    #: scratch space for the canned voice AI
    ai_memory: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ended(self) -> bool:
        return self.state == "ended"

    def transcript(self) -> list[dict[str, str]]:
        return [{"role": h["role"], "content": h["content"]} for h in self.history]

    def ended_fields(self) -> dict[str, Any]:
        """The fields of ``call.ended`` (after ``agent_id`` / ``call_id``)."""
        assert self.ended_at is not None
        started = self.started_at or self.ended_at
        fields: dict[str, Any] = {
            "reason": self.end_reason,
            "duration_seconds": round((self.ended_at - started).total_seconds(), 3),
            "started_at": epoch(started),
            "ended_at": epoch(self.ended_at),
            "messages": self.transcript(),
        }
        if self.started_at is None:  # never connected
            fields.update({"direction": self.direction, "from": self.from_, "to": self.to})
        return fields


@dataclass(eq=False)
class Session:
    """One agent + one contact phone, from the first message until it ends."""

    id: str
    agent_id: str
    contact_phone: str
    contact_name: str
    started_at: datetime
    last_activity: datetime
    idle_timeout: float
    ended: bool = False
    ended_at: datetime | None = None
    end_reason: str | None = None
    last_customer_at: datetime | None = None
    #: Every message of the session, in order (see ``message_record``).
    messages: list[dict[str, Any]] = field(default_factory=list, repr=False)
    #: The AI's conversation history: ``{"role", "content", "source"}``.
    history: list[dict[str, str]] = field(default_factory=list, repr=False)
    #: Scratch space for the canned AI (topic of its last answer, ...).
    ai_memory: dict[str, Any] = field(default_factory=dict, repr=False)
    # Monotonic clocks used by the timers (wall clock can jump).
    last_activity_mono: float = field(default=0.0, repr=False)
    last_customer_mono: float = field(default=0.0, repr=False)

    @property
    def message_count(self) -> int:
        return len(self.messages)

    def add_message(
        self,
        *,
        role: str,
        source: str,
        text: str,
        message_id: str,
        type: str = "text",
        now: datetime,
        mono: float,
    ) -> dict[str, Any]:
        """Record a message in the session and in the AI history; marks activity."""
        record = {
            "message_id": message_id,
            "role": role,
            "source": source,
            "type": type,
            "text": text,
            "timestamp": iso(now),
        }
        self.messages.append(record)
        content = history_content(type, text)
        self.history.append({"role": role, "content": content, "source": source})
        self.last_activity = now
        self.last_activity_mono = mono
        if role == "user":
            self.last_customer_at = now
            self.last_customer_mono = mono
        return record

    def transcript(self) -> list[dict[str, str]]:
        """The chat history as the protocol carries it: ``{"role", "content"}``."""
        return [{"role": h["role"], "content": h["content"]} for h in self.history]

    def ended_frame(self) -> dict[str, Any]:
        """The ``whatsapp.session_ended`` event for this (ended) session."""
        assert self.ended and self.ended_at is not None
        return {
            "event": "whatsapp.session_ended",
            "agent_id": self.agent_id,
            "session_id": self.id,
            "contact_phone": self.contact_phone,
            "contact_name": self.contact_name,
            "reason": self.end_reason,
            "started_at": epoch(self.started_at),
            "ended_at": epoch(self.ended_at),
            "duration": round((self.ended_at - self.started_at).total_seconds(), 3),
            "message_count": self.message_count,
            "transcript": self.transcript(),
            # Chat history entries ({role, content}) that also carry the message's record.
            "messages": [
                {"role": m["role"], "content": history_content(m["type"], m["text"]), **m}
                for m in self.messages
            ],
        }


def history_content(type: str, text: str) -> str:
    """What the LLM sees for a message: the text, or a placeholder for bare media."""
    if text:
        return text
    return "" if type in ("text", "audio") else f"[{type}]"


@dataclass(eq=False)
class AgentState:
    """What the server holds for one agent id, across connections."""

    agent_id: str
    replay_last: int
    config: dict[str, Any] = field(default_factory=dict)
    #: The ``channel.add`` frame of its WhatsApp channel (credentials included), if any.
    whatsapp: dict[str, Any] | None = None
    #: ref -> the ``channel.add`` frame (without ``event``) of each phone number, in order.
    phones: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The live connection holding the agent (``server._Connection``) or None.
    conn: Any = None
    registered: bool = False
    #: Monotonic time its last connection went away (None: never dropped / online).
    dropped_at: float | None = None
    #: Last events delivered to a connection, repeated after ``agent.resumed``.
    recent: deque = field(init=False, repr=False)
    #: Events produced while no connection held the agent, delivered on return.
    buffer: deque = field(default_factory=deque, repr=False)
    # Pause levels.
    paused_all: bool = False
    paused_contacts: set[str] = field(default_factory=set)
    paused_sessions: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.recent = deque(maxlen=max(0, self.replay_last))

    def is_paused(self, session: Session) -> bool:
        return (
            self.paused_all
            or session.contact_phone in self.paused_contacts
            or session.id in self.paused_sessions
        )

    def pause(self, session_id: str | None = None, contact: str | None = None) -> None:
        if session_id is not None:
            self.paused_sessions.add(session_id)
        elif contact is not None:
            self.paused_contacts.add(normalize_phone(contact))
        else:
            self.paused_all = True

    def resume(self, session_id: str | None = None, contact: str | None = None) -> None:
        """Clear one level; with neither target, clear every level."""
        if session_id is not None:
            self.paused_sessions.discard(session_id)
        elif contact is not None:
            self.paused_contacts.discard(normalize_phone(contact))
        else:
            self.paused_all = False
            self.paused_contacts.clear()
            self.paused_sessions.clear()
