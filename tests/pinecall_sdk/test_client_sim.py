"""The client against the Pinecall simulator, over real sockets."""

from __future__ import annotations

import asyncio
import logging

import pytest

from pinecall_sdk import (
    ConnectedEvent,
    DisconnectedEvent,
    ErrorEvent,
    Event,
    Pinecall,
    PinecallError,
    PinecallTimeout,
    ReconnectingEvent,
    RegisteredEvent,
    SessionPausedEvent,
    SessionResumedEvent,
    SessionSentEvent,
    WhatsAppMessageEvent,
    WhatsAppResponseEvent,
    WhatsAppSessionEndedEvent,
    WhatsAppSessionStartedEvent,
    WhatsAppStatusEvent,
)
from pinecall_sdk.connection import State
from pinecall_sdk.protocol import Phase
from pinecall_sdk.simulator import Simulator

from .conftest import (
    PC_TEST_KEY,
    PcRecorder,
    pc_agent_state,
    pc_connection,
    pc_eventually,
    pc_nothing_pending,
    pc_settled,
)

PHONE = "34612345678"


def frames(sim, event, after=0, **match):
    return [
        f for f in sim.received[after:]
        if f.get("event") == event and all(f.get(k) == v for k, v in match.items())
    ]


# --- handshake and registration ------------------------------------------------------


async def test_handshake_and_registration_frames(pc_sim, pc_make):
    pc = pc_make(pc_sim.url)
    lifecycle = PcRecorder()
    pc.on("connected", lifecycle)
    pc.on("registered", lifecycle)
    support = pc.agent("support", language="en", llm="openai/gpt-4.1-mini",
                       prompt="You are a helpful support agent.", voice=None)
    support.add_whatsapp(phone_number_id="123", access_token="EAA-token", verify_token="vt")
    assert not pc.connected and not support.registered

    await pc.connect()
    assert pc.connected
    await support.wait_registered(timeout=3)
    assert support.registered

    assert pc_sim.received[0] == {"event": "connect", "api_key": PC_TEST_KEY}
    assert pc_sim.received[1] == {
        "event": "agent.create", "agent_id": "support", "language": "en",
        "llm": "openai/gpt-4.1-mini", "prompt": "You are a helpful support agent.",
    }
    await pc_sim.wait_for(event="channel.add")
    assert pc_sim.received[2] == {
        "event": "channel.add", "agent_id": "support", "type": "whatsapp", "ref": "123",
        "accessToken": "EAA-token", "verifyToken": "vt",
    }
    assert pc_sim.connected_agents == {"support"}
    event = await lifecycle.wait_for("connected")
    assert isinstance(event, ConnectedEvent)
    registered = await lifecycle.wait_for("registered")
    assert registered.agent_id == "support" and registered.resumed is False


async def test_agent_declared_after_connect(pc_sim, pc_make):
    pc = pc_make(pc_sim.url)
    await pc.connect()
    sales = pc.agent("sales", language="es")
    sales.add_whatsapp(phone_number_id="456", access_token="tok", app_secret="sec")
    await sales.wait_registered(timeout=3)
    await pc_sim.wait_for(event="channel.add")
    assert frames(pc_sim, "agent.create") == [{"event": "agent.create", "agent_id": "sales", "language": "es"}]
    assert frames(pc_sim, "channel.add") == [{
        "event": "channel.add", "agent_id": "sales", "type": "whatsapp", "ref": "456",
        "accessToken": "tok", "appSecret": "sec",
    }]


