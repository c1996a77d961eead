"""Every write to the domain: operators' actions and the outcome of Pinecall commands.

Views, admin actions, the worker and tests call these and nothing else writes
models. Each function is one transaction; whatever operators must hear about is
broadcast, and the worker is woken, only after the commit (so nobody is told
about a row that was rolled back).

The ingest of Pinecall's events lives beside this, in `conversations.ingest`.
"""

from __future__ import annotations

import re
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import wraps

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from conversations import bulk, handoff, notify, selectors, takeovers
from conversations.permissions import PAUSE_WIDE_PERMISSION, TAKE_OVER_PERMISSION, display_name
from conversations.models import (
    AlertPreferences,
    AgentState,
    AuditEntry,
    Call,
    CallUtterance,
    Command,
    ContactPause,
    Conversation,
    HandoffPolicy,
    Message,
    OperatorProfile,
)

WHATSAPP_WINDOW = timezone.timedelta(hours=24)
# The same Send by the same operator within this is a repeat (a double click, a
# retried request), answered with the first one's message.
REPEAT_WINDOW = timezone.timedelta(seconds=1)


class ActionRefused(Exception):
    """An operator's action that cannot be carried out; `str()` says why, for people."""


@dataclass(frozen=True)
class HeldByAnother(ActionRefused):
    holder_name: str

    # Pages isolate the name (bidi) when they show it: they format this themselves.
    MESSAGE = "{holder} holds this conversation. Take it over to reply."

    def __str__(self) -> str:
        return self.MESSAGE.format(holder=self.holder_name)


# What services raise to refuse an action; each is audited (outcome "refused").
REFUSALS = (PermissionDenied, ValidationError, ActionRefused)


# ---------------------------------------------------------------- helpers


def _require(operator: AbstractBaseUser, permission: str) -> None:
    if not operator.has_perm(permission):
        raise PermissionDenied("You are not allowed to do this.")


def refusal_reason(exc: Exception) -> str:
    """The human sentence for a refusal."""
    if isinstance(exc, ValidationError):
        return " ".join(exc.messages)
    return str(exc) or "You are not allowed to do this."


def _refuse(
    *,
    action: str,
    reason: str,
    operator=None,
    conversation: Conversation | int | None = None,
    call: Call | None = None,
    contact_phone: str = "",
    agent_id: str = "",
    **_,
) -> AuditEntry:
    """Audit a refused action: who, what, why."""
    if isinstance(conversation, int):  # the action was given its pk (it reads it itself)
        conversation = Conversation.objects.filter(pk=conversation).first()
    party = conversation or call
    if call is not None:
        reason = f"{reason} (call {call.call_id})"
        contact_phone = contact_phone or call.from_number[:32]
    with transaction.atomic():
        return AuditEntry.objects.create(
            operator=operator if getattr(operator, "pk", None) else None,
            action=action,
            agent_id=agent_id or (party.agent_id if party else settings.PINECALL_AGENT_ID),
            conversation=conversation,
            contact_phone=contact_phone or (conversation.contact_phone if conversation else ""),
            outcome=AuditEntry.Outcome.REFUSED,
            detail=reason[:500],
            completed_at=timezone.now(),
        )


def _audits_refusals(action: str | Callable[..., str]):
    """Make an operator's service one transaction whose refusals are audited.

    `action` is the audited action, or a function of the service's keyword
    arguments that names it (one service for a switch and its reverse).

    The audit row is written after the service's transaction has rolled back:
    inside it, the raise that refuses would roll the row back too. (Views run
    outside any transaction, ATOMIC_REQUESTS being off, so the row commits at
    once; a caller's own transaction keeps it unless that one rolls back.)
    """

    def decorate(service):
        atomic_service = transaction.atomic(service)

        @wraps(service)
        def wrapper(**kwargs):
            try:
                return atomic_service(**kwargs)
            except REFUSALS as exc:
                audited = action(**kwargs) if callable(action) else action
                _refuse(action=audited, reason=refusal_reason(exc), **kwargs)
                raise

        return wrapper

    return decorate


def _locked(conversation: Conversation | int) -> Conversation:
    """The conversation's row (or the one with this pk), locked for the rest of the transaction."""
    pk = conversation if isinstance(conversation, int) else conversation.pk
    return Conversation.objects.select_for_update().get(pk=pk)


def _enqueue(*, audit_action: str, operator, conversation=None, **command_fields) -> Command:
    """Store an intent for Pinecall (outbox + audit) and wake the worker on commit."""
    command = Command.objects.create(operator=operator, conversation=conversation, **command_fields)
    AuditEntry.objects.create(
        operator=operator,
        action=audit_action,
        agent_id=command.agent_id,
        conversation=conversation,
        contact_phone=command.contact_phone,
        command=command,
    )
    notify.after_commit(notify.wake_worker)
    return command


def _queue_send(
    conversation: Conversation, *, author: str, operator, text: str, audit_action: str, now=None
) -> Message:
    """A WhatsApp message of ours: stored at once (pending) and queued for Pinecall."""
    now = now or timezone.now()
    message = Message.objects.create(
        conversation=conversation,
        direction=Message.Direction.OUTBOUND,
        author=author,
        operator=operator,
        text=text,
        status=Message.Status.PENDING,
        created_at=now,
        status_changed_at=now,
    )
    _enqueue(
        audit_action=audit_action,
        operator=operator,
        conversation=conversation,
        message=message,
        kind=Command.Kind.SEND,
        scope=Command.Scope.SESSION,
        agent_id=conversation.agent_id,
        session_id=conversation.session_id,
        contact_phone=conversation.contact_phone,
        text=text,
    )
    return message


def _note(conversation: Conversation, text: str) -> Message:
    """A divider in the timeline ("Ana took over"); not a WhatsApp message."""
    note = Message.objects.create(
        conversation=conversation,
        direction=Message.Direction.NOTE,
        author=Message.Author.SYSTEM,
        text=text,
    )
    notify.after_commit(notify.message_added, note)
    return note


def agent_state_get(agent_id: str | None = None) -> AgentState:
    state, _ = AgentState.objects.get_or_create(agent_id=agent_id or settings.PINECALL_AGENT_ID)
    return state


