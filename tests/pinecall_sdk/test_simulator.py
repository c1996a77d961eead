"""The Pinecall server simulator, tested over real sockets with raw websockets clients.

Each row of the protocol document's tables (commands, confirmations, events)
has a test that checks the frames carry exactly the documented keys (plus
``agent_id`` where the document has it or the simulator adds it on
``whatsapp.*`` events).
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from pinecall_sdk.simulator import Simulator

from .conftest import pc_eventually

PHONE = "34612345678"
NAME = "Ana García"
SESSION_ID_RE = re.compile(r"^wa-[0-9a-f]{12}$")

# The documented key sets (``agent_id`` included where the doc or our choices put it).
KEYS = {
    "connected": {"event"},
    "pong": {"event"},
    "ping": {"event"},
    "agent.created": {"event", "agent_id"},
    "agent.resumed": {"event", "agent_id"},
    "agent.displaced": {"event", "agent_id", "reason"},
    "channel.added": {"event", "agent_id", "type", "ref"},
    "history.data": {"event", "agent_id", "request_id", "call_id", "messages"},
    "history.data.error": {"event", "agent_id", "request_id", "call_id", "error"},
    "history.updated": {"event", "agent_id", "request_id", "call_id"},
    "error": {"event", "code", "message"},
    "session.paused.session": {"event", "agent_id", "session_id"},
    "session.paused.contact": {"event", "agent_id", "contact"},
    "session.paused.agent": {"event", "agent_id"},
    "session.sent": {"event", "agent_id", "session_id"},
    "whatsapp.session_started": {"event", "agent_id", "session_id", "contact_phone",
                                 "contact_name"},
    "whatsapp.message": {"event", "agent_id", "session_id", "from", "name", "type", "text",
                         "message_id", "paused"},
    "whatsapp.response.ai": {"event", "agent_id", "session_id", "to", "text"},
    "whatsapp.response.human": {"event", "agent_id", "session_id", "to", "text", "source"},
    "whatsapp.status": {"event", "agent_id", "status", "recipient", "message_id"},
    "whatsapp.session_ended": {"event", "agent_id", "session_id", "contact_phone",
                               "contact_name", "reason", "started_at", "ended_at", "duration",
                               "message_count", "transcript", "messages"},
}


# --------------------------------------------------------------------------- helpers


class Client:
    """A raw protocol client: JSON frames over a websockets connection, nothing else."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._probes = 0

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self, timeout: float = 3.0) -> dict[str, Any]:
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def recv_n(self, n: int, timeout: float = 3.0) -> list[dict[str, Any]]:
        return [await self.recv(timeout) for _ in range(n)]

    async def expect(self, event: str, timeout: float = 3.0, **match: Any) -> dict[str, Any]:
        """Read frames until one with this event (and these fields) arrives."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv(timeout)
                if frame.get("event") == event and all(frame.get(k) == v for k, v in match.items()):
                    return frame

    async def silent(self) -> None:
        """Assert that nothing is on its way to this client.

        The witness is a probe the simulator answers at once (an unknown event: an
        ``UNKNOWN_EVENT`` error naming it), which must be the very next frame: the
        simulator handles a connection's frames in order and writes what it produces in
        order, so any frame already due would come before the answer. (This holds for
        frames produced at once, i.e. a simulator without ``ai_delay``/``status_delay``.)
        """
        self._probes += 1
        probe = f"test.probe.{self._probes}"
        await self.send({"event": probe})
        frame = await self.recv()
        assert frame.get("event") == "error" and frame.get("code") == "UNKNOWN_EVENT" \
            and probe in frame.get("message", ""), f"unexpected frame {frame}"

    async def close_code(self, timeout: float = 3.0) -> tuple[int | None, str | None]:
        """Read until the server closes; return (code, reason) of its close frame."""
        with pytest.raises(ConnectionClosed) as info:
            async with asyncio.timeout(timeout):
                while True:
                    await self.ws.recv()
        rcvd = info.value.rcvd
        return (rcvd.code, rcvd.reason) if rcvd else (None, None)

    async def command(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send a command and return the next frame."""
        await self.send(frame)
        return await self.recv()

    async def close(self) -> None:
        await self.ws.close()


async def open_ws(sim: Simulator, path: str = "/client") -> Client:
    return Client(await connect(sim.url + path, compression=None))


async def open_client(
    sim: Simulator, agent_id: str | None = "support", channel: bool = True, key: str = "key"
) -> Client:
    """Connect, authenticate, register ``agent_id`` and add its WhatsApp channel."""
    client = await open_ws(sim)
    assert await client.command({"event": "connect", "api_key": key}) == {"event": "connected"}
    if agent_id:
        reply = await client.command({"event": "agent.create", "agent_id": agent_id,
                                      "language": "en", "prompt": "Be nice."})
        assert reply["event"] in ("agent.created", "agent.resumed"), reply
        if channel:
            reply = await client.command({"event": "channel.add", "agent_id": agent_id,
                                          "type": "whatsapp", "ref": "1234567890",
                                          "accessToken": "EAAG-token"})
            assert reply["event"] == "channel.added", reply
    return client


async def customer_turn(sim: Simulator, client: Client, text: str = "Where is my order?",
                        phone: str = PHONE, **kw: Any) -> tuple[dict[str, Any], list[dict]]:
    """The customer writes once; read the message and whatever the AI sends (unpaused)."""
    result = await sim.customer_says(phone=phone, name=kw.pop("name", NAME), text=text, **kw)
    message = await client.expect("whatsapp.message", message_id=result["message_id"])
    frames = [] if message["paused"] else await client.recv_n(4)
    return message, frames


class SimClock:
    """A hand-driven ``time.monotonic`` for the simulator's timing (idle, window, grace).

    The simulator's timers still run on the event loop, but they only act on what this
    clock says, so a test decides how much time has passed, whatever the machine's speed.
    """

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def sim_clock(monkeypatch):
    from pinecall_sdk.simulator import server

    clock = SimClock()
    monkeypatch.setattr(server, "time", clock)  # its only use of `time` is monotonic()
    return clock


