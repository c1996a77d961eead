"""The client's voice part against the simulator, over real sockets: phone numbers,
supervisor commands (frames exactly as documented, confirmations matched), call ends."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pinecall_sdk import (
    BotInterruptedEvent,
    CallEndedEvent,
    CallForwardedEvent,
    CallHeldEvent,
    CallMutedEvent,
    CallRejectedEvent,
    CallStartedEvent,
    CallUnheldEvent,
    ErrorEvent,
    MessageAbortedEvent,
    PinecallError,
    PinecallInvalidArgument,
    PinecallTimeout,
)

from .conftest import PC_CALLER, PC_NUMBER, PcRawServer, PcRecorder, pc_eventually

FORWARD_TO = "+15551234567"


def frames(sim, event: str, after: int = 0, **match: Any) -> list[dict[str, Any]]:
    return [f for f in sim.received[after:]
            if f.get("event") == event and all(f.get(k) == v for k, v in match.items())]


async def live_call(sim, recorder: PcRecorder, script: list | tuple = ()) -> str:
    """A call to PC_NUMBER whose caller stays on the line, silent (after ``script``)."""
    call_id = await sim.place_call(to=PC_NUMBER, from_=PC_CALLER, script=list(script))
    await recorder.wait_for("call.started", lambda e: e.call_id == call_id)
    return call_id


def of_line(recorder: PcRecorder, message_id: str) -> list[str]:
    return [e.event for e in recorder.events if getattr(e, "message_id", None) == message_id]


# --- phone numbers ----------------------------------------------------------------------------


async def test_phones_go_after_whatsapp_and_again_after_every_registration(pc_voice_sim, pc_make):
    sim = pc_voice_sim
    pc = pc_make(sim.url)
    support = pc.agent("support", llm="openai/gpt-4.1-mini")
    support.add_whatsapp(phone_number_id="123", access_token="EAA-token")
    support.add_phone(PC_NUMBER, ringing=True, language="es", stt="deepgram:nova-3:es")
    support.add_phone("sip:support@pbx.example.com", voice="elevenlabs/sarah", config={"a": 1})
    recorder = PcRecorder()
    support.on("channel.added", recorder)
    await pc.connect()
    await support.wait_registered(timeout=3)
    await recorder.wait_for("channel.added", count=3)
    expected = [
        {"event": "channel.add", "agent_id": "support", "type": "whatsapp", "ref": "123",
         "accessToken": "EAA-token"},
        {"event": "channel.add", "agent_id": "support", "type": "phone", "ref": PC_NUMBER,
         "language": "es", "stt": {"provider": "deepgram", "model": "nova-3", "language": "es"},
         "ringing": True},
        {"event": "channel.add", "agent_id": "support", "type": "phone",
         "ref": "sip:support@pbx.example.com", "voice": "elevenlabs/sarah", "config": {"a": 1}},
    ]
    assert frames(sim, "channel.add") == expected
    assert [(e.type, e.ref) for e in recorder.events] == [
        ("whatsapp", "123"), ("phone", PC_NUMBER), ("phone", "sip:support@pbx.example.com")]
    await pc_eventually(lambda: all(p.status == "added" for p in support.phones.values()))
    assert sim.phone_numbers() == {PC_NUMBER: "support", "sip:support@pbx.example.com": "support"}

    mark = len(sim.received)
    await sim.drop_connections()
    await recorder.wait_for("channel.added", count=6)
    assert frames(sim, "channel.add", after=mark) == expected  # again, in the same order
    assert frames(sim, "agent.create", after=mark)  # after the re-registration


async def test_a_phone_added_while_registered_is_sent_at_once(pc_voice, pc_voice_sim):
    _, support, recorder = pc_voice
    support.add_phone("+34910000000")
    added = await recorder.wait_for("channel.added", lambda e: e.ref == "+34910000000")
    assert (added.agent_id, added.type) == ("support", "phone")
    assert list(support.phones) == [PC_NUMBER, "+34910000000"]
    assert support.phones[PC_NUMBER].status == "added"


async def test_phone_in_use_is_a_clear_error_of_the_agent_and_the_number_is_not_readded(
    pc_voice, pc_voice_sim, pc_make
):
    sim = pc_voice_sim
    other = pc_make(sim.url)
    sales = other.agent("sales", llm="openai/gpt-4.1-mini")
    sales.add_phone(PC_NUMBER)  # held by "support" on the other connection
    errors = PcRecorder()
    sales.on("error", errors)
    other.on("error", errors)  # the client's "error" handlers hear it too
    await other.connect()
    await sales.wait_registered(timeout=3)
    error = await errors.wait_for("error")
    assert isinstance(error, ErrorEvent) and error.code == "PHONE_IN_USE" and error.phone == PC_NUMBER
    assert error.agent_id == "sales" and not error.fatal
    assert PC_NUMBER in error.message and "another agent" in error.message
    assert error.raw["code"] == "PHONE_IN_USE"
    phone = sales.phones[PC_NUMBER]
    assert phone.status == "refused" and isinstance(phone.error, PinecallError)
    assert await errors.wait_for("error", count=2) is errors.events[1]  # agent's, then client's
    assert sim.phone_numbers() == {PC_NUMBER: "support"}

    mark = len(sim.received)
    await sim.drop_connections(agent_id="sales")
    await sales.wait_registered(timeout=3)
    await sim.wait_for("agent.create", after=mark, agent_id="sales")
    assert sales.phones[PC_NUMBER].status == "refused"
    # The witness that nothing else was sent: a command sent later and answered.
    calls = await sim.place_call(to=PC_NUMBER, script=[])
    with pytest.raises(PinecallError) as info:
        await sales.call_hold(calls)
    assert info.value.code == "CALL_NOT_FOUND"  # another connection's call
    assert frames(sim, "channel.add", after=mark) == []


@pytest.mark.parametrize("ref, options", [
    ("13186330963", {}), ("+1 318 633 0963", {}), ("+12", {}), ("sip:", {}), (None, {}),
    (PC_NUMBER, {"ringing": "yes"}), (PC_NUMBER, {"language": ""}), (PC_NUMBER, {"config": "x"}),
    (PC_NUMBER, {"voice": 3}),
])
async def test_add_phone_checks_its_arguments(pc_make, ref, options):
    support = pc_make("ws://127.0.0.1:9").agent("support")
    with pytest.raises(PinecallInvalidArgument):
        support.add_phone(ref, **options)
    assert support.phones == {}


# --- supervisor commands --------------------------------------------------------------------


COMMANDS = [
    # method, arguments, the frame's other keys, its answer, the class returned
    ("call_hold", (), {}, "call.held", CallHeldEvent),
    ("call_unhold", (), {}, "call.unheld", CallUnheldEvent),
    ("call_mute", (), {}, "call.muted", CallMutedEvent),
    ("call_forward", (FORWARD_TO,), {"to": FORWARD_TO, "message": "", "announce": False},
     "call.forwarded", CallForwardedEvent),
    ("call_hangup", (), {}, "call.ended", CallEndedEvent),
]


@pytest.mark.parametrize("method, args, keys, answer, cls", COMMANDS, ids=[c[0] for c in COMMANDS])
async def test_call_commands_send_the_documented_frame_and_return_its_confirmation(
    pc_voice, pc_voice_sim, method, args, keys, answer, cls
):
    _, support, recorder = pc_voice
    call_id = await live_call(pc_voice_sim, recorder)
    mark = len(pc_voice_sim.received)
    result = await getattr(support, method)(call_id, *args)
    kind = {"call_hold": "call.hold", "call_unhold": "call.unhold", "call_mute": "call.mute",
            "call_forward": "call.forward", "call_hangup": "call.hangup"}[method]
    assert pc_voice_sim.received[mark:] == [{"event": kind, "call_id": call_id, **keys}]  # no agent_id
    assert type(result) is cls and result.event == answer and result.call_id == call_id
    assert result.agent_id == "support"


async def test_unmute_returns_what_the_caller_said_meanwhile(pc_voice, pc_voice_sim):
    sim = pc_voice_sim
    _, support, recorder = pc_voice
    call_id = await live_call(sim, recorder)
    await support.call_mute(call_id)
    assert await support.call_unmute(call_id) is None  # nothing said
    assert frames(sim, "call.unmute")[-1] == {"event": "call.unmute", "call_id": call_id}
    await support.call_mute(call_id)
    await sim.caller_says(call_id, "is anybody there")
    await sim.caller_says(call_id, "hello?")
    assert await support.call_unmute(call_id) == "is anybody there hello?"
    assert recorder.of("user.message") == []  # nobody heard it while muted


async def test_confirmations_are_matched_by_call(pc_voice, pc_voice_sim):
    _, support, recorder = pc_voice
    first = await live_call(pc_voice_sim, recorder)
    second = await live_call(pc_voice_sim, recorder)
    held = await asyncio.gather(support.call_hold(second), support.call_hold(first),
                                support.call_mute(second))
    assert [e.call_id for e in held] == [second, first, second]


async def test_call_say_speaks_the_line_and_puts_it_in_the_history(pc_voice, pc_voice_sim):
    sim = pc_voice_sim
    _, support, recorder = pc_voice
    call_id = await live_call(sim, recorder)
    mark = len(sim.received)
    text = "A colleague will call you back today."
    assert await support.call_say(call_id, text, message_id="msg_sup_1") == "msg_sup_1"
    assert sim.received[mark:] == [{"event": "bot.reply", "call_id": call_id, "message_id": "msg_sup_1",
                                    "text": text, "in_reply_to": "", "add_to_history": True}]
    speaking = recorder.of("bot.speaking")[-1]
    assert (speaking.message_id, speaking.text) == ("msg_sup_1", text)  # returned on bot.speaking
    await recorder.wait_for("bot.finished", lambda e: e.message_id == "msg_sup_1")
    words = len(text.split())
    assert of_line(recorder, "msg_sup_1") == ["bot.speaking", *["bot.word"] * words,
                                             "message.confirmed", "bot.finished"]
    assert [e.word for e in recorder.of("bot.word")] == text.split()
    assert sim.calls[call_id].transcript() == [{"role": "assistant", "content": text}]


async def test_call_say_without_history_and_with_a_fresh_message_id(pc_voice, pc_voice_sim):
    sim = pc_voice_sim
    _, support, recorder = pc_voice
    call_id = await live_call(sim, recorder)
    message_id = await support.call_say(call_id, "Just a moment, please.", add_to_history=False)
    assert message_id.startswith("msg_") and len(message_id) > 8
    assert frames(sim, "bot.reply")[-1] == {"event": "bot.reply", "call_id": call_id,
                                            "message_id": message_id, "text": "Just a moment, please.",
                                            "in_reply_to": ""}
    await recorder.wait_for("bot.finished", lambda e: e.message_id == message_id)
    assert sim.calls[call_id].transcript() == []


async def test_cancel_speech_stops_the_line_being_said(pc_voice, pc_voice_sim):
    sim = pc_voice_sim
    _, support, recorder = pc_voice
    call_id = await live_call(sim, recorder)
    sim.voice_pace = 30.0  # a line lasts long enough to be cut whatever the machine's speed
    message_id = await support.call_say(call_id, "Let me read you the whole terms and conditions")
    mark = len(sim.received)
    stopped = await support.call_cancel_speech(call_id)
    assert sim.received[mark:] == [{"event": "bot.cancel", "call_id": call_id}]
    assert isinstance(stopped, BotInterruptedEvent)
    assert (stopped.message_id, stopped.reason, stopped.words_spoken) == (message_id, "cancelled", 0)
    assert of_line(recorder, message_id) == ["bot.speaking", "bot.interrupted"]


async def test_cancel_speech_of_one_line_drops_a_line_still_waiting(pc_voice, pc_voice_sim):
    sim = pc_voice_sim
    _, support, recorder = pc_voice
    call_id = await live_call(sim, recorder)
    sim.voice_pace = 30.0
    await support.call_say(call_id, "First line, slowly spoken", message_id="msg_1")
    waiting = asyncio.create_task(support.call_say(call_id, "Second line", message_id="msg_2"))
    await sim.wait_for("bot.reply", message_id="msg_2")
    mark = len(sim.received)
    dropped = await support.call_cancel_speech(call_id, "msg_2")
    assert sim.received[mark:] == [{"event": "bot.cancel", "call_id": call_id, "message_id": "msg_2"}]
    assert isinstance(dropped, MessageAbortedEvent) and dropped.message_id == "msg_2"
    with pytest.raises(PinecallError) as info:
        await waiting
    assert info.value.code == "MESSAGE_ABORTED"
    assert support._runtime.core.is_speaking(call_id, "msg_1") is True  # the first goes on


async def test_cancel_speech_with_nothing_said_sends_nothing(pc_voice, pc_voice_sim):
    sim = pc_voice_sim
    _, support, recorder = pc_voice
    call_id = await live_call(sim, recorder)
    message_id = await support.call_say(call_id, "Short line.")
    await recorder.wait_for("bot.finished", lambda e: e.message_id == message_id)
    assert await support.call_cancel_speech(call_id) is None
    assert await support.call_cancel_speech(call_id, message_id) is None
    await support.call_hold(call_id)  # the witness: sent and answered after the cancels
    assert frames(sim, "bot.cancel") == []


async def test_a_forward_ends_the_call(pc_voice, pc_voice_sim):
    sim = pc_voice_sim
    _, support, recorder = pc_voice
    call_id = await live_call(sim, recorder, ["Can I talk to a real person?"])
    await recorder.wait_for("bot.finished")
    forwarded = await support.call_forward(call_id, FORWARD_TO)
    assert forwarded.to == FORWARD_TO
    ended = await recorder.wait_for("call.ended", lambda e: e.call_id == call_id)
    assert ended.reason == "forwarded" and not ended.local
    assert [e.event for e in recorder.events if e.event.startswith("call.")][-2:] == [
        "call.forwarded", "call.ended"]
    assert sim.calls[call_id].ended and sim.calls[call_id].forwarded_to == FORWARD_TO
    assert call_id not in support.live_calls
    with pytest.raises(PinecallError) as info:
        await support.call_say(call_id, "Are you still there?")
    assert info.value.code == "CALL_NOT_FOUND" and call_id in str(info.value)


async def test_hangup_returns_the_call_ended(pc_voice, pc_voice_sim):
    _, support, recorder = pc_voice
    call_id = await live_call(pc_voice_sim, recorder)
    assert support.live_calls == {call_id}
    ended = await support.call_hangup(call_id)
    assert ended.reason == "client_hangup" and ended.call_id == call_id
    assert isinstance(ended.duration_seconds, float) and ended.ended_at >= ended.started_at
    assert support.live_calls == frozenset()


async def test_an_unknown_call_is_a_clear_error(pc_voice, pc_voice_sim):
    _, support, _ = pc_voice
    mark = len(pc_voice_sim.received)
    with pytest.raises(PinecallError) as info:
        await support.call_hold("CA_no_such_call")
    assert pc_voice_sim.received[mark:] == [{"event": "call.hold", "call_id": "CA_no_such_call"}]
    assert info.value.code == "CALL_NOT_FOUND"
    assert "call.hold for call 'CA_no_such_call'" in str(info.value)
    assert info.value.frame["call_id"] == "CA_no_such_call"


async def test_a_command_waiting_when_the_call_ends_fails_with_call_ended(pc_voice, pc_voice_sim):
    sim = pc_voice_sim
    _, support, recorder = pc_voice
    call_id = await live_call(sim, recorder)
    sim.voice_pace = 30.0
    await support.call_say(call_id, "A long line the caller will not wait for")
    waiting = asyncio.create_task(support.call_say(call_id, "Never said", message_id="msg_late"))
    await sim.wait_for("bot.reply", message_id="msg_late")
    await sim.end_call(call_id)
    with pytest.raises(PinecallError) as info:
        await waiting
    assert info.value.code == "CALL_ENDED" and "hangup" in str(info.value)


async def test_ringing_calls_are_accepted_or_rejected(pc_voice_sim, pc_make):
    sim = pc_voice_sim
    pc = pc_make(sim.url)
    support = pc.agent("support", llm="openai/gpt-4.1-mini")
    support.add_phone(PC_NUMBER, ringing=True)
    recorder = PcRecorder()
    support.on("*", recorder)
    await pc.connect()
    await recorder.wait_for("channel.added")

    call_id = await sim.place_call(to=PC_NUMBER, script=[])
    ringing = await recorder.wait_for("call.ringing")
    assert (ringing.call_id, ringing.from_, ringing.to, ringing.direction) == (
        call_id, "+14155550123", PC_NUMBER, "inbound")
    started = await support.call_accept(call_id)
    assert isinstance(started, CallStartedEvent) and started.call_id == call_id
    assert frames(sim, "call.accept") == [{"event": "call.accept", "agent_id": "support", "call_id": call_id}]

    call_id = await sim.place_call(to=PC_NUMBER, script=[])
    await recorder.wait_for("call.ringing", lambda e: e.call_id == call_id)
    rejected = await support.call_reject(call_id, "busy")
    assert isinstance(rejected, CallRejectedEvent) and rejected.reason == "busy"
    assert frames(sim, "call.reject") == [{"event": "call.reject", "agent_id": "support",
                                           "call_id": call_id, "reason": "busy"}]
    ended = await recorder.wait_for("call.ended", lambda e: e.call_id == call_id)
    assert (ended.reason, ended.from_, ended.to, ended.direction) == ("busy", PC_CALLER, PC_NUMBER, "inbound")


async def test_a_lost_connection_ends_the_live_calls_locally(pc_voice, pc_voice_sim):
    sim = pc_voice_sim
    _, support, recorder = pc_voice
    call_id = await live_call(sim, recorder)
    await sim.drop_connections()
    ended = await recorder.wait_for("call.ended", lambda e: e.call_id == call_id)
    assert ended.local and ended.reason == "connection_lost" and ended.agent_id == "support"
    assert sim.calls[call_id].end_reason == "agent_disconnected"
    await support.wait_registered(timeout=3)
    await recorder.wait_for("channel.added", count=2)  # the number is taken again
    assert [f for f in sim.sent if f.get("event") == "call.ended"] == []  # the server sent none


async def test_voice_events_reach_the_agents_star_handlers_in_order(pc_voice, pc_voice_sim):
    sim = pc_voice_sim
    _, support, recorder = pc_voice
    call_id = await sim.place_call(to=PC_NUMBER, script=["Hello", {"hangup": True}])
    await recorder.wait_for("call.ended")
    names = [e.event for e in recorder.events if getattr(e, "call_id", None) == call_id]
    assert names[0] == "call.started" and names[-1] == "call.ended"
    assert names.index("user.message") < names.index("turn.end") < names.index("bot.speaking")


@pytest.mark.parametrize("call", [
    lambda a: a.call_say("", "hi"),
    lambda a: a.call_say("CA1", "  "),
    lambda a: a.call_say("CA1", "hi", message_id=""),
    lambda a: a.call_say("CA1", "hi", add_to_history="yes"),
    lambda a: a.call_say("CA1", "hi", timeout=0),
    lambda a: a.call_forward("CA1", "5551234"),
    lambda a: a.call_hold(None),
    lambda a: a.call_cancel_speech("CA1", message_id=5),
    lambda a: a.call_reject("CA1", "later"),
])
async def test_call_commands_check_their_arguments(pc_make, call):
    support = pc_make("ws://127.0.0.1:9").agent("support")
    with pytest.raises(PinecallInvalidArgument):
        await call(support)


async def test_an_unanswered_call_command_times_out(pc_make):
    async with PcRawServer() as server:  # connects and registers, never answers commands
        pc = pc_make(server.url)
        support = pc.agent("support")
        await pc.connect()
        await support.wait_registered(timeout=3)
        with pytest.raises(PinecallTimeout) as info:
            await support.call_hold("CA1", timeout=0.2)
        assert info.value.code == "TIMEOUT" and "call.hold for call 'CA1'" in str(info.value)
        assert server.frames("call.hold") == [{"event": "call.hold", "call_id": "CA1"}]