def conversation_window_open(conversation: Conversation, *, now=None) -> bool:
    """WhatsApp allows free text only within 24 h of the customer's last message."""
    last = conversation.last_customer_message_at
    return last is not None and (now or timezone.now()) - last < WHATSAPP_WINDOW


# ---------------------------------------------------------------- one conversation


@_audits_refusals(AuditEntry.Action.TAKE_OVER)
def conversation_take_over(
    *, conversation: Conversation | int, operator: AbstractBaseUser, force: bool = False
) -> Command:
    """Claim the conversation for `operator` and ask Pinecall to pause its AI.

    The first operator to take over holds it; another must pass `force=True`
    (the dashboard asks them to confirm) to take it from them. A repeat while
    the first pause awaits Pinecall returns that pause.
    """
    _require(operator, TAKE_OVER_PERMISSION)
    conversation = _locked(conversation)
    if not conversation.is_active:
        raise ActionRefused("This conversation has ended; there is nothing to take over.")
    holder = conversation.held_by
    if holder is not None and holder.pk != operator.pk and not force:
        raise HeldByAnother(display_name(holder))
    if holder is not None and holder.pk == operator.pk:
        open_pause = conversation.commands.filter(
            kind=Command.Kind.PAUSE, status__in=[Command.Status.PENDING, Command.Status.SENT]
        ).last()
        if open_pause is not None:
            return open_pause  # a repeated click: the pause is already asked for
        if conversation.ai_paused:
            raise ActionRefused("You already hold this conversation.")

    conversation.holder = Conversation.Holder.HUMAN
    conversation.held_by = operator
    conversation.held_since = timezone.now()
    conversation.unread_count = 0
    conversation.holder_active_at = timezone.now()
    conversation.idle_warned_at = None
    waited = _needs_human_end(conversation)  # someone took it: nobody waits any more
    takeovers.claimed(conversation, operator=operator, at=conversation.held_since)
    conversation.save(
        update_fields=[
            "holder", "held_by", "held_since", "unread_count", "holder_active_at",
            "idle_warned_at", *waited, "updated_at",
        ]
    )
    command = _enqueue(
        audit_action=AuditEntry.Action.TAKE_OVER,
        operator=operator,
        conversation=conversation,
        kind=Command.Kind.PAUSE,
        scope=Command.Scope.SESSION,
        agent_id=conversation.agent_id,
        session_id=conversation.session_id,
    )
    if holder is not None and holder.pk != operator.pk:
        _note(conversation, f"{display_name(operator)} took over from {display_name(holder)}")
        notify.after_commit(
            notify.user_notice, holder.pk, "taken_from_you",
            conversation=conversation, by=display_name(operator),
        )
        # Taken from someone: they must see it now, not after the grace.
        notify.after_commit(notify.conversation_changed, conversation)
    else:
        notify.after_commit(notify.conversation_awaiting, conversation, command)
    return command


@_audits_refusals(AuditEntry.Action.SEND)
def conversation_send(
    *, conversation: Conversation | int, operator: AbstractBaseUser, text: str
) -> Message:
    """Store the operator's reply at once (pending) and queue it for Pinecall.

    The same text sent again by the same operator within REPEAT_WINDOW is a
    repeat: the first one's message is returned and nothing new is queued.
    """
    _require(operator, TAKE_OVER_PERMISSION)
    text = (text or "").strip()
    if not text:
        raise ValidationError("Write something before sending.")
    if len(text) > settings.MESSAGE_MAX_LENGTH:
        raise ValidationError(
            f"WhatsApp takes at most {settings.MESSAGE_MAX_LENGTH} characters "
            f"(this has {len(text)})."
        )
    conversation = _locked(conversation)
    # After the lock: a repeat racing the first waits for it, then sees its row.
    repeat = (
        Command.objects.filter(
            conversation=conversation,
            operator=operator,
            kind=Command.Kind.SEND,
            text=text,
            message__isnull=False,
            created_at__gte=timezone.now() - REPEAT_WINDOW,
        )
        .select_related("message")
        .order_by("-id")
        .first()
    )
    if repeat is not None:
        return repeat.message
    if not conversation.is_active:
        raise ActionRefused(
            "This conversation has ended: a new one starts when the customer writes."
        )
    if conversation.held_by_id != operator.pk:
        if conversation.held_by is None:
            raise ActionRefused("Take over this conversation before replying.")
        raise HeldByAnother(display_name(conversation.held_by))
    if not conversation_window_open(conversation):
        raise ActionRefused(
            "The 24-hour WhatsApp window has closed: the customer must write first."
        )

    now = timezone.now()
    message = _queue_send(
        conversation, author=Message.Author.HUMAN, operator=operator, text=text,
        audit_action=AuditEntry.Action.SEND, now=now,
    )
    conversation_touch(conversation, message)
    takeovers.replied(conversation, operator_id=operator.pk, at=now)
    # The holder is on it: the idle clock starts again.
    Conversation.objects.filter(pk=conversation.pk).update(holder_active_at=now, idle_warned_at=None)
    notify.after_commit(notify.message_added, message)
    return message


@_audits_refusals(AuditEntry.Action.HAND_BACK)
def conversation_hand_back(
    *, conversation: Conversation | int, operator: AbstractBaseUser, force: bool = False
) -> Command | None:
    """Ask Pinecall to resume the AI; the holder stays until Pinecall confirms.

    An ended conversation has nothing to resume: the hold is released at once.
    While a resume awaits Pinecall (asked by anyone), it is returned: no second one.
    """
    _require(operator, TAKE_OVER_PERMISSION)
    conversation = _locked(conversation)
    open_resume = conversation.commands.filter(
        kind=Command.Kind.RESUME,
        scope=Command.Scope.SESSION,
        status__in=[Command.Status.PENDING, Command.Status.SENT],
    ).last()
    if open_resume is not None:
        return open_resume
    if conversation.held_by_id is None:
        raise ActionRefused("The AI already handles this conversation.")
    if conversation.held_by_id != operator.pk and not force:
        raise HeldByAnother(display_name(conversation.held_by))
    if not conversation.is_active:
        AuditEntry.objects.create(
            operator=operator,
            action=AuditEntry.Action.HAND_BACK,
            agent_id=conversation.agent_id,
            conversation=conversation,
            outcome=AuditEntry.Outcome.CONFIRMED,
            detail="Released locally: the conversation had ended.",
            completed_at=timezone.now(),
        )
        _release(conversation)
        notify.after_commit(notify.conversation_changed, conversation)
        return None
    command = _enqueue(
        audit_action=AuditEntry.Action.HAND_BACK,
        operator=operator,
        conversation=conversation,
        kind=Command.Kind.RESUME,
        scope=Command.Scope.SESSION,
        agent_id=conversation.agent_id,
        session_id=conversation.session_id,
    )
    notify.after_commit(notify.conversation_awaiting, conversation, command)
    return command


