"""5. Memory: one Daphne process holding 1,000 idle operator sockets.

A Daphne of its own (no worker needed), warmed by a few sockets opened and
closed (so one-time imports and caches are not charged to the sockets); then
VmRSS before, 1,000 authenticated inbox sockets opened (20 at a time, as
browsers arriving), a settle, VmRSS after: per socket = delta / 1,000.
"""

from __future__ import annotations

import asyncio

from bench.clients import LiveClient, close_many, connect_many, create_operators
from bench.stack import Stack, orm

SOCKETS = 1000
WARMUP = 20
SETTLE = 3.0
IDLE = 15.0  # then idle: an idle socket must stay open


async def idle_socket_memory(daphnes: list, warm: list[LiveClient], clients: list[LiveClient]) -> dict:
    """RSS per idle socket over these Daphne processes (the sockets spread over them).

    `warm` sockets are opened and closed first, so one-time imports and caches are
    not charged to the sockets; then VmRSS of each process before, `clients` opened
    20 at a time (as browsers arriving), a settle, VmRSS after.
    """
    await connect_many(warm)
    await asyncio.sleep(1.0)
    await close_many(warm)
    await asyncio.sleep(SETTLE)
    before = [d.rss_kb() for d in daphnes]
    await connect_many(clients, concurrency=20, timeout=300)
    await asyncio.sleep(SETTLE)
    after = [d.rss_kb() for d in daphnes]
    open_count = sum(1 for c in clients if not c.closed.is_set())
    per_socket = (sum(after) - sum(before)) / max(1, open_count)
    return {
        "open": open_count,
        "rss_before_kb": sum(before),
        "rss_after_kb": sum(after),
        "rss_each_kb": [[b, a] for b, a in zip(before, after)],
        "kb_per_socket": per_socket,
    }


async def run(h) -> dict:
    sockets = SOCKETS  # not scaled: the figure is per socket at this count
    async with Stack("memory", h.logs, worker=False, simulator=False) as stack:
        operators = await orm(create_operators, sockets + WARMUP, prefix="mem")
        warm = [LiveClient(stack.port, op, keep=5) for op in operators[:WARMUP]]
        clients = [LiveClient(stack.port, op, keep=5) for op in operators[WARMUP:]]
        measured = await idle_socket_memory([stack.daphne], warm, clients)
        open_count, rss_before, rss_after = measured["open"], measured["rss_before_kb"], measured["rss_after_kb"]
        catch_up = sum(1 for c in clients if c.count > 0)
        stack.check_alive()
        await asyncio.sleep(IDLE)
        still_open = sum(1 for c in clients if not c.closed.is_set())
        codes: dict = {}
        for c in clients:
            if c.closed.is_set():
                codes[str(c.close_code)] = codes.get(str(c.close_code), 0) + 1
        problems = stack.problems()

        await close_many(clients)
        await asyncio.sleep(SETTLE)
        rss_closed = stack.daphne.rss_kb()

    per_socket = measured["kb_per_socket"]
    result = {
        "sockets": sockets,
        "open": open_count,
        "sockets_with_catch_up": catch_up,
        "rss_before_kb": rss_before,
        "rss_after_kb": rss_after,
        "rss_after_close_kb": rss_closed,
        "kb_per_socket": per_socket,
        "idle_seconds": IDLE,
        "open_after_idle": still_open,
        "close_codes": codes,
        "log_problems": problems,
    }
    h.log(
        f"memory: RSS {rss_before} -> {rss_after} kB with {open_count} sockets = "
        f"{per_socket:.1f} kB/socket (after closing: {rss_closed} kB); "
        f"{still_open} still open after {IDLE:.0f} s idle"
    )
    return result
