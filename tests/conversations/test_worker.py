"""The worker against the simulator over a real socket: events stored, commands carried out."""

import asyncio
import os
import time

import pytest
from asgiref.sync import sync_to_async

from conversations import services
from conversations.models import Command, Conversation, Message
from conversations.worker import PinecallBridge
from pinecall_sdk.simulator import Simulator

pytestmark = pytest.mark.django_db(transaction=True)

db = sync_to_async


async def eventually(check, timeout: float = 10.0, interval: float = 0.05):
    """Poll a sync `check` (run off the loop, it may query the DB) until it is truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await db(check)()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {timeout} s: {check.__doc__ or check}")
        await asyncio.sleep(interval)


@pytest.fixture
async def sim():
    async with Simulator(port=0, ai_delay=0, status_delay=0) as simulator:
        yield simulator


@pytest.fixture
def start_worker(sim, settings):
    settings.PINECALL_URL = sim.url
    settings.PINECALL_API_KEY = "test-key"
    settings.PINECALL_COMMAND_TIMEOUT = 5.0
    running = []

    async def start() -> PinecallBridge:
        bridge = PinecallBridge()
        task = asyncio.create_task(bridge.run())
        # What the Channels consumer does in runworker: relay wake-ups to the bridge.
        relay = asyncio.create_task(relay_wakeups(bridge))
        running.append((bridge, task))
        running.append((bridge, relay))
        await asyncio.wait_for(bridge._registered.wait(), 10)
        return bridge

    yield start
    # Teardown runs outside the loop for sync fixtures: stopping is done by `stop_all`.
    for bridge, task in running:
        task.cancel()


@pytest.fixture
async def worker(start_worker):
    bridge = await start_worker()
    yield bridge
    await bridge.stop()


async def relay_wakeups(bridge: PinecallBridge) -> None:
    from channels.layers import get_channel_layer

    from conversations.notify import WORKER_CHANNEL

    layer = get_channel_layer()
    while True:
        await layer.receive(WORKER_CHANNEL)
        bridge.wake()


def only(model, **filters):
    return model.objects.get(**filters)


async def test_a_customer_conversation_lands_complete_and_in_order(sim, worker):
    for text in ["Hi", "Where is my order?", "Thanks"]:
        await sim.customer_says(phone="34612345678", name="Ana", text=text)
        await asyncio.sleep(0.05)

    def complete():
        return Message.objects.filter(status="read", author="ai").count() == 3

    await eventually(complete)
    conversation = await db(only)(Conversation, contact_phone="34612345678")
    authors = await db(lambda: list(conversation.messages.values_list("author", "text")))()
    assert [a for a, _ in authors] == ["customer", "ai"] * 3
    assert [t for a, t in authors if a == "customer"] == ["Hi", "Where is my order?", "Thanks"]
    assert conversation.contact_name == "Ana" and conversation.message_count == 6
    assert conversation.session_id == sim.session_for("34612345678")


async def test_take_over_send_and_hand_back_reach_pinecall(sim, worker, operator):
    started = await sim.customer_says(phone="34611111111", name="Ben", text="I need help")
    session_id = started["session_id"]
    conversation = await eventually(
        lambda: Conversation.objects.filter(session_id=session_id).first()
    )

    await db(services.conversation_take_over)(conversation=conversation, operator=operator)
    await sim.wait_for("session.pause", session_id=session_id, agent_id="support")
    await eventually(lambda: Conversation.objects.get(pk=conversation.pk).ai_paused)
    held = await db(only)(Conversation, pk=conversation.pk)
    assert held.held_by_id == operator.pk and held.holder == "human"
    assert sim.is_paused(session_id)

    # While held, the customer's messages arrive paused and the AI stays quiet.
    await sim.customer_says(phone="34611111111", text="Hello?")
    await eventually(lambda: Message.objects.filter(text="Hello?", paused=True).exists())

    await db(services.conversation_send)(
        conversation=held, operator=operator, text="Hi Ben, a person here."
    )
    frame = await sim.wait_for("session.send", session_id=session_id)
    assert frame["text"] == "Hi Ben, a person here." and frame["contact"] == "34611111111"
    await eventually(
        lambda: Message.objects.filter(author="human", status="read").exists()
    )
    assert await db(Message.objects.filter(author="human").count)() == 1
    assert {"role": "assistant", "content": "Hi Ben, a person here.", "source": "human"} in [
        {k: entry[k] for k in ("role", "content", "source")} for entry in sim.session_history(session_id)
    ]

    await db(services.conversation_hand_back)(conversation=held, operator=operator)
    await sim.wait_for("session.resume", session_id=session_id)
    await eventually(lambda: Conversation.objects.get(pk=conversation.pk).holder == "ai")
    assert not sim.is_paused(session_id)
    statuses = await db(lambda: list(Command.objects.values_list("kind", "status")))()
    assert statuses == [("pause", "confirmed"), ("send", "confirmed"), ("resume", "confirmed")]


async def test_a_refused_command_is_recorded_with_the_reason(sim, worker, operator, make_conversation):
    ghost = await db(make_conversation)(session_id="wa-000000000000")
    command = await db(services.conversation_take_over)(conversation=ghost, operator=operator)
    await eventually(lambda: Command.objects.get(pk=command.pk).status == "failed")
    failed = await db(only)(Command, pk=command.pk)
    assert failed.error_code == "SESSION_NOT_FOUND"
    ghost = await db(only)(Conversation, pk=ghost.pk)
    assert ghost.held_by is None and ghost.state == "ended"


async def test_commands_issued_while_the_worker_is_stopped_go_out_once(
    sim, start_worker, operator
):
    await sim.customer_says(phone="34622222222", name="Cy", text="hello")
    session_id = sim.session_for("34622222222")
    # The worker was not running: the conversation is only known from the intent.
    conversation = await db(Conversation.objects.create)(
        session_id=session_id, agent_id="support", contact_phone="34622222222"
    )
    await db(services.conversation_take_over)(conversation=conversation, operator=operator)

    bridge = await start_worker()
    await eventually(lambda: Command.objects.get().status == "confirmed")
    await bridge.stop()
    mark = len(sim.received)
    bridge = await start_worker()  # a restart must not send it again
    await sim.wait_for("session.pause", session_id=session_id, after=mark)  # the hold re-asserted
    # The outbox goes out in order: once a later command is confirmed, a repeat of
    # the first would already have been sent.
    conversation = await db(only)(Conversation, pk=conversation.pk)
    await db(services.conversation_hand_back)(conversation=conversation, operator=operator)
    await eventually(lambda: Command.objects.filter(status="confirmed").count() == 2)
    await bridge.stop()
    pauses = [f for f in sim.received if f.get("event") == "session.pause"]
    assert len([f for f in pauses if f.get("session_id") == session_id]) == 2  # the command, then the restart's re-assertion of the hold
    assert await db(Command.objects.count)() == 2


async def test_duplicate_and_malformed_frames_change_nothing(sim, worker):
    await sim.customer_says(phone="34633333333", name="Di", text="first")
    await eventually(lambda: Message.objects.filter(author="ai").exists())
    message = await db(only)(Message, text="first")
    conversation = await db(only)(Conversation, pk=message.conversation_id)
    duplicate = {
        "event": "whatsapp.message",
        "agent_id": "support",
        "session_id": conversation.session_id,
        "from": "34633333333",
        "name": "Di",
        "type": "text",
        "text": "first",
        "message_id": message.message_id,
        "paused": False,
    }
    for frame in [
        duplicate,
        "this is not json",
        "[1, 2, 3]",
        {"no": "event"},
        {**duplicate, "message_id": "wamid.bad", "paused": "yes"},
        {**duplicate, "session_id": 12345},
        {"event": "whatsapp.teleport", "session_id": conversation.session_id},
        {"event": "whatsapp.session_started", "agent_id": "support",
         "session_id": conversation.session_id, "contact_phone": "34633333333", "contact_name": "Di"},
    ]:
        await sim.inject(frame)
    await sim.customer_says(phone="34633333333", text="second")
    await eventually(lambda: Message.objects.filter(text="second").exists())
    # The repeats stored nothing; a frame with an odd field is stored with what it has.
    assert await db(Message.objects.filter(author="customer").count)() == 3
    odd = await db(only)(Message, message_id="wamid.bad")
    assert odd.paused is True and odd.text == "first"  # the SDK reads "yes" as true
    assert await db(Conversation.objects.count)() == 1


async def test_held_conversations_are_paused_again_after_a_reconnect(sim, worker, operator):
    await sim.customer_says(phone="34644444444", name="Eva", text="help")
    session_id = sim.session_for("34644444444")
    conversation = await eventually(
        lambda: Conversation.objects.filter(session_id=session_id).first()
    )
    await db(services.conversation_take_over)(conversation=conversation, operator=operator)
    await eventually(lambda: Conversation.objects.get(pk=conversation.pk).ai_paused)
    # Someone (another process, the server) resumes everything: the human's hold wins.
    mark = len(sim.received)
    await sim.resume()
    await sim.wait_for("session.pause", session_id=session_id, after=mark)
    assert sim.is_paused(session_id)

    mark = len(sim.received)
    await sim.drop_connections()
    await sim.wait_for("agent.create", after=mark, timeout=10)
    await sim.wait_for("session.pause", session_id=session_id, after=mark, timeout=10)
    assert sim.is_paused(session_id)


async def test_kill_switch_and_contact_pause(sim, worker, supervisor, operator):
    await sim.customer_says(phone="34655555555", name="Flo", text="hey")
    session_id = sim.session_for("34655555555")
    conversation = await eventually(
        lambda: Conversation.objects.filter(session_id=session_id).first()
    )
    await db(services.conversation_take_over)(conversation=conversation, operator=operator)
    await db(services.contact_pause)(contact_phone="34666666666", operator=supervisor)
    await db(services.agent_pause)(operator=supervisor)
    await sim.wait_for("session.pause", agent_id="support", timeout=5, contact="34666666666")
    await eventually(lambda: services.agent_state_get().ai_paused)

    # The AI back on: Pinecall clears every level, the worker restores the humans' ones.
    mark = len(sim.received)
    await db(services.agent_resume)(operator=supervisor)
    await sim.wait_for("session.resume", after=mark)
    await sim.wait_for("session.pause", session_id=session_id, after=mark)
    await sim.wait_for("session.pause", contact="34666666666", after=mark)
    assert sim.is_paused(session_id)
    assert not await db(lambda: services.agent_state_get().ai_paused)()


async def test_session_end_is_stored(sim, worker):
    await sim.customer_says(phone="34677777777", name="Gus", text="bye")
    session_id = sim.session_for("34677777777")
    await eventually(lambda: Conversation.objects.filter(session_id=session_id).exists())
    await sim.end_session(session_id, reason="idle_timeout")
    await eventually(lambda: Conversation.objects.get(session_id=session_id).state == "ended")
    ended = await db(only)(Conversation, session_id=session_id)
    assert ended.end_reason == "idle_timeout" and ended.ended_at is not None


async def test_an_over_long_session_id_is_fitted_and_the_message_kept(sim, worker):
    """A session id longer than its column (PostgreSQL would refuse it; SQLite would not
    notice): the id is shortened deterministically and the message stored, marked altered."""
    await sim.inject(
        {
            "event": "whatsapp.message",
            "agent_id": "support",
            "session_id": "wa-" + "f" * 200,
            "from": "34688888888",
            "name": "Hal",
            "type": "text",
            "text": "too long an id",
            "message_id": "wamid.too-long-session",
            "paused": False,
        }
    )
    await sim.customer_says(phone="34699999999", name="Ivy", text="still there?")
    await eventually(lambda: Message.objects.filter(text="still there?").exists())
    kept = await db(only)(Message, message_id="wamid.too-long-session")
    assert kept.text == "too long an id" and kept.altered
    conversation = await db(only)(Conversation, pk=kept.conversation_id)
    assert len(conversation.session_id) == 64 and conversation.session_id.startswith("wa-fff")


async def test_a_spool_left_by_a_crashed_worker_is_stored_first(sim, start_worker, settings):
    """A worker killed after reading events and before storing them left them in its
    spool: the next worker stores them before anything new, then removes the file."""
    import json
    from pathlib import Path

    spool = Path(settings.WORKER_SPOOL_DIR)
    spool.mkdir(parents=True, exist_ok=True)
    left = spool / "support-0123456789abcdef.jsonl"
    frames = [
        {"event": "whatsapp.message", "session_id": "wa-leftover0001", "from": "34600000001",
         "name": "Left", "type": "text", "text": f"kept {n}", "message_id": f"wamid.left{n}"}
        for n in range(5)
    ]
    left.write_text("".join(json.dumps([n + 1, f]) + "\n" for n, f in enumerate(frames)))
    bridge = await start_worker()
    await eventually(lambda: Message.objects.filter(text__startswith="kept").count() == 5)
    await eventually(lambda: not left.exists())
    texts = await db(lambda: list(Message.objects.order_by("id").values_list("text", flat=True)))()
    assert texts == [f"kept {n}" for n in range(5)]
    await bridge.stop()


async def test_messages_pinecall_has_and_we_lack_are_shown_after_a_restart(sim, start_worker):
    """After a crash the worker compares each active session with Pinecall's history."""
    bridge = await start_worker()
    session_id = (await sim.customer_says(phone="34600000002", name="Lu", text="first one"))[
        "session_id"
    ]
    await sim.customer_says(phone="34600000002", text="the one we lose")
    await eventually(lambda: Message.objects.filter(text="the one we lose").exists())
    await bridge.stop()
    # As if the worker had died holding it.
    await db(lambda: Message.objects.filter(text="the one we lose").delete())()

    bridge = await start_worker()
    conversation = await eventually(
        lambda: Conversation.objects.filter(session_id=session_id).exclude(unreceived=[]).first()
    )
    assert conversation.unreceived == [{"content": "the one we lose"}]
    assert not await db(Message.objects.filter(text="the one we lose").exists)()
    await bridge.stop()