@transaction.atomic
def conversation_mark_read(*, conversation: Conversation, operator: AbstractBaseUser) -> None:
    """The holder has seen the conversation: its unread count drops to zero."""
    updated = Conversation.objects.filter(
        pk=conversation.pk, held_by=operator, unread_count__gt=0
    ).update(unread_count=0, updated_at=timezone.now())  # catch-up reads updated_at
    if updated:
        conversation.unread_count = 0
        notify.after_commit(notify.conversation_changed, conversation)


# ---------------------------------------------------------------- contact and agent


@_audits_refusals(AuditEntry.Action.PAUSE_CONTACT)
def contact_pause(*, contact_phone: str, operator: AbstractBaseUser, agent_id: str = "") -> Command:
    """Pause the AI for every session, current and future, of one contact."""
    _require(operator, PAUSE_WIDE_PERMISSION)
    agent_id = agent_id or settings.PINECALL_AGENT_ID
    return _enqueue(
        audit_action=AuditEntry.Action.PAUSE_CONTACT,
        operator=operator,
        kind=Command.Kind.PAUSE,
        scope=Command.Scope.CONTACT,
        agent_id=agent_id,
        contact_phone=contact_phone,
    )


@_audits_refusals(AuditEntry.Action.RESUME_CONTACT)
def contact_resume(
    *, contact_phone: str, operator: AbstractBaseUser, agent_id: str = ""
) -> Command:
    _require(operator, PAUSE_WIDE_PERMISSION)
    agent_id = agent_id or settings.PINECALL_AGENT_ID
    return _enqueue(
        audit_action=AuditEntry.Action.RESUME_CONTACT,
        operator=operator,
        kind=Command.Kind.RESUME,
        scope=Command.Scope.CONTACT,
        agent_id=agent_id,
        contact_phone=contact_phone,
    )


@_audits_refusals(AuditEntry.Action.PAUSE_AGENT)
def agent_pause(*, operator: AbstractBaseUser, agent_id: str = "") -> Command:
    """The kill switch: the AI stops answering everyone."""
    _require(operator, PAUSE_WIDE_PERMISSION)
    return _enqueue(
        audit_action=AuditEntry.Action.PAUSE_AGENT,
        operator=operator,
        kind=Command.Kind.PAUSE,
        scope=Command.Scope.AGENT,
        agent_id=agent_id or settings.PINECALL_AGENT_ID,
    )


@_audits_refusals(AuditEntry.Action.RESUME_AGENT)
def agent_resume(*, operator: AbstractBaseUser, agent_id: str = "") -> Command:
    """Switch the AI back on.

    Pinecall's resume-all clears every pause level; the worker re-pauses the
    conversations humans hold and the paused contacts right after it confirms.
    """
    _require(operator, PAUSE_WIDE_PERMISSION)
    return _enqueue(
        audit_action=AuditEntry.Action.RESUME_AGENT,
        operator=operator,
        kind=Command.Kind.RESUME,
        scope=Command.Scope.AGENT,
        agent_id=agent_id or settings.PINECALL_AGENT_ID,
    )


# ---------------------------------------------------------------- logins


@transaction.atomic
def login_refused(*, username: str, ip_address: str, path: str = "") -> AuditEntry:
    """A login refused by throttling (too many failures for this username from this IP)."""
    username = username[:150]
    User = get_user_model()
    user = User.objects.filter(**{User.USERNAME_FIELD: username}).first() if username else None
    where = f" at {path[:100]}" if path else ""
    return AuditEntry.objects.create(
        operator=user,
        action=AuditEntry.Action.LOGIN,
        agent_id="",
        outcome=AuditEntry.Outcome.REFUSED,
        detail=f"Too many failed logins: username {username!r} from {ip_address}{where}"[:500],
        completed_at=timezone.now(),
    )


@transaction.atomic
def export_logged(*, operator: AbstractBaseUser, what: str, conversation: Conversation | None = None) -> AuditEntry:
    """Someone downloaded a CSV: the audit trail says who took which data, and when."""
    return AuditEntry.objects.create(
        operator=operator,
        action=AuditEntry.Action.EXPORT,
        agent_id=conversation.agent_id if conversation else settings.PINECALL_AGENT_ID,
        conversation=conversation,
        outcome=AuditEntry.Outcome.CONFIRMED,
        detail=what[:500],
        completed_at=timezone.now(),
    )


# ---------------------------------------------------------------- the outbox, for the worker


@transaction.atomic
def command_mark_sent(*, command: Command) -> Command:
    """Recorded just before the frame goes out, so a crash cannot send it twice."""
    now = timezone.now()
    Command.objects.filter(pk=command.pk).update(
        status=Command.Status.SENT, sent_at=now, attempts=command.attempts + 1
    )
    command.status, command.sent_at, command.attempts = (
        Command.Status.SENT,
        now,
        command.attempts + 1,
    )
    return command


def commands_claim(limit: int) -> list[Command]:
    """The oldest pending commands, marked sent in one statement, in order.

    Marked before their frames go out, so a crash cannot send one twice; one
    statement, because every action's round trip waits for it.
    """
    table = Command._meta.db_table
    now = timezone.now()
    claimed = Command.objects.raw(
        f"UPDATE {table} SET status = %s, sent_at = %s, attempts = attempts + 1 "
        f"WHERE id IN (SELECT id FROM {table} WHERE status = %s ORDER BY id LIMIT %s) "
        "RETURNING *",
        [Command.Status.SENT, now, Command.Status.PENDING, limit],
    )
    return sorted(claimed, key=lambda command: command.pk)


