"""The simulator's phone calls, over real sockets with raw websockets clients.

Frames are checked against the voice document's tables: every frame a call produces
carries exactly the documented keys (plus ``agent_id``, ``call_id``, ``session_id``,
``seq`` and ``ts``, as in the captures), in the documented order.
"""

from __future__ import annotations

import re
from typing import Any

import asyncio

import pytest
from websockets.asyncio.client import connect

from pinecall_sdk.simulator import Simulator, parse_script

from .conftest import pc_eventually
from .test_simulator import Client

NUMBER = "+13186330963"
CALLER = "+14155550123"
CALL_ID_RE = re.compile(r"^CA[0-9a-f]{32}$")
COMMON = {"event", "agent_id", "call_id", "session_id", "seq", "ts"}

#: The documented keys of each event the simulator sends (besides COMMON).
VOICE_KEYS: dict[str, set[str]] = {
    "call.ringing": {"from", "to", "direction"},
    "call.rejected": {"reason"},
    "call.started": {"from", "to", "direction", "metadata", "language", "transport"},
    "speech.started": {"turn_id", "confidence", "timestamp"},
    "user.speaking": {"text", "confidence", "turn_id", "confirmed_text"},
    "user.speaking.first": {"text", "confidence", "turn_id"},
    "speech.ended": {"turn_id", "duration_ms", "timestamp"},
    "user.message": {"message_id", "text", "confidence", "turn_id", "language", "lag_ms", "phone_number"},
    "turn.end": {"turn_id", "probability", "latency_ms", "text", "message_id"},
    "llm.tool_call": {"msg_id", "tool_calls"},
    "bot.speaking": {"message_id", "text"},
    "bot.word": {"message_id", "word", "word_index", "start_time", "end_time"},
    "message.confirmed": {"message_id", "text"},
    "bot.finished": {"message_id", "duration_ms"},
    "bot.interrupted": {"message_id", "played_ms", "words_spoken", "last_word", "reason"},
    "barge_in": {"cancelled_message_id"},
    "reply.rejected": {"message_id", "in_reply_to", "expected_reply_to", "reason"},
    "message.aborted": {"message_id", "reason"},
    "session.idle_warning": {"remaining_seconds", "idle_timeout_seconds"},
    "session.timeout": {"reason"},
    "call.forwarded": {"to"},
    "call.held": set(),
    "call.unheld": set(),
    "call.muted": set(),
    "call.unmuted": {"muted_transcript"},
    "call.ended": {"reason", "duration_seconds", "started_at", "ended_at", "messages"},
    "call.ended.never_connected": {"reason", "duration_seconds", "started_at", "ended_at", "messages",
                                   "direction", "from", "to"},
}


async def open_ws(sim: Simulator) -> Client:
    # An unbounded queue: a test that stops reading mid-call must still close at once
    # (with a full queue, websockets would not read the server's close frame).
    return Client(await connect(sim.url + "/client", compression=None, max_queue=None))


def assert_keys(frame: dict[str, Any], kind: str | None = None) -> None:
    kind = kind or frame["event"]
    if kind == "user.speaking" and "confirmed_text" not in frame:
        kind = "user.speaking.first"
    assert set(frame) == COMMON | VOICE_KEYS[kind], (kind, frame)


async def phone_client(sim: Simulator, agent_id: str = "support", number: str = NUMBER,
                       llm: bool = True, **channel: Any) -> Client:
    """Connect, register ``agent_id`` (with an LLM unless told) and add ``number``."""
    client = await open_ws(sim)
    assert await client.command({"event": "connect", "api_key": "key"}) == {"event": "connected"}
    create = {"event": "agent.create", "agent_id": agent_id, "language": "en"}
    if llm:
        create["llm"] = "openai/gpt-4.1-mini"
    assert (await client.command(create))["event"] == "agent.created"
    reply = await client.command({"event": "channel.add", "agent_id": agent_id, "type": "phone",
                                  "ref": number, **channel})
    assert reply == {"event": "channel.added", "agent_id": agent_id, "type": "phone", "ref": number}
    return client


