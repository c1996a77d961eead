"""Crash-only: a bug in one of the client's own loops stops it for good, loudly.

The bug is forced by monkeypatching an internal function to raise (of the protocol
core, the dispatcher, or a frame builder of ``pinecall_sdk.protocol``); the tests check
the public signals (``failure``, ``wait_failed()``, ``"fatal"`` handlers), that the
socket is closed and that pending commands fail.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.protocol import State

from pinecall_sdk import PinecallError, protocol
from pinecall_sdk.connection import State as ClientState

from .conftest import PcRawServer, PcRecorder, pc_connection, pc_core, pc_dispatcher, pc_eventually

PHONE = "34612345678"


async def answer_pause_with_a_message(server, ws, frame):
    """Never confirms a pause; sends a customer message instead (the frame that hits the bug)."""
    if frame["event"] == "session.pause":
        await ws.send(json.dumps({
            "event": "whatsapp.message", "agent_id": "support", "session_id": "wa-1",
            "from": PHONE, "text": "hello?", "message_id": "m1", "paused": False,
        }))
    else:
        await PcRawServer.default_answer(server, ws, frame)


@pytest.mark.parametrize(
    "broken, delivered_before_fatal",
    [
        # reading: the frame's handling (the core's routing) raises in the reader; the
        # dispatcher still delivers what was received, then "disconnected" and the fatal "error"
        ((pc_core, "route"), ["disconnected", "error"]),
        # dispatching: the dispatcher itself is gone; nothing more is delivered
        ((pc_dispatcher, "handlers_for"), []),
    ],
    ids=["reading", "dispatching"],
)
async def test_a_bug_in_a_loop_is_fatal_closes_the_socket_and_fails_commands(
        pc_make, monkeypatch, broken, delivered_before_fatal):
    async with PcRawServer(answer_pause_with_a_message) as server:
        pc = pc_make(server.url, command_timeout=10)
        support = pc.agent("support")
        registered = PcRecorder()
        support.on("registered", registered)
        lifecycle = PcRecorder()
        for name in ("disconnected", "reconnecting", "error"):
            pc.on(name, lifecycle)
        calls: list[BaseException] = []
        pc.on("fatal", calls.append)

        @pc.on("fatal")
        async def broken_fatal_handler(exc):
            raise RuntimeError("a fatal handler that fails does not stop the others")

        pc.on("fatal", lambda exc: calls.append(exc))
        await pc.connect()
        await registered.wait_for("registered")  # dispatched before the bug is planted
        socket = pc_connection(pc).ws
        assert pc.failure is None

        part, method = broken
        bug = RuntimeError(f"a bug in {method}")

        def raise_bug(*args, **kwargs):
            raise bug

        monkeypatch.setattr(part(pc), method, raise_bug)
        pause = asyncio.create_task(support.pause("wa-1"))

        assert await asyncio.wait_for(pc.wait_failed(), 5) is bug
        assert pc.failure is bug
        assert calls == [bug, bug]  # every "fatal" handler, with the exception itself
        assert lifecycle.names() == delivered_before_fatal
        if delivered_before_fatal:
            disconnected, error = lifecycle.events
            assert disconnected.reconnect is False
            assert error.code == "INTERNAL" and error.fatal

        # the socket is closed, on both ends, and nothing reconnects
        assert socket.state is State.CLOSED and not pc.connected and pc.state is ClientState.FAILED
        await pc_eventually(lambda: server.connections[0].state is State.CLOSED)
        assert len(server.connections) == 1

        # the pause that was in flight fails; new commands and connect() fail at once
        with pytest.raises(PinecallError) as info:
            await asyncio.wait_for(pause, 1)
        assert info.value.code == "INTERNAL" and "restart the process" in info.value.message
        assert [f["event"] for f in server.frames()] == ["connect", "agent.create", "session.pause"]
        with pytest.raises(PinecallError) as info:
            await support.pause("wa-1")
        assert info.value.code == "INTERNAL"
        with pytest.raises(PinecallError) as info:
            await support.wait_registered(timeout=1)
        assert info.value.code == "INTERNAL"
        with pytest.raises(PinecallError) as info:
            await pc.connect()
        assert info.value.code == "INTERNAL" and info.value.__cause__ is bug

        assert await pc.wait_failed() is bug  # again: returns at once
        await pc.close()
        assert pc.failure is bug


async def test_a_bug_in_registration_after_a_reconnect_is_fatal(pc_sim, pc_support, monkeypatch):
    pc, support = pc_support
    fatal = PcRecorder()
    pc.on("fatal", fatal)
    bug = ValueError("a bug while registering")

    def broken_channel_frame(*args, **kwargs):
        raise bug

    # built when agent.created / agent.resumed arrives, to add the channel back
    monkeypatch.setattr(protocol, "channel_frame", broken_channel_frame)
    await pc_sim.drop_connections()

    assert await asyncio.wait_for(pc.wait_failed(), 5) is bug
    assert fatal.events == [bug]
    await pc_eventually(lambda: not pc_sim.connected_agents)  # its new socket is closed too
    assert not pc.connected and not support.registered
    with pytest.raises(PinecallError) as info:
        await support.get_history("wa-1")
    assert info.value.code == "INTERNAL"


async def test_a_wire_frame_named_fatal_is_only_an_event(pc_sim, pc_support):
    pc, support = pc_support
    fatal: list = []
    pc.on("fatal", fatal.append)
    everything = PcRecorder()
    pc.on("*", everything)
    await pc_sim.inject({"event": "fatal", "agent_id": "support"})
    await pc_sim.inject({"event": "fatal"})
    await everything.wait_for("fatal", count=2)
    assert fatal == [] and pc.failure is None and pc.connected


async def test_a_handler_exception_is_not_a_failure(pc_sim, pc_support):
    pc, support = pc_support
    got = PcRecorder()

    @support.on("whatsapp.message")
    def broken(event):
        raise RuntimeError("a handler's bug is the application's")

    support.on("whatsapp.message", got)
    await pc_sim.customer_says(phone=PHONE, text="one")
    await got.wait_for("whatsapp.message")
    assert pc.failure is None and pc.connected