async def test_reregistration_after_drop(pc_sim, pc_support):
    pc, support = pc_support
    lifecycle = PcRecorder()
    for name in ("connected", "disconnected", "reconnecting"):
        pc.on(name, lifecycle)
    registrations = PcRecorder()
    support.on("registered", registrations)
    mark = len(pc_sim.received)

    await pc_sim.drop_connections()
    await lifecycle.wait_for("connected")
    await support.wait_registered(timeout=3)
    await pc_sim.wait_for(event="channel.add", after=mark)

    assert pc.connected and support.registered
    assert lifecycle.names()[:3] == ["disconnected", "reconnecting", "connected"]
    disconnected, reconnecting = lifecycle.events[:2]
    assert isinstance(disconnected, DisconnectedEvent) and disconnected.reconnect is True
    assert isinstance(reconnecting, ReconnectingEvent) and reconnecting.attempt == 1
    assert reconnecting.delay == pytest.approx(0.02)
    registered = await registrations.wait_for("registered")
    assert isinstance(registered, RegisteredEvent)
    assert (registered.agent_id, registered.resumed) == ("support", True)  # within the grace period
    assert pc_sim.received[mark:mark + 3] == [
        {"event": "connect", "api_key": PC_TEST_KEY},
        {"event": "agent.create", "agent_id": "support", "language": "en",
         "llm": "openai/gpt-4.1-mini", "prompt": "You are helpful."},
        {"event": "channel.add", "agent_id": "support", "type": "whatsapp", "ref": "123",
         "accessToken": "EAA-token"},
    ]
    # and again: the attempt counter was reset by the successful `connected`
    mark = len(pc_sim.received)
    await pc_sim.drop_connections()
    await lifecycle.wait_for("connected", count=2)
    assert [e.attempt for e in lifecycle.of("reconnecting")] == [1, 1]
    await support.wait_registered(timeout=3)
    await pc_sim.wait_for(event="channel.add", after=mark)
    assert len(frames(pc_sim, "agent.create")) == 3 and len(frames(pc_sim, "channel.add")) == 3


# --- commands ------------------------------------------------------------------------


async def test_pause_and_resume_every_shape(pc_sim, pc_support):
    pc, support = pc_support
    sid = (await pc_sim.customer_says(phone=PHONE, name="Ana", text="Hello"))["session_id"]

    paused = await support.pause(sid)
    assert isinstance(paused, SessionPausedEvent)
    assert (paused.agent_id, paused.session_id, paused.contact) == ("support", sid, None)
    assert pc_sim.is_paused(sid)
    assert frames(pc_sim, "session.pause")[-1] == {"event": "session.pause", "agent_id": "support", "session_id": sid}

    resumed = await support.resume(sid)
    assert isinstance(resumed, SessionResumedEvent) and resumed.session_id == sid
    assert not pc_sim.is_paused(sid)

    paused = await support.pause(contact=PHONE)
    assert paused.contact == PHONE and paused.session_id is None
    assert frames(pc_sim, "session.pause")[-1] == {"event": "session.pause", "agent_id": "support", "contact": PHONE}
    assert pc_sim.is_paused(sid)
    resumed = await support.resume(contact=PHONE)
    assert resumed.contact == PHONE
    assert not pc_sim.is_paused(sid)

    paused = await support.pause()
    assert paused.session_id is None and paused.contact is None
    assert frames(pc_sim, "session.pause")[-1] == {"event": "session.pause", "agent_id": "support"}
    assert pc_sim.is_paused(sid)
    resumed = await support.resume()
    assert frames(pc_sim, "session.resume")[-1] == {"event": "session.resume", "agent_id": "support"}
    assert resumed.session_id is None and not pc_sim.is_paused(sid)


async def test_send_message_as_human(pc_sim, pc_support):
    pc, support = pc_support
    responses = PcRecorder()
    support.on("whatsapp.response", responses)
    sid = (await pc_sim.customer_says(phone=PHONE, name="Ana", text="Hello"))["session_id"]
    await support.pause(sid)

    sent = await support.send_message(session_id=sid, contact=PHONE, text="Hi, a person here.")
    assert isinstance(sent, SessionSentEvent) and sent.session_id == sid
    assert frames(pc_sim, "session.send") == [{
        "event": "session.send", "agent_id": "support", "session_id": sid, "contact": PHONE,
        "text": "Hi, a person here.",
    }]
    human = await responses.wait_for("whatsapp.response", lambda e: e.source == "human")
    assert isinstance(human, WhatsAppResponseEvent) and human.text == "Hi, a person here."
    assert human.session_id == sid and human.to == PHONE
    assert pc_sim.session_history(sid)[-1]["content"] == "Hi, a person here."

    # contact only (the server finds the session), and positional session id
    sent = await support.send_message(contact=PHONE, text="Still here.")
    assert sent.contact == PHONE and sent.session_id is None
    sent = await support.send_message(sid, text="Third.")
    assert sent.session_id == sid
    assert [h["content"] for h in pc_sim.session_history(sid)[-2:]] == ["Still here.", "Third."]


