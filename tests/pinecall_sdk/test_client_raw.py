"""The client against tiny hand-driven servers: what the simulator never does
(silence, unconfirmed commands, drops at chosen moments, odd but legal frames)."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from pinecall_sdk import (
    PinecallError,
    PinecallTimeout,
    SessionPausedEvent,
    SessionSentEvent,
)

from pinecall_sdk.connection import State

from .conftest import PcRawServer, PcRecorder, pc_connection, pc_eventually, pc_nothing_pending, pc_settled


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _send(ws, frame):
    await ws.send(json.dumps(frame))


# --- connecting ----------------------------------------------------------------------


async def test_connect_timeout_when_connected_never_comes(pc_make):
    async with PcRawServer(silent=True) as server:
        pc = pc_make(server.url, connect_timeout=0.3)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(PinecallError) as info:
            await pc.connect()
        elapsed = loop.time() - start
        assert info.value.code == "CONNECTION_TIMEOUT" and isinstance(info.value, PinecallTimeout)
        assert "within 0.3 s" in info.value.message  # the connect timeout, not another one
        assert elapsed >= 0.25  # not before it (asyncio timers never fire early); no upper bound
        assert server.frames() == [{"event": "connect", "api_key": "test-key"}]
        assert not pc.connected
        # A failed first connect is not retried: no connection loop was ever started, so
        # nothing can open another connection, now or later.
        await pc_settled(pc)
        assert pc_connection(pc).supervisor is None and pc.state is State.IDLE
        assert len(server.connections) == 1


async def test_connect_timeout_when_the_websocket_handshake_hangs(pc_make):
    async def mute(reader, writer):
        await reader.read()  # accept TCP, never answer the HTTP upgrade; wait for the client to leave
        writer.close()

    tcp = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    try:
        pc = pc_make(f"ws://127.0.0.1:{port}", connect_timeout=0.3)
        with pytest.raises(PinecallError) as info:
            await asyncio.wait_for(pc.connect(), 10)  # a guard against a hang only
        assert info.value.code == "CONNECTION_TIMEOUT"
        assert "within 0.3 s" in info.value.message  # the connect timeout covers the handshake
    finally:
        tcp.close()


async def test_connection_refused(pc_make):
    pc = pc_make(f"ws://127.0.0.1:{_free_port()}")
    with pytest.raises(PinecallError) as info:
        await pc.connect()
    assert info.value.code == "CONNECTION_FAILED"


async def test_authenticated_is_ignored_and_1008_means_unauthorized(pc_make):
    async def chatty(server, ws, frame):
        if frame["event"] == "connect":
            await _send(ws, {"event": "authenticated"})
            await _send(ws, {"event": "connected", "server": "raw"})

    async with PcRawServer(chatty) as server:
        pc = pc_make(server.url)
        everything = PcRecorder()
        pc.on("*", everything)
        await pc.connect()
        event = await everything.wait_for("connected")
        assert event.get("server") == "raw"

    async def closes_1008(server, ws, frame):
        await ws.close(1008, "go away")

    async with PcRawServer(closes_1008) as server:
        pc = pc_make(server.url)
        with pytest.raises(PinecallError) as info:
            await pc.connect()
        assert info.value.code == "UNAUTHORIZED"
        await pc_settled(pc)  # no connection loop: a rejected first connect is never retried
        assert pc_connection(pc).supervisor is None and pc.state is State.IDLE
        assert len(server.connections) == 1


# --- commands without an answer, drops ------------------------------------------------


async def test_unconfirmed_command_times_out(pc_make):
    async with PcRawServer() as server:
        pc = pc_make(server.url, command_timeout=0.3)
        support = pc.agent("support")
        await pc.connect()
        await support.wait_registered(timeout=2)
        with pytest.raises(PinecallTimeout) as info:
            await support.pause("wa-1")
        assert info.value.code == "TIMEOUT" and isinstance(info.value, TimeoutError)
        assert "server did not confirm" in info.value.message
        pc.command_timeout = 30  # the per-call timeout wins
        with pytest.raises(PinecallTimeout) as info:
            await support.send_message(contact="34", text="hi", timeout=0.05)
        assert "no answer within 0.05 s" in info.value.message  # the limit that was applied
        assert pc_nothing_pending(pc)
        assert [f["event"] for f in server.frames()] == [
            "connect", "agent.create", "session.pause", "session.send",
        ]


async def test_sent_command_fails_with_connection_lost_and_is_not_resent(pc_make):
    async def drop_on_pause(server, ws, frame):
        if frame["event"] == "session.pause":
            ws.transport.abort()
        elif frame["event"] == "session.resume":
            await _send(ws, {"event": "session.resumed", "agent_id": "support", "session_id": frame["session_id"]})
        else:
            await PcRawServer.default_answer(server, ws, frame)

    async with PcRawServer(drop_on_pause) as server:
        pc = pc_make(server.url, command_timeout=30)
        support = pc.agent("support")
        support.add_whatsapp(phone_number_id="1", access_token="t")
        await pc.connect()
        await support.wait_registered(timeout=2)
        with pytest.raises(PinecallError) as info:
            await support.pause("wa-1")
        # at the drop, not after the command timeout (that would be a PinecallTimeout, TIMEOUT)
        assert info.value.code == "CONNECTION_LOST" and not isinstance(info.value, PinecallTimeout)
        await support.wait_registered(timeout=2)  # reconnected and registered again
        # A later command through the same queue is the witness: had the pause been resent,
        # it would have been written before this one, on the same socket.
        assert (await support.resume("wa-1")).session_id == "wa-1"
        assert len(server.frames("session.pause")) == 1
        assert [f["event"] for f in server.frames(connection=2)] == [
            "connect", "agent.create", "channel.add", "session.resume",
        ]


async def test_command_queued_during_registration_survives_a_drop(pc_make):
    async def slow_first_registration(server, ws, frame):
        if frame["event"] == "agent.create" and len(server.connections) == 1:
            ws.transport.abort()  # never answered: the command stays queued
            return
        if frame["event"] == "session.pause":
            await _send(ws, {"event": "session.paused", "agent_id": "support", "session_id": frame["session_id"]})
            return
        await PcRawServer.default_answer(server, ws, frame)

    async with PcRawServer(slow_first_registration) as server:
        pc = pc_make(server.url, command_timeout=3)
        support = pc.agent("support")
        support.add_whatsapp(phone_number_id="1", access_token="t")
        await pc.connect()
        confirmation = await support.pause("wa-1")
        assert confirmation.session_id == "wa-1"
        assert [f["event"] for f in server.frames(connection=1)] == ["connect", "agent.create"]
        assert [f["event"] for f in server.frames(connection=2)] == [
            "connect", "agent.create", "channel.add", "session.pause",
        ]


# --- matching --------------------------------------------------------------------------


async def test_confirmations_matched_by_target_not_arrival(pc_make):
    held: list = []

    async def hold_then_answer_backwards(server, ws, frame):
        if frame["event"] in ("session.pause", "session.send"):
            held.append(frame)
            if len(held) == 4:
                await _send(ws, {"event": "session.paused", "agent_id": "support", "contact": "34"})
                await _send(ws, {"event": "session.sent", "agent_id": "support", "session_id": "wa-9"})
                await _send(ws, {"event": "session.paused", "agent_id": "support", "session_id": "wa-2"})
                await _send(ws, {"event": "session.paused", "agent_id": "support", "session_id": "wa-1"})
            return
        await PcRawServer.default_answer(server, ws, frame)

    async with PcRawServer(hold_then_answer_backwards) as server:
        pc = pc_make(server.url)
        support = pc.agent("support")
        await pc.connect()
        results = await asyncio.gather(
            support.pause("wa-1"), support.pause("wa-2"),
            support.send_message(contact="34", text="hi"), support.pause(contact="34"),
        )
        assert [getattr(r, "session_id", None) for r in results[:2]] == ["wa-1", "wa-2"]
        # a contact send confirmed with the session the server resolved
        assert isinstance(results[2], SessionSentEvent) and results[2].session_id == "wa-9"
        assert isinstance(results[3], SessionPausedEvent) and results[3].contact == "34"


async def test_errors_matched_by_session_else_oldest(pc_make):
    held: list = []

    async def refuse(server, ws, frame):
        if frame["event"] == "session.pause" and frame.get("session_id") == "wa-1":
            held.append(frame)  # answered after the error for wa-2: both are in flight then
        elif frame["event"] == "session.pause" and frame.get("session_id") == "wa-2":
            # the old style: text under "error", no agent_id
            await _send(ws, {"event": "error", "code": "SESSION_NOT_FOUND", "error": "gone", "session_id": "wa-2"})
            for pause in held:
                await _send(ws, {"event": "session.paused", "agent_id": "support", "session_id": pause["session_id"]})
        elif frame["event"] == "session.resume":
            await _send(ws, {"event": "error", "code": "INVALID_COMMAND", "message": "nope"})
        else:
            await PcRawServer.default_answer(server, ws, frame)

    async with PcRawServer(refuse) as server:
        pc = pc_make(server.url)
        errors = PcRecorder()
        pc.on("error", errors)
        support = pc.agent("support")
        await pc.connect()
        await support.wait_registered(timeout=2)
        ok_task = asyncio.create_task(support.pause("wa-1"))
        await server.wait_frame("session.pause")  # wa-1 is in flight (and older) first
        with pytest.raises(PinecallError) as info:
            await support.pause("wa-2")
        assert (info.value.code, info.value.message) == ("SESSION_NOT_FOUND", "gone")
        assert info.value.frame["session_id"] == "wa-2"
        assert (await ok_task).session_id == "wa-1"
        with pytest.raises(PinecallError) as info:
            await support.resume()
        assert info.value.code == "INVALID_COMMAND"
        # an error nobody is waiting for goes to the "error" handlers
        await _send(server.connections[0], {"event": "error", "code": "RATE_LIMITED", "message": "slow down"})
        event = await errors.wait_for("error")
        assert event.code == "RATE_LIMITED" and event.message == "slow down" and not event.fatal


# --- displacement ----------------------------------------------------------------------


async def test_displaced_frame_for_every_agent_stops_the_client(pc_make):
    async def displace_on_ping(server, ws, frame):
        if frame["event"] == "ping":
            await _send(ws, {"event": "agent.displaced", "agent_id": "a", "reason": "taken"})
            await _send(ws, {"event": "agent.displaced", "agent_id": "b", "reason": "taken"})
            return  # and keep the socket open: the client must hang up itself
        await PcRawServer.default_answer(server, ws, frame)

    async with PcRawServer(displace_on_ping) as server:
        pc = pc_make(server.url, ping_interval=0.05)
        lifecycle = PcRecorder()
        for name in ("disconnected", "reconnecting", "error"):
            pc.on(name, lifecycle)
        a, b = pc.agent("a"), pc.agent("b")
        await pc.connect()
        disconnected = await lifecycle.wait_for("disconnected")
        assert disconnected.reconnect is False
        await pc_settled(pc)  # its connection loop ended on its own: it will never reconnect
        assert lifecycle.of("reconnecting") == []
        assert len(server.connections) == 1
        assert a.displaced and b.displaced and not pc.connected and pc.state is State.STOPPED
        codes = [(e.agent_id, e.code) for e in lifecycle.of("error")]
        assert ("a", "DISPLACED") in codes and ("b", "DISPLACED") in codes and (None, "DISPLACED") in codes


async def test_close_reason_displaced_stops_the_client(pc_make):
    async def close_displaced(server, ws, frame):
        await PcRawServer.default_answer(server, ws, frame)
        if frame["event"] == "agent.create":
            await ws.close(4000, "Displaced by a new connection")

    async with PcRawServer(close_displaced) as server:
        pc = pc_make(server.url)
        lifecycle = PcRecorder()
        pc.on("disconnected", lifecycle)
        pc.on("reconnecting", lifecycle)
        support = pc.agent("support")
        await pc.connect()
        event = await lifecycle.wait_for("disconnected")
        assert (event.code, event.reconnect) == (4000, False)
        await pc_settled(pc)  # its connection loop ended on its own: it will never reconnect
        assert len(server.connections) == 1 and lifecycle.of("reconnecting") == []
        with pytest.raises(PinecallError) as info:
            await support.pause()
        assert info.value.code == "DISPLACED"


async def test_normal_server_close_is_reconnected(pc_make):
    async def close_once(server, ws, frame):
        await PcRawServer.default_answer(server, ws, frame)
        if frame["event"] == "agent.create" and len(server.connections) == 1:
            await ws.close(1001, "going away")

    async with PcRawServer(close_once) as server:
        pc = pc_make(server.url)
        support = pc.agent("support")
        await pc.connect()
        await pc_eventually(lambda: len(server.connections) == 2)
        await support.wait_registered(timeout=2)
        assert pc.connected and pc.state is State.READY
