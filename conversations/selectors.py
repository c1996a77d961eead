"""Every read the dashboard makes. Services write; these only read.

Each function is a fixed, small number of queries whatever the data's size: the
inbox reads the denormalised columns on Conversation (never the messages), and a
conversation shows only its newest messages, with older ones fetched on demand.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection
from django.db.models import Exists, F, OuterRef, Q, QuerySet
from django.utils import timezone

from conversations.permissions import PAUSE_WIDE_PERMISSION, TAKE_OVER_PERMISSION, display_name
from conversations import bulk, handoff, presence
from conversations.models import (
    AgentState,
    Call,
    CallUtterance,
    HandoffPolicy,
    Command,
    ContactPause,
    Conversation,
    Message,
    OperatorProfile,
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
    qs = with_contact_pause(Conversation.objects.select_related("held_by"))
    key = inbox_filter_key(filter)
    if key == "active":
        qs = qs.filter(state=Conversation.State.ACTIVE)
    elif key == "needs":
        # The queue: whoever has waited longest comes first.
        qs = qs.filter(state=Conversation.State.ACTIVE, needs_human_since__isnull=False)
        return _searched(qs, q).order_by("needs_human_since", "id")
    elif key == "mine":
        qs = qs.filter(held_by=user)
    elif key == "ended":
        qs = qs.filter(state=Conversation.State.ENDED)
    return _searched(qs, q).order_by("-last_message_at", "-id")


PHONE_LIKE = re.compile(r"[\d\s()+.\-]+")  # what someone types as a phone number


def _searched(qs: QuerySet, q: str) -> QuerySet:
    q = (q or "").strip()
    if q:
        digits = "".join(ch for ch in q if ch.isdigit())
        match = Q(contact_name__icontains=q) | Q(contact_phone__icontains=q)
        if digits and digits != q and PHONE_LIKE.fullmatch(q):
            # "+34 600 11" finds "+3460011..."; "Ana2" or a code's "efc9b5eb" is no
            # phone number and must not find every phone with a 2 (or a 95) in it.
            match |= Q(contact_phone__icontains=digits)
        # Messages and internal notes (a note's timeline entry carries its text);
        # not the system's dividers ("Ana took over").
        match |= Exists(
            Message.objects.filter(conversation=OuterRef("pk"), text__icontains=q).exclude(
                direction=Message.Direction.NOTE, author=Message.Author.SYSTEM
            )
        )
        qs = qs.filter(match)
    return qs


def inbox_counts(*, user: AbstractBaseUser) -> dict[str, int]:
    """The filter tabs' counts (three indexed counts; "Ended" grows without bound: none)."""
    active = Conversation.objects.filter(state=Conversation.State.ACTIVE)
    return {
        "active": active.count(),
        "needs": active.filter(needs_human_since__isnull=False).count(),
        "mine": mine_count(user.pk) if user and user.pk else 0,
    }


def mine_count(user_pk: int) -> int:
    return Conversation.objects.filter(state=Conversation.State.ACTIVE, held_by_id=user_pk).count()


def longest_waiting(agent_id: str) -> Conversation | None:
    """The next customer for "Take the next one": waiting longest, nobody holding them."""
    return (
        Conversation.objects.filter(
            agent_id=agent_id,
            state=Conversation.State.ACTIVE,
            needs_human_since__isnull=False,
            held_by__isnull=True,
        )
        .order_by("needs_human_since", "id")
        .first()
    )


def inbox_page(
    *, user: AbstractBaseUser, filter: str = "", q: str = "", page: int = 1, pages: int = 1,
    size: int = 0,
) -> tuple[list[Conversation], bool]:
    """`pages` pages of the inbox from `page` on, and whether there is more: one query,
    no COUNT."""
    size = size or settings.INBOX_PAGE_SIZE
    page, pages = max(1, page), max(1, pages)
    start = (page - 1) * size
    stop = start + size * pages
    rows = list(inbox_queryset(user=user, filter=filter, q=q)[start : stop + 1])
    return rows[: stop - start], len(rows) > stop - start


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