async def test_concurrent_commands_each_get_their_confirmation(pc_sim, pc_support):
    pc, support = pc_support
    s1 = (await pc_sim.customer_says(phone="34600000001", text="a"))["session_id"]
    s2 = (await pc_sim.customer_says(phone="34600000002", text="b"))["session_id"]
    results = await asyncio.gather(
        support.pause(s1), support.pause(s2), support.send_message(s1, text="x"),
        support.resume(s2), support.pause(contact="34600000002"),
    )
    assert [type(r) for r in results] == [
        SessionPausedEvent, SessionPausedEvent, SessionSentEvent, SessionResumedEvent, SessionPausedEvent,
    ]
    assert results[0].session_id == s1 and results[1].session_id == s2
    assert results[3].session_id == s2 and results[4].contact == "34600000002"
    assert pc_nothing_pending(pc)


async def test_session_not_found_raises_with_code(pc_sim, pc_support):
    pc, support = pc_support
    with pytest.raises(PinecallError) as info:
        await support.pause("wa-does-not-exist")
    err = info.value
    assert err.code == "SESSION_NOT_FOUND" and not isinstance(err, PinecallTimeout)
    assert "wa-does-not-exist" in err.message
    assert err.frame["event"] == "error" and err.frame["session_id"] == "wa-does-not-exist"
    with pytest.raises(PinecallError) as info:
        await support.send_message(session_id="wa-nope", text="hello")
    assert info.value.code == "SESSION_NOT_FOUND"
    # the client goes on working
    sid = (await pc_sim.customer_says(phone=PHONE, text="hi"))["session_id"]
    assert (await support.pause(sid)).session_id == sid


async def test_error_matched_to_its_session_among_several(pc_sim, pc_support):
    pc, support = pc_support
    sid = (await pc_sim.customer_says(phone=PHONE, text="hi"))["session_id"]
    good, bad = await asyncio.gather(
        support.pause(sid), support.pause("wa-missing"), return_exceptions=True
    )
    assert isinstance(good, SessionPausedEvent) and good.session_id == sid
    assert isinstance(bad, PinecallError) and bad.code == "SESSION_NOT_FOUND"


async def test_server_side_pause_is_delivered_as_state(pc_sim, pc_support):
    pc, support = pc_support
    states = PcRecorder()
    support.on("session.paused", states)
    sid = (await pc_sim.customer_says(phone=PHONE, text="hi"))["session_id"]
    await pc_sim.pause(session_id=sid)
    event = await states.wait_for("session.paused")
    assert event.session_id == sid
    # an unsolicited state event must not confuse a later command
    assert (await support.pause(sid)).session_id == sid


# --- events --------------------------------------------------------------------------


