"""Reads of the operators' own tools: the canned-reply picker and the contact panel.

A fixed number of queries each, whatever the contact's history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Q

from conversations import canned
from conversations.models import AuditEntry, Call, CannedReply, ContactPause, Conversation, Note
from conversations.operator_tools import canned_reply_visible
from conversations.permissions import display_name

PICKER_SHOWN = 8


@dataclass(frozen=True)
class PickerItem:
    reply: CannedReply
    filled: str  # plain text: escaped where it is shown, inserted as text


def fill_values(conversation: Conversation, operator: AbstractBaseUser) -> canned.FillValues:
    return canned.FillValues(
        customer_name=conversation.contact_name or "",
        customer_phone=conversation.contact_phone or "",
        operator_first_name=(getattr(operator, "first_name", "") or "").strip() or display_name(operator),
        operator_name=display_name(operator),
    )


def canned_reply_picker(
    *, operator: AbstractBaseUser, conversation: Conversation, query: str, limit: int = PICKER_SHOWN
) -> list[PickerItem]:
    """What "/" + `query` offers: shortcuts starting with it first, then titles holding it;
    the most used first. One query."""
    query = (query or "").strip().lstrip("/").lower()[:40]
    qs = CannedReply.objects.filter(canned_reply_visible(operator))
    if query:
        qs = qs.filter(Q(shortcut__startswith=query) | Q(title__icontains=query))
    rows = sorted(
        qs.order_by("-usage_count", "shortcut")[: limit * 2],
        key=lambda r: (not r.shortcut.startswith(query), -r.usage_count, r.shortcut),
    )[:limit]
    values = fill_values(conversation, operator)
    return [PickerItem(reply=r, filled=canned.fill(r.text, values)) for r in rows]


def canned_replies_for(operator: AbstractBaseUser) -> tuple[list[CannedReply], list[CannedReply]]:
    """The management page: (shared replies, this operator's own). One query."""
    rows = list(CannedReply.objects.filter(canned_reply_visible(operator)).select_related("created_by"))
    return [r for r in rows if r.owner_id is None], [r for r in rows if r.owner_id is not None]


def canned_reply_find(pk: int) -> CannedReply | None:
    return CannedReply.objects.filter(pk=pk).first()


# ---------------------------------------------------------------- the contact panel

PANEL_SHOWN = 20


@dataclass
class EarlierSession:
    conversation: Conversation
    handlers: list[str] = field(default_factory=list)  # who took it over, in order

    @property
    def outcome(self) -> str:
        c = self.conversation
        if self.handlers:
            return "Taken over by " + ", ".join(self.handlers)
        if c.needs_human_reason:
            return "Asked for a person; the AI carried on"
        return "Handled by the AI alone"


@dataclass(frozen=True)
class ContactPanel:
    phone: str
    sessions: list[EarlierSession]
    more_sessions: bool
    pause: ContactPause | None
    notes: list[Note]
    more_notes: bool
    calls: list[Call]
    more_calls: bool
    since: datetime | None  # the contact's first session shown


def _phone_forms(phone: str) -> list[str]:
    """WhatsApp gives digits ("34600…"), calls E.164 ("+34600…"): the same person."""
    digits = "".join(ch for ch in phone if ch.isdigit())
    return list(dict.fromkeys(form for form in (phone, digits, "+" + digits) if form and form != "+"))


def contact_panel(conversation: Conversation) -> ContactPanel:
    """The contact beside their conversation (same phone, same agent): their other
    sessions and who handled them, their pause, the notes about them, their calls.
    Five queries."""
    agent_id, phone = conversation.agent_id, conversation.contact_phone
    sessions = list(
        Conversation.objects.select_related("held_by")
        .filter(agent_id=agent_id, contact_phone=phone)
        .exclude(pk=conversation.pk)
        .order_by("-started_at", "-id")[: PANEL_SHOWN + 1]
    )
    more_sessions = len(sessions) > PANEL_SHOWN
    earlier = [EarlierSession(conversation=c) for c in sessions[:PANEL_SHOWN]]
    by_id = {s.conversation.pk: s for s in earlier}
    takeovers = (
        AuditEntry.objects.filter(
            conversation_id__in=list(by_id),
            action=AuditEntry.Action.TAKE_OVER,
            outcome=AuditEntry.Outcome.CONFIRMED,
        )
        .select_related("operator")
        .order_by("id")
    )
    for entry in takeovers if by_id else []:
        name = display_name(entry.operator)
        handlers = by_id[entry.conversation_id].handlers
        if name not in handlers:
            handlers.append(name)
    notes = list(
        Note.objects.select_related("author", "conversation")
        .filter(conversation__agent_id=agent_id, conversation__contact_phone=phone)
        .order_by("-id")[: PANEL_SHOWN + 1]
    )
    calls = list(
        Call.objects.filter(agent_id=agent_id, from_number__in=_phone_forms(phone)).order_by(
            "-started_at", "-id"
        )[: PANEL_SHOWN + 1]
    )
    return ContactPanel(
        phone=phone,
        sessions=earlier,
        more_sessions=more_sessions,
        pause=ContactPause.objects.select_related("paused_by")
        .filter(agent_id=agent_id, contact_phone=phone)
        .first(),
        notes=notes[:PANEL_SHOWN],
        more_notes=len(notes) > PANEL_SHOWN,
        calls=calls[:PANEL_SHOWN],
        more_calls=len(calls) > PANEL_SHOWN,
        since=earlier[-1].conversation.started_at if earlier else None,
    )