def command_requeue(*, command: Command) -> None:
    """Back to pending: for pauses and resumes whose answer was lost (safe to repeat)."""
    Command.objects.filter(pk=command.pk, status=Command.Status.SENT).update(
        status=Command.Status.PENDING
    )


@transaction.atomic
def command_confirm(*, command: Command) -> Command:
    """Pinecall confirmed the command: apply its effect and tell operators."""
    confirmed = _command_confirmed(command.pk, timezone.now())
    if confirmed is None:  # confirmed already
        return Command.objects.get(pk=command.pk)
    _apply_confirmed(confirmed)
    return confirmed


def _command_confirmed(pk: int, now) -> Command | None:
    """The command marked confirmed, with its audit entry, and returned with its
    operator (named in the timeline's divider); None if it was confirmed already.

    Only the command's row is locked. Every action's round trip waits for this: on
    PostgreSQL it is one statement (the update's row lock is the one a
    `SELECT … FOR UPDATE` would take), elsewhere the ORM's three.
    """
    Status, Outcome = Command.Status, AuditEntry.Outcome
    if connection.vendor != "postgresql":
        command = Command.objects.select_for_update(of=("self",)).select_related("operator").get(pk=pk)
        if command.status == Status.CONFIRMED:
            return None
        command.status, command.completed_at = Status.CONFIRMED, now
        command.save(update_fields=["status", "completed_at"])
        AuditEntry.objects.filter(command=command).update(outcome=Outcome.CONFIRMED, completed_at=now)
        return command
    user_model = get_user_model()
    commands, audits, users = (
        Command._meta.db_table, AuditEntry._meta.db_table, user_model._meta.db_table
    )
    with connection.cursor() as cursor:
        cursor.execute(
            f"WITH c AS (UPDATE {commands} SET status = %s, completed_at = %s"
            f"  WHERE id = %s AND status <> %s RETURNING *),"
            f" a AS (UPDATE {audits} SET outcome = %s, completed_at = %s"
            f"  WHERE command_id IN (SELECT id FROM c))"
            f" SELECT {bulk.columns(Command, 'c')}, {bulk.columns(user_model, 'u')}"
            f" FROM c LEFT JOIN {users} u ON u.id = c.operator_id",
            [Status.CONFIRMED, now, pk, Status.CONFIRMED, Outcome.CONFIRMED, now],
        )
        row = cursor.fetchone()
    if row is None:
        return None
    command, _ = bulk.from_row_with(Command, "operator", row)
    return command


@transaction.atomic
def command_fail(*, command: Command, code: str, message: str) -> Command:
    """Pinecall refused the command, or never answered: record why and undo the claim."""
    command = Command.objects.select_for_update().get(pk=command.pk)
    if not command.is_open:
        return command
    now = timezone.now()
    command.status = Command.Status.FAILED
    command.error_code = code[:60]
    command.error_message = message[:500]
    command.completed_at = now
    command.save(update_fields=["status", "error_code", "error_message", "completed_at"])
    AuditEntry.objects.filter(command=command).update(
        outcome=AuditEntry.Outcome.FAILED, completed_at=now, detail=f"{code}: {message}"[:500]
    )
    conversation = command.conversation
    if command.kind == Command.Kind.SEND and command.message_id:
        Message.objects.filter(pk=command.message_id).update(
            status=Message.Status.FAILED, error=message[:300], status_changed_at=now
        )
        failed = Message.objects.get(pk=command.message_id)
        notify.after_commit(notify.message_changed, failed)
    elif command.kind == Command.Kind.PAUSE and conversation is not None:
        conversation = _locked(conversation)
        # The pause never happened: the AI still answers, so the claim is undone,
        # unless someone else has claimed it since.
        if conversation.held_by_id == command.operator_id and not conversation.ai_paused:
            _release(conversation)
            takeovers.ended(conversation, end=takeovers.End.FAILED, at=now)
        if code == "SESSION_NOT_FOUND" and conversation.is_active:
            conversation_end(conversation, reason="not_found")
    if conversation is not None:
        notify.after_commit(notify.conversation_changed, conversation)
    notify.after_commit(notify.command_changed, command)
    return command


def _apply_confirmed(command: Command) -> None:
    Kind, Scope = Command.Kind, Command.Scope
    if command.scope == Scope.SESSION and command.conversation_id and command.kind == Kind.SEND:
        if command.message_id:
            _message_sent(command.message_id)
    elif command.scope == Scope.SESSION and command.conversation_id:
        if command.kind == Kind.PAUSE:
            conversation = _paused_locked(command.conversation_id)
            if command.operator_id and conversation.held_by_id == command.operator_id:
                takeovers.taken(conversation, operator_id=command.operator_id, at=command.completed_at)
            took_from_someone = conversation.messages.filter(
                direction=Message.Direction.NOTE, author=Message.Author.SYSTEM,
                created_at__gte=command.created_at, text__contains="took over from",
            ).exists()  # a forced take over has its divider already
            if conversation.held_by_id == command.operator_id and command.operator_id and not took_from_someone:
                _note(conversation, f"{display_name(command.operator)} took over")
        else:
            conversation = _locked(command.conversation_id)
            if command.kind == Kind.RESUME:
                _set_session_paused(conversation, False)
        notify.after_commit(notify.conversation_changed, conversation)
    elif command.scope == Scope.CONTACT:
        contact_pause_set(
            agent_id=command.agent_id,
            contact_phone=command.contact_phone,
            paused=command.kind == Kind.PAUSE,
            operator=command.operator,
        )
    elif command.scope == Scope.AGENT:
        agent_paused_set(
            agent_id=command.agent_id, paused=command.kind == Kind.PAUSE, operator=command.operator
        )
    elif command.scope == Scope.CALL and command.kind == Kind.SAY and command.call_id and command.line_id:
        call_supervisor_line(call=command.call, message_id=command.line_id, text=command.text)
    notify.after_commit(notify.command_changed, command)


