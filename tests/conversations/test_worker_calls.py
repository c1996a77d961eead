"""Voice calls through the worker against the simulator: stored once, final lines only."""

import pytest

from conversations.models import Call, CallUtterance
from pinecall_sdk.simulator import Simulator
from tests.conversations.test_worker import db, eventually, start_worker  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)

NUMBER = "+14155550100"


@pytest.fixture
async def sim():
    async with Simulator(port=0, ai_delay=0, status_delay=0, voice_pace=0) as simulator:
        yield simulator


@pytest.fixture
def phone_settings(settings):
    settings.PINECALL_PHONE_NUMBERS = [NUMBER]


@pytest.fixture
async def worker(phone_settings, start_worker):
    bridge = await start_worker()
    yield bridge
    await bridge.stop()


def lines_of(call_id):
    return list(
        CallUtterance.objects.filter(call__call_id=call_id).values_list("speaker", "text", "interrupted")
    )


def ended(call_id):
    return Call.objects.filter(call_id=call_id, state="ended").first()


async def test_a_call_is_stored_once_with_its_final_lines(sim, worker):
    await sim.wait_for("channel.add", type="phone")
    call_id = await sim.place_call(
        to=NUMBER, from_="+14155550123", script=["Where is my order?", "Thanks", {"hangup": True}]
    )
    call = await eventually(lambda: ended(call_id))
    assert (call.from_number, call.to_number, call.end_reason) == ("+14155550123", NUMBER, "hangup")
    assert call.duration_seconds is not None
    lines = await db(lines_of)(call_id)
    caller = [text for speaker, text, _ in lines if speaker == "caller"]
    assert caller == ["Where is my order?", "Thanks"]
    ai = [text for speaker, text, _ in lines if speaker == "ai"]
    assert ai and all(ai)  # whole lines, not words
    confirmed = [f for f in sim.sent if f.get("event") == "message.confirmed" and f.get("call_id") == call_id]
    assert len(ai) == len({f["message_id"] for f in confirmed})
    assert await db(Call.objects.count)() == 1


async def test_a_caller_asking_for_a_person_needs_a_human(sim, worker):
    await sim.wait_for("channel.add", type="phone")
    call_id = await sim.place_call(to=NUMBER, script=["I want to speak to a person"])
    await eventually(
        lambda: Call.objects.filter(call_id=call_id, needs_human_since__isnull=False).exists()
    )


async def test_calls_across_a_reconnect_are_stored_once(sim, worker):
    await sim.wait_for("channel.add", type="phone")
    first = await sim.place_call(to=NUMBER, script=["Hello there"])
    await eventually(lambda: ("caller", "Hello there", False) in lines_of(first))
    await eventually(lambda: any(s == "ai" for s, _, _ in lines_of(first)))
    await sim.drop_connections()
    # The server sends no call.ended for calls it cut: the client ends them itself.
    call = await eventually(lambda: ended(first))
    assert call.end_reason == "connection_lost"
    # Back: the number is added again on the new connection.
    await eventually(lambda: NUMBER in sim.phone_numbers())
    second = await sim.place_call(to=NUMBER, script=["Second call", {"hangup": True}])
    await eventually(lambda: ended(second))
    assert await db(Call.objects.count)() == 2
    assert [t for s, t, _ in await db(lines_of)(first) if s == "caller"] == ["Hello there"]
    assert [t for s, t, _ in await db(lines_of)(second) if s == "caller"] == ["Second call"]


async def test_captions_are_forwarded_live_and_never_stored(sim, worker, monkeypatch):
    from conversations import notify

    captions = []
    monkeypatch.setattr(notify, "call_caption", lambda call_id, kind, **f: captions.append((call_id, kind, f)))
    await sim.wait_for("channel.add", type="phone")
    call_id = await sim.place_call(to=NUMBER, script=["Where is my order please", {"hangup": True}])
    await eventually(lambda: ended(call_id))
    kinds = [kind for cid, kind, _ in captions if cid == call_id]
    assert "user.speaking" in kinds and "bot.speaking" in kinds and "bot.word" in kinds
    words = [f["word"] for _, kind, f in captions if kind == "bot.word"]
    lines = await db(lines_of)(call_id)
    assert len(lines) < len(words)  # whole lines stored, not words
    assert not any(text in words for _, text, _ in lines if " " in text)


# ---------------------------------------------------------------- stepping in


async def live_call(sim, script=("Hello",)):
    await sim.wait_for("channel.add", type="phone")
    call_id = await sim.place_call(to=NUMBER, script=list(script))
    call = await eventually(lambda: Call.objects.filter(call_id=call_id).first())
    await eventually(lambda: any(s == "ai" for s, _, _ in lines_of(call_id)))
    return call


