"""6. Scale: 1,000 operators on one conversation, across two Daphne processes.

The stack of the fan-out section with two Daphne processes (each on its own
port, the sockets spread over both, as behind a load balancer). First the
worker's CPU while idle (connected to Pinecall, nothing happening); then the
memory of the idle sockets, by the memory section's method, over both
processes; then samples as in the fan-out section, real and both floors in
turn: the customer's message until it is on all 1,000 sockets.
"""

from __future__ import annotations

import asyncio
import time

from bench import config, fanout, load
from bench.clients import LiveClient, close_many, create_operators
from bench.memory import idle_socket_memory
from bench.stack import Stack, conversation_pk, orm

OPERATORS = 1000
DAPHNES = 2
SAMPLES = 100  # per kind: a p99 of 40 was the worst one or two samples
WARMUP = 5
WARM_SOCKETS = 10  # per Daphne, opened and closed before the memory is read
IDLE_SECONDS = 20.0
PHONE = "34700000002"
SETTLE = 5.0  # after the sockets opened: presence and catch-up frames delivered


async def worker_idle_cpu(stack, seconds: float = IDLE_SECONDS) -> float:
    """Percent of one core the worker used over `seconds` with nothing happening."""
    pid = stack.worker.pid
    t0, cpu0 = time.monotonic(), load.cpu_seconds(pid)
    await asyncio.sleep(seconds)
    return round(100.0 * (load.cpu_seconds(pid) - cpu0) / (time.monotonic() - t0), 2)


async def run(h) -> dict:
    from conversations.notify import conversation_group

    async with Stack("scale", h.logs, daphnes=DAPHNES, app=config.FLOOR_APP) as stack:
        sim = stack.sim
        first = await sim.customer_says(phone=PHONE, name="Scale", text="Is anyone there?")
        pk = await conversation_pk(first["session_id"])
        await asyncio.sleep(2.0)  # the first message's notifications are over
        idle_cpu = await worker_idle_cpu(stack)
        h.log(f"scale: worker idle CPU {idle_cpu} % of a core over {IDLE_SECONDS:.0f} s")

        operators = await orm(create_operators, OPERATORS + WARM_SOCKETS * DAPHNES, prefix="scale")
        probe = fanout.Probe(f'id="messages-{pk}"')

        def client(i, op):
            return LiveClient(stack.ports[i % DAPHNES], op, conversation=pk, keep=5,
                              on_frame=probe.on_frame)

        warm = [client(i, op) for i, op in enumerate(operators[: WARM_SOCKETS * DAPHNES])]
        clients = [client(i, op) for i, op in enumerate(operators[WARM_SOCKETS * DAPHNES :])]
        t_open = time.monotonic()
        memory = await idle_socket_memory(stack.daphnes, warm, clients)
        opened_s = round(time.monotonic() - t_open, 1)
        h.log(f"scale: {memory['open']} sockets open in {opened_s} s; "
              f"{memory['kb_per_socket']} kB per socket")
        await asyncio.sleep(SETTLE)
        closed = [c for c in clients if c.closed.is_set()]
        if closed:
            raise RuntimeError(f"{len(closed)} sockets were closed (code {closed[0].close_code})")

        async def real_send(tok):
            await sim.customer_says(phone=PHONE, name="Scale", text=f"Probe {tok}")

        senders = fanout.floor_senders(conversation_group(pk), pk)
        count = max(10, int(SAMPLES * h.scale))
        kinds = await fanout.alternate(probe, len(clients), {"real": real_send, **senders},
                                       count=count, warmup=WARMUP)
        stack.check_alive()
        entry = fanout.summarize(kinds)
        result = {
            "operators": len(clients),
            "daphnes": DAPHNES,
            "p50_ms": entry["p50_ms"],
            "p99_ms": entry["p99_ms"],
            "floor_p99_ms": entry["floor_p99_ms"],
            "kb_per_socket": memory["kb_per_socket"],
            "worker_idle_cpu_percent": idle_cpu,
            **entry,
            "memory": memory,
            "sockets_open_seconds": opened_s,
        }
        h.log(
            f"scale N={len(clients)} over {DAPHNES} Daphnes: p50 {entry['p50_ms']} p99 "
            f"{entry['p99_ms']} ms; floor p99 {entry['floor_p99_ms']} ms; transport floor p99 "
            f"{entry['transport_floor_p99_ms']} ms"
        )
        if h.profile and entry["p99_ms"] and (
            entry["p99_ms"] > 200 or (entry["ratio_p99"] or 0) > 1.5
        ):
            result["profile"] = await fanout.profile_samples(h, stack, probe, len(clients), real_send,
                                                      section="scale")
        result["log_problems"] = stack.problems()
        await close_many(clients)
    return result
