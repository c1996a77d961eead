"""1. Fan-out: a customer's message until its rendered fragment is on N operators' sockets.

The real path: simulator -> worker (ingest, one transaction) -> on commit the
fragment is rendered and sent (`notify`) -> Redis -> Daphne -> N WebSockets.
The floor, measured in the same run against the same N sockets: a bare
`notify.group_send` from the harness of a fragment of the same size (the real
one, with its token swapped) -> Redis -> Daphne's consumers -> N WebSockets.

The transport floor, same sockets, same clock: the harness PUBLISHes the same
fragment once on Redis pub/sub; each Daphne process writes it to its own sockets
of the conversation in memory (bench/floor_asgi.py): the best transport one can
build on Redis, so the table shows what our transport costs and what the
application adds.

Per sample the latency is the time until the fragment is on *all* N sockets
(the last one); per-socket latencies are kept too. Real, floor and transport
floor samples alternate, so drift on this shared 2-core machine hits all alike.
"""

from __future__ import annotations

import asyncio
import secrets
import time

from bench import config, profiling, stats
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
    from conversations.notify import conversation_group

    scale = h.scale
    result: dict = {}
    async with Stack("fanout", h.logs, app=config.FLOOR_APP) as stack:
        sim = stack.sim
        operators = await orm(create_operators, max(SIZES), prefix="fan")
        first = await sim.customer_says(phone=PHONE, name="Fan Out", text="Hello, anyone there?")
        pk = await conversation_pk(first["session_id"])
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

            senders = floor_senders(group, pk)
            kinds = await alternate(probe, n, {"real": real_send, **senders},
                                    count=count, warmup=WARMUP)
            stack.check_alive()
            entry = summarize(kinds)
            result[str(n)] = entry
            h.log(
                f"fanout N={n}: p50 {entry['p50_ms']} p99 {entry['p99_ms']} ms; floor p50 "
                f"{entry['floor_p50_ms']} p99 {entry['floor_p99_ms']} ms; transport floor p50 "
                f"{entry['transport_floor_p50_ms']} p99 {entry['transport_floor_p99_ms']} ms; "
                f"ratio p99 {entry['ratio_p99']}"
            )

            if n == max(SIZES):
                # Breakdown of the real path: when did the worker create the row?
                result["breakdown_n100"] = await _breakdown(h, stack, probe, n, real_send)
                if h.profile and entry["ratio_p99"] and entry["ratio_p99"] > 1.5:
                    result["profile"] = await profile_samples(h, stack, probe, n, real_send)
            await close_many(clients)
            await asyncio.sleep(0.5)
        result["log_problems"] = stack.problems()
    return result


def floor_senders(group: str, pk: int) -> dict:
    """The two floors' senders; each sends the real path's last fragment, its token swapped.

    `floor`: a bare send through the stack's own transport for fragments
    (`notify.group_send`: the fan-out's PUBLISH, or the channel layer's group_send
    with LIVE_FANOUT=layer), to the real consumers;
    `transport_floor`: one Redis PUBLISH, written by each Daphne process in memory
    (bench/floor_asgi.py), no consumer.
    """
    import redis.asyncio as aioredis

    from conversations import notify

    redis = aioredis.Redis.from_url(config.REDIS_URL)
    fragment = {"text": "", "token": ""}

    def html(tok: str) -> str:
        return fragment["text"].replace(fragment["token"], tok)

    async def floor_send(tok):
        await notify.group_send(group, {"type": "live.html", "html": html(tok)})

    async def transport_send(tok):
        await redis.publish(f"{config.FLOOR_PREFIX}{pk}", html(tok))

    floor_send.fragment = transport_send.fragment = fragment
    return {"floor": floor_send, "transport_floor": transport_send}


async def alternate(probe: Probe, n: int, senders: dict, *, count: int, warmup: int) -> dict:
    """`count` samples of each kind (after `warmup`), taken in turn: real, then the floors.

    The floors send the fragment the real path last rendered (taken at the first
    sample and again after the warm-up), so they carry the same bytes.
    """
    out = {kind: {"all": [], "each": [], "lost": 0, "sizes": []} for kind in senders}
    fragment = next(s.fragment for s in senders.values() if hasattr(s, "fragment"))
    for i in range(warmup + count):
        for kind, send in senders.items():
            lat, tok = await _sample(probe, n, send)
            if lat is None:
                out[kind]["lost"] += 1
                await asyncio.sleep(0.5)
                if kind == "real":
                    break  # no fresh fragment for the floors of this turn
                continue
            if kind == "real":
                if not fragment["text"] or i == warmup:
                    fragment["text"], fragment["token"] = probe.text, tok
                out[kind]["sizes"].append(len(probe.text.encode()))
            if i >= warmup:
                out[kind]["all"].append(max(lat))
                out[kind]["each"].extend(lat)
            await _pause(max(lat))
    return out


def summarize(kinds: dict) -> dict:
    """p50/p95/p99 of the real path and of each floor, and the ratios to the floor."""
    real = stats.summary_ms(kinds["real"]["all"])
    entry = {"p50_ms": real["p50_ms"], "p95_ms": real["p95_ms"], "p99_ms": real["p99_ms"]}
    floors = [k for k in ("floor", "transport_floor") if k in kinds]
    summaries = {k: stats.summary_ms(kinds[k]["all"]) for k in floors}
    for k in floors:
        for p in ("p50_ms", "p95_ms", "p99_ms"):
            entry[f"{k}_{p}"] = summaries[k][p]
    for k in floors:
        prefix = "" if k == "floor" else "transport_"
        entry[f"{prefix}ratio_p50"] = _ratio(real["p50_ms"], summaries[k]["p50_ms"])
        entry[f"{prefix}ratio_p99"] = _ratio(real["p99_ms"], summaries[k]["p99_ms"])
    entry["samples"] = real["samples"]
    for k in floors:
        entry[f"{k}_samples"] = summaries[k]["samples"]
    entry["lost"] = {k: v["lost"] for k, v in kinds.items()}
    entry["fragment_bytes"] = int(stats.percentile(kinds["real"]["sizes"], 50) or 0)
    entry["per_socket"] = {k: stats.summary_ms(v["each"]) for k, v in kinds.items()}
    return entry


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


async def profile_samples(h, stack, probe, n, real_send, *, section: str = "fanout") -> dict:
    """py-spy on every Daphne and the worker during more real samples at this N."""
    if not profiling.available():
        return {"error": "py-spy not installed (pip install py-spy)"}
    seconds = 12
    out = h.profile_dir
    procs = [*stack.daphnes, stack.worker]
    tasks = [
        asyncio.create_task(profiling.record(p.pid, seconds, out / f"{section}-{p.name}.txt"))
        for p in procs
    ]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        tok = token()
        probe.start(tok, n)
        t0 = time.perf_counter()
        await real_send(tok)
        if await probe.wait():
            await _pause(max(probe.hits.values()) - t0)
    raws = await asyncio.gather(*tasks)
    return {p.name: profiling.summarize(raw) for p, raw in zip(procs, raws)}


def _ratio(a, b):
    if not a or not b:
        return None
    return round(a / b, 2)