async def test_a_typed_line_is_said_and_stored_as_the_supervisors(sim, worker, operator):
    from conversations import services
    from conversations.models import Command

    call = await live_call(sim)
    command = await db(services.call_say)(call=call, operator=operator, text="A person is here to help.")
    frame = await sim.wait_for("bot.reply", call_id=call.call_id)
    assert frame["text"] == "A person is here to help." and frame["message_id"] == command.line_id
    await eventually(lambda: Command.objects.get(pk=command.pk).status == "confirmed")
    await eventually(
        lambda: CallUtterance.objects.filter(
            call=call, speaker="supervisor", text="A person is here to help."
        ).exists()
    )
    assert await db(CallUtterance.objects.filter(message_id=command.line_id).count)() == 1


async def test_hang_up_ends_the_call(sim, worker, supervisor):
    from conversations import services
    from conversations.models import Command

    call = await live_call(sim)
    command = await db(services.call_supervise)(call=call, operator=supervisor, kind="hangup")
    await eventually(lambda: Command.objects.get(pk=command.pk).status == "confirmed")
    done = await eventually(lambda: ended(call.call_id))
    assert done.end_reason == "client_hangup"


async def test_forward_leaves_pinecall_for_the_number(sim, worker, supervisor):
    from conversations import services
    from conversations.models import Command

    call = await live_call(sim)
    command = await db(services.call_forward)(call=call, operator=supervisor, to="+34600000000")
    await sim.wait_for("call.forward", call_id=call.call_id)
    await eventually(lambda: Command.objects.get(pk=command.pk).status == "confirmed")
    done = await eventually(lambda: ended(call.call_id))
    assert (done.forwarded_to, done.end_reason) == ("+34600000000", "forwarded")


async def test_hold_and_mute_as_documented_and_what_the_caller_said_while_muted(sim, worker, supervisor):
    from conversations import services
    from conversations.models import Command

    call = await live_call(sim)
    hold = await db(services.call_supervise)(call=call, operator=supervisor, kind="hold")
    assert await sim.wait_for("call.hold", call_id=call.call_id) == {"event": "call.hold", "call_id": call.call_id}
    await eventually(lambda: Command.objects.get(pk=hold.pk).status == "confirmed")
    await eventually(lambda: Call.objects.get(pk=call.pk).on_hold)
    await db(services.call_supervise)(call=call, operator=supervisor, kind="unhold")
    await sim.wait_for("call.unhold", call_id=call.call_id)
    await eventually(lambda: not Call.objects.get(pk=call.pk).on_hold)

    mute = await db(services.call_supervise)(call=call, operator=supervisor, kind="mute")
    assert await sim.wait_for("call.mute", call_id=call.call_id) == {"event": "call.mute", "call_id": call.call_id}
    await eventually(lambda: Command.objects.get(pk=mute.pk).status == "confirmed")
    assert (await db(Call.objects.get)(pk=call.pk)).caller_muted
    await sim.caller_says(call.call_id, "This is between us")
    await db(services.call_supervise)(call=call, operator=supervisor, kind="unmute")
    await sim.wait_for("call.unmute", call_id=call.call_id)
    await eventually(lambda: not Call.objects.get(pk=call.pk).caller_muted)
    heard = await eventually(
        lambda: CallUtterance.objects.filter(call=call, while_muted=True).first()
    )
    assert (heard.speaker, heard.text) == ("caller", "This is between us")
    # Not a line the AI heard: never also stored as an ordinary caller line.
    assert not await db(CallUtterance.objects.filter(call=call, while_muted=False, text="This is between us").exists)()


async def test_stop_speaking_cancels_the_line_being_said(sim, worker, supervisor):
    from conversations import services
    from conversations.models import Command

    sim.voice_pace = 0.2  # the AI speaks at speech pace: there is a line to stop
    await sim.wait_for("channel.add", type="phone")
    call_id = await sim.place_call(to=NUMBER, script=["Tell me everything about my order please"])
    await sim.wait_sent("bot.word", call_id=call_id)
    call = await eventually(lambda: Call.objects.filter(call_id=call_id).first())
    command = await db(services.call_supervise)(call=call, operator=supervisor, kind="stop")
    assert await sim.wait_for("bot.cancel", call_id=call_id) == {"event": "bot.cancel", "call_id": call_id}
    await eventually(lambda: Command.objects.get(pk=command.pk).status == "confirmed")
    await eventually(lambda: CallUtterance.objects.filter(call=call, speaker="ai", interrupted=True).exists())


async def test_forward_to_my_phone_uses_the_operators_number(sim, worker, operator):
    from conversations import services

    call = await live_call(sim)
    await db(services.operator_phone_set)(user=operator, phone="+34 600 000 111")
    await db(services.call_forward_to_me)(call=call, operator=operator)
    frame = await sim.wait_for("call.forward", call_id=call.call_id)
    assert frame["to"] == "+34600000111"
    done = await eventually(lambda: ended(call.call_id))
    assert (done.forwarded_to, done.end_reason) == ("+34600000111", "forwarded")