async def test_every_event_type_is_typed(pc_sim, pc_support):
    pc, support = pc_support
    seen = PcRecorder()
    support.on("*", seen)

    order: list[str] = []
    support.on("*", lambda e: order.append(e.event))

    @support.on("whatsapp.message")
    async def async_handler(event):
        await asyncio.sleep(0)
        order.append("async handler")

    out = await pc_sim.customer_says(phone=PHONE, name="Ana", text="Where is my order?")
    sid = out["session_id"]
    started = await seen.wait_for("whatsapp.session_started")
    assert isinstance(started, WhatsAppSessionStartedEvent)
    assert (started.agent_id, started.session_id, started.contact_phone, started.contact_name) == (
        "support", sid, PHONE, "Ana")

    message = await seen.wait_for("whatsapp.message")
    assert isinstance(message, WhatsAppMessageEvent)
    assert (message.session_id, message.from_, message.name, message.type, message.text) == (
        sid, PHONE, "Ana", "text", "Where is my order?")
    assert message.message_id == out["message_id"] and message.paused is False
    assert message.raw["from"] == PHONE

    ai = await seen.wait_for("whatsapp.response")
    assert isinstance(ai, WhatsAppResponseEvent) and ai.source is None and ai.to == PHONE and ai.text

    read = await seen.wait_for("whatsapp.status", lambda e: e.status == "read")
    assert isinstance(read, WhatsAppStatusEvent) and read.recipient == PHONE and read.message_id
    statuses = [e.status for e in seen.of("whatsapp.status")]
    assert statuses == ["sent", "delivered", "read"]

    await support.pause(sid)
    voice = await pc_sim.customer_says(phone=PHONE, name="Ana", text="voice transcript", type="audio")
    paused_msg = await seen.wait_for("whatsapp.message", lambda e: e.message_id == voice["message_id"])
    assert paused_msg.paused is True and paused_msg.type == "audio" and paused_msg.text == "voice transcript"

    await pc_sim.end_session(sid, reason="idle_timeout")
    ended = await seen.wait_for("whatsapp.session_ended")
    assert isinstance(ended, WhatsAppSessionEndedEvent)
    assert (ended.session_id, ended.contact_phone, ended.reason) == (sid, PHONE, "idle_timeout")
    assert ended.message_count >= 3 and isinstance(ended.duration, float)
    assert isinstance(ended.transcript, list) and ended.transcript[0]["content"] == "Where is my order?"
    assert isinstance(ended.started_at, float) and ended.ended_at >= ended.started_at
    assert isinstance(ended.messages, list) and ended.messages[0]["role"] == "user"

    # order of arrival kept; the async handler is awaited before the next event
    # (per event: the agent's handlers for that name, then its "*" handlers)
    assert order[:4] == ["whatsapp.session_started", "async handler", "whatsapp.message", "whatsapp.response"]


async def test_global_handlers_and_events_without_agent_id(pc_sim, pc_make):
    pc = pc_make(pc_sim.url)
    everything = PcRecorder()
    pc.on("*", everything)
    other = pc.agent("other")  # no WhatsApp channel
    support = pc.agent("support")
    support.add_whatsapp(phone_number_id="1", access_token="t")
    on_support, on_other = PcRecorder(), PcRecorder()
    support.on("*", on_support)
    other.on("*", on_other)
    await pc.connect()
    await support.wait_registered(timeout=3)
    await other.wait_registered(timeout=3)

    await pc_sim.inject({"event": "whatsapp.message", "session_id": "wa-x", "from": "1", "text": "hi"})
    message = await on_support.wait_for("whatsapp.message")
    assert message.agent_id is None and message.session_id == "wa-x"
    await pc_sim.inject({"event": "whatsapp.reaction", "agent_id": "support", "emoji": "+1"})
    unknown = await on_support.wait_for("whatsapp.reaction")
    assert type(unknown) is Event and unknown.get("emoji") == "+1"
    await everything.wait_for("whatsapp.reaction")
    assert "connected" in everything.names() and "whatsapp.message" in everything.names()
    assert not [e for e in on_other.events if e.event.startswith("whatsapp.")]


async def test_malformed_frames_are_skipped_and_odd_fields_read_leniently(
        pc_sim, pc_support, caplog, pc_fresh_readings):
    pc, support = pc_support
    got = PcRecorder()
    support.on("whatsapp.message", got)
    caplog.set_level(logging.WARNING, logger="pinecall_sdk")
    unreadable = [
        "this is not json",
        "[1, 2, 3]",
        '{"agent_id": "support", "session_id": "wa-1"}',
        '{"event": 42}',
        "x" * 5000,
    ]
    odd = [
        '{"event": "whatsapp.message", "agent_id": "support", "session_id": "wa-1", "paused": "yes"}',
        '{"event": "whatsapp.message", "agent_id": "support", "session_id": 7, "text": "hi"}',
        '{"event": "whatsapp.message", "agent_id": "support", "session_id": "wa-1", "text": ["hi"]}',
    ]
    for text in unreadable + odd:
        await pc_sim.inject(text, agent_id="support")
    await pc_sim.inject({"event": "whatsapp.message", "agent_id": "support", "session_id": "wa-1",
                         "from": PHONE, "text": "good one", "message_id": "m1", "paused": False})
    await got.wait_for("whatsapp.message", count=4)
    assert [(e.session_id, e.text, e.paused) for e in got.events] == [
        ("wa-1", None, True), ("7", "hi", None), ("wa-1", None, None), ("wa-1", "good one", False)]
    assert got.events[2].raw["text"] == ["hi"]  # the value as sent stays in raw
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "skipping" in w]) == len(unreadable)
    assert any("this is not json" in w for w in warnings)
    assert any("'paused' was str, read as bool" in w for w in warnings)
    assert any("'text' was list, read as None" in w for w in warnings)
    assert all(len(w) < 600 for w in warnings)  # long frames are truncated
    assert pc.connected
    sid = (await pc_sim.customer_says(phone=PHONE, text="hi"))["session_id"]
    assert (await support.pause(sid)).session_id == sid


