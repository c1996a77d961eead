"""Operators' actions: stored (outbox + audit) before they are attempted; outcomes applied."""

import threading
import time

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import connection, transaction
from django.utils import timezone

from conversations import services
from conversations.models import AgentState, AuditEntry, Command, ContactPause, Conversation, Message
from tests.factories import ConversationFactory, OperatorFactory

pytestmark = pytest.mark.django_db


def test_take_over_claims_and_queues_a_pause(operator, make_conversation):
    conversation = make_conversation()
    command = services.conversation_take_over(conversation=conversation, operator=operator)
    conversation.refresh_from_db()
    assert conversation.held_by == operator and conversation.holder == "human"
    assert not conversation.ai_paused  # not until Pinecall confirms
    assert (command.kind, command.scope, command.session_id, command.status) == (
        "pause",
        "session",
        conversation.session_id,
        "pending",
    )
    audit = AuditEntry.objects.get()
    assert (audit.action, audit.operator, audit.outcome) == ("take_over", operator, "pending")


def test_confirmation_marks_paused_with_a_divider(operator, make_conversation):
    conversation = make_conversation()
    command = services.conversation_take_over(conversation=conversation, operator=operator)
    services.command_confirm(command=command)
    conversation.refresh_from_db()
    assert conversation.ai_paused
    assert conversation.messages.get(direction="note").text == "Ana Silva took over"
    assert AuditEntry.objects.get().outcome == "confirmed"


def test_the_confirmed_command_comes_with_its_operator_and_its_audit_entry_closed(
    operator, make_conversation, django_assert_num_queries
):
    conversation = make_conversation()
    command = services.conversation_take_over(conversation=conversation, operator=operator)
    confirmed = services._command_confirmed(command.pk, timezone.now())
    with django_assert_num_queries(0):
        assert confirmed.operator == operator  # read with it, for the divider
    assert (confirmed.status, confirmed.completed_at is not None) == ("confirmed", True)
    assert AuditEntry.objects.get(command=command).outcome == "confirmed"
    assert services._command_confirmed(command.pk, timezone.now()) is None  # once


def test_confirming_a_pause_of_a_paused_conversation_leaves_its_row_unmoved(
    operator, make_conversation
):
    conversation = make_conversation()
    Conversation.objects.filter(pk=conversation.pk).update(ai_paused=True)
    before = Conversation.objects.get(pk=conversation.pk).updated_at
    paused = services._paused_locked(conversation.pk)
    assert paused.ai_paused and paused.updated_at == before
    with pytest.raises(Conversation.DoesNotExist):
        services._paused_locked(conversation.pk + 1000)


def test_first_operator_holds_and_the_second_must_force(operator, other_operator, make_conversation):
    conversation = make_conversation()
    services.conversation_take_over(conversation=conversation, operator=operator)
    with pytest.raises(services.HeldByAnother, match="Ana Silva holds"):
        services.conversation_take_over(conversation=conversation, operator=other_operator)
    with pytest.raises(services.HeldByAnother):
        services.conversation_send(conversation=conversation, operator=other_operator, text="hi")
    services.conversation_take_over(conversation=conversation, operator=other_operator, force=True)
    conversation.refresh_from_db()
    assert conversation.held_by == other_operator


def test_viewers_cannot_act(viewer, make_conversation):
    conversation = make_conversation()
    with pytest.raises(PermissionDenied):
        services.conversation_take_over(conversation=conversation, operator=viewer)
    with pytest.raises(PermissionDenied):
        services.agent_pause(operator=viewer)
    assert not Command.objects.exists()


def test_operators_cannot_pause_contacts_or_the_agent(operator, supervisor):
    with pytest.raises(PermissionDenied):
        services.contact_pause(contact_phone="346", operator=operator)
    command = services.contact_pause(contact_phone="346", operator=supervisor)
    services.command_confirm(command=command)
    assert ContactPause.objects.filter(contact_phone="346", paused_by=supervisor).exists()
    command = services.contact_resume(contact_phone="346", operator=supervisor)
    services.command_confirm(command=command)
    assert not ContactPause.objects.exists()


def test_kill_switch(supervisor):
    services.command_confirm(command=services.agent_pause(operator=supervisor))
    assert AgentState.objects.get(agent_id="support").ai_paused
    services.command_confirm(command=services.agent_resume(operator=supervisor))
    assert not AgentState.objects.get(agent_id="support").ai_paused