@pytest.fixture
async def sim_server():
    async with Simulator() as sim:
        yield sim


@pytest.fixture
async def sim_client(sim_server):
    client = await open_client(sim_server)
    yield client
    await client.close()


async def started_session(sim: Simulator, client: Client, text: str = "Hi there") -> str:
    result = await sim.customer_says(phone=PHONE, name=NAME, text=text)
    await client.expect("whatsapp.message", message_id=result["message_id"])
    if not sim.is_paused(result["session_id"]):
        await client.expect("whatsapp.status", status="read")
    return result["session_id"]


# --------------------------------------------------------------------------- handshake


async def test_connect_with_a_good_key_gets_connected():
    async with Simulator(api_keys={"good"}) as sim:
        client = await open_ws(sim)
        reply = await client.command({"event": "connect", "api_key": "good"})
        assert reply == {"event": "connected"}
        assert set(reply) == KEYS["connected"]
        assert sim.received[0] == {"event": "connect", "api_key": "good"}
        await client.close()


async def test_any_non_empty_key_is_accepted_by_default(sim_server):
    client = await open_ws(sim_server)
    reply = await client.command({"event": "connect", "api_key": "whatever"})
    assert reply == {"event": "connected"}
    await client.close()


@pytest.mark.parametrize(
    "first_frame",
    [
        {"event": "connect", "api_key": "bad"},
        {"event": "connect"},
        {"event": "connect", "api_key": ""},
        {"event": "connect", "api_key": 42},
        {"event": "agent.create", "agent_id": "support"},
        {"event": "ping"},
        "not json at all",
    ],
    ids=["wrong-key", "no-key", "empty-key", "non-string-key", "no-connect", "ping-first",
         "garbage"],
)
async def test_rejected_handshake_is_unauthorized_and_closed_1008(first_frame):
    async with Simulator(api_keys=["good"]) as sim:
        client = await open_ws(sim)
        await client.send(first_frame)
        error = await client.recv()
        assert set(error) == KEYS["error"]
        assert error["event"] == "error" and error["code"] == "UNAUTHORIZED"
        assert error["message"]
        code, _ = await client.close_code()
        assert code == 1008
        assert not any(f.get("event") == "connected" for f in sim.sent)


async def test_no_connect_frame_in_time_is_unauthorized():
    async with Simulator(auth_timeout=0.1) as sim:
        client = await open_ws(sim)
        assert (await client.recv())["code"] == "UNAUTHORIZED"
        assert (await client.close_code())[0] == 1008


async def test_only_the_client_path_is_served(sim_server):
    client = await open_ws(sim_server, "/elsewhere")
    code, reason = await client.close_code()
    assert code == 1008 and "/client" in reason


# --------------------------------------------------------------------------- agents


async def test_agent_create_gets_agent_created(sim_server):
    client = await open_client(sim_server, agent_id=None)
    reply = await client.command({"event": "agent.create", "agent_id": "support",
                                  "llm": "openai/gpt-4.1-mini"})
    assert reply == {"event": "agent.created", "agent_id": "support"}
    assert set(reply) == KEYS["agent.created"]
    assert sim_server.connected_agents == {"support"}
    assert sim_server.agent("support").config == {"llm": "openai/gpt-4.1-mini"}
    await client.close()


async def test_agent_resumed_replays_last_events_then_buffered_ones():
    async with Simulator(replay_last=3, resume_grace=5) as sim:
        first = await open_client(sim)
        assert (await first.command({"event": "session.pause", "agent_id": "support"}))["event"] \
            == "session.paused"
        ids = [(await sim.customer_says(phone=PHONE, name=NAME, text=f"m{i}"))["message_id"]
               for i in range(3)]
        await first.expect("whatsapp.message", message_id=ids[-1])
        await sim.drop_connections()
        assert sim.connected_agents == set()

        ids += [(await sim.customer_says(phone=PHONE, name=NAME, text=f"m{i}"))["message_id"]
                for i in (3, 4)]  # while offline: buffered

        second = await open_client(sim, channel=False)  # asserts created/resumed
        assert sim.sent[-6]["event"] == "agent.resumed"
        frames = await second.recv_n(5)
        assert [f["message_id"] for f in frames] == ids  # replay of 3, then the 2 buffered
        assert all(f["event"] == "whatsapp.message" and f["paused"] for f in frames)
        await second.silent()
        # A client that deduplicates by message_id stores each message exactly once.
        assert len({f["message_id"] for f in frames}) == 5
        await second.close()


async def test_agent_resumed_frame_shape_after_a_drop():
    async with Simulator(resume_grace=5) as sim:
        await open_client(sim)
        await sim.drop_connections()
        client = await open_client(sim, agent_id=None)
        reply = await client.command({"event": "agent.create", "agent_id": "support"})
        assert reply == {"event": "agent.resumed", "agent_id": "support"}
        assert set(reply) == KEYS["agent.resumed"]
        await client.close()


async def test_registering_again_on_the_same_connection_is_resumed_without_replay(
        sim_server, sim_client):
    await customer_turn(sim_server, sim_client)
    reply = await sim_client.command({"event": "agent.create", "agent_id": "support"})
    assert reply == {"event": "agent.resumed", "agent_id": "support"}
    await sim_client.silent()


async def test_after_the_grace_period_it_is_created_again_and_gets_buffered_events(sim_clock):
    async with Simulator(resume_grace=0.05) as sim:
        first = await open_client(sim)
        await customer_turn(sim, first, "hello")
        await sim.drop_connections()
        result = await sim.customer_says(phone=PHONE, name=NAME, text="anyone?")
        sim_clock.advance(0.1)  # the grace period is over
        client = await open_client(sim, agent_id=None)
        assert (await client.command({"event": "agent.create", "agent_id": "support"}))["event"] \
            == "agent.created"
        message = await client.recv()  # no replay; the buffered events follow
        assert message["event"] == "whatsapp.message"
        assert message["message_id"] == result["message_id"]
        await client.close()