def _message_sent(message_id: int) -> None:
    """Pinecall took a human's reply: only its bubble changes (its tick), not who holds
    the conversation, so only the message's row is locked: as a receipt locks it, so
    a "delivered" that came first is never set back to "sent". Its author comes with
    it: the bubble names them, rendered before it is published."""
    message = Message.objects.select_for_update(of=("self",)).select_related("operator").get(pk=message_id)
    if message.can_move_to(Message.Status.SENT):
        message.status = Message.Status.SENT
        message.status_changed_at = timezone.now()
        message.save(update_fields=["status", "status_changed_at"])
        notify.after_commit(notify.message_changed, message)


# ---------------------------------------------------------------- voice calls: stepping in

CALL_LINE_MAX = 1000


def _call_live(call: Call) -> Call:
    call = Call.objects.select_for_update().get(pk=call.pk)
    if not call.is_live:
        raise ActionRefused("This call has ended.")
    return call


def _call_enqueue(*, call: Call, operator, kind: str, audit_action: str, text: str = "", line_id: str = "") -> Command:
    command = Command.objects.create(
        operator=operator,
        kind=kind,
        scope=Command.Scope.CALL,
        agent_id=call.agent_id,
        session_id=call.call_id,
        call=call,
        text=text,
        line_id=line_id,
    )
    AuditEntry.objects.create(
        operator=operator,
        action=audit_action,
        agent_id=call.agent_id,
        contact_phone=call.from_number[:32],
        command=command,
        detail=text[:500],
    )
    notify.after_commit(notify.wake_worker)
    notify.after_commit(notify.call_changed, call)
    return command


@_audits_refusals(AuditEntry.Action.CALL_SAY)
def call_say(*, call: Call, operator: AbstractBaseUser, text: str) -> Command:
    """Queue a typed line for the AI to say on the call (operators and supervisors).

    Its `message_id` is chosen here, so the line is the supervisor's whichever of
    its confirmation and its `message.confirmed` is stored first.
    """
    _require(operator, TAKE_OVER_PERMISSION)
    text = " ".join((text or "").split())
    if not text:
        raise ValidationError("Write something for the AI to say.")
    if len(text) > CALL_LINE_MAX:
        raise ValidationError(f"A line says at most {CALL_LINE_MAX} characters (this has {len(text)}).")
    call = _call_live(call)
    return _call_enqueue(
        call=call, operator=operator, kind=Command.Kind.SAY, audit_action=AuditEntry.Action.CALL_SAY,
        text=text, line_id="sup_" + secrets.token_hex(12),
    )


def _is_phone_ref(value: str) -> bool:
    return bool(re.fullmatch(r"\+[1-9][0-9]{6,14}", value) or re.fullmatch(r"sip:[^\s@]+@[^\s@]+", value))


@_audits_refusals(AuditEntry.Action.CALL_FORWARD)
def call_forward(*, call: Call, operator: AbstractBaseUser, to: str) -> Command:
    """Queue forwarding the call to a person's number (supervisors); it then leaves Pinecall."""
    _require(operator, PAUSE_WIDE_PERMISSION)
    to = phone_ref_clean(to)
    if not to:
        raise ValidationError("Write the number to forward the call to.")
    return _call_forward_queued(call=call, operator=operator, to=to)


@_audits_refusals(AuditEntry.Action.CALL_FORWARD)
def call_forward_to_me(*, call: Call, operator: AbstractBaseUser) -> Command:
    """Queue forwarding the call to the operator's own phone (their profile): operators may."""
    _require(operator, TAKE_OVER_PERMISSION)
    phone = selectors.operator_phone(operator)
    if not phone:
        raise ValidationError("Set your phone number first: it is where your calls are forwarded.")
    return _call_forward_queued(call=call, operator=operator, to=phone)


def _call_forward_queued(*, call: Call, operator, to: str) -> Command:
    """A forward to a checked number, once the call is known to be live."""
    return _call_enqueue(
        call=_call_live(call), operator=operator, kind=Command.Kind.FORWARD,
        audit_action=AuditEntry.Action.CALL_FORWARD, text=to,
    )


# A supervisor's commands on a live call that carry nothing but the call, and what each audits.
SUPERVISOR_CALL_COMMANDS = {
    Command.Kind.HANGUP: AuditEntry.Action.CALL_HANGUP,
    Command.Kind.STOP: AuditEntry.Action.CALL_STOP,  # `bot.cancel`: the AI's current speech
    Command.Kind.HOLD: AuditEntry.Action.CALL_HOLD,
    Command.Kind.UNHOLD: AuditEntry.Action.CALL_UNHOLD,
    Command.Kind.MUTE: AuditEntry.Action.CALL_MUTE,
    Command.Kind.UNMUTE: AuditEntry.Action.CALL_UNMUTE,
}


@_audits_refusals(lambda *, kind, **_: SUPERVISOR_CALL_COMMANDS[kind])
def call_supervise(*, call: Call, operator: AbstractBaseUser, kind: str) -> Command:
    """Queue hanging up, stopping the AI's speech, hold/unhold or mute/unmute (supervisors)."""
    audit_action = SUPERVISOR_CALL_COMMANDS[kind]
    _require(operator, PAUSE_WIDE_PERMISSION)
    call = _call_live(call)
    return _call_enqueue(call=call, operator=operator, kind=kind, audit_action=audit_action)


@transaction.atomic
def operator_phone_set(*, user: AbstractBaseUser, phone: str) -> OperatorProfile:
    """The phone a person's calls are forwarded to; empty clears it."""
    profile, _ = OperatorProfile.objects.update_or_create(user=user, defaults={"phone": phone_ref_clean(phone)})
    return profile


def phone_ref_clean(value: str) -> str:
    """A person's phone as typed ("+34 600 00 01 11"), as Pinecall takes it; "" stays ""."""
    phone = "".join((value or "").split())
    if phone and not _is_phone_ref(phone):
        raise ValidationError("A phone is an E.164 number (+ and 7 to 15 digits) or a sip: address.")
    return phone


