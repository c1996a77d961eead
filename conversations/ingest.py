"""Pinecall's events, stored: one service per event type.

Each is one transaction and idempotent, because after a reconnect Pinecall may
repeat events: the same `message_id` twice stores one message, a repeated
`session_started` updates, and an event for a session we never saw creates its
conversation. Operators are told after the commit.

The functions take plain values (the wire's fields), so the domain does not
depend on the SDK's types; the worker unpacks events into them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import NamedTuple

from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from conversations import bulk, handoff, notify
from conversations.models import Call, CallUtterance, Command, Conversation, HandoffPolicy, Message
from conversations.sanitize import clean_field, clean_id, clean_text
from conversations.services import (
    NEEDS_HUMAN_FIELDS,
    handoff_policy_get,
    handoff_step_aside,
    needs_human_start,
    conversation_end,
    conversation_touch,
    conversation_record_message,
    agent_paused_set,
    call_supervisor_line as services_call_supervisor_line,
    contact_pause_set,
    session_paused_set,
)

logger = logging.getLogger(__name__)

MESSAGE_TYPES = {choice.value for choice in Message.Type}
# Column sizes, from the models: what a frame's fields are fitted to.
SESSION_ID_MAX = Conversation._meta.get_field("session_id").max_length
AGENT_ID_MAX = Conversation._meta.get_field("agent_id").max_length
PHONE_MAX = Conversation._meta.get_field("contact_phone").max_length
NAME_MAX = Conversation._meta.get_field("contact_name").max_length
MESSAGE_ID_MAX = Message._meta.get_field("message_id").max_length


def _conversation_for(
    *, session_id: str, agent_id: str, contact_phone: str = "", contact_name: str = ""
) -> Conversation:
    """The session's conversation, locked; created when we never saw it start."""
    start = SessionStart(agent_id, session_id, contact_phone, contact_name).fitted()
    return _conversations_locked([start]).conversations[session_id]


@dataclass(frozen=True)
class SessionStart:
    """A `whatsapp.session_started`, in the wire's terms."""

    agent_id: str
    session_id: str
    contact_phone: str
    contact_name: str = ""

    def fitted(self) -> SessionStart:
        return replace(
            self,
            agent_id=clean_id(self.agent_id, AGENT_ID_MAX)[0],
            session_id=clean_id(self.session_id, SESSION_ID_MAX)[0],
            contact_phone=clean_id(self.contact_phone, PHONE_MAX)[0],
            contact_name=clean_field(self.contact_name, NAME_MAX)[0],
        )


def ingest_session_started(**fields) -> Conversation:
    return ingest_sessions_started([SessionStart(**fields)])[0]


@transaction.atomic(savepoint=False)
def ingest_sessions_started(starts: list[SessionStart]) -> list[Conversation]:
    """New sessions (or repeats of known ones, which update the contact's details)."""
    starts = [start.fitted() for start in starts]
    conversations, created, _ = _conversations_locked(starts)
    for start in starts:
        conversation = conversations[start.session_id]
        if start.session_id in created:
            notify.after_commit(notify.inbox_row_changed, conversation)
            continue
        changed = []
        if start.contact_phone and conversation.contact_phone != start.contact_phone:
            conversation.contact_phone = start.contact_phone
            changed.append("contact_phone")
        if start.contact_name and conversation.contact_name != start.contact_name:
            conversation.contact_name = start.contact_name
            changed.append("contact_name")
        if changed:
            conversation.save(update_fields=[*changed, "updated_at"])
            notify.after_commit(notify.conversation_changed, conversation)
    return [conversations[start.session_id] for start in starts]


