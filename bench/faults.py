"""7. Faults: what the worker keeps through a PostgreSQL outage and a `kill -9`.

The same shapes as tests/conversations/test_faults.py, on the bench's stack:

- pg_cut: the worker (and Daphne) reach PostgreSQL through a TCP proxy
  (tests/support/tcp_proxy.py). 400 customer messages at ~40/s over 20 contacts;
  2 s in, the proxy resets every connection and refuses new ones for 10 s, then
  forwards again. One more message after the restore marks the end (events are
  stored in order). Counted: stored once each, and rows that repeat one.
- kill9: 1,000 customer messages at ~100/s over 100 contacts, the simulator's
  default replay window (it repeats its last 3 events to a resumed agent); the
  worker is SIGKILLed when ~300 are stored and started again 3 s later.

- failover: an active worker and a standby; the active one is SIGKILLed and a
  take over is queued at once; timed until Pinecall's confirmation of that
  command is stored (the standby took the lock, registered, sent it). Five
  kills, a fresh standby started after each; the p50 is `failover_s`.

The AI is delayed (it never answers), so every stored row is a customer message.
Each worker gets a spool directory of its own under the run's logs (a restarted
worker finds what the killed one left; nothing from other runs).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections import Counter

from bench import config, procs
from bench.stack import Stack, orm

PG_CUT_S = 10
PG_CUT_MESSAGES, PG_CUT_RATE, PG_CUT_CONTACTS, PG_CUT_AFTER_S = 400, 40.0, 20, 2.0
KILL9_MESSAGES, KILL9_RATE, KILL9_CONTACTS = 1000, 100.0, 100
KILL9_AT, KILL9_DOWN_S = 300, 3.0
WAIT_TIMEOUT, WAIT_STALL = 120.0, 45.0  # for everything to be stored after the fault
DB_UNAVAILABLE = re.compile(
    r"database\s+(?:is\s+)?(?:temporarily\s+)?(?:unavailable|not\s+available)", re.IGNORECASE
)


async def run(h) -> dict:
    results: dict = {}
    checks: dict = {}
    for name, shape in (("pg_cut", _pg_cut), ("kill9", _kill9), ("failover", _failover)):
        h.log(f"faults: {name}")
        try:
            results[name] = await shape(h, checks)
        except Exception as error:  # one broken shape must not lose the other
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            h.log(f"faults: {name} failed: {results[name]['error']}")
    results["checks"] = checks
    results["failover_s"] = (results.get("failover") or {}).get("p50_s")
    return results


# ---------------------------------------------------------------- helpers


async def _burst(
    sim, *, count: int, rate: float, contacts: int, tag: str, prefix: str
) -> list[str]:
    """`count` messages at `rate`/s, round-robin over `contacts`; unique texts; returns ids."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    ids = []
    for i in range(count):
        c = i % contacts
        sent = await sim.customer_says(
            phone=f"{prefix}{c:05d}", name=f"Customer {c}", text=f"{tag} {i} from {c}"
        )
        ids.append(sent["message_id"])
        delay = t0 + (i + 1) / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
    return ids


def _stats(ids: list[str], tag: str) -> dict:
    """Stored (distinct ids of `ids`) and duplicates (repeats by id or by text)."""
    from conversations.models import Message

    wanted = set(ids)
    rows = [
        (mid, text)
        for mid, text in Message.objects.filter(author="customer").values_list("message_id", "text")
        if mid in wanted or text.startswith(tag + " ")
    ]
    by_id = Counter(mid for mid, _ in rows if mid)
    by_text = Counter(text for _, text in rows)
    return {
        "stored": sum(1 for mid in by_id if mid in wanted),
        "duplicates": max(
            sum(n - 1 for n in by_id.values()),
            sum(n - 1 for n in by_text.values()),
            len(rows) - len(by_id),
        ),
    }


def _customer_count() -> int:
    from conversations.models import Message

    return Message.objects.filter(author="customer").count()


def _has(message_id: str) -> bool:
    from conversations.models import Message

    return Message.objects.filter(message_id=message_id).exists()


async def _wait_stored(ids: list[str], tag: str, sentinel: str) -> dict:
    """Until all of `ids` and the sentinel are stored, or the count stops moving."""
    deadline = time.monotonic() + WAIT_TIMEOUT
    last, last_change = -1, time.monotonic()
    while True:
        stats = await orm(_stats, ids, tag)
        now = time.monotonic()
        if stats["stored"] >= len(ids) and await orm(_has, sentinel):
            return stats
        if stats["stored"] != last:
            last, last_change = stats["stored"], now
        if now > deadline or now - last_change > WAIT_STALL:
            return stats
        await asyncio.sleep(0.25)


