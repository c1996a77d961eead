"""Every read the dashboard makes. Services write; these only read.

Each function is a fixed, small number of queries whatever the data's size: the
inbox reads the denormalised columns on Conversation (never the messages), and a
conversation shows only its newest messages, with older ones fetched on demand.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Exists, OuterRef, Q, QuerySet
from django.utils import timezone

from conversations.permissions import PAUSE_WIDE_PERMISSION, TAKE_OVER_PERMISSION, display_name
from conversations.models import (
    AgentState,
    Command,
    ContactPause,
    Conversation,
    Message,
    WorkerProcess,
)

# The inbox's filters: (key, label). The first is the default.
INBOX_FILTERS = [
    ("active", "All active"),
    ("needs", "Needs a human"),
    ("mine", "Mine"),
    ("ended", "Ended"),
]
INBOX_FILTER_KEYS = {key for key, _ in INBOX_FILTERS}
DEFAULT_INBOX_FILTER = "active"

# How long an action's failure stays on the conversation's header.
FAILURE_SHOWN_FOR = timedelta(minutes=10)

OPEN_COMMAND = [Command.Status.PENDING, Command.Status.SENT]


def agent_state_for_display(agent_id: str) -> AgentState:
    """The agent's state without writing: an unsaved default before the worker's first run."""
    return (
        AgentState.objects.select_related("paused_by").filter(agent_id=agent_id).first()
        or AgentState(agent_id=agent_id)
    )


@dataclass(frozen=True)
class Workers:
    """The worker processes the banner describes: the active one and its standbys."""

    active: WorkerProcess | None
    standbys: list[WorkerProcess]


def worker_processes(agent_id: str) -> Workers:
    """Workers heard from recently (one query over a handful of rows)."""
    fresh_since = timezone.now() - timedelta(seconds=settings.WORKER_HEARTBEAT_STALE_SECONDS)
    alive = list(
        WorkerProcess.objects.filter(agent_id=agent_id, seen_at__gte=fresh_since)
        .exclude(role=WorkerProcess.Role.STOPPED)
        .order_by("-seen_at")[:20]
    )
    active = next((w for w in alive if w.role == WorkerProcess.Role.ACTIVE), None)
    return Workers(active=active, standbys=[w for w in alive if w.role == WorkerProcess.Role.STANDBY])


def agent_open_command(agent_id: str) -> Command | None:
    """The kill switch's pause or resume still waiting for Pinecall, if any (partial index)."""
    return (
        Command.objects.filter(
            status__in=OPEN_COMMAND, scope=Command.Scope.AGENT, agent_id=agent_id
        )
        .order_by("-id")
        .first()
    )


def conversations_to_reconcile(agent_id: str, *, limit: int = 500) -> list[tuple[int, str]]:
    """Active conversations, newest first, whose Pinecall history the worker compares."""
    return list(
        Conversation.objects.filter(agent_id=agent_id, state=Conversation.State.ACTIVE)
        .order_by("-last_message_at")
        .values_list("pk", "session_id")[:limit]
    )


# ---------------------------------------------------------------- the inbox


def inbox_filter_key(value: str | None) -> str:
    return value if value in INBOX_FILTER_KEYS else DEFAULT_INBOX_FILTER


def inbox_queryset(*, user: AbstractBaseUser, filter: str = "", q: str = "") -> QuerySet:
    """Conversations for the inbox, newest activity first (the indexes' order)."""
    qs = Conversation.objects.select_related("held_by")
    key = inbox_filter_key(filter)
    if key == "active":
        qs = qs.filter(state=Conversation.State.ACTIVE)
    elif key == "needs":
        qs = qs.filter(state=Conversation.State.ACTIVE).filter(
            Q(needs_human=True) | Q(ai_paused=True, held_by__isnull=True)
        )
    elif key == "mine":
        qs = qs.filter(held_by=user)
    elif key == "ended":
        qs = qs.filter(state=Conversation.State.ENDED)
    q = (q or "").strip()
    if q:
        digits = "".join(ch for ch in q if ch.isdigit())
        match = Q(contact_name__icontains=q) | Q(contact_phone__icontains=q)
        if digits and digits != q:  # "+34 600 11" finds "+3460011..."
            match |= Q(contact_phone__icontains=digits)
        match |= Exists(
            Message.objects.filter(conversation=OuterRef("pk"), text__icontains=q).exclude(
                direction=Message.Direction.NOTE
            )
        )
        qs = qs.filter(match)
    return qs.order_by("-last_message_at", "-id")


def inbox_page(
    *, user: AbstractBaseUser, filter: str = "", q: str = "", page: int = 1, size: int = 0
) -> tuple[list[Conversation], bool]:
    """One page of the inbox and whether there is more: one query, no COUNT."""
    size = size or settings.INBOX_PAGE_SIZE
    page = max(1, page)
    start = (page - 1) * size
    rows = list(inbox_queryset(user=user, filter=filter, q=q)[start : start + size + 1])
    return rows[:size], len(rows) > size


def conversations_changed_since(since: datetime, *, limit: int) -> list[Conversation]:
    """Inbox rows that changed after `since` (a reconnecting page's catch-up)."""
    return list(
        Conversation.objects.select_related("held_by")
        .filter(updated_at__gte=since)
        .order_by("updated_at", "id")[:limit]
    )


# ---------------------------------------------------------------- one conversation


def conversation_get(pk: int) -> Conversation:
    return Conversation.objects.select_related("held_by").get(pk=pk)


def conversation_find(pk: int) -> Conversation | None:
    return Conversation.objects.select_related("held_by").filter(pk=pk).first()


