"""Pinecall's events stored: idempotent, complete, in order."""

import pytest

from conversations import ingest
from conversations.models import Conversation, Message


def customer(session_id="wa-aaaaaaaaaaaa", message_id="wamid.1", text="Hi", **extra):
    fields = dict(
        agent_id="support",
        session_id=session_id,
        contact_phone="34612345678",
        contact_name="Ana",
        message_id=message_id,
        text=text,
        paused=False,
    )
    fields.update(extra)
    return ingest.ingest_customer_message(**fields)


@pytest.mark.django_db
class TestSessionsAndMessages:
    def test_session_started_twice_updates_instead_of_duplicating(self):
        ingest.ingest_session_started(
            agent_id="support", session_id="wa-1", contact_phone="346", contact_name=""
        )
        ingest.ingest_session_started(
            agent_id="support", session_id="wa-1", contact_phone="346", contact_name="Ana"
        )
        assert Conversation.objects.get().contact_name == "Ana"

    def test_message_for_unknown_session_creates_its_conversation(self):
        message = customer(session_id="wa-new")
        conversation = message.conversation
        assert conversation.session_id == "wa-new"
        assert conversation.contact_phone == "34612345678"
        assert conversation.message_count == 1
        assert conversation.last_message_preview == "Hi"

    def test_same_message_id_twice_stores_one_message(self):
        assert customer() is not None
        assert customer() is None
        assert Message.objects.count() == 1
        assert Conversation.objects.get().message_count == 1

    def test_voice_note_keeps_its_transcript_and_unknown_types_become_text(self):
        customer(message_id="m1", type="audio", text="I want a refund")
        customer(message_id="m2", type="sticker", text="?")
        kinds = list(Message.objects.values_list("type", "text"))
        assert kinds == [("audio", "I want a refund"), ("text", "?")]

    def test_paused_flag_is_stored_as_received_and_flags_the_conversation(self):
        customer(paused=True)
        message = Message.objects.get()
        assert message.paused is True
        assert message.conversation.needs_human is True

    def test_asking_for_a_person_flags_the_conversation(self):
        customer(text="Can I talk to a human please?")
        assert Conversation.objects.get().needs_human is True

    def test_html_is_stored_verbatim(self):
        customer(text="<img src=x onerror=alert(1)>")
        assert Message.objects.get().text == "<img src=x onerror=alert(1)>"


@pytest.mark.django_db
class TestResponsesAndStatuses:
    def test_ai_reply_then_statuses_bind_by_recipient_and_never_go_back(self):
        customer()
        reply = ingest.ingest_response(
            agent_id="support", session_id="wa-aaaaaaaaaaaa", to="34612345678", text="On its way"
        )
        assert reply.author == Message.Author.AI and reply.status == "sent"
        ingest.ingest_status(message_id="wamid.out1", status="read", recipient="34612345678")
        ingest.ingest_status(message_id="wamid.out1", status="delivered", recipient="34612345678")
        reply.refresh_from_db()
        assert (reply.message_id, reply.status) == ("wamid.out1", "read")

    def test_statuses_bind_to_replies_in_order(self):
        customer()
        first = ingest.ingest_response(agent_id="support", session_id="wa-aaaaaaaaaaaa", to="34612345678", text="A")
        customer(message_id="wamid.2", text="and?")
        second = ingest.ingest_response(agent_id="support", session_id="wa-aaaaaaaaaaaa", to="34612345678", text="B")
        ingest.ingest_status(message_id="out-a", status="sent", recipient="34612345678")
        ingest.ingest_status(message_id="out-b", status="delivered", recipient="34612345678")
        first.refresh_from_db(), second.refresh_from_db()
        assert (first.message_id, second.message_id) == ("out-a", "out-b")
        assert (first.status, second.status) == ("sent", "delivered")

    def test_repeated_ai_reply_after_reconnect_is_stored_once(self):
        customer()
        for _ in range(2):
            ingest.ingest_response(agent_id="support", session_id="wa-aaaaaaaaaaaa", to="34612345678", text="Same")
        assert Message.objects.filter(author="ai").count() == 1

    def test_human_echo_does_not_duplicate_the_pending_copy(self, operator, make_conversation):
        from conversations import services

        conversation = make_conversation()
        services.conversation_take_over(conversation=conversation, operator=operator)
        sent = services.conversation_send(conversation=conversation, operator=operator, text="Hello, Ana here")
        assert sent.status == "pending"
        echo = ingest.ingest_response(
            agent_id="support",
            session_id=conversation.session_id,
            to=conversation.contact_phone,
            text="Hello, Ana here",
            source="human",
        )
        assert echo is None
        assert conversation.messages.filter(author="human").count() == 1

    def test_receipts_follow_the_order_replies_went_out_not_the_order_they_were_stored(
        self, operator, make_conversation
    ):
        from conversations import services
        from conversations.models import Command

        conversation = make_conversation()
        services.conversation_take_over(conversation=conversation, operator=operator)
        human = services.conversation_send(conversation=conversation, operator=operator, text="Ana here")
        Command.objects.filter(message=human).update(status=Command.Status.SENT)
        # The AI's reply went out before the pause reached Pinecall: stored after the human send.
        ai = ingest.ingest_response(
            agent_id="support", session_id=conversation.session_id, to=conversation.contact_phone, text="AI"
        )
        ingest.ingest_status(message_id="out-ai", status="read", recipient=conversation.contact_phone)
        ingest.ingest_response(
            agent_id="support",
            session_id=conversation.session_id,
            to=conversation.contact_phone,
            text="Ana here",
            source="human",
        )
        ingest.ingest_status(message_id="out-human", status="delivered", recipient=conversation.contact_phone)
        human.refresh_from_db(), ai.refresh_from_db()
        assert (ai.message_id, ai.status) == ("out-ai", "read")
        assert (human.message_id, human.status) == ("out-human", "delivered")

    def test_a_receipt_before_any_echo_binds_to_a_send_already_at_pinecall(self, operator, make_conversation):
        from conversations import services
        from conversations.models import Command

        conversation = make_conversation()
        services.conversation_take_over(conversation=conversation, operator=operator)
        human = services.conversation_send(conversation=conversation, operator=operator, text="Ana here")
        assert ingest.ingest_status(message_id="early", status="sent", recipient=conversation.contact_phone) is None
        Command.objects.filter(message=human).update(status=Command.Status.SENT)
        ingest.ingest_status(message_id="early", status="sent", recipient=conversation.contact_phone)
        human.refresh_from_db()
        assert human.message_id == "early"

    def test_human_send_from_elsewhere_is_stored(self, make_conversation):
        conversation = make_conversation()
        message = ingest.ingest_response(
            agent_id="support", session_id=conversation.session_id, text="From another tool", source="human"
        )
        assert message.author == "human" and message.operator is None

    def test_unknown_status_value_and_unknown_message_change_nothing(self):
        assert ingest.ingest_status(message_id="x", status="exploded", recipient="1") is None
        assert ingest.ingest_status(message_id="x", status="read", recipient="nobody") is None