def _log_text(proc: procs.Proc | None) -> str:
    if proc is None:
        return ""
    try:
        return proc.log.read_text(errors="replace")
    except OSError:
        return ""


# ---------------------------------------------------------------- PostgreSQL cut


async def _pg_cut(h, checks: dict) -> dict:
    from tests.support.tcp_proxy import TcpProxy

    tag = "faults-pgcut"
    proxy = TcpProxy(config.PG_HOST, config.PG_PORT).start()
    try:
        proxied = f"postgres://{config.PG_USER}@127.0.0.1:{proxy.port}/{config.DB_LIVE}"
        env_extra = {"DATABASE_URL": proxied, "WORKER_SPOOL_DIR": str(h.logs / "spool-pgcut")}
        async with Stack("faults-pgcut", h.logs, env_extra=env_extra) as stack:
            cut: dict = {}

            async def cut_then_restore() -> None:
                await asyncio.sleep(PG_CUT_AFTER_S)
                cut["reset"] = await asyncio.to_thread(proxy.cut)
                h.log(f"faults: PostgreSQL cut ({cut['reset']} connections reset)")
                await asyncio.sleep(PG_CUT_S)  # the outage
                cut["refused"] = proxy.refused
                await asyncio.to_thread(proxy.restore)
                h.log(f"faults: PostgreSQL back ({cut['refused']} connections refused meanwhile)")

            cutter = asyncio.create_task(cut_then_restore())
            try:
                ids = await _burst(stack.sim, count=PG_CUT_MESSAGES, rate=PG_CUT_RATE,
                                   contacts=PG_CUT_CONTACTS, tag=tag, prefix="3481")
                await cutter
            finally:
                if not cutter.done():
                    cutter.cancel()
                    await asyncio.to_thread(proxy.restore)
            restored_at = time.monotonic()
            sentinel = await stack.sim.customer_says(
                phone="34899999999", name="Last", text="sentinel after the cut"
            )
            stats = await _wait_stored(ids, tag, sentinel["message_id"])
            checks["pg_cut_recovered_s"] = round(time.monotonic() - restored_at, 1)
            checks["pg_cut_worker_alive"] = stack.worker.alive()
            checks["pg_cut_outage_logged"] = bool(DB_UNAVAILABLE.search(_log_text(stack.worker)))
            checks["pg_cut_connections_reset"] = cut.get("reset")
            checks["pg_cut_connections_refused"] = cut.get("refused")
            problems = stack.problems()
            if problems:
                checks["pg_cut_log_problems"] = problems
    finally:
        proxy.stop()
    result = {"pg_cut_s": PG_CUT_S, "sent": len(ids), "stored": stats["stored"],
              "duplicates": stats["duplicates"]}
    h.log(f"faults: pg_cut {result}; worker alive {checks['pg_cut_worker_alive']}, "
          f"outage logged {checks['pg_cut_outage_logged']}")
    return result


# ---------------------------------------------------------------- kill -9


async def _kill9(h, checks: dict) -> dict:
    tag = "faults-kill9"
    env_extra = {"WORKER_SPOOL_DIR": str(h.logs / "spool-kill9")}
    async with Stack("faults-kill9", h.logs, env_extra=env_extra) as stack:
        sim = stack.sim
        replay_window = sim.replay_last
        killed: dict = {}

        async def kill_then_restart() -> None:
            deadline = time.monotonic() + 60
            while await orm(_customer_count) < KILL9_AT:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"fewer than {KILL9_AT} stored in 60 s:\n{stack.worker.tail()}"
                    )
                await asyncio.sleep(0.02)
            old = stack.worker
            os.killpg(old.pid, signal.SIGKILL)  # no goodbye: whatever was in flight is lost
            await asyncio.to_thread(old.popen.wait, 10)
            old.stop()  # reaped; off the harness's list
            killed["stored"] = await orm(_customer_count)
            h.log(f"faults: worker killed with {killed['stored']} stored")
            await asyncio.sleep(KILL9_DOWN_S)
            env = config.stack_env(database=config.DB_LIVE, pinecall_url=sim.url, extra=env_extra)
            stack.worker = procs.worker(env, h.logs / "faults-kill9-worker.log")

        killer = asyncio.create_task(kill_then_restart())
        try:
            ids = await _burst(sim, count=KILL9_MESSAGES, rate=KILL9_RATE,
                               contacts=KILL9_CONTACTS, tag=tag, prefix="3482")
            await asyncio.wait_for(killer, 90)
        finally:
            killer.cancel()
        sentinel = await sim.customer_says(phone="34899999998", name="Last",
                                           text="sentinel after the kill")
        stats = await _wait_stored(ids, tag, sentinel["message_id"])
        checks["kill9_stored_when_killed"] = killed.get("stored")
        checks["kill9_worker_alive"] = stack.worker.alive()
    result = {"sent": len(ids), "stored": stats["stored"], "duplicates": stats["duplicates"],
              "replay_window": replay_window}
    h.log(f"faults: kill9 {result}")
    return result


