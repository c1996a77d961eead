"""Pinecall's events, stored: one service per event type.

Each is one transaction and idempotent, because after a reconnect Pinecall may
repeat events: the same `message_id` twice stores one message, a repeated
`session_started` updates, and an event for a session we never saw creates its
conversation. Operators are told after the commit.

The functions take plain values (the wire's fields), so the domain does not
depend on the SDK's types; the worker unpacks events into them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from django.db import transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from conversations import live
from conversations.models import Conversation, Message
from conversations.services import (
    conversation_end,
    conversation_touch,
    conversation_record_message,
    agent_paused_set,
    contact_pause_set,
    session_paused_set,
)

logger = logging.getLogger(__name__)

# Customers who ask for a person are flagged for operators even while the AI answers.
ASKS_FOR_A_PERSON = re.compile(
    r"\b(human|person|real (agent|someone)|someone real|operator|representative|"
    r"speak to (an? )?(agent|someone)|talk to (an? )?(agent|someone))\b",
    re.IGNORECASE,
)
MESSAGE_TYPES = {choice.value for choice in Message.Type}


def _conversation_for(
    *, session_id: str, agent_id: str, contact_phone: str = "", contact_name: str = ""
) -> Conversation:
    """The session's conversation, locked; created when we never saw it start."""
    start = SessionStart(agent_id, session_id, contact_phone, contact_name)
    conversations, _ = _conversations_locked([start])
    return conversations[session_id]


@dataclass(frozen=True)
class SessionStart:
    """A `whatsapp.session_started`, in the wire's terms."""

    agent_id: str
    session_id: str
    contact_phone: str
    contact_name: str = ""


def ingest_session_started(**fields) -> Conversation:
    return ingest_sessions_started([SessionStart(**fields)])[0]


@transaction.atomic
def ingest_sessions_started(starts: list[SessionStart]) -> list[Conversation]:
    """New sessions (or repeats of known ones, which update the contact's details)."""
    conversations, created = _conversations_locked(starts)
    for start in starts:
        conversation = conversations[start.session_id]
        if start.session_id in created:
            live.after_commit(live.inbox_row_changed, conversation)
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
            live.after_commit(live.conversation_changed, conversation)
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


def ingest_customer_message(**fields) -> Message | None:
    """A message from the customer. Returns None when it was already stored."""
    stored = ingest_customer_messages([CustomerMessage(**fields)])
    return stored[0] if stored else None


@transaction.atomic
def ingest_customer_messages(incoming: list[CustomerMessage]) -> list[Message]:
    """Customer messages, stored together in a handful of queries however many there are.

    A burst (a campaign, a reconnect's backlog) is most of what the worker
    stores, so this is set-based: the repeats are dropped in one query, the
    conversations locked in one, the messages inserted in one, and each
    conversation's inbox columns written once.
    """
    fresh = _drop_repeats(incoming)
    if not fresh:
        return []
    conversations, _ = _conversations_locked(fresh)
    now = timezone.now()
    messages = Message.objects.bulk_create(
        Message(
            conversation=conversations[m.session_id],
            message_id=m.message_id or None,
            direction=Message.Direction.INBOUND,
            author=Message.Author.CUSTOMER,
            type=m.type if m.type in MESSAGE_TYPES else Message.Type.TEXT,
            text=m.text,
            paused=m.paused,
            created_at=now,
        )
        for m in fresh
    )
    changed: set[str] = set()
    for m, message in zip(fresh, messages):
        conversation = conversations[m.session_id]
        changed.update(conversation_record_message(conversation, message))
        if m.contact_name and not conversation.contact_name:
            conversation.contact_name = m.contact_name
            changed.add("contact_name")
        if conversation.held_by_id is None and (m.paused or ASKS_FOR_A_PERSON.search(m.text)):
            # Nobody answers a paused conversation that no human holds.
            conversation.needs_human = True
            changed.add("needs_human")
    for conversation in conversations.values():
        conversation.updated_at = now
    Conversation.objects.bulk_update(conversations.values(), [*changed, "updated_at"])
    for message in messages:
        live.after_commit(live.message_added, message)
    return messages