@dataclass(frozen=True)
class CustomerMessage:
    """A `whatsapp.message`, in the wire's terms."""

    agent_id: str
    session_id: str
    contact_phone: str
    message_id: str | None
    contact_name: str = ""
    type: str = "text"
    text: str = ""
    paused: bool | None = None
    altered: bool = False

    def fitted(self) -> CustomerMessage:
        """Fitted to the columns; `altered` says whether anything had to change."""
        fields = {
            "agent_id": clean_id(self.agent_id, AGENT_ID_MAX),
            "session_id": clean_id(self.session_id, SESSION_ID_MAX),
            "contact_phone": clean_id(self.contact_phone, PHONE_MAX),
            "contact_name": clean_field(self.contact_name, NAME_MAX),
            "text": clean_text(self.text),
        }
        message_id = clean_id(self.message_id, MESSAGE_ID_MAX) if self.message_id else (None, False)
        altered = self.altered or message_id[1] or any(changed for _, changed in fields.values())
        return replace(
            self,
            **{name: value for name, (value, _) in fields.items()},
            message_id=message_id[0] or None,
            type=self.type if self.type in MESSAGE_TYPES else Message.Type.TEXT,
            paused=self.paused if isinstance(self.paused, bool) else None,
            altered=altered,
        )


def ingest_customer_message(**fields) -> Message | None:
    """A message from the customer. Returns None when it was already stored."""
    stored = ingest_customer_messages([CustomerMessage(**fields)])
    return stored[0] if stored else None


@transaction.atomic(savepoint=False)
def ingest_customer_messages(incoming: list[CustomerMessage]) -> list[Message]:
    """Customer messages, stored together in a handful of queries however many there are.

    A burst (a campaign, a reconnect's backlog) is most of what the worker
    stores, so this is set-based: the conversations (and the agent's handoff
    policy) are read and locked in one query, the messages inserted in one
    (the database skips the repeats), and each conversation's inbox columns
    written once.
    """
    fitted = [m.fitted() for m in incoming]
    if not fitted:
        return []
    agent_id = fitted[0].agent_id
    locked = _conversations_locked(fitted, policy_of=agent_id, creating=_not_stored)
    conversations = locked.conversations
    fitted = [m for m in fitted if m.session_id in conversations]  # a repeat, for a session never seen
    now = timezone.now()
    candidates = [
        Message(
            conversation=conversations[m.session_id],
            message_id=m.message_id or None,
            direction=Message.Direction.INBOUND,
            author=Message.Author.CUSTOMER,
            type=m.type,
            text=m.text,
            paused=m.paused,
            altered=m.altered,
            created_at=now,
        )
        for m in fitted
    ]
    # Pinecall may repeat events after a reconnect: one message per `message_id`.
    messages = bulk.insert_new(candidates, unique="message_id")
    if not messages:
        return []
    fresh = [m for m, message in zip(fitted, candidates) if message.pk is not None]
    changed: set[str] = set()
    policy = locked.policy or handoff_policy_get(agent_id)
    ask_phrases = handoff.phrases_from_text(policy.ask_phrases)
    asked: dict[str, Conversation] = {}
    for m, message in zip(fresh, messages):
        conversation = conversations[m.session_id]
        changed.update(conversation_record_message(conversation, message))
        if m.contact_name and not conversation.contact_name:
            conversation.contact_name = m.contact_name
            changed.add("contact_name")
        if conversation.held_by_id is not None:
            continue
        words = handoff.first_match(m.text, ask_phrases)
        if words:
            if needs_human_start(conversation, reason=Conversation.NeedsHuman.ASKED, words=words, at=now):
                changed.update(NEEDS_HUMAN_FIELDS)
            asked[m.session_id] = conversation
        elif m.paused or conversation.ai_paused:
            # Nobody answers a paused conversation that no human holds.
            if needs_human_start(conversation, reason=Conversation.NeedsHuman.PAUSED_UNHELD, at=now):
                changed.update(NEEDS_HUMAN_FIELDS)
    touched = {conversations[m.session_id].pk: conversations[m.session_id] for m in fresh}.values()
    for conversation in touched:
        conversation.updated_at = now
    bulk.update_rows(touched, [*changed, "updated_at"])
    for conversation in asked.values():
        handoff_step_aside(conversation=conversation, policy=policy)
    for message in messages:
        notify.after_commit(notify.message_added, message)
    return messages