async def test_a_second_connection_displaces_the_first(sim_server):
    first = await open_client(sim_server)
    second = await open_client(sim_server, channel=False)
    displaced = await first.recv()
    assert displaced["event"] == "agent.displaced"
    assert set(displaced) == KEYS["agent.displaced"]
    assert displaced["agent_id"] == "support" and "Displaced" in displaced["reason"]
    code, reason = await first.close_code()
    assert code == 4000 and "Displaced" in reason
    # Events now go to the new connection.
    result = await sim_server.customer_says(phone=PHONE, name=NAME, text="hi")
    await second.expect("whatsapp.message", message_id=result["message_id"])
    assert sim_server.connected_agents == {"support"}
    await second.close()


async def test_conflict_mode_refuses_the_second_connection_while_the_holder_lives():
    async with Simulator(on_duplicate_agent="conflict", resume_grace=5) as sim:
        holder = await open_client(sim)
        other = await open_client(sim, agent_id=None)
        error = await other.command({"event": "agent.create", "agent_id": "support"})
        assert set(error) == KEYS["error"] | {"agent_id", "retry_after_s", "holder_alive"}
        assert error["code"] == "AGENT_CONFLICT"
        assert error["holder_alive"] is True and error["retry_after_s"] > 0
        assert await holder.command({"event": "ping"}) == {"event": "pong"}  # untouched
        # Once the holder is gone, the retry succeeds.
        await sim.drop_connections(agent_id="support")
        assert (await other.command({"event": "agent.create", "agent_id": "support"}))["event"] \
            == "agent.resumed"
        await other.close()


async def test_capacity_limit():
    async with Simulator(capacity=1) as sim:
        client = await open_client(sim, agent_id="sales")
        error = await client.command({"event": "agent.create", "agent_id": "support"})
        assert set(error) == KEYS["error"] | {"agent_id", "used", "limit"}
        assert (error["code"], error["used"], error["limit"]) == ("SERVER_AT_CAPACITY", 1, 1)
        assert sim.connected_agents == {"sales"}
        await client.close()


async def test_channel_add_is_recorded_and_answered_with_channel_added(sim_server):
    client = await open_client(sim_server, channel=False)
    reply = await client.command({"event": "channel.add", "agent_id": "support",
                                  "type": "whatsapp", "ref": "99887766", "accessToken": "tok",
                                  "verifyToken": "v", "appSecret": "s"})
    assert reply == {"event": "channel.added", "agent_id": "support", "type": "whatsapp",
                     "ref": "99887766"}
    assert set(reply) == KEYS["channel.added"]
    await client.silent()
    channel = sim_server.agent("support").whatsapp
    assert channel["ref"] == "99887766" and channel["accessToken"] == "tok"
    assert channel["appSecret"] == "s"
    await client.close()


async def test_messages_go_to_the_agent_with_the_whatsapp_channel(sim_server):
    client = await open_client(sim_server, agent_id="sales", channel=False)
    assert (await client.command({"event": "agent.create", "agent_id": "support"}))["event"] \
        == "agent.created"
    reply = await client.command({"event": "channel.add", "agent_id": "support",
                                  "type": "whatsapp", "ref": "1", "accessToken": "t"})
    assert reply["event"] == "channel.added"
    message, _ = await customer_turn(sim_server, client)
    assert message["agent_id"] == "support"
    await client.close()


# --------------------------------------------------------------------------- keepalive


async def test_client_ping_gets_pong(sim_client):
    reply = await sim_client.command({"event": "ping"})
    assert reply == {"event": "pong"} and set(reply) == KEYS["pong"]


async def test_server_ping_and_client_pong(sim_server, sim_client):
    assert await sim_server.ping_clients() == 1
    ping = await sim_client.recv()
    assert ping == {"event": "ping"} and set(ping) == KEYS["ping"]
    mark = len(sim_server.received)
    await sim_client.send({"event": "pong"})
    assert await sim_server.wait_for("pong", after=mark) == {"event": "pong"}
    await sim_client.silent()  # the pong is not answered


# --------------------------------------------------------------------------- events table


async def test_whatsapp_session_started_and_message_fields(sim_server, sim_client):
    result = await sim_server.customer_says(phone="+34 612 345 678", name=NAME,
                                            text="Where is my order?")
    started = await sim_client.recv()
    assert set(started) == KEYS["whatsapp.session_started"]
    assert started["event"] == "whatsapp.session_started"
    assert SESSION_ID_RE.match(started["session_id"])
    assert (started["contact_phone"], started["contact_name"]) == (PHONE, NAME)
    assert result["session_id"] == started["session_id"]

    message = await sim_client.recv()
    assert set(message) == KEYS["whatsapp.message"]
    assert message["event"] == "whatsapp.message"
    assert message == {
        "event": "whatsapp.message", "agent_id": "support", "session_id": started["session_id"],
        "from": PHONE, "name": NAME, "type": "text", "text": "Where is my order?",
        "message_id": result["message_id"], "paused": False,
    }
    assert message["message_id"].startswith("wamid.")
    assert sim_server.session_for(PHONE) == started["session_id"]


async def test_second_message_of_a_session_has_no_session_started(sim_server, sim_client):
    first, _ = await customer_turn(sim_server, sim_client, "hello")
    result = await sim_server.customer_says(phone=PHONE, name=NAME, text="again")
    message = await sim_client.recv()
    assert message["event"] == "whatsapp.message"
    assert message["session_id"] == first["session_id"] == result["session_id"]
    assert message["message_id"] != first["message_id"]


@pytest.mark.parametrize("type_", ["audio", "image", "video", "document"])
async def test_message_types(sim_server, sim_client, type_):
    text = "I was charged twice, can you check?" if type_ == "audio" else "caption"
    message, frames = await customer_turn(sim_server, sim_client, text, type=type_)
    assert message["type"] == type_ and message["text"] == text
    assert frames[0]["event"] == "whatsapp.response"