def _drop_repeats(incoming: list[CustomerMessage]) -> list[CustomerMessage]:
    """Pinecall may repeat events after a reconnect: one message per `message_id`."""
    ids = [m.message_id for m in incoming if m.message_id]
    seen = set(Message.objects.filter(message_id__in=ids).values_list("message_id", flat=True))
    fresh = []
    for m in incoming:
        if m.message_id:
            if m.message_id in seen:
                continue
            seen.add(m.message_id)
        fresh.append(m)
    return fresh


def _conversations_locked(
    items: list[CustomerMessage] | list[SessionStart],
) -> tuple[dict[str, Conversation], set[str]]:
    """The items' conversations by session id, locked, and the ids of those created
    here (for sessions never seen before)."""
    session_ids = sorted({item.session_id for item in items})  # one lock order, no deadlocks
    locked = Conversation.objects.select_for_update().filter(session_id__in=session_ids)
    conversations = {c.session_id: c for c in locked.order_by("session_id")}
    missing = {item.session_id: item for item in items if item.session_id not in conversations}
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
        created = locked.filter(session_id__in=list(missing)).order_by("session_id")
        conversations.update((c.session_id, c) for c in created)
    return conversations, set(missing)


@transaction.atomic
def ingest_response(
    *,
    agent_id: str,
    session_id: str | None,
    to: str = "",
    text: str = "",
    source: str | None = None,
) -> Message | None:
    """A reply went out: the AI's, or the echo of a human send.

    Returns the new message, or None when it was an echo or a repeat. A direct
    send to a contact whose session had ended comes without a session id: it
    belongs to that contact's latest conversation.
    """
    if session_id:
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
    if source == "human":
        pending_copy = (
            conversation.messages.filter(
                author=Message.Author.HUMAN, echo_received=False, text=text
            )
            .order_by("id")
            .first()
        )
        if pending_copy is not None:
            Message.objects.filter(pk=pending_copy.pk).update(echo_received=True)
            return None
        author = Message.Author.HUMAN  # sent by someone outside this dashboard
    else:
        author = Message.Author.AI
        # Replies carry no id; after a reconnect Pinecall may repeat the last one.
        # The same text again with no customer message in between is that repeat.
        last = conversation.messages.exclude(direction=Message.Direction.NOTE).last()
        if last is not None and last.author == author and last.text == text:
            return None
    now = timezone.now()
    message = Message.objects.create(
        conversation=conversation,
        direction=Message.Direction.OUTBOUND,
        author=author,
        text=text,
        status=Message.Status.SENT,
        echo_received=source == "human",
        created_at=now,
        status_changed_at=now,
    )
    conversation_touch(conversation, message)
    live.after_commit(live.message_added, message)
    return message


@transaction.atomic
def ingest_status(*, message_id: str, status: str, recipient: str = "") -> Message | None:
    """A delivery receipt. Moves a message's status forward only.

    Replies carry no id, so the first receipt naming an unknown id belongs to
    the oldest reply to that recipient that has none yet.
    """
    if status not in Message.Status.values or status == Message.Status.PENDING:
        logger.warning("ignoring unknown status %r for %s", status, message_id)
        return None
    message = Message.objects.select_for_update().filter(message_id=message_id).first()
    if message is None and recipient:
        message = (
            Message.objects.select_for_update()
            .filter(
                direction=Message.Direction.OUTBOUND,
                message_id__isnull=True,
                conversation__contact_phone=recipient,
            )
            .exclude(status__in=[Message.Status.PENDING, Message.Status.FAILED])
            .order_by("id")
            .first()
        )
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
    live.after_commit(live.message_changed, message)
    return message


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
        if isinstance(ended_at, str):
            ended_at = parse_datetime(ended_at)
        elif isinstance(ended_at, (int, float)):
            ended_at = datetime.fromtimestamp(ended_at, tz=UTC)
        conversation_end(conversation, reason=reason or "ended", ended_at=ended_at)
        live.after_commit(live.conversation_changed, conversation)
    return conversation


def ingest_pause_state(
    *, agent_id: str, paused: bool, session_id: str | None = None, contact: str | None = None
) -> None:
    """`session.paused` / `session.resumed`: state, whoever changed it."""
    if session_id:
        session_paused_set(session_id=session_id, paused=paused)
    elif contact:
        contact_pause_set(agent_id=agent_id, contact_phone=contact, paused=paused)
    else:
        agent_paused_set(agent_id=agent_id, paused=paused)