@pytest.mark.django_db
class TestEndAndPauses:
    def test_session_ended_is_recorded_once_with_a_divider(self):
        customer()
        for _ in range(2):
            ingest.ingest_session_ended(
                agent_id="support",
                session_id="wa-aaaaaaaaaaaa",
                reason="idle_timeout",
                ended_at="2026-11-21T10:00:00+00:00",
            )
        conversation = Conversation.objects.get()
        assert conversation.state == "ended" and conversation.end_reason == "idle_timeout"
        assert conversation.ended_at.isoformat() == "2026-11-21T10:00:00+00:00"
        assert conversation.messages.filter(direction="note").count() == 1

    def test_pause_state_from_elsewhere_is_reflected(self, make_conversation):
        from conversations.models import AgentState, ContactPause

        conversation = make_conversation()
        ingest.ingest_pause_state(agent_id="support", paused=True, session_id=conversation.session_id)
        ingest.ingest_pause_state(agent_id="support", paused=True, contact="346")
        ingest.ingest_pause_state(agent_id="support", paused=True)
        conversation.refresh_from_db()
        assert conversation.ai_paused
        assert ContactPause.objects.filter(contact_phone="346").exists()
        assert AgentState.objects.get(agent_id="support").ai_paused
        ingest.ingest_pause_state(agent_id="support", paused=False)
        assert not AgentState.objects.get(agent_id="support").ai_paused


@pytest.mark.django_db
def test_direct_send_echo_without_session_belongs_to_the_contacts_latest_conversation():
    customer()
    message = ingest.ingest_response(
        agent_id="support", session_id=None, to="34612345678", text="After the end", source="human"
    )
    assert message.conversation.session_id == "wa-aaaaaaaaaaaa"
    assert ingest.ingest_response(agent_id="support", session_id=None, to="999", text="x") is None


@pytest.mark.django_db
def test_a_burst_is_stored_set_wise_with_repeats_dropped_and_counts_exact():
    burst = [
        ingest.CustomerMessage(
            agent_id="support",
            session_id=f"wa-{n % 3:012x}",
            contact_phone=f"3460000{n % 3}",
            contact_name=f"C{n % 3}",
            message_id=f"wamid.{n}",
            text="please, a human" if n == 4 else f"m{n}",
        )
        for n in range(9)
    ]
    stored = ingest.ingest_customer_messages(burst + burst[:4])  # repeats within the burst
    assert len(stored) == 9
    assert ingest.ingest_customer_messages(burst) == []  # and repeats of stored ones
    counts = dict(Conversation.objects.values_list("session_id", "message_count"))
    # The one who asked for a person also got the holding message.
    assert counts == {f"wa-{0:012x}": 3, f"wa-{1:012x}": 4, f"wa-{2:012x}": 3}
    last = Conversation.objects.get(session_id=f"wa-{2:012x}")
    assert last.last_message_preview == "m8" and last.contact_name == "C2"
    asked = Conversation.objects.get(session_id=f"wa-{1:012x}")
    assert asked.needs_human and asked.needs_human_reason == "asked" and asked.auto_paused
    customers = Message.objects.filter(author="customer")
    assert list(customers.values_list("text", flat=True)) == [m.text for m in burst]


@pytest.mark.django_db(transaction=True)
def test_the_worker_stores_a_batch_around_a_bad_event():
    from pinecall_sdk.events import parse_event

    from conversations.worker import store_batch

    def message(n, session="wa-bbbbbbbbbbbb"):
        return parse_event({
            "event": "whatsapp.message", "agent_id": "support", "session_id": session,
            "from": "34611", "name": "B", "type": "text", "text": f"m{n}",
            "message_id": f"wamid.b{n}", "paused": False,
        })

    bad = message(99, session="wa-" + "x" * 100)  # too long for the column on PostgreSQL
    store_batch([message(1), message(2), bad, message(3)], "support")
    texts = set(Message.objects.values_list("text", flat=True))
    assert {"m1", "m2", "m3"} <= texts
