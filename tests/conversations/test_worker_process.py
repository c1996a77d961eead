"""`manage.py runworker pinecall` as its own process, against the simulator."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.db import connection

from conversations import services
from conversations.models import Command, Conversation, Message
from pinecall_sdk.simulator import Simulator

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parents[2]


def database_url() -> str:
    """The URL of the test database pytest-django created, for the worker process."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def start_worker(sim: Simulator, log: Path, **extra_env: str) -> subprocess.Popen:
    env = {
        **os.environ,
        **extra_env,
        "DATABASE_URL": database_url(),
        "PINECALL_URL": sim.url,
        "PINECALL_API_KEY": "test-key",
        "PYTHONUNBUFFERED": "1",
        # Kept across a restart of the same test's worker, never shared between tests.
        "WORKER_SPOOL_DIR": str(log.parent / "spool"),
    }
    return subprocess.Popen(
        [sys.executable, "manage.py", "runworker", "pinecall"],
        cwd=ROOT,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


async def wait_until(check, timeout: float = 30.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not await sync_to_async(check)():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        await asyncio.sleep(0.1)


async def stop(process: subprocess.Popen, sig=signal.SIGTERM) -> int:
    process.send_signal(sig)
    return await asyncio.to_thread(process.wait, 20)


async def test_runworker_connects_at_start_and_carries_out_queued_commands(tmp_path, operator):
    async with Simulator(port=0, ai_delay=0, status_delay=0) as sim:
        await sim.customer_says(phone="34612345678", name="Ana", text="hello")
        session_id = sim.session_for("34612345678")
        # Issued while no worker runs: waits in the outbox.
        conversation = await sync_to_async(Conversation.objects.create)(
            session_id=session_id, agent_id="support", contact_phone="34612345678"
        )
        await sync_to_async(services.conversation_take_over)(
            conversation=conversation, operator=operator
        )
        log = tmp_path / "worker.log"
        worker = start_worker(sim, log)
        try:
            # Connected and registered without any channel message arriving first.
            await sim.wait_for("agent.create", timeout=30)
            await sim.wait_for("channel.add", timeout=10)
            await sim.wait_for("session.pause", session_id=session_id, timeout=10)
            await wait_until(lambda: Command.objects.get().status == "confirmed")
            # Events that happened before the worker started were buffered by Pinecall.
            await wait_until(lambda: Message.objects.filter(text="hello").exists())
        finally:
            code = await stop(worker)
        assert code == 0, log.read_text()
        output = log.read_text()
        assert "command" in output and "confirmed" in output
        assert "worker stopped" in output
        assert [f["event"] for f in sim.received].count("session.pause") == 1


async def test_a_rejected_key_stops_the_worker_with_a_clear_error(tmp_path):
    async with Simulator(port=0, api_keys={"the-right-key"}) as sim:
        log = tmp_path / "worker.log"
        worker = start_worker(sim, log)
        code = await asyncio.to_thread(worker.wait, 30)
    assert code != 0
    assert "UNAUTHORIZED" in log.read_text()


async def test_kill_9_in_the_middle_of_a_burst_then_restart_stores_exact_counts(tmp_path):
    """1,000 customer messages from 100 contacts; the worker is killed mid-way.

    A server cannot know what a dead client received: after the agent comes
    back, the simulator repeats what it had sent (replay window larger than the
    burst) and the worker must store every message exactly once.
    """
    contacts, per_contact = 100, 10
    async with Simulator(port=0, ai_delay=3600, replay_last=5000) as sim:
        log = tmp_path / "worker.log"
        worker = start_worker(sim, log)
        await sim.wait_for("channel.add", timeout=30)
        killed = False
        for n in range(per_contact):
            for c in range(contacts):
                await sim.customer_says(
                    phone=f"3460000{c:04d}", name=f"Customer {c}", text=f"message {n} from {c}"
                )
            await asyncio.sleep(0.02)
            if not killed and n >= 2:
                await wait_until(lambda: Message.objects.count() >= 100)
                worker.kill()  # SIGKILL: no goodbye, whatever was in flight is lost
                await asyncio.to_thread(worker.wait, 10)
                killed = True
        stored_at_kill = await sync_to_async(Message.objects.count)()
        assert stored_at_kill < contacts * per_contact
        worker = start_worker(sim, log)
        try:
            await wait_until(
                lambda: Message.objects.count() >= contacts * per_contact, timeout=120
            )
            # Events are stored in order: once a message sent after everything else
            # is stored, any repeat of an earlier one has been handled too.
            await sim.customer_says(phone="34600009999", name="Last", text="sentinel")
            await wait_until(lambda: Message.objects.filter(text="sentinel").exists())
        finally:
            await stop(worker)
    assert await sync_to_async(
        Message.objects.filter(author="customer").exclude(text="sentinel").count
    )() == 1000
    assert await sync_to_async(Conversation.objects.count)() == contacts + 1
    counts = await sync_to_async(
        lambda: set(
            Conversation.objects.exclude(contact_phone="34600009999").values_list(
                "message_count", flat=True
            )
        )
    )()
    assert counts == {per_contact}


def start_redis(port: int, tmp_path: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return process
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


async def test_the_worker_survives_redis_going_away(tmp_path, operator):
    """Redis (the channel layer) stops and comes back: events and commands keep flowing,
    because the database is the record and the worker polls its outbox."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    redis_process = start_redis(port, tmp_path)
    async with Simulator(port=0, ai_delay=0, status_delay=0) as sim:
        log = tmp_path / "worker.log"
        worker = start_worker(sim, log, REDIS_URL=f"redis://127.0.0.1:{port}/0")
        try:
            await sim.wait_for("channel.add", timeout=30)
            redis_process.kill()
            redis_process.wait(5)
            await asyncio.sleep(1.0)

            await sim.customer_says(phone="34612340000", name="Jo", text="anyone?")
            await wait_until(lambda: Message.objects.filter(text="anyone?").exists())
            conversation = await sync_to_async(Conversation.objects.get)(contact_phone="34612340000")
            await sync_to_async(services.conversation_take_over)(
                conversation=conversation, operator=operator
            )
            await wait_until(lambda: Command.objects.get().status == "confirmed")

            redis_process = start_redis(port, tmp_path)
            await asyncio.sleep(1.0)
            await sync_to_async(services.conversation_hand_back)(
                conversation=conversation, operator=operator
            )
            await wait_until(lambda: Command.objects.filter(status="confirmed").count() == 2)
            assert worker.poll() is None, "the worker died"
        finally:
            code = await stop(worker)
            redis_process.kill()
    assert code == 0, log.read_text()
    assert "channel layer unavailable" in log.read_text()
