"""Caption latency: a `bot.word` on the wire until it is on every watching operator's socket.

The real path: the simulator sends `bot.word` -> the worker renders the live-only
caption (no database) and group_sends it to the call's group -> Redis -> Daphne ->
N call pages. Each word's send time is taken as the simulator queues the frame
(the harness's clock, `time.perf_counter()`); its arrival is the k-th caption
fragment of that line on a socket for the k-th word of the line (one socket keeps
the order its group was sent in).

The floor, same sockets, same clock, after the real words: a bare `group_send` from
the harness of a caption fragment of the same shape to the same call group.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import defaultdict

from bench import stats
from bench.clients import LiveClient, close_many, connect_many, create_operators
from bench.fanout import Probe, _ratio, _sample, token
from bench.stack import Stack, orm, wait_until

SIZES = (1, 10)
WORDS = {1: 300, 10: 300}  # words measured per size (the call talks until it has them)
FLOOR_SAMPLES = 200
NUMBER = "+14155550100"
PACE = 0.15  # seconds per spoken word: brisk speech, so a run takes well under a minute
# A caller who keeps asking: every line gets a spoken answer of a dozen words or more.
QUESTIONS = [
    "Where is my order", "When will it arrive", "Can I change the address",
    "What about a refund", "Is it insured", "Can I cancel it", "Who is the courier",
]
_WORD_FRAGMENT = re.compile(r'beforeend:#words-([0-9a-f]{16})"><span class="word">')


class _TimedFrames(list):
    """The simulator's record of frames it sent, timing each `bot.word` as it is queued."""

    def __init__(self) -> None:
        super().__init__()
        self.words: dict[str, list[float]] = defaultdict(list)  # message_id -> send times

    def append(self, frame) -> None:
        if isinstance(frame, dict) and frame.get("event") == "bot.word":
            self.words[frame.get("message_id") or ""].append(time.perf_counter())
        super().append(frame)


class _Arrivals:
    """Per socket and line (the caption's DOM key), the arrival times of its words."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def on_frame(self, client, t: float, text: str) -> None:
        for key in _WORD_FRAGMENT.findall(text):
            self.seen[id(client)][key].append(t)


def _call_pk(call_id: str):
    from conversations.models import Call

    return Call.objects.filter(call_id=call_id).values_list("pk", flat=True).first()


def _latencies(lines: dict[str, list[float]], arrivals: _Arrivals, clients: list) -> tuple[list[float], list[float], int]:
    """(per word: until on all sockets, per word and socket, words lost on some socket)."""
    from conversations.models import dom_key

    on_all, each, lost = [], [], 0
    for message_id, times in lines.items():
        key = dom_key(message_id)
        for k, t_sent in enumerate(times):
            got = [arrivals.seen[id(c)][key][k] for c in clients if len(arrivals.seen[id(c)][key]) > k]
            if len(got) < len(clients):
                lost += 1
                continue
            each.extend(t - t_sent for t in got)
            on_all.append(max(got) - t_sent)
    return on_all, each, lost


async def run(h) -> dict:
    from channels.layers import get_channel_layer

    from conversations.notify import call_group

    result: dict = {}
    async with Stack(
        "captions", h.logs,
        sim_kwargs={"voice_pace": PACE, "ai_delay": 0.05, "call_idle_timeout": 900, "call_max_duration": 900},
        env_extra={"PINECALL_PHONE_NUMBERS": NUMBER},
    ) as stack:
        sim = stack.sim
        operators = await orm(create_operators, max(SIZES), prefix="cap")
        await sim.wait_for("channel.add", type="phone", timeout=30)
        layer = get_channel_layer()
        for n in SIZES:
            want = max(40, int(WORDS[n] * h.scale))
            sent = _TimedFrames()
            sim.sent = sent
            call_id = await sim.place_call(to=NUMBER, from_="+14155550999", script=[{"silence": 600}])
            pk = await wait_until(lambda: _call_pk(call_id), timeout=30, interval=0.05, what=f"call {call_id}")
            arrivals = _Arrivals()
            probe = Probe('beforeend:#words-')

            def on_frame(client, t, text, arrivals=arrivals, probe=probe):
                arrivals.on_frame(client, t, text)
                probe.on_frame(client, t, text)

            clients = [LiveClient(stack.port, op, call=pk, keep=20, on_frame=on_frame) for op in operators[:n]]
            await connect_many(clients)
            await asyncio.sleep(1.0)  # catch-up delivered
            # Only lines begun while every socket watched (not the greeting, maybe half heard).
            watching_since = time.perf_counter()

            def measured_lines(sent=sent, since=watching_since):
                return {mid: times for mid, times in list(sent.words.items()) if times[0] > since}

            asked = 0
            deadline = time.monotonic() + 240
            while sum(map(len, measured_lines().values())) < want and time.monotonic() < deadline:
                await sim.caller_says(call_id, QUESTIONS[asked % len(QUESTIONS)])
                asked += 1
                # The answer is spoken word by word before the caller speaks again.
                await sim.wait_sent("bot.finished", timeout=60, after=len(sent) - 1, call_id=call_id)
            await asyncio.sleep(1.0)  # the last words' fragments arrive
            on_all, each, lost = await asyncio.to_thread(_latencies, measured_lines(), arrivals, clients)

            # The floor: the same sockets, a caption fragment of the same shape, a bare group_send.
            group = call_group(call_id)

            async def floor_send(tok, group=group):
                html = (f'<div hx-swap-oob="beforeend:#words-{tok[:16].ljust(16, "0")}">'
                        f'<span class="word">{tok} </span></div>')
                await layer.group_send(group, {"type": "live.html", "html": html})

            floor = []
            floor_lost = 0
            for _ in range(max(40, int(FLOOR_SAMPLES * h.scale))):
                lat, _tok = await _sample(probe, n, floor_send)
                if lat is None:
                    floor_lost += 1
                    continue
                floor.append(max(lat))
                await asyncio.sleep(0.02)
            await close_many(clients)
            await sim.end_call(call_id)

            real = stats.summary_ms(on_all)
            base = stats.summary_ms(floor)
            result[str(n)] = {
                "p50_ms": real["p50_ms"], "p95_ms": real["p95_ms"], "p99_ms": real["p99_ms"],
                "floor_p50_ms": base["p50_ms"], "floor_p95_ms": base["p95_ms"], "floor_p99_ms": base["p99_ms"],
                "ratio_p50": _ratio(real["p50_ms"], base["p50_ms"]),
                "ratio_p99": _ratio(real["p99_ms"], base["p99_ms"]),
                "words": real["samples"], "floor_samples": base["samples"],
                "lost": {"real": lost, "floor": floor_lost},
                "per_socket": stats.summary_ms(each),
                "pace_s_per_word": PACE,
            }
            h.log(
                f"captions N={n}: p50 {real['p50_ms']} p99 {real['p99_ms']} ms over {real['samples']} words "
                f"(lost {lost}); floor p50 {base['p50_ms']} p99 {base['p99_ms']} ms"
            )
    return result