async def test_the_worker_serves_its_health_and_metrics(sim, start_worker, settings):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings.WORKER_HTTP_PORT = port
    settings.METRICS_TOKEN = "s3cret"
    bridge = await start_worker()
    await sim.customer_says(phone="34600000003", name="Mo", text="metrics please")
    await eventually(lambda: Message.objects.filter(text="metrics please").exists())

    def get(path, token=None):
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    assert await asyncio.to_thread(get, "/healthz") == (200, "ok\n")
    status, body = await eventually(lambda: (lambda r: r if r[0] == 200 else None)(get("/readyz")))
    assert '"role": "active"' in body
    assert (await asyncio.to_thread(get, "/metrics"))[0] == 404
    status, body = await asyncio.to_thread(get, "/metrics", "s3cret")
    assert status == 200
    assert 'pinecall_events_stored_total{event="whatsapp.message"}' in body
    assert "pinecall_worker_active 1.0" in body
    await bridge.stop()


def test_a_sender_whose_loop_is_gone_steps_aside():
    """A bridge that ended without `stop()` (a crash, a test that failed mid-way) must not
    leave later writes handing their fragments to an event loop that is closed."""
    from conversations import notify

    bridge = PinecallBridge()
    loop = asyncio.new_event_loop()
    sender = bridge._install_sender(loop)
    loop.close()
    try:
        # Not a fragment (those a thread may publish itself): for the loop, which is gone.
        notify.send("operators", {"type": "live.revoked", "session_key": ""})
        assert notify._sender is None
        notify.send_through(sender)
        notify.send_through(None, replacing=lambda group, message: None)  # another's: kept
        assert notify._sender is sender
    finally:
        notify.send_through(None)