async def test_ai_response_and_statuses(sim_server, sim_client):
    message, frames = await customer_turn(sim_server, sim_client, "Where is my order 48213?")
    response, *statuses = frames
    assert set(response) == KEYS["whatsapp.response.ai"]  # no "source" for the AI
    assert response["event"] == "whatsapp.response"
    assert response["session_id"] == message["session_id"] and response["to"] == PHONE
    assert "48213" in response["text"]
    for status in statuses:
        assert set(status) == KEYS["whatsapp.status"]
        assert status["event"] == "whatsapp.status" and status["recipient"] == PHONE
    assert [s["status"] for s in statuses] == ["sent", "delivered", "read"]
    assert len({s["message_id"] for s in statuses}) == 1
    assert statuses[0]["message_id"].startswith("wamid.")
    assert statuses[0]["message_id"] != message["message_id"]


async def test_statuses_keep_their_order_with_a_delay():
    async with Simulator(ai_delay=0.02, status_delay=0.02) as sim:
        client = await open_client(sim)
        await sim.customer_says(phone=PHONE, name=NAME, text="refund please")
        frames = await client.recv_n(6)
        assert [f["event"] for f in frames] == ["whatsapp.session_started", "whatsapp.message",
                                                "whatsapp.response"] + ["whatsapp.status"] * 3
        assert [f["status"] for f in frames[3:]] == ["sent", "delivered", "read"]
        await client.close()


async def test_receipt_limits_blocked_contact_stays_at_sent(sim_server, sim_client):
    sim_server.receipt_limits[PHONE] = "sent"
    await sim_server.customer_says(phone=PHONE, name=NAME, text="hi")
    frames = await sim_client.recv_n(4)
    assert frames[-1] == {**frames[-1], "event": "whatsapp.status", "status": "sent"}
    await sim_client.silent()


async def test_idle_session_ends_and_the_next_message_opens_a_new_session():
    async with Simulator(idle_timeout=0.3) as sim:
        client = await open_client(sim)
        first, _ = await customer_turn(sim, client, "Where is my order?")
        ended = await client.expect("whatsapp.session_ended", timeout=2)
        assert set(ended) == KEYS["whatsapp.session_ended"]
        assert ended["session_id"] == first["session_id"]
        assert (ended["contact_phone"], ended["contact_name"]) == (PHONE, NAME)
        assert ended["reason"] == "idle_timeout"
        # Epoch seconds, as numbers: the JavaScript SDK sorts and subtracts them.
        started, stopped = ended["started_at"], ended["ended_at"]
        assert all(type(t) is float for t in (started, stopped))
        session = sim.sessions[first["session_id"]]
        assert started == round(session.started_at.timestamp(), 3)
        assert stopped == round(session.ended_at.timestamp(), 3)
        assert stopped > started
        assert ended["duration"] >= 0.3
        assert abs((stopped - started) - ended["duration"]) < 0.01
        assert ended["message_count"] == 2
        assert [t["role"] for t in ended["transcript"]] == ["user", "assistant"]
        assert all(set(t) == {"role", "content"} for t in ended["transcript"])
        assert ended["transcript"][0]["content"] == "Where is my order?"
        # messages: chat history entries too ({role, content}), with the message records
        assert [(m["role"], m["content"]) for m in ended["messages"]] == [
            (t["role"], t["content"]) for t in ended["transcript"]]
        assert [m["message_id"] for m in ended["messages"]][0] == first["message_id"]
        assert ended["messages"][0]["source"] == "customer"
        assert sim.sessions[first["session_id"]].ended
        assert sim.session_for(PHONE) is None

        second, _ = await customer_turn(sim, client, "Hello again")
        assert second["session_id"] != first["session_id"]
        await client.close()


async def test_activity_postpones_the_idle_end(sim_clock):
    async with Simulator(idle_timeout=0.4) as sim:
        client = await open_client(sim)
        first, _ = await customer_turn(sim, client, "one")
        session = sim.sessions[first["session_id"]]
        sim_clock.advance(0.25)
        second, _ = await customer_turn(sim, client, "two")
        assert second["session_id"] == session.id
        sim_clock.advance(0.25)  # 0.5 s after the first message, 0.25 s after the last activity
        # The witness: the session's idle timer runs (and arms itself again) at this time.
        timer = sim._timers[session.id]
        await pc_eventually(lambda: sim._timers.get(session.id) is not timer,
                            what="the idle timer's next check")
        assert not session.ended
        sim_clock.advance(0.2)  # 0.45 s after the last activity
        ended = await client.expect("whatsapp.session_ended", timeout=3)
        assert (ended["session_id"], ended["reason"]) == (session.id, "idle_timeout")
        await client.close()


async def test_end_session_now_with_window_expired(sim_server, sim_client):
    session_id = await started_session(sim_server, sim_client)
    await sim_server.end_session(session_id, reason="window_expired")
    ended = await sim_client.recv()
    assert ended["event"] == "whatsapp.session_ended" and ended["reason"] == "window_expired"


async def test_window_expires_24h_after_the_customer_last_wrote(sim_clock):
    async with Simulator(window=0.3, idle_timeout=10) as sim:  # 24 h squeezed into 0.3 s
        client = await open_client(sim)
        message, _ = await customer_turn(sim, client)
        sim_clock.advance(0.15)
        sent = await client.command({"event": "session.send", "agent_id": "support",
                                     "session_id": message["session_id"], "text": "Still there?"})
        assert sent["event"] == "session.sent"  # within the window: the agent's message went out
        sim_clock.advance(0.16)  # 0.31 s after the customer wrote, 0.16 s after the agent did
        ended = await client.expect("whatsapp.session_ended", timeout=3)
        assert ended["reason"] == "window_expired"
        await client.close()


# --------------------------------------------------------------------------- pauses


async def test_pause_one_session(sim_server, sim_client):
    session_id = await started_session(sim_server, sim_client)
    reply = await sim_client.command({"event": "session.pause", "agent_id": "support",
                                      "session_id": session_id})
    assert reply == {"event": "session.paused", "agent_id": "support", "session_id": session_id}
    assert set(reply) == KEYS["session.paused.session"]
    assert sim_server.is_paused(session_id)
    message, _ = await customer_turn(sim_server, sim_client, "hello?")
    assert message["paused"] is True
    await sim_client.silent()  # the AI does not answer
    # Another contact is not paused.
    other, frames = await customer_turn(sim_server, sim_client, "hi", phone="447700900123")
    assert other["paused"] is False and frames[0]["event"] == "whatsapp.response"