def with_contact_pause(qs: QuerySet) -> QuerySet:
    """Each row says whether its contact is paused (a subquery in the same query)."""
    return qs.annotate(
        contact_paused=Exists(
            ContactPause.objects.filter(
                agent_id=OuterRef("agent_id"), contact_phone=OuterRef("contact_phone")
            )
        )
    )


def inbox_rows_by_id(conversation_ids, *, newest: int) -> list[Conversation]:
    """The `newest` of these rows by last activity, to re-render, oldest first (so the
    newest lands on top)."""
    rows = list(
        with_contact_pause(Conversation.objects.select_related("held_by"))
        .filter(pk__in=list(conversation_ids))
        .order_by(F("last_message_at").desc(nulls_last=True), "-id")[:newest]
    )
    rows.reverse()
    return rows


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
    idle_deadline: float | None = None  # epoch s: when an idle holder's hold goes back to the AI
    agent_paused: bool = False  # the kill switch

    @property
    def answering(self) -> tuple[str, str]:
        """Who answers this customer right now, and why: the one derived state behind
        the header's badge, the composer's notice and the inbox row's chip.

        ("ai", ""), ("me"|"other", holder), ("nobody", "agent"|"contact"|"session").
        """
        if self.holder in ("me", "other"):
            return self.holder, self.holder_name
        if self.agent_paused:
            return "nobody", "agent"
        if self.contact_paused:
            return "nobody", "contact"
        if self.conversation.ai_paused:
            return "nobody", "session"
        return "ai", ""

    @property
    def paused_text(self) -> str:
        return {
            "agent": "AI paused everywhere",
            "contact": "AI paused for this contact",
            "session": "AI paused",
        }.get(self.answering[1], "")

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
        who, _ = self.answering
        if who == "nobody":
            return "needs", f"{self.paused_text} · nobody holds this"
        return "ai", "AI is answering"


@dataclass(frozen=True)
class ConversationFacts:
    """What every viewer's view of a conversation's state is made of, read once:
    a change rendered for many viewers reads these once, not once per viewer."""

    conversation: Conversation
    last_session_command: Command | None
    contact_paused: bool
    contact_command: Command | None
    agent_paused: bool
    idle_seconds: int


_FACTS_VALUES = {
    "session": Command.Scope.SESSION.value,
    "contact": Command.Scope.CONTACT.value,
    "pause": Command.Kind.PAUSE.value,
    "resume": Command.Kind.RESUME.value,
    "pending": Command.Status.PENDING.value,
    "sent": Command.Status.SENT.value,
}


@functools.cache
def _facts_sql() -> str:
    """The conversation, its holder and the facts' scalars in one statement.

    Written out (once per process) rather than built by the ORM: compiling the
    five subqueries took three of the four milliseconds this read cost, and every
    viewer's render of every change starts here. Portable SQL (SQLite and
    PostgreSQL); the columns come from the models, so a migration cannot skew it.
    """
    conversation, user = Conversation._meta.db_table, get_user_model()._meta.db_table
    command, pause = Command._meta.db_table, ContactPause._meta.db_table
    agent, policy = AgentState._meta.db_table, HandoffPolicy._meta.db_table
    return f"""
        SELECT {bulk.columns(Conversation, "c")}, {bulk.columns(get_user_model(), "u")},
          (SELECT k.id FROM {command} k WHERE k.conversation_id = c.id
             AND k.scope = %(session)s AND k.kind IN (%(pause)s, %(resume)s)
           ORDER BY k.id DESC LIMIT 1),
          (SELECT k.id FROM {command} k WHERE k.agent_id = c.agent_id
             AND k.contact_phone = c.contact_phone AND k.scope = %(contact)s
             AND k.status IN (%(pending)s, %(sent)s)
           ORDER BY k.id DESC LIMIT 1),
          EXISTS (SELECT 1 FROM {pause} p WHERE p.agent_id = c.agent_id
                    AND p.contact_phone = c.contact_phone),
          EXISTS (SELECT 1 FROM {agent} a WHERE a.agent_id = c.agent_id AND a.ai_paused),
          (SELECT h.idle_seconds FROM {policy} h WHERE h.agent_id = c.agent_id LIMIT 1)
        FROM {conversation} c LEFT JOIN {user} u ON u.id = c.held_by_id
        WHERE c.id = %(pk)s
        """