class Locked(NamedTuple):
    conversations: dict[str, Conversation]  # by session id
    created: set[str]  # the session ids of those created here (never seen before)
    policy: HandoffPolicy | None  # with `policy_of`: that agent's, if it has one yet


def _not_stored(messages: list[CustomerMessage]) -> list[CustomerMessage]:
    """The messages whose `message_id` is not stored yet."""
    ids = [m.message_id for m in messages if m.message_id]
    stored = set(Message.objects.filter(message_id__in=ids).values_list("message_id", flat=True))
    return [m for m in messages if m.message_id not in stored]


def _conversations_locked(
    items: list[CustomerMessage] | list[SessionStart],
    *,
    policy_of: str | None = None,
    creating: Callable[[list], list] | None = None,
) -> Locked:
    """The items' conversations, locked; created for sessions never seen before (for
    those of the items `creating` keeps, when given). With `policy_of`, that agent's
    handoff policy is read in the same statement: one round trip less before the
    commit that every live screen waits for."""
    session_ids = sorted({item.session_id for item in items})  # one lock order, no deadlocks
    conversations, policy = _select_locked(session_ids, policy_of)
    unseen = [item for item in items if item.session_id not in conversations]
    if unseen and creating is not None:
        unseen = creating(unseen)
    missing = {item.session_id: item for item in unseen}
    if missing:
        Conversation.objects.bulk_create(
            [
                Conversation(
                    session_id=item.session_id,
                    agent_id=item.agent_id,
                    contact_phone=item.contact_phone,
                    contact_name=item.contact_name,
                )
                for item in missing.values()
            ],
            ignore_conflicts=True,  # created concurrently: take theirs
        )
        created, policy_now = _select_locked(sorted(missing), policy_of if policy is None else None)
        conversations.update(created)
        policy = policy or policy_now
    return Locked(conversations, set(missing), policy)


def _select_locked(session_ids: list[str], policy_of: str | None) -> tuple[dict[str, Conversation], HandoffPolicy | None]:
    """`SELECT … FOR UPDATE` written out: the ORM's compiling of it cost more than its
    round trip (PostgreSQL locks; SQLite, which has no row locks, needs none)."""
    conversation_table, policy_table = Conversation._meta.db_table, HandoffPolicy._meta.db_table
    select, join, params = bulk.columns(Conversation, "c"), "", []
    if policy_of is not None:
        select += ", " + bulk.columns(HandoffPolicy, "h")
        join, params = f" LEFT JOIN {policy_table} h ON h.agent_id = %s", [policy_of]
    lock = " FOR UPDATE OF c" if connection.features.has_select_for_update_of else ""
    places = ", ".join(["%s"] * len(session_ids))
    sql = (
        f"SELECT {select} FROM {conversation_table} c{join} "
        f"WHERE c.session_id IN ({places}) ORDER BY c.session_id{lock}"
    )
    n = len(Conversation._meta.concrete_fields)
    conversations, policy = {}, None
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, *session_ids])
        for row in cursor.fetchall():
            conversation = bulk.from_row(Conversation, row[:n])
            conversations[conversation.session_id] = conversation
            if policy is None and policy_of is not None and row[n] is not None:
                policy = bulk.from_row(HandoffPolicy, row[n:])
    return conversations, policy


def reply_key(*, session_id: str, follows: str, rank: int, text: str) -> str:
    """The identity of a reply that carries no id: where it stands in its session."""
    material = "\x1f".join([session_id, follows, str(rank), text])
    return hashlib.sha256(material.encode("utf-8", "replace")).hexdigest()


# With no known anchor (the first events after a reconnect or a restart), a
# reply is a repeat when one of the latest replies says the same.
RECENT_REPLIES = 30