def inbox_rows_by_id(conversation_ids) -> list[Conversation]:
    """Rows to re-render, oldest activity first (so the newest lands on top)."""
    return list(
        Conversation.objects.select_related("held_by")
        .filter(pk__in=list(conversation_ids))
        .order_by("last_message_at", "id")
    )


def conversation_messages(
    *, conversation_id: int, before: int | None = None, limit: int = 0
) -> tuple[list[Message], bool]:
    """The newest `limit` messages (before `before`), oldest first, and whether older exist."""
    limit = limit or settings.CONVERSATION_PAGE_SIZE
    qs = Message.objects.select_related("operator").filter(conversation_id=conversation_id)
    if before:
        qs = qs.filter(id__lt=before)
    rows = list(qs.order_by("-id")[: limit + 1])
    has_earlier = len(rows) > limit
    rows = rows[:limit]
    rows.reverse()
    return rows, has_earlier


def messages_after(*, conversation_id: int, after: int, limit: int) -> list[Message]:
    """Messages newer than `after`, oldest first (at most `limit`)."""
    return list(
        Message.objects.select_related("operator")
        .filter(conversation_id=conversation_id, id__gt=after)
        .order_by("id")[:limit]
    )


def messages_changed_since(
    *, conversation_id: int, since: datetime, upto: int, limit: int
) -> list[Message]:
    """Messages up to `upto` whose delivery status moved after `since`."""
    return list(
        Message.objects.select_related("operator")
        .filter(conversation_id=conversation_id, id__lte=upto, status_changed_at__gte=since)
        .order_by("id")[:limit]
    )


@dataclass
class ConversationState:
    """What one user sees of a conversation's state: the header and the composer."""

    conversation: Conversation
    holder: str  # "ai", "me" or "other"
    holder_name: str
    pending: str  # "", "take_over" or "hand_back": a session command awaiting Pinecall
    pending_by_me: bool
    failure: Command | None  # my latest take over / hand back, if it failed recently
    contact_paused: bool
    contact_pending: str  # "", "pause" or "resume"
    can_take_over: bool
    can_pause: bool

    @property
    def active(self) -> bool:
        return self.conversation.is_active

    @property
    def confirmed(self) -> bool:
        """Pinecall confirmed the AI's pause for the current holder."""
        return self.conversation.ai_paused and not self.pending

    @property
    def can_reply(self) -> bool:
        return self.holder == "me" and self.active and self.can_take_over

    @property
    def badge(self) -> tuple[str, str]:
        """(css modifier, text) for the header's holder badge."""
        c = self.conversation
        if not self.active:
            return "ended", "Conversation ended"
        if self.holder == "me":
            if self.pending == "take_over":
                return "pending", "Taking over… waiting for Pinecall"
            if self.pending == "hand_back":
                return "pending", "Handing back… waiting for Pinecall"
            return "human", "You hold this conversation"
        if self.holder == "other":
            if self.pending == "take_over":
                return "pending", f"{self.holder_name} is taking over…"
            if self.pending == "hand_back":
                return "pending", f"{self.holder_name} is handing back…"
            return "other", f"{self.holder_name} holds this conversation"
        if c.ai_paused or self.contact_paused:
            return "needs", "AI paused · nobody holds this"
        return "ai", "AI is answering"


def conversation_state(*, conversation: Conversation, user: AbstractBaseUser) -> ConversationState:
    """Three small queries: the last session command, the contact's pause, its open command."""
    last = (
        Command.objects.filter(
            conversation_id=conversation.pk,
            scope=Command.Scope.SESSION,
            kind__in=[Command.Kind.PAUSE, Command.Kind.RESUME],
        )
        .order_by("-id")
        .first()
    )
    pending, pending_by_me, failure = "", False, None
    if last is not None:
        if last.is_open:
            pending = "take_over" if last.kind == Command.Kind.PAUSE else "hand_back"
            pending_by_me = last.operator_id == user.pk
        elif (
            last.status == Command.Status.FAILED
            and last.operator_id == user.pk
            and last.completed_at
            and timezone.now() - last.completed_at < FAILURE_SHOWN_FOR
        ):
            failure = last
    contact_paused = ContactPause.objects.filter(
        agent_id=conversation.agent_id, contact_phone=conversation.contact_phone
    ).exists()
    contact_command = (
        Command.objects.filter(
            status__in=OPEN_COMMAND,
            scope=Command.Scope.CONTACT,
            agent_id=conversation.agent_id,
            contact_phone=conversation.contact_phone,
        )
        .order_by("-id")
        .first()
    )
    contact_pending = ""
    if contact_command is not None:
        contact_pending = "pause" if contact_command.kind == Command.Kind.PAUSE else "resume"

    if conversation.held_by_id is None:
        holder, holder_name = "ai", "AI"
    elif conversation.held_by_id == user.pk:
        holder, holder_name = "me", "You"
    else:
        holder, holder_name = "other", display_name(conversation.held_by)
    # A pending take over that is not the holder's own (e.g. the claim was undone) is stale.
    if pending == "take_over" and holder == "ai":
        pending = ""
    return ConversationState(
        conversation=conversation,
        holder=holder,
        holder_name=holder_name,
        pending=pending,
        pending_by_me=pending_by_me,
        failure=failure,
        contact_paused=contact_paused,
        contact_pending=contact_pending,
        can_take_over=user.has_perm(TAKE_OVER_PERMISSION),
        can_pause=user.has_perm(PAUSE_WIDE_PERMISSION),
    )