def test_ended_conversation_refuses_take_over_clearly(operator, make_conversation):
    conversation = make_conversation(state="ended")
    with pytest.raises(services.ActionRefused, match="ended"):
        services.conversation_take_over(conversation=conversation, operator=operator)


def test_send_needs_the_hold_text_and_an_open_window(operator, make_conversation):
    conversation = make_conversation()
    with pytest.raises(services.ActionRefused, match="Take over"):
        services.conversation_send(conversation=conversation, operator=operator, text="hi")
    services.conversation_take_over(conversation=conversation, operator=operator)
    with pytest.raises(ValidationError):
        services.conversation_send(conversation=conversation, operator=operator, text="   ")
    with pytest.raises(ValidationError, match="4096"):
        services.conversation_send(conversation=conversation, operator=operator, text="x" * 4097)
    type(conversation).objects.filter(pk=conversation.pk).update(
        last_customer_message_at=timezone.now() - timezone.timedelta(hours=25)
    )
    with pytest.raises(services.ActionRefused, match="24-hour"):
        services.conversation_send(conversation=conversation, operator=operator, text="hi")
    assert not Message.objects.exists()


def test_send_is_pending_then_confirmed(operator, make_conversation):
    conversation = make_conversation()
    services.conversation_take_over(conversation=conversation, operator=operator)
    message = services.conversation_send(conversation=conversation, operator=operator, text=" Hello ")
    assert (message.text, message.status, message.author, message.operator) == (
        "Hello",
        "pending",
        "human",
        operator,
    )
    services.command_confirm(command=message.command)
    message.refresh_from_db()
    assert message.status == "sent"


def test_failed_send_says_why(operator, make_conversation):
    conversation = make_conversation()
    services.conversation_take_over(conversation=conversation, operator=operator)
    message = services.conversation_send(conversation=conversation, operator=operator, text="Hello")
    services.command_fail(command=message.command, code="SESSION_NOT_FOUND", message="Session ended")
    message.refresh_from_db()
    assert (message.status, message.error) == ("failed", "Session ended")
    assert AuditEntry.objects.get(action="send").outcome == "failed"


def test_failed_take_over_undoes_the_claim(operator, make_conversation):
    conversation = make_conversation()
    command = services.conversation_take_over(conversation=conversation, operator=operator)
    services.command_fail(command=command, code="TIMEOUT", message="no answer")
    conversation.refresh_from_db()
    assert conversation.held_by is None and conversation.holder == "ai"


def test_hand_back_keeps_the_holder_until_confirmed(operator, make_conversation):
    conversation = make_conversation()
    services.command_confirm(
        command=services.conversation_take_over(conversation=conversation, operator=operator)
    )
    command = services.conversation_hand_back(conversation=conversation, operator=operator)
    conversation.refresh_from_db()
    assert conversation.held_by == operator
    services.command_confirm(command=command)
    conversation.refresh_from_db()
    assert (conversation.held_by, conversation.holder, conversation.ai_paused) == (None, "ai", False)
    assert conversation.messages.filter(direction="note").last().text == "Handed back to the AI"


def test_hand_back_of_an_ended_conversation_releases_at_once(operator, make_conversation):
    conversation = make_conversation()
    services.conversation_take_over(conversation=conversation, operator=operator)
    type(conversation).objects.filter(pk=conversation.pk).update(state="ended")
    assert services.conversation_hand_back(conversation=conversation, operator=operator) is None
    conversation.refresh_from_db()
    assert conversation.held_by is None


def test_unread_counts_customer_messages_while_held_and_resets_on_read(operator, make_conversation):
    from conversations import ingest

    conversation = make_conversation()
    services.conversation_take_over(conversation=conversation, operator=operator)
    for n in range(3):
        ingest.ingest_customer_message(
            agent_id="support",
            session_id=conversation.session_id,
            contact_phone=conversation.contact_phone,
            message_id=f"m{n}",
            text="hello?",
            paused=True,
        )
    conversation.refresh_from_db()
    assert conversation.unread_count == 3
    assert not conversation.needs_human  # someone holds it
    services.conversation_mark_read(conversation=conversation, operator=operator)
    conversation.refresh_from_db()
    assert conversation.unread_count == 0


def test_confirming_twice_changes_nothing(operator, make_conversation):
    conversation = make_conversation()
    command = services.conversation_take_over(conversation=conversation, operator=operator)
    services.command_confirm(command=command)
    services.command_confirm(command=command)
    services.command_fail(command=command, code="X", message="late")
    command.refresh_from_db()
    assert command.status == "confirmed"
    assert conversation.messages.filter(direction="note").count() == 1


