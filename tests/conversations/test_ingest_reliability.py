"""Nothing a customer writes is lost: odd values fitted, repeats recognised, refusals kept."""

import pytest
from django.db import OperationalError

from conversations import ingest, services, worker
from conversations.models import Conversation, DeadLetter, IngestCursor, Message
from conversations.sanitize import clean_field, clean_id, clean_text
from pinecall_sdk.events import parse_event

SESSION = "wa-aaaaaaaaaaaa"


def message_frame(message_id: str, text: str, session_id: str = SESSION, **extra) -> dict:
    return {
        "event": "whatsapp.message",
        "agent_id": "support",
        "session_id": session_id,
        "from": "34612345678",
        "name": "Ana",
        "type": "text",
        "text": text,
        "message_id": message_id,
        "paused": False,
        **extra,
    }


def reply_frame(text: str, session_id: str = SESSION, **extra) -> dict:
    return {
        "event": "whatsapp.response",
        "agent_id": "support",
        "session_id": session_id,
        "to": "34612345678",
        "text": text,
        **extra,
    }


def store_stream(frames: list[dict], anchors: worker.ReplyAnchors) -> None:
    """What the bridge does with a batch read from its spool, without the socket."""
    events = []
    for frame in frames:
        if frame == worker.REGISTERED_MARK:
            anchors.forget()
            continue
        event = parse_event(frame)
        if event.event == "whatsapp.message":
            anchors.customer_message(event.session_id, event.message_id)
        elif event.event == "whatsapp.response":
            event.follows, event.rank = anchors.reply(event.session_id, event.text)
        events.append(event)
    worker.store_batch(events, "support", spool_id="test-spool", seq=len(frames))


class TestSanitise:
    def test_nul_and_lone_surrogates_are_removed_and_reported(self):
        assert clean_text("a\x00b") == ("ab", True)
        assert clean_text("x\ud800y") == ("x\ufffdy", True)
        assert clean_text("\ud83d\ude00 fine") == ("\U0001f600 fine", True)  # a pair, joined
        assert clean_text("plain") == ("plain", False)
        assert clean_text(12) == ("12", True)

    def test_long_ids_shorten_the_same_way_every_time(self):
        long = "wa-" + "f" * 200
        first, altered = clean_id(long, 64)
        assert altered and len(first) == 64 and first.startswith("wa-fff")
        assert clean_id(long, 64)[0] == first
        assert clean_id(long + "g", 64)[0] != first

    def test_names_are_cut_to_their_column(self):
        name, altered = clean_field("N" * 500, 200)
        assert altered and len(name) == 200


@pytest.mark.django_db
class TestOddMessagesAreStored:
    def test_a_message_with_nul_surrogate_and_long_fields_is_kept_and_marked(self):
        ingest.ingest_customer_message(
            agent_id="support",
            session_id="wa-" + "9" * 100,
            contact_phone="3" * 60,
            contact_name="Z" * 300,
            message_id="wamid." + "x" * 300,
            text="refund\x00 please \udc00",
        )
        message = Message.objects.get()
        assert message.text == "refund please \ufffd"
        assert message.altered
        assert len(message.message_id) == 128
        conversation = message.conversation
        assert len(conversation.session_id) == 64 and len(conversation.contact_phone) == 32
        assert len(conversation.contact_name) == 200

    def test_the_same_over_long_ids_again_are_recognised_as_repeats(self):
        fields = dict(
            agent_id="support",
            session_id="wa-" + "9" * 100,
            contact_phone="346",
            message_id="wamid." + "x" * 300,
            text="once",
        )
        assert ingest.ingest_customer_message(**fields) is not None
        assert ingest.ingest_customer_message(**fields) is None
        assert Message.objects.count() == 1 and Conversation.objects.count() == 1