async def test_pause_a_contact_covers_current_and_future_sessions(sim_server, sim_client):
    session_id = await started_session(sim_server, sim_client)
    reply = await sim_client.command({"event": "session.pause", "agent_id": "support",
                                      "contact": PHONE})
    assert reply == {"event": "session.paused", "agent_id": "support", "contact": PHONE}
    assert set(reply) == KEYS["session.paused.contact"]
    assert sim_server.is_paused(session_id)
    await sim_server.end_session(session_id)
    await sim_client.expect("whatsapp.session_ended")
    message, _ = await customer_turn(sim_server, sim_client, "new conversation")
    assert message["session_id"] != session_id and message["paused"] is True
    await sim_client.silent()


async def test_pause_the_agent(sim_server, sim_client):
    reply = await sim_client.command({"event": "session.pause", "agent_id": "support"})
    assert reply == {"event": "session.paused", "agent_id": "support"}
    assert set(reply) == KEYS["session.paused.agent"]
    for phone in (PHONE, "447700900123"):
        message, _ = await customer_turn(sim_server, sim_client, "hello", phone=phone)
        assert message["paused"] is True
    await sim_client.silent()


@pytest.mark.parametrize("shape", ["session", "contact", "agent"])
async def test_resume_confirmations(sim_server, sim_client, shape):
    session_id = await started_session(sim_server, sim_client)
    target = {"session": {"session_id": session_id}, "contact": {"contact": PHONE},
              "agent": {}}[shape]
    await sim_client.command({"event": "session.pause", "agent_id": "support", **target})
    assert sim_server.is_paused(session_id)
    reply = await sim_client.command({"event": "session.resume", "agent_id": "support", **target})
    assert reply == {"event": "session.resumed", "agent_id": "support", **target}
    assert set(reply) == KEYS[f"session.paused.{shape}"]
    assert not sim_server.is_paused(session_id)


async def test_levels_are_independent_and_resume_all_clears_every_level(sim_server, sim_client):
    session_id = await started_session(sim_server, sim_client)
    for target in ({"session_id": session_id}, {"contact": PHONE}, {}):
        await sim_client.command({"event": "session.pause", "agent_id": "support", **target})
    # Clearing one level leaves the others.
    await sim_client.command({"event": "session.resume", "agent_id": "support",
                              "session_id": session_id})
    await sim_client.command({"event": "session.resume", "agent_id": "support", "contact": PHONE})
    assert sim_server.is_paused(session_id)  # the agent level is still on
    await sim_client.command({"event": "session.pause", "agent_id": "support",
                              "session_id": session_id})
    await sim_client.command({"event": "session.pause", "agent_id": "support", "contact": PHONE})
    # A resume with neither target clears all three.
    assert (await sim_client.command({"event": "session.resume", "agent_id": "support"})) == \
        {"event": "session.resumed", "agent_id": "support"}
    assert not sim_server.is_paused(session_id)
    message, frames = await customer_turn(sim_server, sim_client, "hello?")
    assert message["paused"] is False and frames[0]["event"] == "whatsapp.response"


async def test_paused_voice_note_still_carries_its_transcript(sim_server, sim_client):
    await sim_client.command({"event": "session.pause", "agent_id": "support"})
    message, _ = await customer_turn(sim_server, sim_client, "I need a refund for the blender",
                                     type="audio")
    assert message["type"] == "audio" and message["paused"] is True
    assert message["text"] == "I need a refund for the blender"
    await sim_client.silent()


async def test_a_pause_during_the_ai_delay_stops_the_answer():
    async with Simulator(ai_delay=0.2) as sim:
        client = await open_client(sim)
        result = await sim.customer_says(phone=PHONE, name=NAME, text="hi")
        await client.expect("whatsapp.message")
        await client.command({"event": "session.pause", "agent_id": "support",
                              "session_id": result["session_id"]})
        # the witness: the AI's delayed answer has run (its task is gone), and found the pause
        await pc_eventually(lambda: not sim._tasks, what="the AI's delayed answer")
        await client.silent()
        await client.close()


async def test_server_side_pause_emits_the_state(sim_server, sim_client):
    session_id = await started_session(sim_server, sim_client)
    await sim_server.pause(session_id=session_id)
    assert await sim_client.recv() == {"event": "session.paused", "agent_id": "support",
                                       "session_id": session_id}
    await sim_server.resume()
    assert await sim_client.recv() == {"event": "session.resumed", "agent_id": "support"}


# --------------------------------------------------------------------------- human sends


async def test_human_send_is_delivered_and_enters_the_history(sim_server, sim_client):
    session_id = await started_session(sim_server, sim_client, "Where is my order?")
    await sim_client.command({"event": "session.pause", "agent_id": "support",
                              "session_id": session_id})
    human_text = "Hi Ana, Laura here. Your parcel is at the Madrid depot."
    await sim_client.send({"event": "session.send", "agent_id": "support",
                           "session_id": session_id, "text": human_text})
    sent, response, *statuses = await sim_client.recv_n(5)
    assert sent == {"event": "session.sent", "agent_id": "support", "session_id": session_id}
    assert set(sent) == KEYS["session.sent"]
    assert set(response) == KEYS["whatsapp.response.human"]
    assert response == {"event": "whatsapp.response", "agent_id": "support",
                        "session_id": session_id, "to": PHONE, "text": human_text,
                        "source": "human"}
    assert [s["status"] for s in statuses] == ["sent", "delivered", "read"]
    assert all(set(s) == KEYS["whatsapp.status"] and s["recipient"] == PHONE for s in statuses)
    assert sim_server.session_history(session_id)[-1] == {
        "role": "assistant", "content": human_text, "source": "human"}

    # After the resume, the AI's next answer knows what the human said.
    await sim_client.command({"event": "session.resume", "agent_id": "support",
                              "session_id": session_id})
    _, frames = await customer_turn(sim_server, sim_client, "ok, thanks")
    assert "colleague" in frames[0]["text"] and "Madrid depot" in frames[0]["text"]
    history = sim_server.session_history(session_id)
    assert [(h["role"], h["source"]) for h in history] == [
        ("user", "customer"), ("assistant", "ai"), ("assistant", "human"),
        ("user", "customer"), ("assistant", "ai")]


