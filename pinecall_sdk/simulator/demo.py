"""Demo mode: a handful of believable customers keep the inbox alive.

As soon as an agent with a WhatsApp channel is connected, the customers start
writing (the first within about a second, the others staggered a few seconds
apart). Each one follows a short multi-turn script: it waits for an answer
(from the AI or from a human operator) and for some "typing" time before its
next line; if nobody answers for a while it nudges once. When the script is
done the customer goes quiet, the session ends after the demo idle timeout,
and a bit later the customer comes back with another script.

Demo sessions use ``min(sim.idle_timeout, sim.demo_idle_timeout)`` (3 minutes
by default) so that ended conversations show up too.

Phone calls (:func:`run_voice_demo`): the demo registers no number itself. Once a
connected agent has added a phone number (``channel.add`` type phone), a first
caller rings within a few seconds, then another every ``demo_call_interval``
(about a minute), in turn: an order status, a caller who asks for a person (and
then waits on the line, silent, for someone to do something), and one who talks
over the bot.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .server import Simulator

log = logging.getLogger("pinecall_sdk.simulator")

# A turn is (type, text). For "audio" the text is the voice note's transcript,
# for "image" the caption.
Script = list[tuple[str, str]]

SCRIPTS: dict[str, Script] = {
    "late_order": [
        ("text", "Hi! I ordered a rain jacket last week and it still hasn't arrived"),
        ("text", "The order number is 48213"),
        ("text", "Can I change the delivery address? I won't be home on Thursday"),
        ("text", "Calle Mayor 12, 3B, 28013 Madrid"),
        ("text", "Perfect, thanks!"),
    ],
    "refund": [
        ("text", "Hello, the blender I received is broken, it doesn't turn on"),
        ("text", "I'd rather have a refund than a replacement"),
        ("text", "Yes please"),
        ("text", "How long until I get my money back?"),
    ],
    "voice_note": [
        ("audio", "Hi, this is Marta. I'm calling about my subscription, I think I was charged "
                  "twice this month and I'd like to know why"),
        ("text", "Can you check please?"),
        ("audio", "Ok great, and will the refund go back to the same card? Thanks a lot"),
    ],
    "wants_a_person": [
        ("text", "I need to talk to a human please"),
        ("text", "This is the third time I write about the same issue and nobody fixes it"),
        ("text", "My order 51877 arrived with the wrong size, twice"),
        ("text", "ok"),
    ],
    "damaged_photo": [
        ("text", "Good morning, my package arrived damaged"),
        ("image", "This is how the box looked when it arrived"),
        ("text", "Yes, a replacement would be great"),
        ("text", "Thank you!"),
    ],
    "pre_sales": [
        ("text", "Hi, do you have the trail running shoes in size 42?"),
        ("text", "And how much is shipping to France?"),
        ("text", "Great, do you have any discount code for a first order?"),
        ("text", "Thanks, bye!"),
    ],
}


@dataclass
class Customer:
    phone: str
    name: str
    scripts: list[str]


CUSTOMERS = [
    Customer("34612345678", "Ana García", ["late_order", "pre_sales"]),
    Customer("4915112345678", "Tom Becker", ["refund", "late_order"]),
    Customer("393471234567", "Marta Rossi", ["voice_note", "damaged_photo"]),
    Customer("447700900123", "James Miller", ["wants_a_person", "refund"]),
    Customer("5215512345678", "Lucía Fernández", ["damaged_photo", "voice_note"]),
    Customer("33612345678", "Chloé Martin", ["pre_sales", "wants_a_person"]),
]

NUDGES = ["Hello? Is anyone there?", "Hi? Still waiting for an answer", "??"]

#: Phone callers: (from number, script); see ``state.parse_script``.
VOICE_SCRIPTS: dict[str, list] = {
    "order_status": [
        "Hi, I'm calling about my order, it still hasn't arrived",
        "The order number is 48213",
        "Great, thank you so much. Bye!",
        {"hangup": True},
    ],
    "wants_a_person": [  # about a minute and a half for someone to take the call
        "Hello, I've been charged twice for my subscription",
        "Can I talk to a real person?",
        {"silence": 15.0},
        "Hello? Is anyone there?",
        {"silence": 15.0},
        "I'll stay on the line, but I really want to speak to someone",
        {"silence": 15.0},
        "Hello?",
    ],
    "talks_over": [
        "Hi, I want to change the delivery address of my order 51877",
        {"say": "Sorry, sorry, it's for the delivery on Thursday", "barge_in": 4},
        "Calle Mayor 12, Madrid",
        "Perfect, thanks. Bye!",
        {"hangup": True},
    ],
}

CALLERS = [
    ("+14155550123", "order_status"),
    ("+447700900123", "wants_a_person"),
    ("+34612345678", "talks_over"),
]


async def run_demo(
    sim: "Simulator", *, speed: float = 1.0, rng: random.Random | None = None
) -> None:
    """Run the demo customers until cancelled. ``speed`` > 1 makes everything faster."""
    rng = rng or random.Random()
    await _wait_for_whatsapp_agent(sim)
    log.info("demo: a WhatsApp agent is connected, customers start writing")
    tasks = []
    start = rng.uniform(0.3, 1.0)
    for index, customer in enumerate(CUSTOMERS):
        tasks.append(asyncio.create_task(
            _customer_loop(sim, customer, start / speed, speed, random.Random(rng.random())),
            name=f"sim-demo-{customer.phone}",
        ))
        start += rng.uniform(2.0, 6.0) if index else rng.uniform(1.0, 3.0)
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_for_whatsapp_agent(sim: "Simulator") -> None:
    while True:
        for agent_id in sim.connected_agents:
            agent = sim.agent(agent_id)
            if agent is not None and agent.whatsapp:
                return
        await asyncio.sleep(0.1)


async def _customer_loop(
    sim: "Simulator", customer: Customer, first_delay: float, speed: float, rng: random.Random
) -> None:
    await asyncio.sleep(first_delay)
    round_ = 0
    while True:
        script = SCRIPTS[customer.scripts[round_ % len(customer.scripts)]]
        session_id = await _play(sim, customer, script, speed, rng)
        round_ += 1
        # Go quiet until the session has ended, then come back a bit later.
        while session_id and not sim.sessions[session_id].ended:
            await asyncio.sleep(1.0 / speed)
        await asyncio.sleep(rng.uniform(20.0, 60.0) / speed)


async def _play(
    sim: "Simulator", customer: Customer, script: Script, speed: float, rng: random.Random
) -> str | None:
    idle = min(sim.idle_timeout, sim.demo_idle_timeout)
    session_id = None
    for turn, (type_, text) in enumerate(script):
        if turn:
            outcome = await _wait_for_answer(sim, session_id, 25.0 / speed)
            if outcome == "silence":
                await _say(sim, customer, "text", rng.choice(NUDGES), idle)
                outcome = await _wait_for_answer(sim, session_id, 40.0 / speed)
            if outcome != "answered":
                return session_id  # gives up, or the session is over
            await asyncio.sleep(rng.uniform(3.0, 8.0) / speed)  # reading and typing
        result = await _say(sim, customer, type_, text, idle)
        if result is None:
            return session_id
        session_id = result["session_id"]
    return session_id


async def _say(sim: "Simulator", customer: Customer, type_: str, text: str, idle: float):
    try:
        return await sim.customer_says(phone=customer.phone, name=customer.name, text=text,
                                       type=type_, idle_timeout=idle)
    except Exception:  # the demo must never take the server down
        log.exception("demo: customer %s could not write", customer.name)
        return None


async def _wait_for_answer(sim: "Simulator", session_id: str | None, timeout: float) -> str:
    """Wait until the session's last message is an assistant one (AI or human).

    Returns "answered", "ended" (the session is over) or "silence" (timeout).
    """
    if session_id is None:
        return "answered"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        session = sim.sessions.get(session_id)
        if session is None or session.ended:
            return "ended"
        if session.history and session.history[-1]["role"] == "assistant":
            return "answered"
        await asyncio.sleep(0.25)
    return "silence"


async def run_voice_demo(
    sim: "Simulator", *, interval: float = 60.0, speed: float = 1.0, rng: random.Random | None = None
) -> None:
    """Place demo phone calls until cancelled: the first a few seconds after a connected
    agent added a phone number, then one every ``interval`` seconds or so (``speed`` > 1:
    sooner). Calls go to the numbers the client added; the demo adds none."""
    rng = rng or random.Random()
    turn = 0
    delay = rng.uniform(2.0, 4.0)
    while True:
        number = await _wait_for_phone(sim)
        log.info("demo: phone number %s is taken, a call comes in %.1f s", number, delay / speed)
        await asyncio.sleep(delay / speed)
        numbers = sim.phone_numbers()
        if not numbers:
            delay = rng.uniform(2.0, 4.0)  # the agent left meanwhile: start over when it is back
            continue
        caller, script = CALLERS[turn % len(CALLERS)]
        to = number if number in numbers else next(iter(numbers))
        try:
            await sim.place_call(to=to, from_=caller, script=VOICE_SCRIPTS[script])
            turn += 1
        except Exception:  # the demo must never take the server down
            log.exception("demo: the call from %s could not be placed", caller)
        delay = interval * rng.uniform(0.8, 1.2)


async def _wait_for_phone(sim: "Simulator") -> str:
    while True:
        numbers = sim.phone_numbers()
        if numbers:
            return next(iter(numbers))
        await asyncio.sleep(0.1)