class LoopSends:
    """`notify.group_send` replaced: the sends the event loop made, in order; held
    while `held` is clear, as a Redis that is slow to answer would hold them."""

    def __init__(self) -> None:
        self.made: list[str] = []
        self.held = asyncio.Event()
        self.held.set()

    async def __call__(self, group, message):
        await self.held.wait()
        self.made.append(message["html"])


@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="the fan-out runs on Redis only")
async def test_with_redis_the_orm_thread_publishes_a_fragment_itself_and_in_order(monkeypatch):
    from conversations import notify

    loop_sends = LoopSends()
    monkeypatch.setattr(notify, "group_send", loop_sends)
    bridge = PinecallBridge()
    sender = bridge._install_sender(asyncio.get_running_loop())
    sending = asyncio.create_task(bridge._send_broadcasts())
    consumer = notify._async_redis().pubsub()
    await consumer.subscribe(notify.fanout_channel("direct-test"))
    await consumer.get_message(timeout=2)  # the subscription's confirmation

    async def published() -> list[str]:
        got = []
        while (message := await consumer.get_message(ignore_subscribe_messages=True, timeout=0.5)) is not None:
            got.append(message["data"].decode())
        return got

    try:
        # From the ORM thread with nothing waiting on the loop: published there and then.
        await asyncio.to_thread(notify.send_html, "direct-test", "<p>one</p>")
        assert await published() == ["<p>one</p>"] and loop_sends.made == []
        # One handed to the loop first (sent on the loop, held): the next waits behind it.
        loop_sends.held.clear()
        notify.send_html("direct-test", "<p>two</p>")
        await asyncio.to_thread(notify.send_html, "direct-test", "<p>three</p>")
        assert await published() == []
        loop_sends.held.set()
        await asyncio.wait_for(bridge._broadcasts.join(), 5)
        assert loop_sends.made == ["<p>two</p>", "<p>three</p>"]
        # Nothing handed any more: the ORM thread publishes itself again.
        await asyncio.to_thread(notify.send_html, "direct-test", "<p>four</p>")
        assert await published() == ["<p>four</p>"]
        assert loop_sends.made == ["<p>two</p>", "<p>three</p>"]
    finally:
        notify.send_through(None, replacing=sender)
        sending.cancel()
        await consumer.aclose()