async def test_send_with_session_and_contact_echoes_both(sim_server, sim_client):
    session_id = await started_session(sim_server, sim_client)
    await sim_client.send({"event": "session.send", "agent_id": "support",
                           "session_id": session_id, "contact": PHONE, "text": "Hello!"})
    sent, response = await sim_client.recv_n(2)
    assert sent == {"event": "session.sent", "agent_id": "support", "session_id": session_id,
                    "contact": PHONE}
    assert response["session_id"] == session_id and response["source"] == "human"


async def test_send_to_a_contact_with_a_live_session_goes_into_it(sim_server, sim_client):
    session_id = await started_session(sim_server, sim_client)
    await sim_client.send({"event": "session.send", "agent_id": "support", "contact": PHONE,
                           "text": "Hello from a human"})
    sent, response = await sim_client.recv_n(2)
    assert sent == {"event": "session.sent", "agent_id": "support", "contact": PHONE}
    assert response["session_id"] == session_id
    assert sim_server.session_history(session_id)[-1]["source"] == "human"


async def test_send_to_an_ended_session_falls_back_to_a_direct_send(sim_server, sim_client):
    session_id = await started_session(sim_server, sim_client)
    await sim_server.end_session(session_id)
    await sim_client.expect("whatsapp.session_ended")
    await sim_client.send({"event": "session.send", "agent_id": "support",
                           "session_id": session_id, "contact": PHONE, "text": "Any news?"})
    sent, response, *statuses = await sim_client.recv_n(5)
    assert sent == {"event": "session.sent", "agent_id": "support", "session_id": session_id,
                    "contact": PHONE}
    # A direct send has no session: no session_id on the response.
    assert response == {"event": "whatsapp.response", "agent_id": "support", "to": PHONE,
                        "text": "Any news?", "source": "human"}
    assert [s["status"] for s in statuses] == ["sent", "delivered", "read"]
    assert sim_server.session_for(PHONE) is None
    assert sim_server.session_history(session_id)[-1]["content"] != "Any news?"


@pytest.mark.parametrize("command", ["session.send", "session.pause", "session.resume"])
async def test_unknown_session_is_session_not_found(sim_server, sim_client, command):
    frame = {"event": command, "agent_id": "support", "session_id": "wa-000000000000"}
    if command == "session.send":
        frame["text"] = "hello"
    error = await sim_client.command(frame)
    assert set(error) == KEYS["error"] | {"agent_id", "session_id"}
    assert error["code"] == "SESSION_NOT_FOUND"
    assert (error["agent_id"], error["session_id"]) == ("support", "wa-000000000000")


async def test_ended_session_without_contact_is_session_not_found(sim_server, sim_client):
    session_id = await started_session(sim_server, sim_client)
    await sim_server.end_session(session_id)
    await sim_client.expect("whatsapp.session_ended")
    for frame in ({"event": "session.send", "agent_id": "support", "session_id": session_id,
                   "text": "hi"},
                  {"event": "session.pause", "agent_id": "support", "session_id": session_id}):
        error = await sim_client.command(frame)
        assert error["code"] == "SESSION_NOT_FOUND" and error["session_id"] == session_id


# --------------------------------------------------------------------------- history


async def test_history_get_answers_with_the_chat_history(sim_server, sim_client):
    session_id = await started_session(sim_server, sim_client, "Where is my order?")
    await sim_client.send({"event": "session.send", "agent_id": "support",
                           "session_id": session_id, "text": "A human here."})
    await sim_client.expect("whatsapp.status", status="read")
    reply = await sim_client.command({"event": "history.get", "agent_id": "support",
                                      "call_id": session_id, "request_id": "r-1"})
    assert set(reply) == KEYS["history.data"]
    assert (reply["event"], reply["agent_id"], reply["call_id"], reply["request_id"]) == (
        "history.data", "support", session_id, "r-1")
    # what a dashboard needs to reconcile: the customer's messages too, as role "user"
    assert reply["messages"] == [
        {"role": h["role"], "content": h["content"]} for h in sim_server.session_history(session_id)]
    assert [m["role"] for m in reply["messages"]] == ["user", "assistant", "assistant"]
    assert reply["messages"][0]["content"] == "Where is my order?"
    assert reply["messages"][2]["content"] == "A human here."


async def test_history_get_from_an_old_client_without_request_id(sim_server, sim_client):
    session_id = await started_session(sim_server, sim_client)
    reply = await sim_client.command({"event": "history.get", "agent_id": "support",
                                      "call_id": session_id})
    assert set(reply) == KEYS["history.data"] - {"request_id"}


@pytest.mark.parametrize("which", ["unknown", "ended", "other agent's"])
async def test_history_of_a_session_it_does_not_have_is_an_error_reply(
        sim_server, sim_client, which):
    session_id = "wa-000000000000"
    if which == "ended":
        session_id = await started_session(sim_server, sim_client)
        await sim_server.end_session(session_id)
        await sim_client.expect("whatsapp.session_ended")
    elif which == "other agent's":
        session_id = (await sim_server.customer_says(phone=PHONE, text="hi", agent_id="sales"))[
            "session_id"]
    for event, answer in (("history.get", "history.data"), ("history.set", "history.updated"),
                          ("history.add", "history.updated")):
        reply = await sim_client.command({"event": event, "agent_id": "support",
                                          "call_id": session_id, "request_id": 7,
                                          "messages": []})
        assert set(reply) == KEYS["history.data.error"]
        assert (reply["event"], reply["call_id"], reply["request_id"]) == (answer, session_id, 7)
        assert session_id in reply["error"]