async def read_call(client: Client, call_id: str, until: str = "call.ended", **match: Any) -> list[dict]:
    """Frames of the call, up to and including the first ``until`` (with ``match``)."""
    out = []
    while True:
        frame = await client.recv()
        if frame.get("call_id") != call_id:
            continue
        out.append(frame)
        if frame["event"] == until and all(frame.get(k) == v for k, v in match.items()):
            return out


def names(frames: list[dict]) -> list[str]:
    return [f["event"] for f in frames]


def collapse(events: list[str]) -> list[str]:
    """Runs of the same event as one ("bot.word" x 12 -> "bot.word+")."""
    out: list[str] = []
    for name in events:
        if out and out[-1].rstrip("+") == name:
            out[-1] = name + "+"
        else:
            out.append(name)
    return out


@pytest.fixture
async def sim():
    async with Simulator(voice_pace=0.0) as sim:
        yield sim


@pytest.fixture
async def client(sim):
    client = await phone_client(sim)
    yield client
    await client.close()


# --------------------------------------------------------------------------- a whole call


async def test_a_call_follows_the_documented_order_of_events(sim, client):
    call_id = await sim.place_call(to=NUMBER, from_=CALLER,
                                   script=["Where is my order 48213?", {"hangup": True}])
    assert CALL_ID_RE.match(call_id) and sim.calls[call_id].to == NUMBER
    frames = await read_call(client, call_id)
    assert collapse(names(frames)) == [
        "call.started", "speech.started", "user.speaking+", "speech.ended", "user.message", "turn.end",
        "llm.tool_call", "bot.speaking", "bot.word+", "message.confirmed", "bot.finished", "call.ended",
    ]
    for frame in frames:
        assert_keys(frame)
        assert (frame["agent_id"], frame["call_id"], frame["session_id"]) == ("support", call_id, call_id)
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    started, ended = frames[0], frames[-1]
    assert (started["from"], started["to"], started["direction"], started["transport"]) == (
        CALLER, NUMBER, "inbound", "phone")
    tool = next(f for f in frames if f["event"] == "llm.tool_call")
    assert tool["tool_calls"] == [{"id": tool["tool_calls"][0]["id"], "name": "lookup_order",
                                   "arguments": {"order_id": "48213"}}]
    speaking = next(f for f in frames if f["event"] == "bot.speaking")
    assert speaking["text"] == "" and speaking["message_id"] == tool["msg_id"]  # a server-LLM line
    confirmed = next(f for f in frames if f["event"] == "message.confirmed")
    assert "48213" in confirmed["text"]
    assert ended["reason"] == "hangup" and isinstance(ended["duration_seconds"], float)
    assert isinstance(ended["started_at"], float) and ended["ended_at"] >= ended["started_at"]
    assert ended["messages"] == [{"role": "user", "content": "Where is my order 48213?"},
                                 {"role": "assistant", "content": confirmed["text"]}]
    assert sim.calls[call_id].state == "ended" and sim.calls[call_id].end_reason == "hangup"


async def test_interim_drafts_grow_word_by_word_then_the_final_text(sim, client):
    text = "I would like to change my delivery address"
    call_id = await sim.place_call(to=NUMBER, script=[text, {"hangup": True}])
    frames = await read_call(client, call_id, "turn.end")
    drafts = [f for f in frames if f["event"] == "user.speaking"]
    words = text.split()
    assert [d["text"] for d in drafts] == [" ".join(words[:n]) for n in range(1, len(words) + 1)]
    assert [d.get("confirmed_text") for d in drafts] == [None] + [d["text"] for d in drafts[:-1]]
    assert all("message_id" not in d for d in drafts)  # as captured: the final carries the id
    final = next(f for f in frames if f["event"] == "user.message")
    assert final["text"] == text and final["phone_number"] == CALLER
    assert names(frames).index("user.message") > names(frames).index("speech.ended") > \
        names(frames).index(drafts[-1]["event"])
    turn_end = frames[-1]
    assert (turn_end["message_id"], turn_end["text"], turn_end["turn_id"]) == (
        final["message_id"], text, final["turn_id"])
    assert {d["turn_id"] for d in drafts} == {final["turn_id"]}