async def test_handler_exceptions_do_not_stop_the_client(pc_sim, pc_support, caplog):
    pc, support = pc_support
    got = PcRecorder()

    @support.on("whatsapp.message")
    def broken(event):
        raise RuntimeError("boom in a plain handler")

    @support.on("whatsapp.message")
    async def broken_async(event):
        raise RuntimeError("boom in an async handler")

    support.on("whatsapp.message", got)
    caplog.set_level(logging.ERROR, logger="pinecall_sdk")
    await pc_sim.customer_says(phone=PHONE, text="one")
    await pc_sim.customer_says(phone=PHONE, text="two")
    await got.wait_for("whatsapp.message", count=2)
    assert [e.text for e in got.events] == ["one", "two"]
    booms = [r for r in caplog.records if r.exc_info and "boom" in str(r.exc_info[1])]
    assert len(booms) == 4
    sid = got.events[0].session_id
    assert (await support.pause(sid)).session_id == sid


async def test_slow_handler_does_not_block_reader(pc_sim, pc_support):
    pc, support = pc_support
    order: list[str] = []
    release = asyncio.Event()

    @support.on("whatsapp.message")
    async def slow(event):
        order.append(f"start {event.text}")
        await release.wait()
        order.append(f"end {event.text}")

    sid = (await pc_sim.customer_says(phone=PHONE, text="first"))["session_id"]
    await pc_sim.customer_says(phone=PHONE, text="second")
    await pc_eventually(lambda: order == ["start first"])
    # while the handler is stuck: confirmations and server pings still flow
    assert (await asyncio.wait_for(support.pause(sid), 1)).session_id == sid
    mark = len(pc_sim.received)
    await pc_sim.ping_clients()
    await pc_sim.wait_for(event="pong", after=mark, timeout=1)
    assert order == ["start first"]
    release.set()
    await pc_eventually(lambda: len(order) == 4)
    assert order == ["start first", "end first", "start second", "end second"]


# --- keep-alive ----------------------------------------------------------------------


async def test_ping_pong_both_ways(pc_sim, pc_make):
    pc = pc_make(pc_sim.url, ping_interval=0.05)
    pongs = PcRecorder()
    pc.on("pong", pongs)
    await pc.connect()
    await pongs.wait_for("pong", count=2)
    assert len(frames(pc_sim, "ping")) >= 2 and all(f == {"event": "ping"} for f in frames(pc_sim, "ping"))
    assert pc.last_pong is not None
    mark = len(pc_sim.received)
    assert await pc_sim.ping_clients() == 1
    assert await pc_sim.wait_for(event="pong", after=mark, timeout=2) == {"event": "pong"}


# --- reconnects, queueing ------------------------------------------------------------