@transaction.atomic
def ingest_response(
    *,
    agent_id: str,
    session_id: str | None,
    to: str = "",
    text: str = "",
    source: str | None = None,
    follows: str | None = None,
    rank: int = 1,
) -> Message | None:
    """A reply went out: the AI's, or the echo of a human send.

    Returns the new message, or None when it was an echo or a repeat. A direct
    send to a contact whose session had ended comes without a session id: it
    belongs to that contact's latest conversation.

    Replies carry no id, and after a reconnect Pinecall repeats recent events:
    `follows` (the id of the customer message this reply came after, in the
    order the events arrived) and `rank` (how many replies with this text came
    after it, this one included) make the key that recognises a repeat. The
    worker tracks them; None when it does not know (right after a reconnect).
    """
    agent_id = clean_id(agent_id, AGENT_ID_MAX)[0]
    to = clean_id(to, PHONE_MAX)[0]
    text, altered = clean_text(text)
    if session_id:
        session_id = clean_id(session_id, SESSION_ID_MAX)[0]
        conversation = _conversation_for(
            session_id=session_id, agent_id=agent_id, contact_phone=to
        )
    else:
        conversation = (
            Conversation.objects.select_for_update()
            .filter(agent_id=agent_id, contact_phone=to)
            .order_by("-started_at")
            .first()
        )
        if conversation is None:
            logger.warning("reply to %s with no session and no conversation: not stored", to)
            return None
    author = Message.Author.HUMAN if source == "human" else Message.Author.AI
    key = None
    if follows is not None:
        key = reply_key(
            session_id=conversation.session_id, follows=follows, rank=rank, text=text
        )
        if Message.objects.filter(reply_key=key).exists():
            return None  # a repeat
    elif _said_recently(conversation, author=author, text=text):
        return None  # a repeat, as far as anyone can tell
    if source == "human":
        # Our own sends: an operator's, or the dashboard's holding message.
        pending_copy = (
            conversation.messages.filter(
                direction=Message.Direction.OUTBOUND,
                author__in=[Message.Author.HUMAN, Message.Author.SYSTEM],
                echo_received=False,
                text=text,
            )
            .order_by("id")
            .first()
        )
        if pending_copy is not None:
            # Our own send, echoed: the stored copy takes the key, so a replay finds it.
            Message.objects.filter(pk=pending_copy.pk).update(
                echo_received=True, reply_key=key, went_out_at=timezone.now()
            )
            return None
        # Otherwise: sent by someone outside this dashboard.
    now = timezone.now()
    message = Message.objects.create(
        conversation=conversation,
        direction=Message.Direction.OUTBOUND,
        author=author,
        text=text,
        status=Message.Status.SENT,
        echo_received=source == "human",
        reply_key=key,
        altered=altered,
        created_at=now,
        status_changed_at=now,
        went_out_at=now,
    )
    conversation_touch(conversation, message)
    if author == Message.Author.AI and conversation.held_by_id is None:
        policy = handoff_policy_get(conversation.agent_id)
        words = handoff.first_match(text, handoff.phrases_from_text(policy.ai_phrases))
        if words and needs_human_start(conversation, reason=Conversation.NeedsHuman.AI_PASSED, words=words):
            conversation.save(update_fields=[*NEEDS_HUMAN_FIELDS, "updated_at"])
            notify.after_commit(notify.conversation_changed, conversation)
    notify.after_commit(notify.message_added, message)
    return message


def _said_recently(conversation: Conversation, *, author: str, text: str) -> bool:
    recent = (
        conversation.messages.filter(direction=Message.Direction.OUTBOUND)
        .order_by("-id")
        .values_list("author", "text", "echo_received")[:RECENT_REPLIES]
    )
    for recent_author, recent_text, echoed in recent:
        if recent_author == author and recent_text == text:
            # A human send not yet echoed is ours, waiting for its echo: not a repeat.
            return author != Message.Author.HUMAN or echoed
    return False


