"""1. Fan-out: a customer's message until its rendered fragment is on N operators' sockets.

The real path: simulator -> worker (ingest, one transaction) -> on commit the
fragment is rendered and group_sent -> Redis -> Daphne -> N WebSockets.
The floor, measured in the same run against the same N sockets: a bare
`channel_layer.group_send` from the harness of a fragment of the same size
(the real one, with its token swapped) -> Redis -> Daphne -> N WebSockets.

Per sample the latency is the time until the fragment is on *all* N sockets
(the last one); per-socket latencies are kept too. Real and floor samples
alternate, so drift on this shared 2-core machine hits both alike.
"""

from __future__ import annotations

import asyncio
import secrets
import time

from bench import profiling, stats
from bench.clients import LiveClient, close_many, connect_many, create_operators
from bench.stack import Stack, conversation_pk, orm

SIZES = (1, 10, 100)
SAMPLES = {1: 200, 10: 200, 100: 100}
WARMUP = 10
PHONE = "34700000001"
TIMEOUT = 10.0


def token() -> str:
    return "fx" + secrets.token_hex(8)  # fixed length: the floor reuses the real fragment


class Probe:
    """Counts a token's arrival on each socket; done when all expected sockets have it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker  # only message fragments, not the inbox row that repeats the text
        self.token = ""
        self.hits: dict[int, float] = {}
        self.expected = 0
        self.text = ""
        self.done: asyncio.Future | None = None

    def start(self, tok: str, expected: int) -> None:
        self.token, self.expected, self.hits, self.text = tok, expected, {}, ""
        self.done = asyncio.get_running_loop().create_future()

    def on_frame(self, client, t: float, text: str) -> None:
        tok = self.token
        if tok and tok in text and self.marker in text and id(client) not in self.hits:
            self.hits[id(client)] = t
            if not self.text:
                self.text = text
            if len(self.hits) >= self.expected and not self.done.done():
                self.done.set_result(None)

    async def wait(self) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(self.done), TIMEOUT)
            return True
        except TimeoutError:
            return False
        finally:
            self.token = ""


async def _sample(probe: Probe, n: int, send) -> tuple[list[float] | None, str]:
    tok = token()
    probe.start(tok, n)
    t0 = time.perf_counter()
    await send(tok)
    ok = await probe.wait()
    if not ok:
        return None, tok
    return [t - t0 for t in probe.hits.values()], tok


async def _pause(last: float) -> None:
    # Let the trailing frames of this sample (the inbox row) drain before the next one.
    await asyncio.sleep(min(0.3, max(0.02, 3 * last)))


def _ingest_breakdown(walls: dict[str, float]) -> dict:
    """Send -> row created in the worker (Message.created_at), from wall clocks."""
    from conversations.models import Message

    created = dict(
        Message.objects.filter(text__startswith="Probe ").values_list("text", "created_at")
    )
    delays = []
    for text, wall in walls.items():
        at = created.get(text)
        if at is not None:
            delays.append(at.timestamp() - wall)
    return stats.summary_ms(delays, ps=(50, 99))


async def run(h) -> dict:
    from channels.layers import get_channel_layer

    from conversations.notify import conversation_group

    scale = h.scale
    result: dict = {}
    async with Stack("fanout", h.logs) as stack:
        sim = stack.sim
        operators = await orm(create_operators, max(SIZES), prefix="fan")
        first = await sim.customer_says(phone=PHONE, name="Fan Out", text="Hello, anyone there?")
        pk = await conversation_pk(first["session_id"])
        layer = get_channel_layer()
        group = conversation_group(pk)
        marker = f'id="messages-{pk}"'

        for n in SIZES:
            count = max(10, int(SAMPLES[n] * scale))
            probe = Probe(marker)
            clients = [
                LiveClient(stack.port, op, conversation=pk, keep=20, on_frame=probe.on_frame)
                for op in operators[:n]
            ]
            await connect_many(clients)
            await asyncio.sleep(1.0)  # catch-up frames delivered
            closed = [c for c in clients if c.closed.is_set()]
            if closed:
                raise RuntimeError(f"{len(closed)} sockets were closed (code {closed[0].close_code})")

            async def real_send(tok):
                await sim.customer_says(phone=PHONE, name="Fan Out", text=f"Probe {tok}")

            fragment = {"text": "", "token": ""}

            async def floor_send(tok):
                html = fragment["text"].replace(fragment["token"], tok)
                await layer.group_send(group, {"type": "live.html", "html": html})

            real_all, floor_all, real_each, floor_each = [], [], [], []
            lost = {"real": 0, "floor": 0}
            sizes = []
            for i in range(WARMUP + count):
                lat, tok = await _sample(probe, n, real_send)
                if lat is None:
                    lost["real"] += 1
                    await asyncio.sleep(0.5)
                    continue
                if not fragment["text"] or i == WARMUP:
                    # The floor sends this very fragment, its token swapped (same length).
                    fragment["text"], fragment["token"] = probe.text, tok
                sizes.append(len(probe.text.encode()))
                if i >= WARMUP:
                    real_all.append(max(lat))
                    real_each.extend(lat)
                await _pause(max(lat))

                lat, _ = await _sample(probe, n, floor_send)
                if lat is None:
                    lost["floor"] += 1
                    await asyncio.sleep(0.5)
                    continue
                if i >= WARMUP:
                    floor_all.append(max(lat))
                    floor_each.extend(lat)
                await _pause(max(lat))
            stack.check_alive()

            real = stats.summary_ms(real_all)
            floor = stats.summary_ms(floor_all)
            entry = {
                "p50_ms": real["p50_ms"],
                "p95_ms": real["p95_ms"],
                "p99_ms": real["p99_ms"],
                "floor_p50_ms": floor["p50_ms"],
                "floor_p95_ms": floor["p95_ms"],
                "floor_p99_ms": floor["p99_ms"],
                "ratio_p50": _ratio(real["p50_ms"], floor["p50_ms"]),
                "ratio_p99": _ratio(real["p99_ms"], floor["p99_ms"]),
                "samples": real["samples"],
                "floor_samples": floor["samples"],
                "lost": lost,
                "fragment_bytes": int(stats.percentile(sizes, 50) or 0),
                "per_socket": {
                    "real": stats.summary_ms(real_each),
                    "floor": stats.summary_ms(floor_each),
                },
            }
            result[str(n)] = entry
            h.log(
                f"fanout N={n}: p50 {entry['p50_ms']} p99 {entry['p99_ms']} ms; floor p50 "
                f"{entry['floor_p50_ms']} p99 {entry['floor_p99_ms']} ms; ratio p99 {entry['ratio_p99']}"
            )

            if n == max(SIZES):
                # Breakdown of the real path: when did the worker create the row?
                result["breakdown_n100"] = await _breakdown(h, stack, probe, n, real_send)
                if h.profile and entry["ratio_p99"] and entry["ratio_p99"] > 1.5:
                    result["profile"] = await _profile(h, stack, probe, n, real_send)
            await close_many(clients)
            await asyncio.sleep(0.5)
        result["log_problems"] = stack.problems()
    return result


async def _breakdown(h, stack, probe, n, real_send) -> dict:
    """A few more real samples with wall clocks: send -> row created -> all sockets."""
    walls, totals = {}, []
    for _ in range(30):
        tok = token()
        probe.start(tok, n)
        t0, wall0 = time.perf_counter(), time.time()
        await real_send(tok)
        if await probe.wait():
            totals.append(max(probe.hits.values()) - t0)
            walls[f"Probe {tok}"] = wall0
            await _pause(totals[-1])
    created = await orm(_ingest_breakdown, walls)
    total = stats.summary_ms(totals, ps=(50, 99))
    return {
        "samples": len(totals),
        "send_to_row_created_ms": created,
        "send_to_all_sockets_ms": total,
        "note": "row created = Message.created_at (worker's clock, before INSERT and commit); "
        "the rest is commit, render, two group_sends and delivery by Daphne",
    }


async def _profile(h, stack, probe, n, real_send) -> dict:
    """py-spy on Daphne and the worker during more real samples at N=100."""
    if not profiling.available():
        return {"error": "py-spy not installed (pip install py-spy)"}
    seconds = 12
    out = h.profile_dir
    tasks = [
        asyncio.create_task(profiling.record(stack.daphne.pid, seconds, out / "fanout-daphne.txt")),
        asyncio.create_task(profiling.record(stack.worker.pid, seconds, out / "fanout-worker.txt")),
    ]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        tok = token()
        probe.start(tok, n)
        t0 = time.perf_counter()
        await real_send(tok)
        if await probe.wait():
            await _pause(max(probe.hits.values()) - t0)
    daphne_raw, worker_raw = await asyncio.gather(*tasks)
    return {
        "daphne": profiling.summarize(daphne_raw),
        "worker": profiling.summarize(worker_raw),
    }


def _ratio(a, b):
    if not a or not b:
        return None
    return round(a / b, 2)