async def test_commands_queued_while_down_are_sent_once_after_restart(pc_make):
    sim = Simulator()
    await sim.start()
    port = sim.port
    pc = pc_make(sim.url, command_timeout=5.0)
    lifecycle = PcRecorder()
    pc.on("reconnecting", lifecycle)
    pc.on("connected", lifecycle)
    support = pc.agent("support", language="en")
    support.add_whatsapp(phone_number_id="123", access_token="tok")
    await pc.connect()
    await support.wait_registered(timeout=3)

    await sim.stop()
    await pc_eventually(lambda: not pc.connected)
    assert not support.registered
    pending = [
        asyncio.create_task(support.pause(contact=PHONE)),
        asyncio.create_task(support.send_message(contact=PHONE, text="sorry for the wait")),
        asyncio.create_task(support.pause()),
    ]
    withdrawn = asyncio.create_task(support.resume(contact="34999", timeout=0.1))
    with pytest.raises(PinecallTimeout) as info:
        await withdrawn
    assert info.value.code == "TIMEOUT" and "withdrawn" in info.value.message
    await lifecycle.wait_for("reconnecting", count=2)  # it keeps trying while the server is down
    assert not any(t.done() for t in pending)

    sim2 = Simulator(port=port)
    for _ in range(20):  # the same port: retry in the unlikely case something else grabbed it
        try:
            await sim2.start()
            break
        except OSError:
            await asyncio.sleep(0.05)
    else:
        pytest.fail(f"port {port} could not be reused")
    try:
        results = await asyncio.wait_for(asyncio.gather(*pending), 5)
        assert [type(r) for r in results] == [SessionPausedEvent, SessionSentEvent, SessionPausedEvent]
        # A later command through the same queue is the witness: anything sent again
        # would have been written before it, on the same socket.
        witness = (await sim2.customer_says(phone="34600000009", text="witness"))["session_id"]
        assert [h["content"] for h in await support.get_history(witness)][:1] == ["witness"]
        names = [f["event"] for f in sim2.received if f["event"] != "ping"]
        assert names == [
            "connect", "agent.create", "channel.add", "session.pause", "session.send", "session.pause",
            "history.get",
        ]
        assert sim2.received[3] == {"event": "session.pause", "agent_id": "support", "contact": PHONE}
        assert sim2.received[5] == {"event": "session.pause", "agent_id": "support"}
        assert frames(sim2, "session.resume") == []  # the withdrawn one never left
        attempts = [e.attempt for e in lifecycle.of("reconnecting")]
        assert attempts == list(range(1, len(attempts) + 1))
    finally:
        await pc.close()
        await sim2.stop()


async def test_close_stops_everything(pc_sim, pc_support):
    pc, support = pc_support
    lifecycle = PcRecorder()
    pc.on("disconnected", lifecycle)
    pc.on("reconnecting", lifecycle)
    await pc.close()
    assert not pc.connected and not support.registered and pc.state is State.CLOSED
    event = await lifecycle.wait_for("disconnected")
    assert event.reconnect is False
    await pc_eventually(lambda: not pc_sim.connected_agents)
    await pc_settled(pc)  # its connection loop has ended: no reconnect, now or later
    assert lifecycle.of("reconnecting") == []
    assert len(frames(pc_sim, "connect")) == 1
    with pytest.raises(PinecallError) as info:
        await support.pause()
    assert info.value.code == "CLOSED"
    with pytest.raises(PinecallError):
        await pc.connect()
    await pc.close()  # twice is fine


# --- displacement, keys, conflicts, capacity ------------------------------------------


async def test_displaced_client_does_not_reconnect(pc_sim, pc_support, pc_make):
    old, support = pc_support
    lifecycle = PcRecorder()
    for name in ("disconnected", "reconnecting", "error", "agent.displaced"):
        old.on(name, lifecycle)
    displaced = PcRecorder()
    support.on("agent.displaced", displaced)

    new = pc_make(pc_sim.url)
    new_support = new.agent("support")
    await new.connect()
    await new_support.wait_registered(timeout=3)

    event = await displaced.wait_for("agent.displaced")
    assert event.agent_id == "support" and "Displaced" in event.reason
    disconnected = await lifecycle.wait_for("disconnected")
    assert disconnected.reconnect is False
    errors = await lifecycle.wait_for("error", lambda e: e.agent_id is None)
    assert errors.code == "DISPLACED" and errors.fatal
    assert not old.connected and not support.registered and support.displaced
    assert old.state is State.STOPPED
    await pc_settled(old)  # its connection loop ended on its own: it will never reconnect
    assert lifecycle.of("reconnecting") == []
    assert len(frames(pc_sim, "connect")) == 2  # the old client and the new one, no retry
    with pytest.raises(PinecallError) as info:
        await support.pause()
    assert info.value.code == "DISPLACED"
    with pytest.raises(PinecallError) as info:
        await support.wait_registered(timeout=1)
    assert info.value.code == "DISPLACED"
    assert pc_sim.connected_agents == {"support"} and new_support.registered


