"""Server-side state of the simulator: agents, sessions, pauses, history.

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
from typing import Any

MESSAGE_TYPES = frozenset({"text", "audio", "image", "video", "document"})
END_REASONS = frozenset({"idle_timeout", "window_expired"})

_NON_DIGITS = re.compile(r"\D")


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