def conversation_awaiting_command(conversation_id: int, command_id: int) -> Conversation | None:
    """The conversation, if its operator's command still waits on Pinecall."""
    awaiting = Command.objects.filter(pk=command_id, status__in=OPEN_COMMAND)
    return Conversation.objects.filter(Exists(awaiting), pk=conversation_id).first()


def conversation_facts_find(pk: int) -> ConversationFacts | None:
    """The conversation and its facts in two queries (one when no command is involved);
    None when it is gone. A change's renders for every viewer start here."""
    with connection.cursor() as cursor:
        cursor.execute(_facts_sql(), {**_FACTS_VALUES, "pk": pk})
        row = cursor.fetchone()
        if row is None:
            return None
        conversation, rest = bulk.from_row_with(Conversation, "held_by", row)
        session_command, contact_command, contact_paused, agent_paused, idle_seconds = rest
        ids = [i for i in (session_command, contact_command) if i]
        commands = {}
        if ids:
            cursor.execute(
                f"SELECT {bulk.columns(Command, 'k')} FROM {Command._meta.db_table} k WHERE k.id IN ({', '.join(['%s'] * len(ids))})",
                ids,
            )
            commands = {command.pk: command for command in (bulk.from_row(Command, r) for r in cursor.fetchall())}
    held_and_counting = conversation.held_by_id and conversation.is_active and conversation.holder_active_at
    return ConversationFacts(
        conversation=conversation,
        last_session_command=commands.get(session_command),
        contact_paused=bool(contact_paused),
        contact_command=commands.get(contact_command),
        agent_paused=bool(agent_paused),
        idle_seconds=(
            (settings.HANDOFF_IDLE_SECONDS if idle_seconds is None else idle_seconds)
            if held_and_counting
            else 0
        ),
    )


def conversation_facts(conversation: Conversation) -> ConversationFacts:
    """The facts of a conversation already read (read again, with them, by its pk)."""
    facts = conversation_facts_find(conversation.pk)
    if facts is None:  # deleted meanwhile: nothing pending, nothing paused
        return ConversationFacts(conversation, None, False, None, False, 0)
    return facts


def conversation_state(
    *, conversation: Conversation, user: AbstractBaseUser, facts: ConversationFacts | None = None
) -> ConversationState:
    """One user's view of the state, from `facts` (read here when not given)."""
    if facts is None:
        facts = conversation_facts(conversation)
    last = facts.last_session_command
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
    contact_pending = ""
    if facts.contact_command is not None:
        contact_pending = "pause" if facts.contact_command.kind == Command.Kind.PAUSE else "resume"

    if conversation.held_by_id is None:
        holder, holder_name = "ai", "AI"
    elif conversation.held_by_id == user.pk:
        holder, holder_name = "me", "You"
    else:
        holder, holder_name = "other", display_name(conversation.held_by)
    # A pending take over that is not the holder's own (e.g. the claim was undone) is stale.
    if pending == "take_over" and holder == "ai":
        pending = ""
    idle_deadline = None
    if holder == "me" and conversation.is_active and conversation.holder_active_at is not None:
        idle_deadline = (conversation.holder_active_at + timedelta(seconds=facts.idle_seconds)).timestamp()
    return ConversationState(
        conversation=conversation,
        holder=holder,
        holder_name=holder_name,
        pending=pending,
        pending_by_me=pending_by_me,
        failure=failure,
        contact_paused=facts.contact_paused,
        contact_pending=contact_pending,
        can_take_over=user.has_perm(TAKE_OVER_PERMISSION),
        can_pause=user.has_perm(PAUSE_WIDE_PERMISSION),
        idle_deadline=idle_deadline,
        agent_paused=facts.agent_paused,
    )


NAMED_VIEWERS = 9  # the presence bar and an inbox row's mark name nine at most


@dataclass(frozen=True)
class Viewer:
    pk: int
    name: str