async def test_history_set_and_add_answer_history_updated(sim_server, sim_client):
    session_id = await started_session(sim_server, sim_client, "first")
    reply = await sim_client.command({
        "event": "history.set", "agent_id": "support", "call_id": session_id, "request_id": "s",
        "messages": [{"role": "user", "content": "rewritten"}]})
    assert reply == {"event": "history.updated", "agent_id": "support", "call_id": session_id,
                     "request_id": "s"}
    assert set(reply) == KEYS["history.updated"]
    reply = await sim_client.command({
        "event": "history.add", "agent_id": "support", "call_id": session_id, "request_id": "a",
        "messages": [{"role": "assistant", "content": "added", "extra": "ignored"}]})
    assert reply["event"] == "history.updated" and reply["request_id"] == "a"
    data = await sim_client.command({"event": "history.get", "agent_id": "support",
                                     "call_id": session_id, "request_id": "g"})
    assert data["messages"] == [{"role": "user", "content": "rewritten"},
                                {"role": "assistant", "content": "added"}]
    await sim_server.end_session(session_id)
    ended = await sim_client.expect("whatsapp.session_ended")
    assert ended["transcript"] == data["messages"]


@pytest.mark.parametrize(
    "frame",
    [
        {"event": "history.get", "agent_id": "support"},
        {"event": "history.get", "agent_id": "support", "call_id": 5},
        {"event": "history.get", "agent_id": "not-mine", "call_id": "wa-1"},
        {"event": "history.set", "agent_id": "support", "call_id": "live"},
        {"event": "history.set", "agent_id": "support", "call_id": "live", "messages": "hi"},
        {"event": "history.add", "agent_id": "support", "call_id": "live",
         "messages": [{"role": "user"}]},
        {"event": "history.add", "agent_id": "support", "call_id": "live",
         "messages": [{"role": "", "content": "x"}]},
        {"event": "history.add", "agent_id": "support", "call_id": "live", "messages": ["x"]},
    ],
)
async def test_malformed_history_commands_are_invalid_command(sim_server, sim_client, frame):
    if frame.get("call_id") == "live":
        frame = {**frame, "call_id": await started_session(sim_server, sim_client)}
    error = await sim_client.command({**frame, "request_id": "r"})
    assert error["event"] == "error" and error["code"] == "INVALID_COMMAND", error
    assert error.get("request_id", "r") == "r"
    assert await sim_client.command({"event": "ping"}) == {"event": "pong"}


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "frame",
    [
        {"event": "session.send", "agent_id": "support", "text": "no target"},
        {"event": "session.send", "agent_id": "support", "contact": PHONE},
        {"event": "session.send", "agent_id": "support", "contact": PHONE, "text": ""},
        {"event": "session.send", "agent_id": "support", "contact": PHONE, "text": 42},
        {"event": "session.pause", "agent_id": "support", "session_id": None},
        {"event": "session.pause", "agent_id": "support", "contact": 34612345678},
        {"event": "session.pause"},
        {"event": "session.pause", "agent_id": "not-mine"},
        {"event": "agent.create"},
        {"event": "agent.create", "agent_id": ""},
        {"event": "channel.add", "agent_id": "support", "type": "whatsapp", "ref": "1"},
        {"event": "channel.add", "agent_id": "support", "type": "sms", "ref": "1",
         "accessToken": "t"},
        {"event": "channel.add", "agent_id": "nobody", "type": "whatsapp", "ref": "1",
         "accessToken": "t"},
        {"no_event": True},
        {"event": 7},
        [1, 2, 3],
        "not json {",
        '"a string"',
    ],
)
async def test_malformed_commands_are_invalid_command(sim_server, sim_client, frame):
    await sim_client.send(frame if isinstance(frame, (dict, str)) else json.dumps(frame))
    error = await sim_client.recv()
    assert error["event"] == "error" and error["code"] == "INVALID_COMMAND", error
    assert KEYS["error"] <= set(error) <= KEYS["error"] | {"agent_id", "session_id"}
    assert error["message"]
    assert await sim_client.command({"event": "ping"}) == {"event": "pong"}  # still alive


async def test_non_json_frame_is_recorded_raw(sim_server, sim_client):
    await sim_client.send("hello?")
    assert (await sim_client.recv())["code"] == "INVALID_COMMAND"
    assert sim_server.received[-1] == {"_raw": "hello?"}


async def test_a_deeply_nested_frame_is_invalid_command(sim_server, sim_client):
    nested = "[" * 100_000 + "]" * 100_000
    await sim_client.send(nested)
    assert (await sim_client.recv())["code"] == "INVALID_COMMAND"
    assert sim_server.received[-1] == {"_raw": nested}
    assert await sim_client.command({"event": "ping"}) == {"event": "pong"}


async def test_binary_frame_is_invalid_command(sim_server, sim_client):
    await sim_client.ws.send(b'{"event":"ping"}')
    assert (await sim_client.recv())["code"] == "INVALID_COMMAND"


async def test_unknown_event(sim_server, sim_client):
    error = await sim_client.command({"event": "session.teleport", "agent_id": "support"})
    assert set(error) == KEYS["error"]
    assert error["code"] == "UNKNOWN_EVENT" and "session.teleport" in error["message"]
    assert await sim_client.command({"event": "ping"}) == {"event": "pong"}


# --------------------------------------------------------------------------- test controls


async def test_drop_connections_cuts_without_a_close_frame(sim_server, sim_client):
    assert await sim_server.drop_connections() == 1
    code, _ = await sim_client.close_code()
    assert code is None  # no close frame: a network cut
    assert sim_server.connected_agents == set()


async def test_close_connections_sends_a_close_frame(sim_server, sim_client):
    await sim_server.close_connections(1012, "Service restart")
    assert await sim_client.close_code() == (1012, "Service restart")