def call_supervisor_line(*, call: Call, message_id: str, text: str) -> CallUtterance:
    """A line a supervisor had the bot say: stored as theirs, whichever came first,
    this or its `message.confirmed`. (Inside the caller's transaction.)"""
    line, created = CallUtterance.objects.select_for_update().get_or_create(
        call=call,
        message_id=message_id,
        defaults={"speaker": CallUtterance.Speaker.SUPERVISOR, "text": text},
    )
    if created:
        notify.after_commit(notify.call_line_added, line)
    elif line.speaker != CallUtterance.Speaker.SUPERVISOR:
        line.speaker = CallUtterance.Speaker.SUPERVISOR
        line.save(update_fields=["speaker"])
        notify.after_commit(notify.call_line_changed, line)
    return line


# ---------------------------------------------------------------- pause state, whoever changed it


@transaction.atomic
def session_paused_set(*, session_id: str, paused: bool) -> Conversation | None:
    """Pinecall says this session's AI is paused or resumed (by us or by anyone)."""
    conversation = Conversation.objects.select_for_update().filter(session_id=session_id).first()
    if conversation is None:
        return None
    if _set_session_paused(conversation, paused):
        notify.after_commit(notify.conversation_changed, conversation)
    return conversation


def _paused_locked(pk: int) -> Conversation:
    """The conversation, locked and with its AI paused (as `_set_session_paused(…, True)`
    on `_locked(pk)` would leave it), in one `UPDATE … RETURNING`: a confirmed pause
    is on every take over's round trip."""
    table = connection.ops.quote_name(Conversation._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET ai_paused = %s,"
            f" updated_at = CASE WHEN ai_paused THEN updated_at ELSE %s END"
            f" WHERE id = %s RETURNING {bulk.columns(Conversation, table)}",
            [True, timezone.now(), pk],
        )
        row = cursor.fetchone()
    if row is None:
        raise Conversation.DoesNotExist(f"conversation {pk}")
    return bulk.from_row(Conversation, row)


def _set_session_paused(conversation: Conversation, paused: bool) -> bool:
    """Apply a confirmed session-level pause state; True when something changed."""
    if not paused and conversation.held_by_id is not None:
        # A resume ends a human's hold: the AI answers again.
        _note(conversation, "Handed back to the AI")
        _release(conversation)
        takeovers.released(conversation, at=timezone.now())
        return True
    if conversation.ai_paused == paused:
        return False
    conversation.ai_paused = paused
    conversation.save(update_fields=["ai_paused", "updated_at"])
    return True


@transaction.atomic
def contact_pause_set(
    *, agent_id: str, contact_phone: str, paused: bool, operator=None
) -> None:
    if paused:
        ContactPause.objects.get_or_create(
            agent_id=agent_id, contact_phone=contact_phone, defaults={"paused_by": operator}
        )
    else:
        ContactPause.objects.filter(agent_id=agent_id, contact_phone=contact_phone).delete()
    conversation = (
        Conversation.objects.filter(agent_id=agent_id, contact_phone=contact_phone)
        .order_by("-started_at")
        .first()
    )
    if conversation is not None:
        notify.after_commit(notify.conversation_changed, conversation)


@transaction.atomic
def agent_paused_set(*, agent_id: str, paused: bool, operator=None) -> AgentState:
    """The kill switch's confirmed state. A resume-all also clears contact pauses."""
    state = AgentState.objects.select_for_update().get_or_create(agent_id=agent_id)[0]
    state.ai_paused = paused
    state.paused_by = operator if paused else None
    state.paused_at = timezone.now() if paused else None
    state.save(update_fields=["ai_paused", "paused_by", "paused_at"])
    notify.after_commit(notify.agent_state_changed, state)
    return state


@transaction.atomic
def agent_connection_set(*, agent_id: str, connected: bool) -> AgentState:
    """The worker's link to Pinecall, shown on every page."""
    state = AgentState.objects.select_for_update().get_or_create(agent_id=agent_id)[0]
    changed = state.worker_connected != connected
    state.worker_connected = connected
    state.worker_seen_at = timezone.now()
    state.save(update_fields=["worker_connected", "worker_seen_at"])
    if changed:
        notify.after_commit(notify.agent_state_changed, state)
    notify.after_commit(notify.worker_heartbeat, state)
    return state


# ---------------------------------------------------------------- shared by services and ingest


def _release(conversation: Conversation) -> None:
    conversation.holder = Conversation.Holder.AI
    conversation.held_by = None
    conversation.held_since = None
    conversation.ai_paused = False
    conversation.unread_count = 0
    conversation.save(
        update_fields=["holder", "held_by", "held_since", "ai_paused", "unread_count", "updated_at"]
    )


def conversation_end(conversation: Conversation, *, reason: str, ended_at=None) -> None:
    """Mark it ended, with a divider in the timeline (the caller holds its lock)."""
    conversation.state = Conversation.State.ENDED
    conversation.end_reason = reason
    conversation.ended_at = ended_at or timezone.now()
    conversation.needs_human = False
    conversation.save(update_fields=["state", "end_reason", "ended_at", "needs_human", "updated_at"])
    takeovers.ended(conversation, end=takeovers.End.ENDED, at=conversation.ended_at)
    _note(conversation, f"Conversation ended ({reason.replace('_', ' ')})")


UNRECEIVED_SHOWN = 50


@transaction.atomic
def conversation_unreceived_set(*, conversation_id: int, pinecall_said: list[str]) -> list[str]:
    """Compare what Pinecall's history says the customer wrote with what we stored.

    What we lack is kept on the conversation for operators to read (marked as
    recovered), never stored as messages: the original may still arrive with
    its id. Returns the texts not received.
    """
    conversation = Conversation.objects.select_for_update().filter(pk=conversation_id).first()
    if conversation is None:
        return []
    stored = Counter(
        conversation.messages.filter(author=Message.Author.CUSTOMER).values_list("text", flat=True)
    )
    missing = []
    for text in pinecall_said:
        if stored[text] > 0:
            stored[text] -= 1
        else:
            missing.append(text)
    unreceived = [{"content": text} for text in missing[-UNRECEIVED_SHOWN:]]
    conversation.unreceived_checked_at = timezone.now()
    fields = ["unreceived_checked_at"]
    if unreceived != conversation.unreceived:
        conversation.unreceived = unreceived
        fields += ["unreceived", "updated_at"]
        notify.after_commit(notify.conversation_changed, conversation)
    conversation.save(update_fields=fields)
    return missing