async def test_words_come_one_by_one_at_the_speech_pace():
    # A small pace, so the words are really spread in time; only their order is asserted.
    async with Simulator(voice_pace=0.002) as sim:
        client = await phone_client(sim)
        call_id = await sim.place_call(to=NUMBER, script=["Hi there", {"hangup": True}])
        frames = await read_call(client, call_id)
        start = names(frames).index("bot.speaking")
        end = names(frames).index("bot.finished")
        line = frames[start:end + 1]
        assert collapse(names(line)) == ["bot.speaking", "bot.word+", "message.confirmed", "bot.finished"]
        words = [f for f in line if f["event"] == "bot.word"]
        assert [w["word_index"] for w in words] == list(range(len(words)))
        assert " ".join(w["word"] for w in words) == line[-2]["text"]
        assert [w["start_time"] for w in words] == sorted(w["start_time"] for w in words)
        assert all(w["end_time"] > w["start_time"] for w in words)
        assert line[-1]["duration_ms"] == 300 * len(words)
        await client.close()


async def test_a_caller_who_talks_over_the_bot(sim, client):
    call_id = await sim.place_call(to=NUMBER, script=[
        "Where is my order 48213?",
        {"say": "Sorry, the other one", "barge_in": 3},
        {"hangup": True},
    ])
    frames = await read_call(client, call_id)
    first = next(f for f in frames if f["event"] == "bot.speaking")["message_id"]
    events = names(frames)
    cut = events.index("barge_in")
    assert events[cut - 1] == "speech.started" and events[cut + 1] == "bot.interrupted"
    assert frames[cut]["cancelled_message_id"] == first
    interrupted = frames[cut + 1]
    assert_keys(interrupted)
    assert (interrupted["message_id"], interrupted["words_spoken"], interrupted["played_ms"],
            interrupted["reason"]) == (first, 3, 900, "user_spoke")
    words = [f["word"] for f in frames if f["event"] == "bot.word" and f["message_id"] == first]
    assert len(words) == 3 and interrupted["last_word"] == words[-1]
    assert not [f for f in frames[cut:] if f.get("message_id") == first and f["event"] != "bot.interrupted"]
    # The caller's line goes on, and the AI answers it.
    assert collapse(events[cut + 2:]) [:4] == ["user.speaking+", "speech.ended", "user.message", "turn.end"]
    assert frames[-1]["messages"][1] == {"role": "assistant", "content": " ".join(words)}


async def test_a_caller_who_asks_for_a_person_then_waits_silent_until_idle():
    async with Simulator(voice_pace=0.0, call_idle_timeout=0.2) as sim:
        client = await phone_client(sim)
        call_id = await sim.place_call(to=NUMBER, script=["Can I talk to a real person?"])
        frames = await read_call(client, call_id)
        answer = next(f for f in frames if f["event"] == "message.confirmed")["text"]
        assert "colleague" in answer
        tail = frames[-3:]
        assert names(tail) == ["session.idle_warning", "session.timeout", "call.ended"]
        for frame in tail:
            assert_keys(frame)
        assert (tail[0]["remaining_seconds"], tail[0]["idle_timeout_seconds"]) == (0.1, 0.2)
        assert tail[1]["reason"] == "idle_timeout" and tail[2]["reason"] == "idle_timeout"
        await client.close()


async def test_without_an_llm_the_server_does_not_answer(sim):
    client = await phone_client(sim, llm=False)
    call_id = await sim.place_call(to=NUMBER, script=["Hello?", {"hangup": True}])
    frames = await read_call(client, call_id)
    assert names(frames)[-3:] == ["user.message", "turn.end", "call.ended"]
    await client.close()


async def test_a_greeting_in_the_config_is_said_first_and_recorded(sim):
    client = await open_ws(sim)
    await client.command({"event": "connect", "api_key": "k"})
    await client.command({"event": "agent.create", "agent_id": "support", "llm": "x",
                          "greeting": {"en": "Thanks for calling, how can I help?"}})
    await client.command({"event": "channel.add", "agent_id": "support", "type": "phone", "ref": NUMBER})
    call_id = await sim.place_call(to=NUMBER, script=[{"hangup": True}])
    frames = await read_call(client, call_id)
    assert collapse(names(frames)) == ["call.started", "bot.speaking", "bot.word+", "message.confirmed",
                                       "bot.finished", "call.ended"]
    assert frames[-1]["messages"] == [{"role": "assistant", "content": "Thanks for calling, how can I help?"}]
    await client.close()