def test_the_worker_claims_pending_commands_once_oldest_first(operator, make_conversation):
    """Claimed = marked sent in the same statement that picks them: never handed out twice."""
    first, second, third = (make_conversation() for _ in range(3))
    commands = [services.conversation_take_over(conversation=c, operator=operator) for c in (first, second, third)]
    claimed = services.commands_claim(2)
    assert [c.pk for c in claimed] == [commands[0].pk, commands[1].pk]
    assert all(c.status == "sent" and c.attempts == 1 and c.sent_at is not None for c in claimed)
    assert [c.pk for c in services.commands_claim(10)] == [commands[2].pk]
    assert services.commands_claim(10) == []
    stored = {c.pk: c for c in Command.objects.all()}
    assert {c.status for c in stored.values()} == {"sent"} and {c.attempts for c in stored.values()} == {1}


def test_a_conversations_facts_are_read_in_one_statement_as_the_orm_sees_them(
    operator, supervisor, make_conversation, django_assert_max_num_queries
):
    """`conversation_facts_find` writes its SQL by hand (for speed): every column and
    fact must come back as the ORM would give it, on SQLite and PostgreSQL alike."""
    from conversations import selectors
    from conversations.models import Conversation, HandoffPolicy

    conversation = make_conversation(contact_name="Zoë <b>")
    take_over = services.conversation_take_over(conversation=conversation, operator=operator)
    services.command_confirm(command=take_over)
    pause = services.contact_pause(contact_phone=conversation.contact_phone, operator=supervisor)
    services.command_confirm(command=services.agent_pause(operator=supervisor))
    HandoffPolicy.objects.update_or_create(agent_id=conversation.agent_id, defaults={"idle_seconds": 321})

    with django_assert_max_num_queries(2):
        facts = selectors.conversation_facts_find(conversation.pk)
    expected = Conversation.objects.get(pk=conversation.pk)
    for field in Conversation._meta.concrete_fields:
        assert getattr(facts.conversation, field.attname) == getattr(expected, field.attname), field.name
    assert facts.conversation.held_since.tzinfo is not None
    with django_assert_max_num_queries(0):
        assert facts.conversation.held_by == operator
        assert facts.conversation.held_by.first_name == "Ana"
    assert facts.last_session_command == take_over and facts.last_session_command.status == "confirmed"
    assert facts.contact_command == pause and facts.contact_command.status == "pending"
    assert facts.contact_paused is False  # not until Pinecall confirms
    assert facts.agent_paused is True
    assert facts.idle_seconds == 321
    assert selectors.conversation_facts_find(conversation.pk + 1000) is None


@pytest.mark.django_db(transaction=True)
def test_a_receipt_that_came_first_is_not_set_back_by_the_send_confirmation():
    """The confirmation locks the message as a receipt does: waiting for the receipt's
    transaction, it sees "delivered" and leaves it (it read it unlocked before, and
    wrote "sent" over it)."""
    if connection.vendor != "postgresql":
        pytest.skip("row locks: PostgreSQL")
    operator = OperatorFactory()
    conversation = ConversationFactory(held=True, held_by=operator)
    message = services.conversation_send(conversation=conversation, operator=operator, text="hi")
    [command] = services.commands_claim(10)
    locked, go = threading.Event(), threading.Event()

    def receipt():
        try:
            with transaction.atomic():
                row = Message.objects.select_for_update().get(pk=message.pk)
                row.status = Message.Status.DELIVERED
                row.save(update_fields=["status"])
                locked.set()
                go.wait(10)
        finally:
            connection.close()

    def confirm():
        try:
            services.command_confirm(command=command)
        finally:
            connection.close()

    first = threading.Thread(target=receipt)
    first.start()
    assert locked.wait(10)
    second = threading.Thread(target=confirm)
    second.start()
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
    deadline = timezone.now() + timezone.timedelta(seconds=10)
    with connection.cursor() as cursor:
        while timezone.now() < deadline:
            cursor.execute(waiting)
            if cursor.fetchone()[0]:
                break
            time.sleep(0.01)
    go.set()
    first.join(10), second.join(10)
    message.refresh_from_db()
    assert message.status == Message.Status.DELIVERED
    assert Command.objects.get(pk=command.pk).status == Command.Status.CONFIRMED