# ---------------------------------------------------------------- failover


FAILOVER_KILLS = 5


def _active_worker_pid() -> int | None:
    from datetime import timedelta

    from django.utils import timezone

    from conversations.models import WorkerProcess

    fresh = timezone.now() - timedelta(seconds=10)
    row = WorkerProcess.objects.filter(role="active", seen_at__gte=fresh).order_by("-active_since").first()
    return row.pid if row else None


def _standby_pids() -> set[int]:
    from datetime import timedelta

    from django.utils import timezone

    from conversations.models import WorkerProcess

    fresh = timezone.now() - timedelta(seconds=10)
    return set(WorkerProcess.objects.filter(role="standby", seen_at__gte=fresh).values_list("pid", flat=True))


def _queue_take_over(session_id: str, phone: str) -> int:
    from django.contrib.auth.models import User
    from django.utils import timezone

    from conversations import services
    from conversations.models import Conversation

    operator = User.objects.filter(username="bench-failover").first() or User.objects.create_superuser(
        "bench-failover", password=None
    )
    conversation, _ = Conversation.objects.get_or_create(
        session_id=session_id, defaults={"agent_id": "support", "contact_phone": phone}
    )
    Conversation.objects.filter(pk=conversation.pk).update(last_customer_message_at=timezone.now())
    return services.conversation_take_over(conversation=conversation, operator=operator).pk


def _confirmed(command_id: int) -> bool:
    from conversations.models import Command

    return Command.objects.filter(pk=command_id, status="confirmed").exists()


async def _failover(h, checks: dict) -> dict:
    env_extra = {"WORKER_SPOOL_DIR": str(h.logs / "spool-failover")}
    samples: list[float] = []
    async with Stack("faults-failover", h.logs, env_extra=env_extra) as stack:
        sim = stack.sim
        env = config.stack_env(database=config.DB_LIVE, pinecall_url=sim.url, extra=env_extra)
        standby = procs.worker(env, h.logs / "faults-failover-standby0.log")
        workers = {stack.worker.pid: stack.worker, standby.pid: standby}
        try:
            for round_ in range(FAILOVER_KILLS):
                deadline = time.monotonic() + 60
                while (active_pid := await orm(_active_worker_pid)) not in workers:
                    if time.monotonic() > deadline:
                        raise RuntimeError("no active worker among the bench's")
                    await asyncio.sleep(0.05)
                # The standby must be waiting (its row written) before the kill.
                while not (await orm(_standby_pids)) & (set(workers) - {active_pid}):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the standby never reported")
                    await asyncio.sleep(0.05)
                phone = f"3483{round_:07d}"
                session_id = (await sim.customer_says(phone=phone, name="Failover", text="hi"))[
                    "session_id"
                ]
                victim = workers.pop(active_pid)
                os.killpg(victim.pid, signal.SIGKILL)
                killed_at = time.monotonic()
                command_id = await orm(_queue_take_over, session_id, phone)
                while not await orm(_confirmed, command_id):
                    if time.monotonic() - killed_at > 60:
                        raise RuntimeError("no failover within 60 s")
                    await asyncio.sleep(0.02)
                samples.append(time.monotonic() - killed_at)
                h.log(f"faults: failover {round_ + 1}: {samples[-1]:.2f} s")
                await asyncio.to_thread(victim.popen.wait, 10)
                victim.stop()
                fresh = procs.worker(env, h.logs / f"faults-failover-standby{round_ + 1}.log")
                workers[fresh.pid] = fresh
            stack.worker = next(iter(workers.values()))
        finally:
            for worker in workers.values():
                if worker is not stack.worker:
                    worker.stop()
    samples.sort()
    result = {
        "kills": len(samples),
        "p50_s": round(samples[len(samples) // 2], 3),
        "max_s": round(samples[-1], 3),
        "samples_s": [round(x, 3) for x in samples],
    }
    checks["failover_target_s"] = 10
    h.log(f"faults: failover {result}")
    return result