# --------------------------------------------------------------------------- ringing


async def test_ringing_only_for_numbers_added_with_ringing(sim):
    client = await phone_client(sim, ringing=True)
    call_id = await sim.place_call(to=NUMBER, from_=CALLER, script=[])
    ringing = await client.expect("call.ringing")
    assert_keys(ringing)
    assert (ringing["call_id"], ringing["from"], ringing["to"], ringing["direction"]) == (
        call_id, CALLER, NUMBER, "inbound")
    await client.send({"event": "bot.reply", "call_id": call_id, "message_id": "m", "text": "hi"})
    error = await client.expect("error")
    assert (error["code"], error["call_id"]) == ("INVALID_COMMAND", call_id)  # not connected yet
    await client.send({"event": "call.accept", "agent_id": "support", "call_id": call_id})
    assert (await client.expect("call.started"))["call_id"] == call_id

    call_id = await sim.place_call(to=NUMBER, from_=CALLER, script=[])
    await client.expect("call.ringing", call_id=call_id)
    await client.send({"event": "call.reject", "agent_id": "support", "call_id": call_id, "reason": "busy"})
    rejected = await client.expect("call.rejected")
    assert_keys(rejected)
    ended = await client.expect("call.ended", call_id=call_id)
    assert_keys(ended, "call.ended.never_connected")
    assert (ended["reason"], ended["from"], ended["to"], ended["direction"], ended["messages"]) == (
        "busy", CALLER, NUMBER, "inbound", [])
    await client.close()


async def test_a_ringing_call_nobody_answers_is_accepted_anyway():
    async with Simulator(voice_pace=0.0, ring_timeout=0.0) as sim:
        client = await phone_client(sim, ringing=True)
        call_id = await sim.place_call(to=NUMBER, script=[])
        frames = await read_call(client, call_id, "call.started")
        assert names(frames) == ["call.ringing", "call.started"]
        await client.close()


# --------------------------------------------------------------------------- supervisor commands


async def live(sim: Simulator, client: Client, script: list | tuple = ()) -> str:
    call_id = await sim.place_call(to=NUMBER, from_=CALLER, script=list(script))
    await client.expect("call.started", call_id=call_id)
    return call_id


async def test_bot_reply_is_spoken_with_its_message_id_and_enters_the_history(sim, client):
    call_id = await live(sim, client)
    await client.send({"event": "bot.reply", "call_id": call_id, "message_id": "msg_x",
                       "text": "Hello from a person", "in_reply_to": "", "add_to_history": True})
    frames = await read_call(client, call_id, "bot.finished")
    assert collapse(names(frames)) == ["bot.speaking", "bot.word+", "message.confirmed", "bot.finished"]
    assert {f["message_id"] for f in frames} == {"msg_x"}
    assert frames[0]["text"] == "Hello from a person"  # bot.reply: the whole line
    assert sim.calls[call_id].transcript() == [{"role": "assistant", "content": "Hello from a person"}]
    await client.send({"event": "bot.reply", "call_id": call_id, "message_id": "msg_y", "text": "Not kept"})
    await read_call(client, call_id, "bot.finished", message_id="msg_y")
    assert len(sim.calls[call_id].transcript()) == 1  # without add_to_history


async def test_a_reply_to_a_stale_user_message_is_rejected(sim, client):
    call_id = await live(sim, client, ["Hello"])
    await client.expect("bot.finished", call_id=call_id)
    await client.send({"event": "bot.reply", "call_id": call_id, "message_id": "msg_r", "text": "late",
                       "in_reply_to": "um_old"})
    rejected = await client.expect("reply.rejected")
    assert_keys(rejected)
    assert (rejected["message_id"], rejected["in_reply_to"], rejected["reason"]) == (
        "msg_r", "um_old", "message_obsolete")
    assert rejected["expected_reply_to"] == sim.calls[call_id].last_user_message_id