def conversation_touch(conversation: Conversation, message: Message) -> None:
    """Keep the inbox's columns in step with the newest message, and save them."""
    fields = conversation_record_message(conversation, message)
    conversation.save(update_fields=[*fields, "updated_at"])


def conversation_record_message(conversation: Conversation, message: Message) -> list[str]:
    """Move the inbox's columns on for a new message, in memory; returns the fields changed."""
    conversation.last_message_at = message.created_at
    conversation.last_message_preview = message.text[:200]
    conversation.last_message_author = message.author
    conversation.message_count += 1
    fields = ["last_message_at", "last_message_preview", "last_message_author", "message_count"]
    if message.author == Message.Author.CUSTOMER:
        conversation.last_customer_message_at = message.created_at
        fields.append("last_customer_message_at")
        if conversation.unreceived:
            # It arrived after all: no longer one we lack.
            texts = [entry.get("content") for entry in conversation.unreceived]
            if message.text in texts:
                del conversation.unreceived[texts.index(message.text)]
                fields.append("unreceived")
        if conversation.held_by_id is not None:
            conversation.unread_count += 1
            fields.append("unread_count")
    return fields


# ---------------------------------------------------------------- the handoff: a customer needs a person


def handoff_policy_get(agent_id: str | None = None) -> HandoffPolicy:
    """The agent's handoff policy, created from the HANDOFF_* settings on first use."""
    agent_id = agent_id or settings.PINECALL_AGENT_ID
    policy, _ = HandoffPolicy.objects.get_or_create(
        agent_id=agent_id,
        defaults={
            "pause_on_ask": settings.HANDOFF_PAUSE_ON_ASK,
            "holding_message": settings.HANDOFF_HOLDING_MESSAGE,
            "fallback_seconds": settings.HANDOFF_FALLBACK_SECONDS,
            "idle_seconds": settings.HANDOFF_IDLE_SECONDS,
            "ask_phrases": handoff.DEFAULT_ASK_PHRASES,
            "ai_phrases": handoff.AI_PASSES_PHRASES,
        },
    )
    return policy


@_audits_refusals(AuditEntry.Action.POLICY)
def handoff_policy_update(*, operator: AbstractBaseUser, agent_id: str = "", **fields) -> HandoffPolicy:
    """Supervisors change the policy at runtime; it applies at once, everywhere."""
    _require(operator, PAUSE_WIDE_PERMISSION)
    policy = handoff_policy_get(agent_id)
    allowed = {"pause_on_ask", "holding_message", "fallback_seconds", "idle_seconds",
               "ask_phrases", "ai_phrases"}
    unknown = set(fields) - allowed
    if unknown:
        raise ValidationError(f"Unknown policy fields: {', '.join(sorted(unknown))}")
    for name, value in fields.items():
        setattr(policy, name, value)
    policy.updated_by = operator
    policy.full_clean()
    policy.save()
    AuditEntry.objects.create(
        operator=operator,
        action=AuditEntry.Action.POLICY,
        agent_id=policy.agent_id,
        outcome=AuditEntry.Outcome.CONFIRMED,
        detail=", ".join(f"{k}={v!r}"[:80] for k, v in fields.items())[:500],
        completed_at=timezone.now(),
    )
    return policy


def needs_human_start(conversation: Conversation, *, reason: str, words: str = "", at=None) -> bool:
    """The customer waits for a person from now (unless already waiting); in memory.

    Returns True when it started now. The caller saves the fields
    (`NEEDS_HUMAN_FIELDS`): the ingest writes many conversations at once.
    """
    if conversation.needs_human_since is not None or conversation.held_by_id is not None:
        return False
    conversation.needs_human_since = at or timezone.now()
    conversation.needs_human_reason = reason
    conversation.needs_human_words = (words or "")[:200]
    conversation.needs_human = True
    takeovers.waits(conversation, reason=reason, at=conversation.needs_human_since)
    return True


NEEDS_HUMAN_FIELDS = ["needs_human_since", "needs_human_reason", "needs_human_words", "needs_human"]


def _needs_human_end(conversation: Conversation) -> list[str]:
    """Nobody waits any more. Why they had waited stays, for the handoff brief."""
    conversation.needs_human_since = None
    conversation.needs_human = False
    conversation.auto_paused = False
    return ["needs_human_since", "needs_human", "auto_paused"]


def handoff_step_aside(*, conversation: Conversation, policy: HandoffPolicy) -> Command | None:
    """The customer asked for a person: pause the AI for them (and say so, if configured).

    Audited as an automatic pause; nobody holds the conversation yet, so it
    stays in the "Needs a human" queue until someone takes over or the
    fallback gives it back to the AI.
    """
    if not policy.pause_on_ask or conversation.ai_paused or conversation.auto_paused:
        return None
    if conversation.held_by_id is not None or not conversation.is_active:
        return None
    command = _enqueue(
        audit_action=AuditEntry.Action.AUTO_PAUSE,
        operator=None,
        conversation=conversation,
        kind=Command.Kind.PAUSE,
        scope=Command.Scope.SESSION,
        agent_id=conversation.agent_id,
        session_id=conversation.session_id,
    )
    conversation.auto_paused = True
    conversation.save(update_fields=["auto_paused", "updated_at"])
    _note(conversation, "The customer asked for a person: the AI steps aside")
    if policy.holding_message.strip():
        holding = _queue_send(
            conversation, author=Message.Author.SYSTEM, operator=None,
            text=policy.holding_message.strip(), audit_action=AuditEntry.Action.AUTO_PAUSE,
        )
        conversation_touch(conversation, holding)
        notify.after_commit(notify.message_added, holding)
    notify.after_commit(notify.conversation_changed, conversation)
    return command