@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="the fan-out runs on Redis only")
async def test_with_redis_a_redis_that_does_not_answer_holds_the_orm_thread_once(settings, monkeypatch):
    """A server that takes the connection and never answers: the first PUBLISH gives up
    after `PUBLISH_NOW_TIMEOUT` and drops its fragment (at most once); the next ones go
    through the event loop, so storing never waits on Redis again for a while."""
    import socket

    from conversations import notify

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    settings.REDIS_URL = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
    loop_sends = LoopSends()
    monkeypatch.setattr(notify, "group_send", loop_sends)
    bridge = PinecallBridge()
    sender = bridge._install_sender(asyncio.get_running_loop())
    sending = asyncio.create_task(bridge._send_broadcasts())
    try:
        await asyncio.to_thread(notify.send_html, "direct-test", "<p>lost</p>")
        assert bridge._direct_paused_until > time.monotonic()
        await asyncio.to_thread(notify.send_html, "direct-test", "<p>through the loop</p>")
        await asyncio.wait_for(bridge._broadcasts.join(), 5)
        assert loop_sends.made == ["<p>through the loop</p>"]
    finally:
        notify.send_through(None, replacing=sender)
        sending.cancel()
        silent.close()


@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="wake-ups go over Redis only with Redis")
async def test_with_redis_an_action_wakes_the_worker_without_waiting_for_its_poll(
    sim, start_worker, operator, monkeypatch
):
    from conversations import notify, worker as worker_module

    monkeypatch.setattr(worker_module, "OUTBOX_POLL_SECONDS", 120.0)
    # Not `start_worker()` (it relays the channel layer's wake-ups too): the bridge alone.
    bridge = PinecallBridge()
    running = asyncio.create_task(bridge.run())
    await asyncio.wait_for(bridge._registered.wait(), 10)
    redis = notify._async_redis()

    async def listening() -> bool:
        return dict(await redis.pubsub_numsub(notify.worker_wake_channel())).get(
            notify.worker_wake_channel().encode(), 0
        ) > 0

    deadline = asyncio.get_running_loop().time() + 10
    while not await listening():
        assert asyncio.get_running_loop().time() < deadline, "the worker never listened for wake-ups"
        await asyncio.sleep(0.05)
    started = await sim.customer_says(phone="34622222222", name="Eva", text="Help")
    conversation = await eventually(
        lambda: Conversation.objects.filter(session_id=started["session_id"]).first()
    )
    # The bridge has drained and now waits (the poll is 2 minutes away): only a wake-up sends it.
    await db(services.conversation_take_over)(conversation=conversation, operator=operator)
    await sim.wait_for("session.pause", session_id=started["session_id"], timeout=10)
    await bridge.stop()
    await running
