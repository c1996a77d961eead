"""3. Operator round trip: an action's POST until another operator has the new state.

Two operators, A and B, both on the conversation's page (a live socket each).
Each socket renders its own viewer's header when the conversation changes, so
the frame is the state the browser shows (no request follows it).

Take over: A POSTs /c/<pk>/take-over/ -> the outbox row commits, the worker is
woken and sends `session.pause` -> the simulator answers `session.paused` ->
the worker confirms the command -> `conversation.state` to the conversation's
group -> B's socket renders B's header -> B shows "A holds this conversation"
(badge "other"). Measured (the headline): until that frame arrived.
Between samples A hands back, confirmed the same way.

Send: A (holding the conversation) POSTs /c/<pk>/send/ -> `session.send` at the
simulator -> `session.sent` -> the confirmed bubble (tick "sent" or later) on
B's socket. No GET needed: the bubble itself is the state.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time

from bench import profiling, stats
from bench.clients import Http, LiveClient, connect_many, create_operators
from bench.stack import Stack, conversation_pk, orm

SAMPLES = 100
WARMUP = 5
BUDGET = 75.0  # seconds per action: a 2-second round trip stops early, its figure is clear
TIMEOUT = 10.0
PHONE = "34700000002"
BADGE = re.compile(r'data-badge="([a-z]+)"')


class Browser:
    """An operator's page: its socket, and the header states its frames show."""

    def __init__(self, port: int, operator, pk: int) -> None:
        self.pk = pk
        self.http = Http(port, operator)
        self.http.fetch_csrf()
        self.header_marker = f'id="conv-header-{pk}"'
        self.ws = LiveClient(port, operator, conversation=pk, keep=200, on_frame=self._on_frame)
        # (frame time, frame time, badge) for each header the socket received
        self.states: list[tuple[float, float, str]] = []
        self._changed = asyncio.Event()

    def _on_frame(self, client, t: float, text: str) -> None:
        if self.header_marker in text:
            m = BADGE.search(text)
            self.states.append((t, t, m.group(1) if m else "?"))
            self._changed.set()

    async def wait_state(self, badge: str, *, since: float, timeout: float = TIMEOUT):
        """The first header, in a frame after `since`, that shows `badge`."""
        deadline = time.perf_counter() + timeout
        while True:
            for t_frame, t_done, seen in self.states:
                if t_frame >= since and seen == badge:
                    return t_frame, t_done
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise TimeoutError(f"state {badge!r} not shown; saw {self.states[-3:]}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    async def post(self, path: str, form: dict | None = None) -> tuple[int, str, float]:
        return await asyncio.to_thread(self.http.request, "POST", path, form=form)

    async def close(self) -> None:
        await self.ws.close()
        self.http.close()


async def run(h) -> dict:
    samples = max(10, int(SAMPLES * h.scale))
    async with Stack("round_trip", h.logs) as stack:
        sim = stack.sim
        a_op, b_op = await orm(create_operators, 2, prefix="rt")
        first = await sim.customer_says(phone=PHONE, name="Round Trip", text="Hello, I have a question")
        session_id = first["session_id"]
        pk = await conversation_pk(session_id)
        a, b = Browser(stack.port, a_op, pk), Browser(stack.port, b_op, pk)
        await connect_many([a.ws, b.ws])
        await asyncio.sleep(0.5)

        take_over = await _take_over_samples(h, stack, a, b, pk, session_id, samples)
        # A holds the conversation from here on: the sends.
        await _take_over(stack, a, b, pk, session_id)
        send = await _send_samples(h, stack, a, b, pk, session_id, samples)
        result = {"take_over": take_over, "send": send}
        missed = (take_over.get("p50_ms") or 1e9) > 25 or (send.get("p50_ms") or 1e9) > 25
        if h.profile and missed:
            result["profile"] = await _profile(h, stack, a, b, pk, session_id)
        result["log_problems"] = stack.problems()
        await a.close()
        await b.close()
    return result


async def _take_over(stack, a: Browser, b: Browser, pk: int, session_id: str) -> dict:
    """One take over, timed at each step (perf_counter seconds from the POST)."""
    idx = len(stack.sim.received)
    t0 = time.perf_counter()
    post = asyncio.ensure_future(a.post(f"/c/{pk}/take-over/"))
    await stack.sim.wait_for("session.pause", timeout=TIMEOUT, after=idx, session_id=session_id)
    t_pause = time.perf_counter()
    t_frame, t_state = await b.wait_state("other", since=t0)
    status, _, post_seconds = await post
    if status != 200:
        raise RuntimeError(f"take over answered {status}")
    return {
        "total": t_state - t0,
        "socket": t_frame - t0,
        "pause_at_simulator": t_pause - t0,
        "post_answer": post_seconds,
    }


async def _hand_back(stack, a: Browser, b: Browser, pk: int, session_id: str) -> None:
    idx = len(stack.sim.received)
    t0 = time.perf_counter()
    status, _, _ = await a.post(f"/c/{pk}/hand-back/")
    if status != 200:
        raise RuntimeError(f"hand back answered {status}")
    await stack.sim.wait_for("session.resume", timeout=TIMEOUT, after=idx, session_id=session_id)
    await b.wait_state("ai", since=t0)


async def _take_over_samples(h, stack, a, b, pk, session_id, samples) -> dict:
    steps: dict[str, list[float]] = {}
    failures = 0
    deadline = time.monotonic() + BUDGET
    for i in range(WARMUP + samples):
        if time.monotonic() > deadline and len(steps.get("total", [])) >= 10:
            h.log(f"round trip: take over stopped after {i} samples (time budget)")
            break
        try:
            timing = await _take_over(stack, a, b, pk, session_id)
            await asyncio.sleep(0.05)  # the trailing fragments
            await _hand_back(stack, a, b, pk, session_id)
            await asyncio.sleep(0.05)
        except (TimeoutError, RuntimeError) as error:
            failures += 1
            h.log(f"round trip: take over sample {i} failed: {error}")
            if failures > 5:
                raise
            await _reset(stack, a, b, pk, session_id)
            continue
        if i >= WARMUP:
            for key, value in timing.items():
                steps.setdefault(key, []).append(value)
    return _summary(h, "take over", steps, failures)


async def _reset(stack, a, b, pk, session_id) -> None:
    """After a failed sample: wait, and hand back if A still holds it."""
    await asyncio.sleep(3)

    def held():
        from conversations.models import Conversation

        return Conversation.objects.filter(pk=pk, held_by__isnull=False).exists()

    if await orm(held):
        try:
            await _hand_back(stack, a, b, pk, session_id)
        except Exception:
            await asyncio.sleep(3)


async def _send_samples(h, stack, a, b, pk, session_id, samples) -> dict:
    steps: dict[str, list[float]] = {}
    failures = 0
    deadline = time.monotonic() + BUDGET
    for i in range(WARMUP + samples):
        if time.monotonic() > deadline and len(steps.get("total", [])) >= 10:
            h.log(f"round trip: send stopped after {i} samples (time budget)")
            break
        tok = "sx" + secrets.token_hex(8)
        text = f"Send probe {tok}"
        idx = len(stack.sim.received)
        t0 = time.perf_counter()
        post = asyncio.ensure_future(a.post(f"/c/{pk}/send/", {"text": text}))
        try:
            await stack.sim.wait_for("session.send", timeout=TIMEOUT, after=idx, text=text)
            t_sim = time.perf_counter()
            t_frame, _ = await b.ws.wait_frame(
                lambda s: tok in s and ("tick-sent" in s or "tick-delivered" in s or "tick-read" in s),
                since=t0,
                timeout=TIMEOUT,
            )
            status, _, post_seconds = await post
            if status != 200:
                raise RuntimeError(f"send answered {status}")
        except (TimeoutError, RuntimeError, ConnectionError) as error:
            failures += 1
            h.log(f"round trip: send sample {i} failed: {error}")
            if failures > 5:
                raise
            await asyncio.sleep(3)
            continue
        await asyncio.sleep(0.05)
        if i >= WARMUP:
            for key, value in {
                "total": t_frame - t0,
                "send_at_simulator": t_sim - t0,
                "post_answer": post_seconds,
            }.items():
                steps.setdefault(key, []).append(value)
    return _summary(h, "send", steps, failures)


def _summary(h, label: str, steps: dict[str, list[float]], failures: int) -> dict:
    main = stats.summary_ms(steps.get("total", []), ps=(50, 95, 99))
    out = {
        "p50_ms": main["p50_ms"],
        "p95_ms": main["p95_ms"],
        "p99_ms": main["p99_ms"],
        "max_ms": main["max_ms"],
        "samples": main["samples"],
        "failures": failures,
        "steps": {k: stats.summary_ms(v, ps=(50, 99)) for k, v in steps.items() if k != "total"},
    }
    h.log(f"round trip {label}: p50 {out['p50_ms']} p99 {out['p99_ms']} ms ({out['samples']} samples)")
    return out


async def _profile(h, stack, a, b, pk, session_id) -> dict:
    """py-spy on Daphne and the worker during more take over / hand back cycles."""
    if not profiling.available():
        return {"error": "py-spy not installed (pip install py-spy)"}
    seconds = 10
    tasks = [
        asyncio.create_task(profiling.record(stack.daphne.pid, seconds, h.profile_dir / "round_trip-daphne.txt")),
        asyncio.create_task(profiling.record(stack.worker.pid, seconds, h.profile_dir / "round_trip-worker.txt")),
    ]
    # A holds it after the send samples: hand back first.
    try:
        await _hand_back(stack, a, b, pk, session_id)
    except Exception:
        pass
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            await _take_over(stack, a, b, pk, session_id)
            await _hand_back(stack, a, b, pk, session_id)
        except Exception:
            await asyncio.sleep(1)
    daphne_raw, worker_raw = await asyncio.gather(*tasks)
    return {
        "daphne": profiling.summarize(daphne_raw),
        "worker": profiling.summarize(worker_raw),
    }

