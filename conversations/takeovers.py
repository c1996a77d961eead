"""The takeover episodes the reports read (one `Takeover` row per time a person was
needed or stepped in).

Small writes that the services call inside their own transactions, beside the
event they record, so each time is the event's own: the wait's start, the click,
Pinecall's confirmation of the pause, the first human message, the hand back.
"""

from __future__ import annotations

from datetime import datetime

from conversations.models import AuditEntry, Command, Conversation, Takeover

End = Takeover.End

# The audit action of the resume that ended a hold says how it was handed back.
_END_OF_RESUME = {
    AuditEntry.Action.HAND_BACK: Takeover.End.MANUAL,
    AuditEntry.Action.AUTO_HAND_BACK: Takeover.End.AUTO,
}


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, (end - start).total_seconds())


def _open(conversation: Conversation) -> Takeover | None:
    return (
        Takeover.objects.filter(conversation=conversation, ended_at__isnull=True).order_by("-id").first()
    )


def _theirs(conversation: Conversation, operator_id: int) -> Takeover | None:
    """The open episode, if `operator_id` is the one who took it."""
    takeover = _open(conversation)
    return takeover if takeover is not None and takeover.taken_by_id == operator_id else None


def _close(takeover: Takeover, *, end: str, at: datetime) -> None:
    takeover.ended_at = at
    takeover.end = end
    if end in Takeover.HANDED_BACK:
        takeover.handling_seconds = _seconds(takeover.taken_at, at)
    takeover.save(update_fields=["ended_at", "end", "handling_seconds"])


def waits(conversation: Conversation, *, reason: str, at: datetime) -> Takeover:
    """The customer waits for a person from `at`."""
    return Takeover.objects.create(
        conversation=conversation,
        agent_id=conversation.agent_id,
        conversation_started_at=conversation.started_at,
        started_at=at,
        needs_human_at=at,
        needs_human_reason=reason,
    )


def claimed(conversation: Conversation, *, operator, at: datetime) -> Takeover:
    """`operator` clicked Take over: the waiting episode becomes theirs, or one starts.

    Taken from another operator, theirs ends (reassigned) and a new one starts.
    """
    takeover = _open(conversation)
    if takeover is not None and takeover.taken_by_id not in (None, operator.pk):
        _close(takeover, end=Takeover.End.REASSIGNED, at=at)
        takeover = None
    if takeover is None:
        return Takeover.objects.create(
            conversation=conversation, agent_id=conversation.agent_id,
            conversation_started_at=conversation.started_at, started_at=at, taken_by=operator, claimed_at=at,
        )
    if takeover.taken_by_id is None:
        takeover.taken_by = operator
        takeover.claimed_at = at
        takeover.save(update_fields=["taken_by", "claimed_at"])
    return takeover


def taken(conversation: Conversation, *, operator_id: int, at: datetime) -> None:
    """Pinecall confirmed the pause that `operator_id` asked for: they hold it now."""
    takeover = _theirs(conversation, operator_id)
    if takeover is None or takeover.taken_at is not None:
        return
    takeover.taken_at = at
    takeover.wait_seconds = _seconds(takeover.needs_human_at, at)
    # A reply written before Pinecall confirmed counts as immediate.
    takeover.reply_seconds = _seconds(at, takeover.first_reply_at) if takeover.first_reply_at else None
    takeover.save(update_fields=["taken_at", "wait_seconds", "reply_seconds"])


def replied(conversation: Conversation, *, operator_id: int, at: datetime) -> None:
    """The holder's message: the first one of the episode is the first human response."""
    takeover = _theirs(conversation, operator_id)
    if takeover is None or takeover.first_reply_at is not None:
        return
    takeover.first_reply_at = at
    takeover.reply_seconds = _seconds(takeover.taken_at, at)
    takeover.save(update_fields=["first_reply_at", "reply_seconds"])


def ended(conversation: Conversation, *, end: str, at: datetime) -> None:
    """The episode ends without a hand back: a fallback, a failed pause, the conversation's end."""
    takeover = _open(conversation)
    if takeover is not None:
        _close(takeover, end=end, at=at)


def released(conversation: Conversation, *, at: datetime) -> None:
    """The AI answers a held conversation again: handed back by hand, automatically, or
    resumed outside the dashboard (no resume of ours since the take over)."""
    takeover = _open(conversation)
    if takeover is None:
        return
    since = takeover.claimed_at or takeover.started_at
    action = (
        Command.objects.filter(
            conversation=conversation, kind=Command.Kind.RESUME, scope=Command.Scope.SESSION,
            created_at__gte=since,
        )
        .order_by("-id")
        .values_list("audit__action", flat=True)
        .first()
    )
    _close(takeover, end=_END_OF_RESUME.get(action, Takeover.End.RESUMED), at=at)
