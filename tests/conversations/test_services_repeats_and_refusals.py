"""A repeated action makes one command, not two; every refused action is audited."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.test import Client
from django.utils import timezone

from conversations import services
from conversations.models import AuditEntry, Command, Message

pytestmark = pytest.mark.django_db


def refusals(**filters):
    return AuditEntry.objects.filter(outcome="refused", **filters)


# ---------------------------------------------------------------- repeats


class TestRepeats:
    def test_take_over_twice_is_one_pause(self, operator, make_conversation):
        conversation = make_conversation()
        first = services.conversation_take_over(conversation=conversation, operator=operator)
        again = services.conversation_take_over(conversation=conversation, operator=operator)
        assert again.pk == first.pk
        assert Command.objects.filter(kind="pause").count() == 1
        assert AuditEntry.objects.count() == 1 and not refusals().exists()

    def test_take_over_once_confirmed_is_refused_not_repeated(self, operator, make_conversation):
        conversation = make_conversation()
        command = services.conversation_take_over(conversation=conversation, operator=operator)
        services.command_confirm(command=command)
        with pytest.raises(services.ActionRefused, match="already hold"):
            services.conversation_take_over(conversation=conversation, operator=operator)
        assert Command.objects.filter(kind="pause").count() == 1

    def test_hand_back_twice_is_one_resume(self, operator, make_conversation):
        conversation = make_conversation(held=True, held_by=operator)
        first = services.conversation_hand_back(conversation=conversation, operator=operator)
        again = services.conversation_hand_back(conversation=conversation, operator=operator)
        assert again.pk == first.pk
        assert Command.objects.filter(kind="resume").count() == 1

    def test_hand_back_while_anyones_resume_is_open_returns_it(
        self, operator, other_operator, make_conversation
    ):
        conversation = make_conversation(held=True, held_by=operator)
        first = services.conversation_hand_back(conversation=conversation, operator=operator)
        services.command_mark_sent(command=first)  # sent, not yet answered: still open
        again = services.conversation_hand_back(
            conversation=conversation, operator=other_operator, force=True
        )
        assert again.pk == first.pk
        assert Command.objects.filter(kind="resume").count() == 1

    def test_hand_back_after_the_resume_failed_asks_again(self, operator, make_conversation):
        conversation = make_conversation(held=True, held_by=operator)
        first = services.conversation_hand_back(conversation=conversation, operator=operator)
        services.command_fail(command=first, code="TIMEOUT", message="no answer")
        again = services.conversation_hand_back(conversation=conversation, operator=operator)
        assert again.pk != first.pk

    def test_the_same_text_within_a_second_is_one_message(self, operator, make_conversation):
        conversation = make_conversation(held=True, held_by=operator)
        first = services.conversation_send(conversation=conversation, operator=operator, text="Hi!")
        again = services.conversation_send(
            conversation=conversation, operator=operator, text="  Hi!  "
        )
        assert again.pk == first.pk
        assert Message.objects.filter(author="human").count() == 1
        assert Command.objects.filter(kind="send").count() == 1
        conversation.refresh_from_db()
        assert conversation.message_count == 1

    def test_the_same_text_later_is_sent_again(self, operator, make_conversation):
        conversation = make_conversation(held=True, held_by=operator)
        services.conversation_send(conversation=conversation, operator=operator, text="ok")
        Command.objects.update(created_at=timezone.now() - timedelta(seconds=1, milliseconds=1))
        services.conversation_send(conversation=conversation, operator=operator, text="ok")
        assert Command.objects.filter(kind="send").count() == 2

    def test_another_text_or_another_operator_is_not_a_repeat(
        self, operator, other_operator, make_conversation
    ):
        conversation = make_conversation(held=True, held_by=operator)
        services.conversation_send(conversation=conversation, operator=operator, text="one")
        services.conversation_send(conversation=conversation, operator=operator, text="two")
        assert Command.objects.filter(kind="send").count() == 2
        services.conversation_take_over(
            conversation=conversation, operator=other_operator, force=True
        )
        services.conversation_send(conversation=conversation, operator=other_operator, text="two")
        assert Command.objects.filter(kind="send").count() == 3

    def test_a_repeated_send_through_the_view_answers_with_the_same_bubble(
        self, operator_client, operator, make_conversation
    ):
        conversation = make_conversation(held=True, held_by=operator)
        url = f"/c/{conversation.pk}/send/"
        first = operator_client.post(url, {"text": "double"}, HTTP_HX_REQUEST="true")
        again = operator_client.post(url, {"text": "double"}, HTTP_HX_REQUEST="true")
        assert first.status_code == again.status_code == 200
        message = Message.objects.get(author="human")
        assert f'id="msg-{message.pk}"' in again.content.decode()


# ---------------------------------------------------------------- refusals audited


class TestRefusalsAudited:
    def test_a_viewers_actions(self, viewer, make_conversation):
        conversation = make_conversation()
        for service, kwargs, action in [
            (services.conversation_take_over, {"conversation": conversation}, "take_over"),
            (services.conversation_send, {"conversation": conversation, "text": "x"}, "send"),
            (services.conversation_hand_back, {"conversation": conversation}, "hand_back"),
            (
                services.contact_pause,
                {"contact_phone": conversation.contact_phone},
                "pause_contact",
            ),
            (
                services.contact_resume,
                {"contact_phone": conversation.contact_phone},
                "resume_contact",
            ),
            (services.agent_pause, {}, "pause_agent"),
            (services.agent_resume, {}, "resume_agent"),
        ]:
            with pytest.raises(PermissionDenied):
                service(operator=viewer, **kwargs)
            entry = refusals(action=action).get()
            assert entry.operator == viewer
            assert entry.detail == "You are not allowed to do this."
            assert entry.completed_at is not None
        assert not Command.objects.exists()
        assert refusals(action="pause_contact").get().contact_phone == conversation.contact_phone

    def test_a_take_over_race_lost(self, operator, other_operator, make_conversation):
        conversation = make_conversation()
        services.conversation_take_over(conversation=conversation, operator=operator)
        with pytest.raises(services.HeldByAnother):
            services.conversation_take_over(conversation=conversation, operator=other_operator)
        entry = refusals().get()
        assert (entry.operator, entry.action, entry.conversation) == (
            other_operator,
            "take_over",
            conversation,
        )
        assert entry.detail == "Ana Silva holds this conversation. Take it over to reply."
        assert entry.agent_id == conversation.agent_id
        assert entry.contact_phone == conversation.contact_phone

    def test_a_send_when_not_holding(self, operator, other_operator, make_conversation):
        conversation = make_conversation(held=True, held_by=other_operator)
        with pytest.raises(services.HeldByAnother):
            services.conversation_send(conversation=conversation, operator=operator, text="hi")
        unheld = make_conversation()
        with pytest.raises(services.ActionRefused, match="Take over"):
            services.conversation_send(conversation=unheld, operator=operator, text="hi")
        assert [e.detail for e in refusals(action="send").order_by("id")] == [
            "Bruno Costa holds this conversation. Take it over to reply.",
            "Take over this conversation before replying.",
        ]
        assert not Message.objects.filter(author="human").exists()

    def test_a_send_when_the_window_closed(self, operator, make_conversation):
        conversation = make_conversation(
            held=True,
            held_by=operator,
            last_customer_message_at=timezone.now() - timedelta(hours=25),
        )
        with pytest.raises(services.ActionRefused, match="24-hour"):
            services.conversation_send(conversation=conversation, operator=operator, text="hi")
        assert "24-hour WhatsApp window has closed" in refusals(action="send").get().detail

    def test_a_send_when_ended(self, operator, make_conversation):
        conversation = make_conversation(held=True, held_by=operator, state="ended")
        with pytest.raises(services.ActionRefused, match="ended"):
            services.conversation_send(conversation=conversation, operator=operator, text="hi")
        assert "has ended" in refusals(action="send").get().detail
        assert not Command.objects.exists()

    def test_an_invalid_send(self, operator, make_conversation):
        conversation = make_conversation(held=True, held_by=operator)
        with pytest.raises(ValidationError):
            services.conversation_send(conversation=conversation, operator=operator, text=" ")
        assert refusals(action="send").get().detail == "Write something before sending."

    def test_a_take_over_of_an_ended_conversation(self, operator, make_conversation):
        conversation = make_conversation(state="ended")
        with pytest.raises(services.ActionRefused):
            services.conversation_take_over(conversation=conversation, operator=operator)
        assert "ended" in refusals(action="take_over").get().detail

    def test_a_refusal_writes_nothing_else(self, operator, other_operator, make_conversation):
        """The service's own writes are rolled back; only the audit row stays."""
        conversation = make_conversation(held=True, held_by=other_operator)
        before = AuditEntry.objects.count()
        with pytest.raises(services.HeldByAnother):
            services.conversation_hand_back(conversation=conversation, operator=operator)
        assert AuditEntry.objects.count() == before + 1
        assert not Command.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_the_refusal_is_committed_although_the_service_raises(viewer, make_conversation):
    """Through the view, as in production (no ATOMIC_REQUESTS): the row is committed."""
    from django.db import connection

    assert not connection.in_atomic_block
    conversation = make_conversation()
    client = Client()
    client.force_login(viewer)
    response = client.post(f"/c/{conversation.pk}/take-over/", HTTP_HX_REQUEST="true")
    assert response.status_code == 403
    entry = refusals(action="take_over").get()
    assert entry.operator == viewer and entry.conversation == conversation