@_audits_refusals(AuditEntry.Action.KEEP)
def conversation_keep(*, conversation: Conversation | int, operator: AbstractBaseUser) -> Conversation:
    """"Keep it": the holder is still on it; the idle clock starts again."""
    _require(operator, TAKE_OVER_PERMISSION)
    conversation = _locked(conversation)
    if conversation.held_by_id != operator.pk:
        raise ActionRefused("Only the person who holds this conversation can keep it.")
    conversation.holder_active_at = timezone.now()
    conversation.idle_warned_at = None
    conversation.save(update_fields=["holder_active_at", "idle_warned_at", "updated_at"])
    AuditEntry.objects.create(
        operator=operator,
        action=AuditEntry.Action.KEEP,
        agent_id=conversation.agent_id,
        conversation=conversation,
        outcome=AuditEntry.Outcome.CONFIRMED,
        completed_at=timezone.now(),
    )
    notify.after_commit(notify.conversation_changed, conversation)
    return conversation


IDLE_WARNING_SECONDS = 60


@transaction.atomic
def handoff_tick(*, agent_id: str, now=None) -> dict:
    """The handoff's clocks, computed from stored times (a restart changes nothing).

    - nobody took an auto-paused conversation within the fallback: back to the AI;
    - a holder idle for the policy's time: handed back automatically, and told;
    - a minute before that: the holder is warned.
    Run every second or so by the active worker; returns what it did (counts).
    """
    now = now or timezone.now()
    done = {"fallbacks": 0, "auto_hand_backs": 0, "warnings": 0}
    # Every clock below runs on a held or an auto-paused conversation: while there is
    # none (most seconds), one query is the whole tick (the idle worker's CPU).
    timed = Conversation.objects.filter(agent_id=agent_id, state=Conversation.State.ACTIVE).filter(
        Q(held_by__isnull=False) | Q(auto_paused=True, held_by__isnull=True)
    )
    if not timed.exists():
        return done
    policy = handoff_policy_get(agent_id)
    active = Conversation.objects.select_for_update(skip_locked=True).filter(
        agent_id=agent_id, state=Conversation.State.ACTIVE
    )
    fallback_before = now - timedelta(seconds=policy.fallback_seconds)
    for conversation in active.filter(
        auto_paused=True, held_by__isnull=True, needs_human_since__lte=fallback_before
    ):
        _enqueue(
            audit_action=AuditEntry.Action.FALLBACK,
            operator=None,
            conversation=conversation,
            kind=Command.Kind.RESUME,
            scope=Command.Scope.SESSION,
            agent_id=conversation.agent_id,
            session_id=conversation.session_id,
        )
        fields = _needs_human_end(conversation)
        conversation.save(update_fields=[*fields, "updated_at"])
        takeovers.ended(conversation, end=takeovers.End.FALLBACK, at=now)
        minutes = max(1, round(policy.fallback_seconds / 60))
        _note(conversation, f"Nobody took over within {minutes} min: the AI answers again")
        notify.after_commit(notify.conversation_changed, conversation)
        done["fallbacks"] += 1

    idle_before = now - timedelta(seconds=policy.idle_seconds)
    held = active.filter(held_by__isnull=False).exclude(
        commands__kind=Command.Kind.RESUME,
        commands__status__in=[Command.Status.PENDING, Command.Status.SENT],
    )
    for conversation in held.filter(holder_active_at__lte=idle_before):
        holder = conversation.held_by
        _enqueue(
            audit_action=AuditEntry.Action.AUTO_HAND_BACK,
            operator=None,
            conversation=conversation,
            kind=Command.Kind.RESUME,
            scope=Command.Scope.SESSION,
            agent_id=conversation.agent_id,
            session_id=conversation.session_id,
        )
        minutes = max(1, round(policy.idle_seconds / 60))
        _note(conversation, f"{display_name(holder)} sent nothing for {minutes} min: back to the AI")
        notify.after_commit(
            notify.user_notice, holder.pk, "auto_hand_back", conversation=conversation, minutes=minutes
        )
        notify.after_commit(notify.conversation_changed, conversation)
        done["auto_hand_backs"] += 1

    warn_before = now - timedelta(seconds=max(0, policy.idle_seconds - IDLE_WARNING_SECONDS))
    for conversation in held.filter(
        holder_active_at__lte=warn_before, holder_active_at__gt=idle_before, idle_warned_at__isnull=True
    ):
        conversation.idle_warned_at = now
        conversation.save(update_fields=["idle_warned_at"])
        left = int((conversation.holder_active_at + timedelta(seconds=policy.idle_seconds) - now).total_seconds())
        notify.after_commit(
            notify.user_notice, conversation.held_by_id, "idle_warning",
            conversation=conversation, seconds_left=max(0, left),
        )
        done["warnings"] += 1
    return done


def conversation_take_next(*, operator: AbstractBaseUser, agent_id: str = "") -> Conversation | None:
    """"Take the next one": the customer who has waited longest, taken over in one click.

    Two operators clicking at once get two different customers: the row is
    claimed under a lock that the other skips.
    """
    _require(operator, TAKE_OVER_PERMISSION)
    agent_id = agent_id or settings.PINECALL_AGENT_ID
    with transaction.atomic():
        conversation = (
            Conversation.objects.select_for_update(skip_locked=True)
            .filter(
                agent_id=agent_id,
                state=Conversation.State.ACTIVE,
                needs_human_since__isnull=False,
                held_by__isnull=True,
            )
            .order_by("needs_human_since", "id")
            .first()
        )
        if conversation is None:
            return None
        conversation_take_over(conversation=conversation, operator=operator)
    return conversation


def alert_preferences_get(user: AbstractBaseUser) -> AlertPreferences:
    """One person's alert switches; viewers start with none (they ask for them)."""
    preferences = AlertPreferences.objects.filter(user=user).first()
    if preferences is None:
        operates = user.has_perm(TAKE_OVER_PERMISSION)
        preferences = AlertPreferences(user=user, sound=operates, title=operates, desktop=False)
    return preferences


@transaction.atomic
def alert_preferences_set(*, user: AbstractBaseUser, sound: bool, title: bool, desktop: bool) -> AlertPreferences:
    preferences, _ = AlertPreferences.objects.update_or_create(
        user=user, defaults={"sound": sound, "title": title, "desktop": desktop}
    )
    return preferences
