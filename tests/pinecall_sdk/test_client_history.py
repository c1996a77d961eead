"""``agent.get_history`` (history.get -> history.data) and ``channel.added``."""

from __future__ import annotations

import asyncio
import json

import pytest

from pinecall_sdk import ChannelAddedEvent, HistoryDataEvent, PinecallError, PinecallTimeout

from .conftest import PcRawServer, PcRecorder, pc_nothing_pending

PHONE = "34612345678"


# --- against the simulator -------------------------------------------------------------


async def test_get_history_returns_the_chat_history_with_customer_messages(pc_sim, pc_support):
    pc, support = pc_support
    sid = (await pc_sim.customer_says(phone=PHONE, name="Ana", text="Where is my order?"))["session_id"]
    await support.send_message(session_id=sid, contact=PHONE, text="A person here.")
    await pc_sim.customer_says(phone=PHONE, name="Ana", text="Thanks!")
    mark = len(pc_sim.received)

    history = await support.get_history(sid)

    assert history == pc_sim.sessions[sid].transcript()
    assert [(h["role"], h["content"]) for h in history[:3]] == [
        ("user", "Where is my order?"), ("assistant", history[1]["content"]), ("assistant", "A person here.")]
    assert ("user", "Thanks!") in [(h["role"], h["content"]) for h in history]
    request = await pc_sim.wait_for("history.get", after=mark)
    assert set(request) == {"event", "agent_id", "call_id", "request_id"}
    assert (request["agent_id"], request["call_id"]) == ("support", sid)
    assert isinstance(request["request_id"], str) and request["request_id"]

    await support.get_history(sid)
    ids = [f["request_id"] for f in pc_sim.received[mark:] if f.get("event") == "history.get"]
    assert len(ids) == 2 and len(set(ids)) == 2  # a fresh request_id each time


async def test_history_data_is_delivered_to_handlers_too(pc_sim, pc_support):
    pc, support = pc_support
    seen = PcRecorder()
    support.on("history.data", seen)
    sid = (await pc_sim.customer_says(phone=PHONE, text="hi"))["session_id"]
    await support.get_history(sid)
    data = await seen.wait_for("history.data")
    assert isinstance(data, HistoryDataEvent) and data.call_id == sid and data.error is None


@pytest.mark.parametrize("which", ["unknown", "ended"])
async def test_get_history_of_a_session_the_server_does_not_have(pc_sim, pc_support, which):
    pc, support = pc_support
    sid = "wa-000000000000"
    if which == "ended":
        sid = (await pc_sim.customer_says(phone=PHONE, text="hi"))["session_id"]
        await pc_sim.end_session(sid)
    with pytest.raises(PinecallError) as info:
        await support.get_history(sid)
    assert info.value.code == "SESSION_NOT_FOUND" and sid in info.value.message
    assert info.value.frame["event"] == "history.data" and "error" in info.value.frame
    assert pc.connected and pc_nothing_pending(pc)


async def test_concurrent_get_history_calls_each_get_their_own(pc_sim, pc_support):
    pc, support = pc_support
    sessions = [(await pc_sim.customer_says(phone=f"3460000000{n}", text=f"I am {n}"))["session_id"]
                for n in range(5)]
    histories = await asyncio.gather(*(support.get_history(sid) for sid in sessions))
    assert [h[0]["content"] for h in histories] == [f"I am {n}" for n in range(5)]


async def test_get_history_issued_before_connecting_waits_for_registration(pc_sim, pc_make):
    pc = pc_make(pc_sim.url)
    support = pc.agent("support")
    support.add_whatsapp(phone_number_id="123", access_token="t")
    early = asyncio.create_task(support.get_history("wa-000000000000"))
    await pc.connect()
    with pytest.raises(PinecallError) as info:
        await early
    assert info.value.code == "SESSION_NOT_FOUND"
    names = [f["event"] for f in pc_sim.received]
    assert names == ["connect", "agent.create", "channel.add", "history.get"]


async def test_channel_added_is_a_typed_event(pc_sim, pc_make):
    pc = pc_make(pc_sim.url)
    support = pc.agent("support")
    support.add_whatsapp(phone_number_id="123", access_token="t")
    seen = PcRecorder()
    support.on("channel.added", seen)
    await pc.connect()
    added = await seen.wait_for("channel.added")
    assert isinstance(added, ChannelAddedEvent)
    assert (added.agent_id, added.type, added.ref) == ("support", "whatsapp", "123")


# --- against hand-driven servers -----------------------------------------------------------


def history_answerer(*, echo_request_id: bool, hold: int = 1, order=lambda held: held):
    """Hold ``hold`` history.get frames, then answer them in ``order(held)``."""
    held: list[dict] = []

    async def answer(server, ws, frame):
        if frame["event"] != "history.get":
            await PcRawServer.default_answer(server, ws, frame)
            return
        held.append(frame)
        if len(held) < hold:
            return
        for request in order(list(held)):
            reply = {"event": "history.data", "agent_id": "support", "call_id": request["call_id"],
                     "messages": [{"role": "user", "content": f"in {request['call_id']}"}]}
            if echo_request_id:
                reply["request_id"] = request["request_id"]
            await ws.send(json.dumps(reply))
        held.clear()

    return answer


