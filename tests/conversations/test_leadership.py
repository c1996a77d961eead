"""One active worker, the others standbys: real `runworker pinecall` processes on PostgreSQL.

- Two workers started at once with 20 sends queued: each sent exactly once, one
  active, the banner true throughout.
- `kill -9` of the active worker during traffic: a standby takes over, the next
  command is confirmed, nothing is doubled (the test prints the failover time).
- A worker whose database connection is cut loses leadership: it stops sending,
  closes its Pinecall connection after a short grace and waits as a standby; the
  other worker carries on.
"""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from conversations import services
from conversations.models import AgentState, Command, Conversation, Message, WorkerProcess
from pinecall_sdk.simulator import Simulator
from tests.support.processes import (
    astop,
    database_url,
    open_pg_proxy,
    require_postgres,
    start_worker,
    tail,
    wait_until,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(180)]


def active_workers() -> list[WorkerProcess]:
    fresh = timezone.now() - timedelta(seconds=10)
    return list(WorkerProcess.objects.filter(role="active", seen_at__gte=fresh))


async def held_conversation(sim: Simulator, operator, phone: str) -> Conversation:
    """A conversation the simulator knows, held by `operator` (its pause still queued)."""
    session_id = (await sim.customer_says(phone=phone, name="Queued", text="hello"))["session_id"]

    def make():
        # A running worker may have stored the session already.
        conversation, _ = Conversation.objects.get_or_create(
            session_id=session_id,
            defaults={"agent_id": "support", "contact_phone": phone},
        )
        Conversation.objects.filter(pk=conversation.pk).update(last_customer_message_at=timezone.now())
        services.conversation_take_over(conversation=conversation, operator=operator)
        return Conversation.objects.get(pk=conversation.pk)

    return await sync_to_async(make)()


async def test_two_workers_started_at_once_send_each_queued_command_once(tmp_path, operator):
    require_postgres()
    async with Simulator(port=0, ai_delay=3600, status_delay=0) as sim:
        conversation = await held_conversation(sim, operator, "34610000001")
        texts = [f"queued send {n}" for n in range(20)]
        for text in texts:
            await sync_to_async(services.conversation_send)(
                conversation=conversation, operator=operator, text=text
            )
        workers = [start_worker(sim, tmp_path / f"worker{n}.log") for n in range(2)]
        banner_offline_after_online = []
        try:
            def all_confirmed():
                state = AgentState.objects.filter(agent_id="support").first()
                if state is not None:
                    if state.worker_connected:
                        banner_offline_after_online.append(False)
                    elif banner_offline_after_online:
                        banner_offline_after_online.append(True)  # it said offline again
                return Command.objects.filter(status="confirmed").count() == 21

            await wait_until(all_confirmed, timeout=60, what="21 commands confirmed")
            sends = [f["text"] for f in sim.received if f.get("event") == "session.send"]
            assert sorted(sends) == sorted(texts), "each queued send exactly once"
            assert len(await sync_to_async(active_workers)()) == 1
            standbys = await wait_until(
                lambda: WorkerProcess.objects.filter(role="standby").count(), what="a standby"
            )
            assert standbys == 1
            assert True not in banner_offline_after_online, "the banner said offline while one was active"
            assert all(w.poll() is None for w in workers)
        finally:
            codes = [await astop(w) for w in workers]
    assert codes == [0, 0], "\n".join(tail(tmp_path / f"worker{n}.log") for n in range(2))