async def test_rejected_key_fails_connect_without_retry(pc_make):
    async with Simulator(api_keys={"good-key"}) as sim:
        pc = pc_make(sim.url, api_key="bad-key")
        with pytest.raises(PinecallError) as info:
            await pc.connect()
        assert info.value.code == "UNAUTHORIZED"
        await pc_settled(pc)  # no connection loop was started: nothing retries, now or later
        assert pc_connection(pc).supervisor is None and pc.state is State.IDLE
        assert frames(sim, "connect") == [{"event": "connect", "api_key": "bad-key"}]
        assert not pc.connected


async def test_rejected_key_on_reconnect_stops(pc_make):
    async with Simulator(api_keys={"good-key"}) as sim:
        pc = pc_make(sim.url, api_key="good-key")
        lifecycle = PcRecorder()
        for name in ("disconnected", "reconnecting", "error", "connected"):
            pc.on(name, lifecycle)
        support = pc.agent("support")
        await pc.connect()
        await support.wait_registered(timeout=3)

        sim.api_keys = frozenset({"rotated-key"})
        await sim.drop_connections()
        error = await lifecycle.wait_for("error")
        assert isinstance(error, ErrorEvent) and error.code == "UNAUTHORIZED" and error.fatal
        await pc_settled(pc)  # its connection loop ended on its own: it will never reconnect
        assert len(frames(sim, "connect")) == 2
        assert lifecycle.names() == ["connected", "disconnected", "reconnecting", "error"]
        with pytest.raises(PinecallError) as info:
            await support.pause()
        assert info.value.code == "UNAUTHORIZED"
        assert pc.failure is None  # a refusal the client reports, not a failure of its own
        assert pc.state is State.STOPPED


async def test_agent_conflict_is_retried_until_the_holder_leaves(pc_make):
    async with Simulator(on_duplicate_agent="conflict") as sim:
        holder = pc_make(sim.url)
        held = holder.agent("support")
        await holder.connect()
        await held.wait_registered(timeout=3)

        pc = pc_make(sim.url)
        errors = PcRecorder()
        pc.on("error", errors)
        support = pc.agent("support", language="en")
        support.add_whatsapp(phone_number_id="123", access_token="tok")
        await pc.connect()
        queued = asyncio.create_task(support.pause(contact=PHONE, timeout=5))
        await pc_eventually(lambda: len(frames(sim, "agent.create")) >= 4)
        assert not support.registered and not queued.done()

        await holder.close()
        await support.wait_registered(timeout=3)
        assert (await queued).contact == PHONE
        assert errors.events == []  # retried conflicts are not errors
        creates = frames(sim, "agent.create")
        assert all(f == {"event": "agent.create", "agent_id": "support", "language": "en"} for f in creates[1:])
        assert frames(sim, "session.pause") == [{"event": "session.pause", "agent_id": "support", "contact": PHONE}]