async def test_bot_cancel_interrupts_the_line_and_aborts_a_waiting_one(sim, client):
    call_id = await live(sim, client)
    sim.voice_pace = 30.0  # the lines are still being said when the cancels come
    await client.send({"event": "bot.reply", "call_id": call_id, "message_id": "m1", "text": "one two three"})
    await client.expect("bot.speaking", message_id="m1")
    await client.send({"event": "bot.reply", "call_id": call_id, "message_id": "m2", "text": "four"})
    await client.send({"event": "bot.cancel", "call_id": call_id, "message_id": "m2"})
    aborted = await client.expect("message.aborted")
    assert_keys(aborted)
    assert (aborted["message_id"], aborted["reason"]) == ("m2", "cancelled")
    await client.send({"event": "bot.cancel", "call_id": call_id})
    interrupted = await client.expect("bot.interrupted")
    assert_keys(interrupted)
    assert (interrupted["message_id"], interrupted["reason"], interrupted["words_spoken"],
            interrupted["last_word"]) == ("m1", "cancelled", 0, "")
    await client.send({"event": "bot.cancel", "call_id": call_id})  # nothing said: no answer
    await client.silent()


async def test_hold_keeps_the_caller_waiting_until_unhold(sim, client):
    call_id = await live(sim, client)
    await client.send({"event": "call.hold", "call_id": call_id})
    assert_keys(await client.expect("call.held", call_id=call_id))
    task = asyncio.create_task(sim.caller_says(call_id, "Hello?"))
    await client.send({"event": "call.unhold", "call_id": call_id})
    frames = await read_call(client, call_id, "speech.started")
    assert names(frames) == ["call.unheld", "speech.started"]  # nothing said while held
    await task


async def test_mute_collects_what_the_caller_says_and_the_ai_does_not_answer(sim, client):
    call_id = await live(sim, client)
    await client.send({"event": "call.mute", "call_id": call_id})
    assert_keys(await client.expect("call.muted"))
    await sim.caller_says(call_id, "I can hear music")
    await sim.caller_says(call_id, "hello?")
    await client.send({"event": "call.unmute", "call_id": call_id})
    frames = await read_call(client, call_id, "call.unmuted")
    assert names(frames) == ["call.unmuted"]  # nothing was sent while muted
    assert_keys(frames[0])
    assert frames[0]["muted_transcript"] == "I can hear music hello?"
    await client.send({"event": "call.mute", "call_id": call_id})
    await client.send({"event": "call.unmute", "call_id": call_id})
    assert (await client.expect("call.unmuted"))["muted_transcript"] is None


async def test_forward_then_the_call_ends(sim, client):
    call_id = await live(sim, client)
    await client.send({"event": "call.forward", "call_id": call_id, "to": "+15551234567",
                       "message": "", "announce": False})
    frames = await read_call(client, call_id)
    assert names(frames) == ["call.forwarded", "call.ended"]
    assert_keys(frames[0])
    assert frames[0]["to"] == "+15551234567" and frames[1]["reason"] == "forwarded"
    await client.send({"event": "call.hold", "call_id": call_id})
    error = await client.expect("error")
    assert (error["code"], error["call_id"]) == ("CALL_NOT_FOUND", call_id)
    assert "forwarded" in error["message"]


async def test_hangup_ends_the_call_with_client_hangup(sim, client):
    call_id = await live(sim, client)
    await client.send({"event": "call.hangup", "call_id": call_id})
    ended = await client.expect("call.ended", call_id=call_id)
    assert_keys(ended)
    assert ended["reason"] == "client_hangup"


@pytest.mark.parametrize("frame, code", [
    ({"event": "call.hold"}, "INVALID_COMMAND"),
    ({"event": "call.hold", "call_id": 12}, "INVALID_COMMAND"),
    ({"event": "call.hold", "call_id": "CA_unknown"}, "CALL_NOT_FOUND"),
    ({"event": "bot.reply", "call_id": "{call}", "message_id": "m"}, "INVALID_COMMAND"),
    ({"event": "bot.reply", "call_id": "{call}", "text": "hi"}, "INVALID_COMMAND"),
    ({"event": "bot.reply", "call_id": "{call}", "message_id": "m", "text": "hi", "add_to_history": 1},
     "INVALID_COMMAND"),
    ({"event": "call.forward", "call_id": "{call}", "to": "5551234"}, "INVALID_COMMAND"),
    ({"event": "call.accept", "agent_id": "support", "call_id": "{call}"}, "CALL_NOT_FOUND"),
    ({"event": "channel.add", "agent_id": "support", "type": "phone", "ref": "5551234"}, "INVALID_COMMAND"),
    ({"event": "channel.add", "agent_id": "support", "type": "phone", "ref": NUMBER, "ringing": "yes"},
     "INVALID_COMMAND"),
    ({"event": "channel.add", "agent_id": "support", "type": "fax", "ref": NUMBER}, "INVALID_COMMAND"),
])
async def test_bad_voice_commands_are_refused(sim, client, frame, code):
    call_id = await live(sim, client)
    frame = {k: (call_id if v == "{call}" else v) for k, v in frame.items()}
    error = await client.command(frame)
    assert error["event"] == "error" and error["code"] == code, error
    if isinstance(frame.get("call_id"), str):
        assert error["call_id"] == frame["call_id"]