async def test_history_data_matched_by_request_id_whatever_the_order(pc_make):
    answer = history_answerer(echo_request_id=True, hold=3, order=lambda held: held[::-1])
    async with PcRawServer(answer) as server:
        pc = pc_make(server.url)
        support = pc.agent("support")
        await pc.connect()
        await support.wait_registered(timeout=3)
        got = await asyncio.gather(*(support.get_history(sid) for sid in ("wa-1", "wa-2", "wa-3")))
        assert got == [[{"role": "user", "content": f"in wa-{n}"}] for n in (1, 2, 3)]


async def test_history_data_without_request_id_matched_by_call_id_then_in_order(pc_make):
    async def answer(server, ws, frame):
        if frame["event"] != "history.get":
            await PcRawServer.default_answer(server, ws, frame)
        elif frame["call_id"] == "wa-2":  # the second request: answer both, the second first
            for call_id in ("wa-2", None):  # an old server: no request_id, then not even call_id
                reply = {"event": "history.data", "messages": [{"role": "user", "content": str(call_id)}]}
                if call_id:
                    reply["call_id"] = call_id
                await ws.send(json.dumps(reply))

    async with PcRawServer(answer) as server:
        pc = pc_make(server.url)
        support = pc.agent("support")
        await pc.connect()
        await support.wait_registered(timeout=3)
        first = asyncio.create_task(support.get_history("wa-1"))
        await server.wait_frame("history.get")
        second = asyncio.create_task(support.get_history("wa-2"))
        assert await second == [{"role": "user", "content": "wa-2"}]
        assert await first == [{"role": "user", "content": "None"}]


async def test_stale_history_data_does_not_answer_another_request(pc_make):
    async def answer(server, ws, frame):
        if frame["event"] == "history.get":
            for request_id in ("not-yours", frame["request_id"]):
                await ws.send(json.dumps({"event": "history.data", "request_id": request_id,
                                          "call_id": frame["call_id"],
                                          "messages": [{"role": "user", "content": request_id}]}))
        else:
            await PcRawServer.default_answer(server, ws, frame)

    async with PcRawServer(answer) as server:
        pc = pc_make(server.url)
        support = pc.agent("support")
        stale = PcRecorder()
        pc.on("history.data", stale)  # no agent_id in the frame: the client's handlers get it
        await pc.connect()
        await support.wait_registered(timeout=3)
        history = await support.get_history("wa-1")
        assert history == [{"role": "user", "content": server.frames("history.get")[0]["request_id"]}]
        unmatched = await stale.wait_for("history.data", lambda e: e.request_id == "not-yours")
        assert unmatched.messages[0]["content"] == "not-yours"  # delivered as an event only


async def test_odd_history_entries_are_left_out(pc_make):
    async def answer(server, ws, frame):
        if frame["event"] == "history.get":
            await ws.send(json.dumps({
                "event": "history.data", "request_id": frame["request_id"], "call_id": frame["call_id"],
                "messages": [{"role": "user", "content": "kept", "extra": 1}, "junk", 5, None, []],
            }))
        else:
            await PcRawServer.default_answer(server, ws, frame)

    async with PcRawServer(answer) as server:
        pc = pc_make(server.url)
        support = pc.agent("support")
        await pc.connect()
        await support.wait_registered(timeout=3)
        assert await support.get_history("wa-1") == [{"role": "user", "content": "kept", "extra": 1}]


@pytest.mark.parametrize(
    "reply, code",
    [
        ({"event": "history.data", "error": "Session not found"}, "SESSION_NOT_FOUND"),
        ({"event": "history.data", "error": {"code": "NOPE", "message": "gone"}}, "SESSION_NOT_FOUND"),
        # a server that does not know history.get at all
        ({"event": "error", "code": "UNKNOWN_EVENT", "message": "unknown event 'history.get'"},
         "UNKNOWN_EVENT"),
    ],
)
async def test_history_errors_raise(pc_make, reply, code):
    async def answer(server, ws, frame):
        if frame["event"] == "history.get":
            await ws.send(json.dumps({**reply, "request_id": frame["request_id"]}))
        else:
            await PcRawServer.default_answer(server, ws, frame)

    async with PcRawServer(answer) as server:
        pc = pc_make(server.url)
        support = pc.agent("support")
        await pc.connect()
        await support.wait_registered(timeout=3)
        with pytest.raises(PinecallError) as info:
            await support.get_history("wa-1")
        assert info.value.code == code


async def test_get_history_times_out(pc_make):
    async with PcRawServer() as server:  # answers history.get never
        pc = pc_make(server.url)
        support = pc.agent("support")
        support.add_whatsapp(phone_number_id="1", access_token="t")  # no channel.added either
        await pc.connect()
        await support.wait_registered(timeout=3)
        with pytest.raises(PinecallTimeout) as info:
            await support.get_history("wa-1", timeout=0.1)
        assert info.value.code == "TIMEOUT" and "history.get" in info.value.message
        assert pc_nothing_pending(pc) and pc.connected