@transaction.atomic
def ingest_status(*, message_id: str, status: str, recipient: str = "") -> Message | None:
    """A delivery receipt. Moves a message's status forward only.

    Replies carry no id, so the first receipt naming an unknown id belongs to
    the oldest reply to that recipient that has none yet.
    """
    if status not in Message.Status.values or status == Message.Status.PENDING:
        logger.warning("ignoring unknown status %r for %s", status, message_id)
        return None
    if not message_id or not isinstance(message_id, str):
        # A receipt names its message; without a name it moves nothing.
        logger.warning("ignoring a %s status without a message id (recipient %s)", status, recipient)
        return None
    message_id = clean_id(message_id, MESSAGE_ID_MAX)[0]
    recipient = clean_id(recipient, PHONE_MAX)[0]
    message = Message.objects.select_for_update().filter(message_id=message_id).first()
    if message is None and recipient:
        message = _oldest_unbound_reply(recipient)
        if message is not None:
            message.message_id = message_id
            message.save(update_fields=["message_id"])
    if message is None:
        logger.info("status %s for unknown message %s (recipient %s)", status, message_id, recipient)
        return None
    if not message.can_move_to(status):
        return message
    message.status = status
    message.status_changed_at = timezone.now()
    message.save(update_fields=["status", "status_changed_at"])
    notify.after_commit(notify.message_changed, message)
    return message


def _oldest_unbound_reply(recipient: str) -> Message | None:
    """The reply a receipt naming a new WhatsApp id belongs to.

    Pinecall's events come in order, so a reply's `whatsapp.response` is stored
    before its first receipt: the oldest reply that went out and has no id yet
    is the one. Only when no echo was seen (lost in a reconnect) does it fall
    back to the oldest reply stored, a human send counting once its command is
    at Pinecall.
    """
    unbound = (
        Message.objects.select_for_update(of=("self",))
        .filter(
            direction=Message.Direction.OUTBOUND,
            message_id__isnull=True,
            conversation__contact_phone=recipient,
        )
        .exclude(status=Message.Status.FAILED)
    )
    went_out = unbound.filter(went_out_at__isnull=False).order_by("went_out_at", "id").first()
    if went_out is not None:
        return went_out
    return (
        unbound.filter(went_out_at__isnull=True)
        .exclude(Q(status=Message.Status.PENDING) & ~Q(command__status=Command.Status.SENT))
        .order_by("id")
        .first()
    )


@transaction.atomic
def ingest_session_ended(
    *,
    agent_id: str,
    session_id: str,
    contact_phone: str = "",
    contact_name: str = "",
    reason: str = "",
    ended_at: str | float | datetime | None = None,
) -> Conversation:
    conversation = _conversation_for(
        session_id=session_id,
        agent_id=agent_id,
        contact_phone=contact_phone,
        contact_name=contact_name,
    )
    if conversation.is_active:
        ended_at = _as_datetime(ended_at)
        conversation_end(conversation, reason=reason or "ended", ended_at=ended_at)
        notify.after_commit(notify.conversation_changed, conversation)
    return conversation


def _as_datetime(value) -> datetime | None:
    """A time as Pinecall sends it: epoch seconds (what its SDK expects) or ISO 8601."""
    if isinstance(value, datetime):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, tz=UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if isinstance(value, str):
        try:
            return parse_datetime(value)
        except ValueError:
            return None
    return None


def ingest_pause_state(
    *, agent_id: str, paused: bool, session_id: str | None = None, contact: str | None = None
) -> None:
    """`session.paused` / `session.resumed`: state, whoever changed it."""
    session_id = clean_id(session_id, SESSION_ID_MAX)[0] if session_id else None
    contact = clean_id(contact, PHONE_MAX)[0] if contact else None
    if session_id:
        session_paused_set(session_id=session_id, paused=paused)
    elif contact:
        contact_pause_set(agent_id=agent_id, contact_phone=contact, paused=paused)
    else:
        agent_paused_set(agent_id=agent_id, paused=paused)


# ---------------------------------------------------------------- voice calls
#
# Final lines only: the caller's `user.message`, the bot's `message.confirmed`.
# Interim captions (`user.speaking`, `bot.word`) are live-only and never stored.
# Idempotent like WhatsApp's: a call by `call_id`, a line by (call, `message_id`).

CALL_ID_MAX = Call._meta.get_field("call_id").max_length
CALL_NUMBER_MAX = Call._meta.get_field("from_number").max_length
UTTERANCE_ID_MAX = CallUtterance._meta.get_field("message_id").max_length