async def test_agent_conflict_gives_up(pc_make):
    async with Simulator(on_duplicate_agent="conflict") as sim:
        holder = pc_make(sim.url)
        holder.agent("support")
        await holder.connect()
        await holder.agents["support"].wait_registered(timeout=3)

        pc = pc_make(sim.url, conflict_give_up_after=0.3)
        errors = PcRecorder()
        pc.on("error", errors)
        support = pc.agent("support")
        queued = asyncio.create_task(support.pause(timeout=5))
        await pc.connect()
        with pytest.raises(PinecallError) as info:
            await support.wait_registered(timeout=3)
        assert info.value.code == "AGENT_CONFLICT"
        error = await errors.wait_for("error")
        assert error.code == "AGENT_CONFLICT" and error.fatal and error.agent_id == "support"
        assert error.retry_after_s == 5 and error.holder_alive is True
        with pytest.raises(PinecallError) as info:
            await queued
        assert info.value.code == "AGENT_CONFLICT"
        # no more attempts: the registration was given up on this connection (the core
        # sends agent.create again only from BACKING_OFF, or on reregister() or a new
        # connection), after its last refusal was answered
        assert pc_agent_state(pc).phase is Phase.REFUSED
        count = len(frames(sim, "agent.create"))
        # a round trip on the same socket after it: the server has read all it was sent
        other = pc.agent("other")
        await other.wait_registered(timeout=3)
        assert len(frames(sim, "agent.create")) == count + 1
        assert frames(sim, "agent.create")[-1] == {"event": "agent.create", "agent_id": "other"}
        assert frames(sim, "session.pause") == []
        assert pc.connected  # the connection itself is fine


async def test_server_at_capacity_is_reported(pc_make):
    async with Simulator(capacity=1) as sim:
        first = pc_make(sim.url)
        first.agent("a")
        await first.connect()
        await first.agents["a"].wait_registered(timeout=3)

        pc = pc_make(sim.url)
        errors = PcRecorder()
        pc.on("error", errors)
        b = pc.agent("b")
        await pc.connect()
        error = await errors.wait_for("error")
        assert error.code == "SERVER_AT_CAPACITY" and (error.used, error.limit) == (1, 1)
        assert "1 of 1" in error.message
        with pytest.raises(PinecallError) as info:
            await b.wait_registered(timeout=1)
        assert info.value.code == "SERVER_AT_CAPACITY"


# --- odds and ends -------------------------------------------------------------------


async def test_direct_send_without_session(pc_sim, pc_support, caplog):
    pc, support = pc_support
    responses = PcRecorder()
    support.on("whatsapp.response", responses)
    caplog.set_level(logging.WARNING, logger="pinecall_sdk")
    sent = await support.send_message(contact="34699999999", text="We shipped it.")
    assert sent.contact == "34699999999" and sent.session_id is None
    response = await responses.wait_for("whatsapp.response")
    assert (response.session_id, response.to, response.source) == (None, "34699999999", "human")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_close_from_inside_a_handler(pc_sim, pc_support):
    pc, support = pc_support
    closed = asyncio.Event()
    lifecycle = PcRecorder()
    pc.on("disconnected", lifecycle)

    @support.on("whatsapp.message")
    async def stop(event):
        await pc.close()
        closed.set()

    await pc_sim.customer_says(phone=PHONE, text="stop")
    await asyncio.wait_for(closed.wait(), 3)
    assert not pc.connected
    await lifecycle.wait_for("disconnected")


async def test_connect_twice_and_context_manager(pc_sim):
    async with Pinecall(api_key="k", url=pc_sim.url, ping_interval=None) as pc:
        await pc.connect()  # already connected: nothing happens
        assert pc.connected and len(frames(pc_sim, "connect")) == 1
        agent = pc.agent("support")
        await agent.wait_registered(timeout=3)
    assert not pc.connected


async def test_wait_registered_times_out_and_reregister(pc_make):
    async with Simulator(on_duplicate_agent="conflict") as sim:
        holder = pc_make(sim.url)
        holder.agent("support")
        await holder.connect()
        await holder.agents["support"].wait_registered(timeout=3)

        pc = pc_make(sim.url, conflict_give_up_after=60)  # still retrying during the first wait
        support = pc.agent("support")
        await pc.connect()
        with pytest.raises(PinecallTimeout):
            await support.wait_registered(timeout=0.05)
        pc.conflict_give_up_after = 0.2  # read at every refusal: now it gives up soon
        with pytest.raises(PinecallError) as info:
            await support.wait_registered(timeout=3)
        assert info.value.code == "AGENT_CONFLICT"
        with pytest.raises(PinecallError) as info:
            await support.pause()
        assert info.value.code == "AGENT_CONFLICT"

        await holder.close()
        support.reregister()
        await support.wait_registered(timeout=3)
        assert isinstance(await support.pause(), SessionPausedEvent)
