"""Fixtures for the pinecall_sdk tests.

Client-side fixtures are prefixed ``pc_``; the simulator's own fixtures (if any)
are prefixed ``sim_``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from pinecall_sdk import Pinecall
from pinecall_sdk.connection import Connection
from pinecall_sdk.dispatch import Dispatcher
from pinecall_sdk.protocol import AgentState, ProtocolCore

PC_TEST_KEY = "test-key"

#: Small timeouts and delays so that the suite stays fast.
PC_FAST_OPTIONS: dict[str, Any] = dict(
    command_timeout=2.0,
    connect_timeout=2.0,
    ping_interval=None,
    reconnect_base_delay=0.02,
    reconnect_max_delay=0.2,
    reconnect_jitter=0.0,
    conflict_base_delay=0.02,
    conflict_max_delay=0.1,
    conflict_retry_after_cap=0.05,
    close_timeout=1.0,
)


class PcRecorder:
    """A handler that keeps every event it gets, and can wait for one."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self._changed = asyncio.Event()

    def __call__(self, event: Any) -> None:
        self.events.append(event)
        self._changed.set()

    def names(self) -> list[str]:
        return [e.event for e in self.events]

    def of(self, name: str) -> list[Any]:
        return [e for e in self.events if e.event == name]

    async def wait_for(
        self, name: str, pred: Callable[[Any], bool] = lambda e: True, timeout: float = 3.0, count: int = 1
    ) -> Any:
        async def _wait() -> Any:
            while True:
                found = [e for e in self.events if e.event == name and pred(e)]
                if len(found) >= count:
                    return found[count - 1]
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(_wait(), timeout)