async def test_kill_9_of_the_active_worker_hands_over_to_the_standby(tmp_path, operator):
    require_postgres()
    async with Simulator(port=0, ai_delay=3600, status_delay=0) as sim:
        logs = [tmp_path / "a" / "worker.log", tmp_path / "b" / "worker.log"]
        for log in logs:
            log.parent.mkdir()
        # Both on one machine's spool, as two processes of one host would be.
        spool = str(tmp_path / "spool")
        workers = [start_worker(sim, log, WORKER_SPOOL_DIR=spool) for log in logs]
        try:
            [active] = await wait_until(active_workers, what="one active worker")
            by_pid = {w.pid: w for w in workers}
            victim = by_pid[active.pid]
            survivor = next(w for w in workers if w is not victim)
            for n in range(50):
                await sim.customer_says(phone=f"3462000{n % 10:04d}", text=f"before {n}")
            await wait_until(lambda: Message.objects.filter(text__startswith="before").count() == 50)

            dying = sim._agents["support"].conn
            victim.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            # Customers keep writing once Pinecall has noticed the dead connection: what
            # it sent into the dying socket before that is the protocol's own loss window
            # (the reconciliation shows it), not the failover's.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while sim._agents["support"].conn is dying:
                assert loop.time() < deadline, "the simulator never noticed the killed worker"
                await asyncio.sleep(0.02)
            traffic = asyncio.ensure_future(_traffic(sim, "during", 50))
            await wait_until(
                lambda: [w for w in active_workers() if w.pid == survivor.pid],
                timeout=60,
                what="the standby active",
            )
            conversation = await held_conversation(sim, operator, "34620009999")
            await wait_until(
                lambda: Command.objects.filter(conversation=conversation, status="confirmed").exists(),
                timeout=60,
                what="a command confirmed by the new active worker",
            )
            failover_s = time.monotonic() - killed_at
            print(f"failover: the standby confirmed a command {failover_s:.2f} s after kill -9")
            await traffic
            await wait_until(
                lambda: Message.objects.filter(text__startswith="during").count() == 50,
                timeout=60,
                what="the traffic during the failover stored",
            )
            texts = await sync_to_async(
                lambda: list(Message.objects.filter(author="customer").values_list("text", flat=True))
            )()
            assert len(texts) == len(set(texts)) == 101, "nothing doubled"  # with the "hello"
            assert survivor.poll() is None
        finally:
            for worker in workers:
                await astop(worker)


async def _traffic(sim: Simulator, tag: str, count: int) -> None:
    for n in range(count):
        await sim.customer_says(phone=f"3462100{n % 10:04d}", text=f"{tag} {n}")
        await asyncio.sleep(0.02)  # pacing the customers, not waiting for a result


async def test_a_worker_that_loses_its_database_stops_and_the_standby_takes_over(tmp_path, operator):
    require_postgres()
    proxy = open_pg_proxy()
    async with Simulator(port=0, ai_delay=3600, status_delay=0) as sim:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        standby = None
        cut_off = start_worker(sim, tmp_path / "a" / "worker.log", database_url(via_port=proxy.port))
        try:
            [first] = await wait_until(active_workers, what="the proxied worker active")
            assert first.pid == cut_off.pid
            standby = start_worker(sim, tmp_path / "b" / "worker.log")
            await wait_until(
                lambda: WorkerProcess.objects.filter(role="standby", pid=standby.pid).exists(),
                what="the second worker waiting as standby",
            )
            proxy.cut()
            # It stops sending at once, gives its Pinecall connection up after a short
            # grace, and stays up as a standby; the other worker takes over.
            await wait_until(
                lambda: [w for w in active_workers() if w.pid == standby.pid],
                timeout=60,
                what="the standby active",
            )
            log_a = tmp_path / "a" / "worker.log"
            await wait_until(lambda: "standby again" in log_a.read_text(), timeout=60,
                             what="the cut-off worker back to standby")
            assert "leadership lost: not sending" in log_a.read_text()
            assert cut_off.poll() is None, "it stays up (a standby now)"
            conversation = await held_conversation(sim, operator, "34630000001")
            await wait_until(
                lambda: Command.objects.filter(conversation=conversation, status="confirmed").exists(),
                timeout=30,
                what="the new active worker's command confirmed",
            )
            pauses = [f for f in sim.received if f.get("event") == "session.pause"
                      and f.get("session_id") == conversation.session_id]
            assert len(pauses) == 1
        finally:
            proxy.restore()
            proxy.stop()
            await astop(cut_off)
            await astop(standby)