@pytest.mark.django_db
class TestReplaysAreIdempotent:
    def test_a_replay_of_thirty_events_doubles_nothing(self):
        anchors = worker.ReplyAnchors()
        frames = []
        for n in range(15):
            frames += [message_frame(f"wamid.{n}", f"question {n}"), reply_frame(f"answer {n}")]
        frames[-2:-2] = [reply_frame("answer 13")]  # an AI that says the same thing twice
        store_stream(frames, anchors)
        before = list(Message.objects.values_list("author", "text"))
        # The connection drops; the server repeats its last thirty events.
        store_stream([worker.REGISTERED_MARK, *frames[-30:]], anchors)
        assert list(Message.objects.values_list("author", "text")) == before
        assert [t for a, t in before if a == "ai"].count("answer 13") == 2

    def test_a_repeat_whose_customer_message_was_not_replayed_is_recognised(self):
        anchors = worker.ReplyAnchors()
        store_stream([message_frame("wamid.1", "hi"), reply_frame("hello!")], anchors)
        store_stream([worker.REGISTERED_MARK, reply_frame("hello!")], anchors)
        assert Message.objects.filter(author="ai").count() == 1

    def test_the_echo_of_a_human_send_replayed_stays_one_message(self, operator):
        anchors = worker.ReplyAnchors()
        store_stream([message_frame("wamid.1", "hi")], anchors)
        conversation = Conversation.objects.get()
        services.conversation_take_over(conversation=conversation, operator=operator)
        services.conversation_send(conversation=conversation, operator=operator, text="Ana here")
        echo = reply_frame("Ana here", source="human")
        store_stream([echo], anchors)
        store_stream([worker.REGISTERED_MARK, message_frame("wamid.1", "hi"), echo], anchors)
        assert Message.objects.filter(author="human").count() == 1

    def test_a_status_without_message_id_moves_nothing(self):
        anchors = worker.ReplyAnchors()
        store_stream([message_frame("wamid.1", "hi"), reply_frame("hello!")], anchors)
        ingest.ingest_status(message_id="wamid.reply", status="sent", recipient="34612345678")
        ingest.ingest_status(message_id=None, status="read", recipient="34612345678")
        ingest.ingest_status(message_id="", status="read", recipient="34612345678")
        assert Message.objects.get(author="ai").status == "sent"
        assert Message.objects.get(author="customer").status == ""

    def test_the_cursor_is_written_with_the_batch(self):
        store_stream([message_frame("wamid.1", "hi")], worker.ReplyAnchors())
        assert IngestCursor.objects.get(spool_id="test-spool").seq == 1


@pytest.mark.django_db
class TestRefusedAndUnavailable:
    def test_an_event_the_data_model_refuses_becomes_a_dead_letter(self, monkeypatch):
        def refuse(event, agent_id):
            raise ValueError("not storable")

        monkeypatch.setitem(worker.STORE, "whatsapp.status", refuse)
        event = parse_event({"event": "whatsapp.status", "message_id": "w1", "status": "read"})
        worker.store_batch([event], "support")
        dead = DeadLetter.objects.get()
        assert dead.event == "whatsapp.status" and "not storable" in dead.reason
        assert dead.frame["message_id"] == "w1"

        monkeypatch.undo()
        assert worker.dead_letter_retry(dead_letter=dead)
        dead.refresh_from_db()
        assert dead.resolved_at is not None

    def test_a_database_outage_is_raised_to_be_retried_never_dead_lettered(self, monkeypatch):
        def outage(event, agent_id):
            raise OperationalError("connection refused")

        monkeypatch.setitem(worker.STORE, "whatsapp.status", outage)
        event = parse_event({"event": "whatsapp.status", "message_id": "w1", "status": "read"})
        with pytest.raises(OperationalError):
            worker.store_batch([event], "support", spool_id="s", seq=5)
        assert not DeadLetter.objects.exists()
        assert not IngestCursor.objects.exists()  # rolled back with the batch


@pytest.mark.django_db
class TestUnreceived:
    def test_what_pinecall_has_and_we_lack_is_listed_until_it_arrives(self):
        anchors = worker.ReplyAnchors()
        store_stream([message_frame("wamid.1", "hi"), message_frame("wamid.3", "thanks")], anchors)
        conversation = Conversation.objects.get()
        missing = services.conversation_unreceived_set(
            conversation_id=conversation.pk, pinecall_said=["hi", "my order is 123", "thanks"]
        )
        assert missing == ["my order is 123"]
        conversation.refresh_from_db()
        assert conversation.unreceived == [{"content": "my order is 123"}]
        assert Message.objects.count() == 2  # listed, never stored as a message
        # The original arrives late, with its id: the notice goes.
        store_stream([message_frame("wamid.2", "my order is 123")], anchors)
        conversation.refresh_from_db()
        assert conversation.unreceived == []