async def pc_eventually(
    pred: Callable[[], bool], timeout: float = 3.0, interval: float = 0.01, what: str = "condition"
) -> None:
    """Wait until ``pred()`` is true; fail the test after ``timeout`` s (a guard against a
    hang, not a speed requirement: keep it generous)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        await asyncio.sleep(interval)


# The only door the tests use into a client's internals: its protocol core (queues,
# commands in flight, registration phases), its connection (state, socket, loop) and
# its dispatcher (handler tables).


def pc_core(pc: Pinecall) -> ProtocolCore:
    return pc._runtime.core


def pc_connection(pc: Pinecall) -> Connection:
    return pc._runtime.conn


def pc_dispatcher(pc: Pinecall) -> Dispatcher:
    return pc._runtime.dispatch


def pc_agent_state(pc: Pinecall, agent_id: str = "support") -> AgentState:
    return pc_core(pc).agents[agent_id]


def pc_nothing_pending(pc: Pinecall, agent_id: str = "support") -> bool:
    """No command of the agent is queued or in flight."""
    state = pc_agent_state(pc, agent_id)
    return not state.outbox and not state.inflight


async def pc_settled(pc: Pinecall, timeout: float = 3.0) -> None:
    """Wait until ``pc`` can no longer reconnect and has handed out every event it queued.

    Its connection loop (the only code that reconnects, and that sends "reconnecting"
    before every attempt) has ended on its own, or was never started (a failed first
    ``connect()``); and its event queue is empty (with plain-function handlers such as
    ``PcRecorder``, an event is handled in the very step it leaves the queue). After this,
    "it did not reconnect" and "no such event came" are lasting facts, not a moment's.
    """

    def settled() -> bool:
        return not pc_connection(pc).running and pc_dispatcher(pc).idle()

    await pc_eventually(settled, timeout, what="the client's connection loop ending and its events delivered")


class PcRawServer:
    """A tiny hand-driven WebSocket server, for behaviour the simulator never shows.

    ``on_frame(server, ws, frame)`` decides the answers (default: ``connected``,
    ``agent.created``, ``pong``; commands are never confirmed). Frames are kept in
    ``received`` as ``(connection number, frame)``.
    """

    def __init__(
        self,
        on_frame: Callable[["PcRawServer", ServerConnection, dict[str, Any]], Awaitable[None]] | None = None,
        silent: bool = False,
    ) -> None:
        self.on_frame = on_frame or self.default_answer
        self.silent = silent
        self.received: list[tuple[int, dict[str, Any]]] = []
        self.connections: list[ServerConnection] = []
        self._server: Any = None
        self._changed = asyncio.Event()

    @staticmethod
    async def default_answer(server: "PcRawServer", ws: ServerConnection, frame: dict[str, Any]) -> None:
        event = frame.get("event")
        if event == "connect":
            await ws.send(json.dumps({"event": "connected"}))
        elif event == "agent.create":
            await ws.send(json.dumps({"event": "agent.created", "agent_id": frame["agent_id"]}))
        elif event == "ping":
            await ws.send(json.dumps({"event": "pong"}))

    async def _handle(self, ws: ServerConnection) -> None:
        self.connections.append(ws)
        number = len(self.connections)
        try:
            async for message in ws:
                frame = json.loads(message)
                self.received.append((number, frame))
                self._changed.set()
                if not self.silent:
                    await self.on_frame(self, ws, frame)
        except ConnectionClosed:
            pass

    def frames(self, event: str | None = None, connection: int | None = None) -> list[dict[str, Any]]:
        return [
            f for n, f in self.received
            if (event is None or f.get("event") == event) and (connection is None or n == connection)
        ]

    async def wait_frame(self, event: str, count: int = 1, timeout: float = 3.0) -> dict[str, Any]:
        async def _wait() -> dict[str, Any]:
            while True:
                found = self.frames(event)
                if len(found) >= count:
                    return found[count - 1]
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(_wait(), timeout)

    @property
    def url(self) -> str:
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}"

    async def __aenter__(self) -> "PcRawServer":
        self._server = await serve(self._handle, "127.0.0.1", 0, compression=None)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
def pc_fresh_readings(monkeypatch):
    """Forget which lenient readings were already logged (each is logged once per process)."""
    from pinecall_sdk import events

    monkeypatch.setattr(events, "_reported_readings", set())


@pytest.fixture
async def pc_sim():
    from pinecall_sdk.simulator import Simulator

    async with Simulator() as sim:
        yield sim


@pytest.fixture
async def pc_make():
    """``pc_make(url, **options)``: a Pinecall with fast test defaults, closed at teardown."""
    clients: list[Pinecall] = []

    def make(url: str, **options: Any) -> Pinecall:
        options.setdefault("api_key", PC_TEST_KEY)
        for key, value in PC_FAST_OPTIONS.items():
            options.setdefault(key, value)
        pc = Pinecall(url=url, **options)
        clients.append(pc)
        return pc

    yield make
    for pc in clients:
        await pc.close()


@pytest.fixture
async def pc_support(pc_sim, pc_make):
    """A connected client with a registered "support" agent on a WhatsApp channel."""
    pc = pc_make(pc_sim.url)
    support = pc.agent("support", language="en", llm="openai/gpt-4.1-mini", prompt="You are helpful.")
    support.add_whatsapp(phone_number_id="123", access_token="EAA-token")
    channel = PcRecorder()
    support.on("channel.added", channel)
    await pc.connect()
    await support.wait_registered(timeout=3)
    await channel.wait_for("channel.added")  # so that tests start with nothing in flight
    support.off("channel.added", channel)
    return pc, support


# --- voice ----------------------------------------------------------------------------

PC_NUMBER = "+13186330963"  # the phone number the voice fixtures' agent adds
PC_CALLER = "+14155550123"


@pytest.fixture
async def pc_voice_sim():
    """A simulator whose calls run at no speech pace at all (events in order, no waits)."""
    from pinecall_sdk.simulator import Simulator

    async with Simulator(voice_pace=0.0) as sim:
        yield sim


@pytest.fixture
async def pc_voice(pc_voice_sim, pc_make):
    """``(pc, support, recorder)``: a connected client whose "support" agent (with a
    server-side LLM) added ``PC_NUMBER``; ``recorder`` gets every event of the agent."""
    pc = pc_make(pc_voice_sim.url)
    support = pc.agent("support", language="en", llm="openai/gpt-4.1-mini", prompt="You are helpful.")
    support.add_phone(PC_NUMBER)
    recorder = PcRecorder()
    support.on("*", recorder)
    await pc.connect()
    await support.wait_registered(timeout=3)
    await recorder.wait_for("channel.added")
    return pc, support, recorder