async def test_inject_sends_raw_frames(sim_server, sim_client):
    assert await sim_server.inject({"event": "something.new", "x": 1}) == 1
    assert await sim_client.recv() == {"event": "something.new", "x": 1}
    broken = '{"event": "whatsapp.message", "broken": '
    await sim_server.inject(broken, agent_id="support")
    assert await asyncio.wait_for(sim_client.ws.recv(), 2) == broken
    assert await sim_server.inject({"event": "x"}, agent_id="nobody") == 0
    # hostile frames, verbatim: deep nesting as text, invalid UTF-8 as a binary frame
    nested = "[" * 100_000 + "]" * 100_000
    await sim_server.inject(nested)
    assert await asyncio.wait_for(sim_client.ws.recv(), 2) == nested
    assert sim_server.sent[-1] == {"_raw": nested}
    await sim_server.inject(b"\xff\xfe{")
    assert await asyncio.wait_for(sim_client.ws.recv(), 2) == b"\xff\xfe{"
    assert sim_server.sent[-1] == {"_raw": "\ufffd\ufffd{", "_binary": True}
    with pytest.raises(UnicodeEncodeError):  # a text frame cannot carry a lone surrogate
        await sim_server.inject('{"text": "\ud800"}')
    assert await sim_client.command({"event": "ping"}) == {"event": "pong"}  # still fine


async def test_lone_surrogates_are_escaped_and_nul_kept(sim_server, sim_client):
    text = "a\x00b\ud800c"
    await sim_server.customer_says(phone=PHONE, name=NAME, text=text)
    raw = await asyncio.wait_for(sim_client.ws.recv(), 2)
    while json.loads(raw)["event"] != "whatsapp.message":
        raw = await asyncio.wait_for(sim_client.ws.recv(), 2)
    assert "\\ud800" in raw and "\\u0000" in raw  # JSON escapes: valid UTF-8 on the wire
    assert json.loads(raw)["text"] == text


async def test_wait_for_and_received(sim_server, sim_client):
    await sim_client.send({"event": "ping", "n": 1})
    first = await sim_server.wait_for("ping", n=1)
    assert first == {"event": "ping", "n": 1}
    mark = sim_server.received.index(first) + 1
    with pytest.raises(TimeoutError):
        await sim_server.wait_for("ping", timeout=0.1, after=mark)
    waiter = asyncio.create_task(sim_server.wait_for("ping", after=mark, n=2))
    await pc_eventually(lambda: sim_server._waiters, what="the waiter parked")  # it is waiting
    await sim_client.send({"event": "ping", "n": 2})
    assert (await waiter)["n"] == 2
    assert [f.get("event") for f in sim_server.received][:3] == ["connect", "agent.create",
                                                                 "channel.add"]


async def test_sessions_and_session_for(sim_server, sim_client):
    session_id = await started_session(sim_server, sim_client)
    session = sim_server.sessions[session_id]
    assert (session.id, session.agent_id, session.contact_phone, session.contact_name) == \
        (session_id, "support", PHONE, NAME)
    assert not session.ended and session.started_at <= session.last_activity
    assert sim_server.session_for(PHONE, agent_id="support") == session_id
    assert sim_server.session_for(PHONE, agent_id="sales") is None
    assert sim_server.session_for("447700900123") is None


async def test_events_for_an_agent_that_never_connected_wait_for_it(sim_server):
    result = await sim_server.customer_says(phone=PHONE, name=NAME, text="hello?")
    client = await open_client(sim_server, agent_id=None)
    assert (await client.command({"event": "agent.create", "agent_id": "support"}))["event"] \
        == "agent.created"
    frames = await client.recv_n(6)
    assert frames[1]["message_id"] == result["message_id"]
    await client.close()


async def test_many_messages_all_arrive(sim_server, sim_client):
    # Speed is not asserted here (it depends on the machine); every message arriving is.
    n = 2000
    sent = [(await sim_server.customer_says(phone=str(34600000000 + i % 50), name="Bench",
                                            text=f"m{i}"))["message_id"] for i in range(n)]
    frames = await sim_client.recv_n(n * 5 + 50, timeout=10)
    assert [f["message_id"] for f in frames if f["event"] == "whatsapp.message"] == sent


async def test_demo_customers_start_writing_soon():
    async with Simulator(demo=True) as sim:
        client = await open_client(sim)
        started = await client.expect("whatsapp.session_started", timeout=3)
        message = await client.expect("whatsapp.message", timeout=2)
        assert message["session_id"] == started["session_id"] and message["text"]
        assert sim.sessions[started["session_id"]].idle_timeout <= 300
        await client.close()


async def test_stop_closes_client_connections():
    sim = Simulator()
    await sim.start()
    client = await open_client(sim)
    await sim.stop()
    code, _ = await client.close_code()
    assert code == 1001


# --------------------------------------------------------------------------- the canned AI


async def ai_replies(sim: Simulator, *texts: str, phone: str = PHONE) -> list[str]:
    """Have the customer say each text (no client connected: events are buffered)."""
    for text in texts:
        result = await sim.customer_says(phone=phone, name=NAME, text=text)
    return [h["content"] for h in sim.session_history(result["session_id"])
            if h["role"] == "assistant"]


async def test_ai_answers_by_topic_and_remembers_the_order_number(sim_server):
    replies = await ai_replies(sim_server, "Hi! My parcel hasn't arrived",
                               "The order number is 48213", "I want to cancel it", "yes")
    assert "order number" in replies[0]
    assert "48213" in replies[1] and "track" in replies[1]
    assert "cancel" in replies[2] and "#48213" in replies[2]
    assert replies[3] == "Order #48213 is cancelled. The refund is on its way."


async def test_ai_refund_flow_and_request_for_a_person(sim_server):
    replies = await ai_replies(sim_server, "I want a refund", "yes please",
                               "how long until I get my money back?", "can I talk to a human?")
    assert "Refunds go back" in replies[0] and "Shall I open the return" in replies[0]
    assert "return" in replies[1] and "open" in replies[1]
    assert "5-7 business days" in replies[2]
    assert "colleague" in replies[3]


async def test_ai_does_not_take_a_postcode_for_an_order_number(sim_server):
    replies = await ai_replies(sim_server, "Where is my order 48213?", "Can I change the address?",
                               "Calle Mayor 12, 28013 Madrid", "where is my order now?")
    assert "28013 Madrid" in replies[2]
    assert "#48213" in replies[3]