def _call_for(*, call_id: str, agent_id: str, **fields) -> Call:
    """The call, locked; created when we never saw it start (events may come out of order)."""
    call_id = clean_id(call_id, CALL_ID_MAX)[0]
    if not call_id:
        raise ValueError("a call event without call_id")
    defaults = {"agent_id": clean_field(agent_id, AGENT_ID_MAX)[0]}
    for name in ("from_number", "to_number"):
        if fields.get(name):
            defaults[name] = clean_field(fields[name], CALL_NUMBER_MAX)[0]
    if fields.get("direction"):
        defaults["direction"] = clean_field(fields["direction"], 10)[0]
    call, _ = Call.objects.select_for_update().get_or_create(call_id=call_id, defaults=defaults)
    return call


@transaction.atomic
def ingest_call_started(
    *, agent_id: str, call_id: str, from_number: str = "", to_number: str = "", direction: str = ""
) -> Call:
    call = _call_for(
        call_id=call_id, agent_id=agent_id, from_number=from_number, to_number=to_number, direction=direction
    )
    changed = []
    for name, value, size in (
        ("from_number", from_number, CALL_NUMBER_MAX),
        ("to_number", to_number, CALL_NUMBER_MAX),
        ("direction", direction, 10),
    ):
        value = clean_field(value or "", size)[0]
        if value and getattr(call, name) != value:
            setattr(call, name, value)
            changed.append(name)
    if changed:
        call.save(update_fields=changed)
    notify.after_commit(notify.call_changed, call)
    return call


@transaction.atomic
def ingest_call_caller_line(*, agent_id: str, call_id: str, message_id: str, text: str) -> CallUtterance | None:
    """`user.message`: the caller's final words of a turn (once per `message_id`)."""
    call = _call_for(call_id=call_id, agent_id=agent_id)
    message_id = clean_id(message_id or "", UTTERANCE_ID_MAX)[0]
    text = clean_text(text or "")[0]
    if not message_id:
        message_id = "um-" + hashlib.sha256(text.encode()).hexdigest()[:24]
    line, created = CallUtterance.objects.get_or_create(
        call=call,
        message_id=message_id,
        defaults={"speaker": CallUtterance.Speaker.CALLER, "text": text},
    )
    if not created:
        return None
    if call.needs_human_since is None:
        policy = handoff_policy_get(call.agent_id)
        if handoff.first_match(text, handoff.phrases_from_text(policy.ask_phrases)):
            call.needs_human_since = line.at
            call.save(update_fields=["needs_human_since"])
            notify.after_commit(notify.call_changed, call)
    notify.after_commit(notify.call_line_added, line)
    return line


@transaction.atomic
def ingest_call_line_confirmed(*, agent_id: str, call_id: str, message_id: str, text: str) -> CallUtterance | None:
    """`message.confirmed`: the bot's final wording. An AI line unless it is one a
    supervisor had said (`call_supervisor_line`, by the `message_id` we sent)."""
    call = _call_for(call_id=call_id, agent_id=agent_id)
    message_id = clean_id(message_id or "", UTTERANCE_ID_MAX)[0]
    if not message_id:
        raise ValueError("message.confirmed without message_id")
    text = clean_text(text or "")[0]
    line, created = CallUtterance.objects.select_for_update().get_or_create(
        call=call, message_id=message_id, defaults={"speaker": CallUtterance.Speaker.AI, "text": text}
    )
    if created:
        notify.after_commit(notify.call_line_added, line)
        return line
    if text and line.text != text:
        line.text = text
        line.save(update_fields=["text"])
        notify.after_commit(notify.call_line_changed, line)
    return line


@transaction.atomic
def call_supervisor_line(*, call: Call, message_id: str, text: str) -> CallUtterance:
    """A line a supervisor had the bot say (see `services.call_supervisor_line`)."""
    message_id = clean_id(message_id, UTTERANCE_ID_MAX)[0]
    return services_call_supervisor_line(call=call, message_id=message_id, text=clean_text(text)[0])


