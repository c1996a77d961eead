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
from datetime import UTC, datetime

from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from conversations import live
from conversations.models import Conversation, Message
from conversations.services import (
    _end,
    _touch,
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
) -> tuple[Conversation, bool]:
    """The session's conversation, locked; created when we never saw it start."""
    conversation = Conversation.objects.select_for_update().filter(session_id=session_id).first()
    if conversation is not None:
        return conversation, False
    try:
        with transaction.atomic():
            conversation = Conversation.objects.create(
                session_id=session_id,
                agent_id=agent_id,
                contact_phone=contact_phone,
                contact_name=contact_name,
            )
    except IntegrityError:  # created concurrently: take theirs
        conversation = Conversation.objects.select_for_update().get(session_id=session_id)
        return conversation, False
    return conversation, True


@transaction.atomic
def ingest_session_started(
    *, agent_id: str, session_id: str, contact_phone: str, contact_name: str = ""
) -> Conversation:
    conversation, created = _conversation_for(
        session_id=session_id,
        agent_id=agent_id,
        contact_phone=contact_phone,
        contact_name=contact_name,
    )
    if not created:
        changed = []
        if contact_phone and conversation.contact_phone != contact_phone:
            conversation.contact_phone = contact_phone
            changed.append("contact_phone")
        if contact_name and conversation.contact_name != contact_name:
            conversation.contact_name = contact_name
            changed.append("contact_name")
        if not changed:
            return conversation
        conversation.save(update_fields=[*changed, "updated_at"])
    live.after_commit(live.conversation_changed, conversation)
    return conversation


@transaction.atomic
def ingest_customer_message(
    *,
    agent_id: str,
    session_id: str,
    contact_phone: str,
    contact_name: str = "",
    message_id: str | None,
    type: str = "text",
    text: str = "",
    paused: bool | None = None,
) -> Message | None:
    """A message from the customer. Returns None when it was already stored."""
    if message_id and Message.objects.filter(message_id=message_id).exists():
        return None
    conversation, _ = _conversation_for(
        session_id=session_id,
        agent_id=agent_id,
        contact_phone=contact_phone,
        contact_name=contact_name,
    )
    if contact_name and not conversation.contact_name:
        conversation.contact_name = contact_name
    # One worker stores events in order, so the check above is not racing anyone.
    message = Message.objects.create(
        conversation=conversation,
        message_id=message_id or None,
        direction=Message.Direction.INBOUND,
        author=Message.Author.CUSTOMER,
        type=type if type in MESSAGE_TYPES else Message.Type.TEXT,
        text=text,
        paused=paused,
    )
    if conversation.held_by_id is None and (paused or ASKS_FOR_A_PERSON.search(text or "")):
        # Nobody answers a paused conversation that no human holds.
        conversation.needs_human = True
    _touch(conversation, message)
    if conversation.needs_human:
        Conversation.objects.filter(pk=conversation.pk).update(needs_human=True)
    live.after_commit(live.message_added, message)
    return message


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
        conversation, _ = _conversation_for(
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
    _touch(conversation, message)
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
    conversation, _ = _conversation_for(
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
        _end(conversation, reason=reason or "ended", ended_at=ended_at)
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
