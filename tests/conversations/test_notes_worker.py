"""An internal note against the worker and the simulator: it never reaches Pinecall,
while the operator's reply written after it does."""

import json

import pytest

from conversations import operator_tools, services
from conversations.models import Command, Conversation, Message
from tests.conversations.test_worker import db, eventually, relay_wakeups, sim, start_worker, worker  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)


async def test_a_note_never_reaches_the_simulator_nor_the_ais_history(sim, worker, operator):
    started = await sim.customer_says(phone="34615550000", name="Nora", text="My parcel is late")
    session_id = started["session_id"]
    conversation = await eventually(lambda: Conversation.objects.filter(session_id=session_id).first())
    await db(services.conversation_take_over)(conversation=conversation, operator=operator)
    await eventually(lambda: Conversation.objects.get(pk=conversation.pk).ai_paused)

    secret = "Internal: customer is on the fraud watchlist"
    await db(operator_tools.note_create)(conversation=conversation, operator=operator, text=secret)
    await db(services.conversation_send)(conversation=conversation, operator=operator, text="Checking it now")
    # The reply written after the note went out: anything the note could have sent would be before it.
    frame = await sim.wait_for("session.send", session_id=session_id)
    assert "Checking it now" in json.dumps(frame)

    assert secret not in json.dumps(sim.received)
    assert secret not in json.dumps(sim.session_history(session_id))
    kinds = await db(lambda: list(Command.objects.values_list("kind", "text")))()
    assert kinds == [("pause", ""), ("send", "Checking it now")]
    sent = await db(lambda: list(Message.objects.exclude(direction="note").values_list("text", flat=True)))()
    assert secret not in sent