async def test_a_call_of_another_connection_is_not_found(sim, client):
    call_id = await live(sim, client)
    other = await phone_client(sim, agent_id="sales", number="+34910000000")
    error = await other.command({"event": "call.hangup", "call_id": call_id})
    assert (error["code"], error["call_id"]) == ("CALL_NOT_FOUND", call_id)
    await other.close()


# --------------------------------------------------------------------------- numbers and connections


async def test_calls_only_go_to_numbers_an_agent_added(sim, client):
    with pytest.raises(ValueError, match="no agent added"):
        await sim.place_call(to="+34999999999", script=[])
    with pytest.raises(ValueError):
        await sim.place_call(to=NUMBER, from_="nope", script=[])
    with pytest.raises(ValueError):
        await sim.place_call(to=NUMBER, script=[{"dance": True}])
    call_id = await sim.place_call(script=[])  # None: the first number of a connected agent
    assert sim.calls[call_id].to == NUMBER and sim.calls[call_id].agent_id == "support"


async def test_a_number_in_use_by_a_connected_agent_is_refused(sim, client):
    other = await open_ws(sim)
    await other.command({"event": "connect", "api_key": "k"})
    await other.command({"event": "agent.create", "agent_id": "sales"})
    error = await other.command({"event": "channel.add", "agent_id": "sales", "type": "phone", "ref": NUMBER})
    assert error == {"event": "error", "code": "PHONE_IN_USE", "message": f"{NUMBER} is in use by another agent",
                     "agent_id": "sales", "phone": NUMBER}
    await client.close()  # "support" goes offline: its number can move
    await pc_eventually(lambda: sim.phone_numbers() == {}, what="support offline")
    reply = await other.command({"event": "channel.add", "agent_id": "sales", "type": "phone", "ref": NUMBER})
    assert reply["event"] == "channel.added"
    assert sim.phone_numbers() == {NUMBER: "sales"}
    await other.close()


async def test_a_dropped_connection_ends_its_calls_without_call_ended(sim, client):
    call_id = await live(sim, client)
    await sim.drop_connections()
    assert sim.calls[call_id].end_reason == "agent_disconnected"
    again = await open_ws(sim)
    await again.command({"event": "connect", "api_key": "k"})
    assert (await again.command({"event": "agent.create", "agent_id": "support"}))["event"] == "agent.resumed"
    await again.silent()  # nothing was kept for later about that call
    # Its number is still its own: a call to it while offline would have been hung up.
    await again.close()
    await pc_eventually(lambda: not sim.connected_agents, what="support offline")
    offline = await sim.place_call(to=NUMBER, script=[])
    assert sim.calls[offline].end_reason == "agent_offline"


def test_scripts_are_checked():
    assert parse_script(["hi", {"say": "x", "barge_in": 2}, {"silence": 1}, {"hangup": True}])[1].barge_in == 2
    for bad in (["  "], [3], [{}], [{"say": ""}], [{"say": "x", "barge_in": -1}], [{"silence": "1"}],
                [{"say": "x", "loud": True}]):
        with pytest.raises(ValueError):
            parse_script(bad)


# --------------------------------------------------------------------------- demo


async def test_the_demo_calls_once_a_client_added_a_phone_number():
    async with Simulator(demo=True, demo_speed=50.0, voice_pace=0.0) as sim:
        client = await phone_client(sim)
        started = await client.expect("call.started", timeout=5)
        assert started["to"] == NUMBER and started["from"].startswith("+")
        message = await client.expect("user.message", call_id=started["call_id"])
        assert message["text"]
        await client.close()