def conversation_viewers(conversation_ids) -> dict[int, list[Viewer]]:
    """Who has each of these conversations open now (`presence`), the first few named."""
    live = presence.viewers_of(conversation_ids)
    if not live:
        return {}
    # Names for the first few only (a few spare for accounts just deactivated): the
    # bar and the row's mark name nine; with 1,000 viewers, the rest are a count.
    read = NAMED_VIEWERS + 3
    pks = {pk for users in live.values() for pk in users[:read]}
    people = {u.pk: u for u in get_user_model().objects.filter(pk__in=pks, is_active=True)}
    out = {}
    for conversation_id, users in live.items():
        named = [Viewer(pk=pk, name=display_name(people[pk])) for pk in users[:read] if pk in people]
        viewers = named + [Viewer(pk=pk, name="") for pk in users[read:]]
        if viewers:
            out[conversation_id] = viewers
    return out


def handoff_policy(agent_id: str) -> HandoffPolicy:
    """The agent's handoff policy as stored, or its defaults from settings (nothing written)."""
    return HandoffPolicy.objects.filter(agent_id=agent_id).first() or HandoffPolicy(
        agent_id=agent_id,
        pause_on_ask=settings.HANDOFF_PAUSE_ON_ASK,
        holding_message=settings.HANDOFF_HOLDING_MESSAGE,
        fallback_seconds=settings.HANDOFF_FALLBACK_SECONDS,
        idle_seconds=settings.HANDOFF_IDLE_SECONDS,
    )


@dataclass(frozen=True)
class HandoffBrief:
    """What an operator reads first when a customer needs (or just got) a person."""

    reason: str
    words: str
    waiting_since: datetime | None
    last_messages: list[Message]
    mentions: handoff.Mentions
    earlier_conversations: int


BRIEF_SHOWN_FOR = timedelta(minutes=15)


def handoff_brief(conversation: Conversation) -> HandoffBrief | None:
    """Three small queries; None when nobody needs, or just took, this conversation."""
    recent_take = (
        conversation.held_since is not None
        and timezone.now() - conversation.held_since < BRIEF_SHOWN_FOR
    )
    if not conversation.needs_human_reason or not (conversation.needs_human_since or recent_take):
        return None
    said = list(
        Message.objects.filter(conversation=conversation, author=Message.Author.CUSTOMER)
        .order_by("-id")[:5]
    )
    said.reverse()
    earlier = Conversation.objects.filter(
        agent_id=conversation.agent_id,
        contact_phone=conversation.contact_phone,
        started_at__lt=conversation.started_at,
    ).count()
    return HandoffBrief(
        reason=conversation.get_needs_human_reason_display(),
        words=conversation.needs_human_words,
        waiting_since=conversation.needs_human_since,
        last_messages=said[-3:],
        mentions=handoff.mentions([m.text for m in said]),
        earlier_conversations=earlier,
    )


# ---------------------------------------------------------------- voice calls

CALLS_ENDED_SHOWN = 50


def calls_live() -> list[Call]:
    # A caller who asked for a person first (the longest waiting), then the newest calls.
    return list(
        Call.objects.filter(state=Call.State.LIVE).order_by(
            F("needs_human_since").asc(nulls_last=True), "-started_at", "-id"
        )
    )


def calls_asking_for_a_person() -> int:
    """Live calls whose caller asked for a person: the Calls tab's badge and its alerts."""
    return Call.objects.filter(state=Call.State.LIVE, needs_human_since__isnull=False).count()


def calls_ended(limit: int = CALLS_ENDED_SHOWN) -> list[Call]:
    return list(Call.objects.filter(state=Call.State.ENDED).order_by("-ended_at", "-id")[:limit])


def operator_phone(user: AbstractBaseUser) -> str:
    """Where 'Forward to my phone' sends a call ("" : not set)."""
    return OperatorProfile.objects.filter(user=user).values_list("phone", flat=True).first() or ""


def call_find(pk: int) -> Call | None:
    return Call.objects.filter(pk=pk).first()


def call_lines(call: Call) -> list:
    return list(call.utterances.order_by("at", "id"))


def call_line_find(pk: int) -> CallUtterance | None:
    return CallUtterance.objects.select_related("call").filter(pk=pk).first()