@transaction.atomic
def ingest_call_interrupted(
    *, agent_id: str, call_id: str, message_id: str, words_spoken: int | None = None
) -> CallUtterance | None:
    """`bot.interrupted`: the line was cut off. Marks a stored line; a line not yet
    confirmed is created (AI, no text yet) and gets its wording from `message.confirmed`."""
    call = _call_for(call_id=call_id, agent_id=agent_id)
    message_id = clean_id(message_id or "", UTTERANCE_ID_MAX)[0]
    if not message_id:
        return None
    if isinstance(words_spoken, bool) or not isinstance(words_spoken, int) or words_spoken < 0:
        words_spoken = None
    line, created = CallUtterance.objects.select_for_update().get_or_create(
        call=call,
        message_id=message_id,
        defaults={"speaker": CallUtterance.Speaker.AI, "interrupted": True, "words_spoken": words_spoken},
    )
    if not created and not line.interrupted:
        line.interrupted = True
        line.words_spoken = words_spoken
        line.save(update_fields=["interrupted", "words_spoken"])
    notify.after_commit(notify.call_line_changed, line)
    return line


@transaction.atomic
def ingest_call_forwarded(*, agent_id: str, call_id: str, to: str = "") -> Call:
    call = _call_for(call_id=call_id, agent_id=agent_id)
    to = clean_field(to or "", CALL_NUMBER_MAX)[0]
    if to and call.forwarded_to != to:
        call.forwarded_to = to
        call.save(update_fields=["forwarded_to"])
        notify.after_commit(notify.call_changed, call)
    return call


@transaction.atomic
def ingest_call_switched(
    *, agent_id: str, call_id: str, on_hold: bool | None = None, caller_muted: bool | None = None,
    muted_transcript: str | None = None,
) -> Call:
    """`call.held`/`unheld`/`muted`/`unmuted`: the call's switches as Pinecall confirms them;
    what the caller said while muted (the AI did not hear it) is kept as their line, marked."""
    call = _call_for(call_id=call_id, agent_id=agent_id)
    changed = [
        name for name, value in (("on_hold", on_hold), ("caller_muted", caller_muted))
        if value is not None and getattr(call, name) != value
    ]
    for name in changed:
        setattr(call, name, not getattr(call, name))
    if changed:
        call.save(update_fields=changed)
        notify.after_commit(notify.call_changed, call)
    text = clean_text(muted_transcript or "")[0].strip() if isinstance(muted_transcript, str) else ""
    if text:
        line, created = CallUtterance.objects.get_or_create(
            call=call,
            message_id="muted-" + hashlib.sha256(text.encode()).hexdigest()[:24],
            defaults={"speaker": CallUtterance.Speaker.CALLER, "text": text, "while_muted": True},
        )
        if created:
            notify.after_commit(notify.call_line_added, line)
    return call


@transaction.atomic
def ingest_call_ended(
    *,
    agent_id: str,
    call_id: str,
    reason: str = "",
    duration_seconds: float | None = None,
    started_at=None,
    ended_at=None,
    from_number: str = "",
    to_number: str = "",
    direction: str = "",
) -> Call:
    """`call.ended`: state, reason, duration. Its `messages` (the server's history)
    repeat the lines already stored and are not stored again."""
    call = _call_for(
        call_id=call_id, agent_id=agent_id, from_number=from_number, to_number=to_number, direction=direction
    )
    if not call.is_live:
        return call
    call.state = Call.State.ENDED
    call.end_reason = clean_field(reason or "ended", 40)[0]
    call.ended_at = _as_datetime(ended_at) or timezone.now()
    started = _as_datetime(started_at)
    if started is not None:
        call.started_at = started
    if isinstance(duration_seconds, (int, float)) and not isinstance(duration_seconds, bool):
        call.duration_seconds = float(duration_seconds)
    else:
        call.duration_seconds = max(0.0, (call.ended_at - call.started_at).total_seconds())
    call.save(update_fields=["state", "end_reason", "ended_at", "started_at", "duration_seconds"])
    notify.after_commit(notify.call_changed, call)
    return call
