"""`conversations.bulk`: rows in and out in one statement, as the ORM would store them."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from conversations import bulk, ingest
from conversations.models import Conversation, Message
from tests.factories import ConversationFactory


def inbound(conversation, message_id, text="hi"):
    return Message(
        conversation=conversation,
        message_id=message_id,
        direction=Message.Direction.INBOUND,
        author=Message.Author.CUSTOMER,
        text=text,
    )


@pytest.mark.django_db
def test_insert_new_skips_what_is_stored_and_repeats_within_and_sets_the_keys():
    conversation = ConversationFactory()
    stored = inbound(conversation, "w.1")
    stored.save()
    objs = [
        inbound(conversation, "w.1", "repeat of a stored one"),
        inbound(conversation, "w.2", "new"),
        inbound(conversation, None, "no id: never a repeat"),
        inbound(conversation, "w.2", "repeat within"),
        inbound(conversation, "w.3", "new too"),
    ]
    with CaptureQueriesContext(connection) as queries:
        inserted = bulk.insert_new(objs, unique="message_id")
    assert len(queries) == 1
    assert inserted == [objs[1], objs[2], objs[4]]
    assert [m.pk for m in inserted] == list(
        Message.objects.exclude(pk=stored.pk).order_by("pk").values_list("pk", flat=True)
    )
    assert objs[0].pk is None and objs[3].pk is None
    assert list(Message.objects.order_by("pk").values_list("text", flat=True)) == [
        "hi", "new", "no id: never a repeat", "new too",
    ]
    assert not inserted[0]._state.adding
    assert bulk.insert_new([], unique="message_id") == []


@pytest.mark.django_db
def test_a_batch_of_repeats_leaves_its_conversation_untouched():
    first = ingest.ingest_customer_message(
        agent_id="support", session_id="wa-r", contact_phone="346", message_id="w.9", text="once"
    )
    before = Conversation.objects.get(pk=first.conversation_id)
    assert ingest.ingest_customer_message(
        agent_id="support", session_id="wa-r", contact_phone="346", message_id="w.9", text="once"
    ) is None
    after = Conversation.objects.get(pk=first.conversation_id)
    assert after.message_count == 1
    assert after.updated_at == before.updated_at


@pytest.mark.django_db
def test_a_repeat_under_a_session_never_seen_creates_no_conversation():
    ingest.ingest_customer_message(
        agent_id="support", session_id="wa-s", contact_phone="346", message_id="w.7", text="x"
    )
    assert ingest.ingest_customer_message(
        agent_id="support", session_id="wa-other", contact_phone="346", message_id="w.7", text="x"
    ) is None
    assert list(Conversation.objects.values_list("session_id", flat=True)) == ["wa-s"]


@pytest.mark.django_db
def test_insert_new_of_one_row_inserts_it_once():
    conversation = ConversationFactory()
    first = bulk.insert_new([inbound(conversation, "w.one", "first")], unique="message_id")
    again = bulk.insert_new([inbound(conversation, "w.one", "again")], unique="message_id")
    assert [m.pk for m in first] == list(Message.objects.values_list("pk", flat=True))
    assert again == []
    assert list(Message.objects.values_list("text", flat=True)) == ["first"]


@pytest.mark.django_db
@pytest.mark.parametrize("rows", [1, 3])
def test_update_rows_writes_the_fields_named_and_nothing_else(rows):
    conversations = [ConversationFactory(contact_name=f"Before {i}", message_count=1) for i in range(rows)]
    untouched = ConversationFactory(contact_name="Other", message_count=1)
    for i, conversation in enumerate(conversations):
        conversation.contact_name = f"After {i}"
        conversation.message_count = 10 + i
        conversation.contact_phone = "not saved"
    with CaptureQueriesContext(connection) as queries:
        updated = bulk.update_rows(conversations, ["contact_name", "message_count", "contact_name"])
    assert updated == rows
    assert len(queries) == 1
    stored = {c.pk: c for c in Conversation.objects.all()}
    for i, conversation in enumerate(conversations):
        assert (stored[conversation.pk].contact_name, stored[conversation.pk].message_count) == (f"After {i}", 10 + i)
        assert stored[conversation.pk].contact_phone != "not saved"
    assert (stored[untouched.pk].contact_name, stored[untouched.pk].message_count) == ("Other", 1)
