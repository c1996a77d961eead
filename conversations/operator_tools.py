"""Writes of the operators' own tools: canned replies and internal notes.

The same shape as `conversations.services`: keyword-only, one transaction each,
refusals audited, notifications after the commit. Nothing here reaches Pinecall:
a note is never a Command and never a WhatsApp message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db.models import F, Q
from django.utils import timezone

from conversations import notify
from conversations.models import AuditEntry, CannedReply, Conversation, Message, Note
from conversations.permissions import PAUSE_WIDE_PERMISSION, TAKE_OVER_PERMISSION, display_name
from conversations.services import ActionRefused, _audits_refusals, _require

NOTE_MAX_LENGTH = 4000
# "@ana", "@ana.silva", "@bruno_c": a mention ends at a space or punctuation.
_MENTION = re.compile(r"(?<![\w@])@([\w][\w.-]*[\w]|[\w])", re.UNICODE)


# ---------------------------------------------------------------- canned replies


def _audit(*, operator, action: str, detail: str, conversation: Conversation | None = None) -> None:
    AuditEntry.objects.create(
        operator=operator,
        action=action,
        agent_id=conversation.agent_id if conversation else "",
        conversation=conversation,
        contact_phone=conversation.contact_phone if conversation else "",
        outcome=AuditEntry.Outcome.CONFIRMED,
        detail=detail[:500],
        completed_at=timezone.now(),
    )


def _may_manage(operator: AbstractBaseUser, reply: CannedReply) -> None:
    """Shared replies are the supervisors'; a personal one is its owner's only."""
    if reply.owner_id is None:
        _require(operator, PAUSE_WIDE_PERMISSION)
    elif reply.owner_id != operator.pk:
        raise ActionRefused("This canned reply is someone else's.")


@_audits_refusals(AuditEntry.Action.CANNED_REPLY)
def canned_reply_save(
    *,
    operator: AbstractBaseUser,
    title: str,
    shortcut: str,
    text: str,
    shared: bool,
    reply: CannedReply | None = None,
) -> CannedReply:
    """Create (no `reply`) or change a canned reply; unknown variables are refused."""
    _require(operator, TAKE_OVER_PERMISSION)
    if reply is not None:
        reply = CannedReply.objects.select_for_update().get(pk=reply.pk)
        _may_manage(operator, reply)
    else:
        reply = CannedReply(created_by=operator)
    reply.owner = None if shared else operator
    _may_manage(operator, reply)  # sharing one is a supervisor's call too
    reply.title = (title or "").strip()
    reply.shortcut = shortcut or ""
    reply.text = (text or "").strip()
    reply.full_clean(validate_unique=False)
    taken = CannedReply.objects.filter(shortcut=reply.shortcut, owner=reply.owner).exclude(pk=reply.pk)
    if taken.exists():
        whose = "shared reply" if reply.owner is None else "reply of yours"
        raise ValidationError(f"Another {whose} already uses /{reply.shortcut}.")
    created = reply.pk is None
    reply.save()
    _audit(
        operator=operator,
        action=AuditEntry.Action.CANNED_REPLY,
        detail=f"{'Created' if created else 'Changed'} {'shared' if shared else 'personal'} /{reply.shortcut}",
    )
    return reply


@_audits_refusals(AuditEntry.Action.CANNED_REPLY)
def canned_reply_delete(*, operator: AbstractBaseUser, reply: CannedReply) -> None:
    _require(operator, TAKE_OVER_PERMISSION)
    _may_manage(operator, reply)
    shortcut = reply.shortcut
    CannedReply.objects.filter(pk=reply.pk).delete()
    _audit(operator=operator, action=AuditEntry.Action.CANNED_REPLY, detail=f"Deleted /{shortcut}")


def canned_reply_visible(operator: AbstractBaseUser) -> Q:
    """The replies one operator may use: the shared ones and their own."""
    return Q(owner__isnull=True) | Q(owner_id=operator.pk)


def canned_reply_used(*, operator: AbstractBaseUser, reply_id: int) -> bool:
    """Counted when the picker inserts it in a composer (whether or not it is sent:
    what the operator reached for, measured where the choice is made)."""
    if not operator.has_perm(TAKE_OVER_PERMISSION):
        return False
    return bool(
        CannedReply.objects.filter(canned_reply_visible(operator), pk=reply_id).update(
            usage_count=F("usage_count") + 1, last_used_at=timezone.now()
        )
    )


# ---------------------------------------------------------------- internal notes


@dataclass(frozen=True)
class Mentions:
    people: list  # the users notified
    unresolved: list[str]  # "@names" that matched nobody, or more than one person


def mentions_resolve(text: str) -> Mentions:
    """`@username` or `@first name` of active staff (anyone who may use the dashboard's
    actions); a first name two people share is not guessed (their username is asked for)."""
    names = list(dict.fromkeys(match.group(1) for match in _MENTION.finditer(text or "")))
    if not names:
        return Mentions(people=[], unresolved=[])
    match = Q()
    for name in names:
        match |= Q(username__iexact=name) | Q(first_name__iexact=name)
    candidates = [
        user
        for user in get_user_model().objects.filter(match, is_active=True)
        if user.is_staff or user.has_perm(TAKE_OVER_PERMISSION)
    ]
    people, unresolved = [], []
    for name in names:
        key = name.lower()
        by_username = [u for u in candidates if u.get_username().lower() == key]
        matched = by_username or [u for u in candidates if (u.first_name or "").lower() == key]
        if len(matched) == 1:
            if matched[0] not in people:
                people.append(matched[0])
        else:
            unresolved.append("@" + name)
    return Mentions(people=people, unresolved=unresolved)


@_audits_refusals(AuditEntry.Action.NOTE)
def note_create(*, conversation: Conversation, operator: AbstractBaseUser, text: str) -> tuple[Note, Mentions]:
    """An internal note in the timeline, for colleagues only; mentioned people are told.

    Stored as a Note and its place in the timeline (a Message of direction NOTE):
    no Command, nothing for Pinecall, nothing the AI reads, no inbox movement.
    """
    _require(operator, TAKE_OVER_PERMISSION)
    text = (text or "").strip()
    if not text:
        raise ValidationError("Write the note before adding it.")
    if len(text) > NOTE_MAX_LENGTH:
        raise ValidationError(f"A note holds at most {NOTE_MAX_LENGTH} characters (this has {len(text)}).")
    mentions = mentions_resolve(text)
    now = timezone.now()
    entry = Message.objects.create(
        conversation=conversation,
        direction=Message.Direction.NOTE,
        author=Message.Author.HUMAN,
        operator=operator,
        text=text,
        created_at=now,
    )
    note = Note.objects.create(
        conversation=conversation, author=operator, text=text, timeline_entry=entry, created_at=now
    )
    note.mentions.set(mentions.people)
    named = ", ".join("@" + user.get_username() for user in mentions.people)
    _audit(
        operator=operator,
        action=AuditEntry.Action.NOTE,
        conversation=conversation,
        detail=f"Note #{note.pk}" + (f", mentioning {named}" if named else ""),
    )
    notify.after_commit(notify.message_added, entry)
    excerpt = text if len(text) <= 140 else text[:139] + "…"
    for person in mentions.people:
        if person.pk != operator.pk:
            notify.after_commit(
                notify.user_notice, person.pk, "mentioned",
                conversation=conversation, by=display_name(operator), excerpt=excerpt,
            )
    return note, mentions
