"""The handoff loop against the simulator with the real worker (in-process bridge).

A customer who asks for a person: the AI steps aside at once, and if nobody
takes over it comes back after the policy's fallback. A holder who goes quiet:
the conversation goes back to the AI after the idle time, and they are told.
The clocks run from stored times, so a worker restart in between changes nothing.
"""

import asyncio
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.utils import timezone

from conversations import notify, services
from conversations.models import AuditEntry, Command, Conversation, Message
from dashboard import fanout
from tests.conversations.test_worker import eventually, sim, start_worker  # noqa: F401 (fixtures)

pytestmark = pytest.mark.django_db(transaction=True)
db = sync_to_async


class Told:
    """One person's fragments, as their sockets get them: through the fan-out on Redis,
    else through the channel layer (embedded)."""

    def __init__(self) -> None:
        self.frames: asyncio.Queue[str] = asyncio.Queue()
        self.groups: list[str] = []
        self._reader = None

    async def deliver(self, html: str) -> None:  # what the fan-out calls
        await self.frames.put(html)

    async def join(self, group: str) -> None:
        self.groups.append(group)
        if notify.fanout_enabled():
            await fanout.join([group], self)
            return
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(group, channel)

        async def read():
            while True:
                await self.deliver((await layer.receive(channel))["html"])

        self._reader = asyncio.create_task(read())

    async def next(self, timeout: float = 15) -> str:
        return await asyncio.wait_for(self.frames.get(), timeout)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        fanout.leave(self.groups, self)


def set_policy(**fields):
    policy = services.handoff_policy_get()
    for name, value in fields.items():
        setattr(policy, name, value)
    policy.save()


async def test_asking_for_a_person_pauses_the_ai_and_nobody_taking_over_gives_it_back(
    sim, start_worker
):
    await db(set_policy)(fallback_seconds=3, holding_message="One moment, a colleague is coming.")
    bridge = await start_worker()
    session_id = (await sim.customer_says(phone="34650000001", name="Pia", text="hello"))["session_id"]
    await eventually(lambda: Message.objects.filter(author="ai").count() == 1)

    await sim.customer_says(phone="34650000001", text="Can I talk to a real person?")
    conversation = await eventually(
        lambda: Conversation.objects.filter(session_id=session_id, needs_human_since__isnull=False).first()
    )
    assert conversation.needs_human_reason == "asked" and conversation.needs_human_words == "real person"
    await sim.wait_for("session.pause", session_id=session_id)
    holding = await sim.wait_for("session.send", session_id=session_id)
    assert holding["text"] == "One moment, a colleague is coming."
    await eventually(lambda: sim.is_paused(session_id))
    assert await db(AuditEntry.objects.filter(action="auto_pause", operator=None).exists)()

    # While nobody holds it the AI stays quiet; the clock comes from the stored time.
    await sim.customer_says(phone="34650000001", text="still there?")
    waiting = await eventually(lambda: Message.objects.filter(text="still there?").first())
    ai_before_resume = await db(Message.objects.filter(author="ai").count)()

    await sim.wait_for("session.resume", session_id=session_id, timeout=20)
    # Nothing answered the message written while the AI stood aside.
    assert not await db(Message.objects.filter(author="ai", id__gt=waiting.id).exists)()
    await eventually(lambda: not Conversation.objects.get(pk=conversation.pk).needs_human_since)
    assert await db(AuditEntry.objects.filter(action="fallback", conversation_id=conversation.pk).exists)()
    await sim.customer_says(phone="34650000001", text="ok thanks")
    await eventually(lambda: Message.objects.filter(author="ai").count() == ai_before_resume + 1)
    await bridge.stop()


async def test_the_fallback_survives_a_worker_restart(sim, start_worker):
    await db(set_policy)(fallback_seconds=4, holding_message="")
    bridge = await start_worker()
    session_id = (await sim.customer_says(phone="34650000002", name="Rui", text="I want to speak to an agent"))[
        "session_id"
    ]
    await sim.wait_for("session.pause", session_id=session_id)
    await bridge.stop()
    mark = len(sim.received)
    bridge = await start_worker()  # a new process: nothing in memory about the wait
    await sim.wait_for("session.resume", session_id=session_id, after=mark, timeout=20)
    await bridge.stop()


async def test_an_idle_holder_is_handed_back_and_told(sim, start_worker, operator):
    await db(set_policy)(idle_seconds=90)
    bridge = await start_worker()
    session_id = (await sim.customer_says(phone="34650000003", name="Sol", text="hi"))["session_id"]
    conversation = await eventually(lambda: Conversation.objects.filter(session_id=session_id).first())
    await db(services.conversation_take_over)(conversation=conversation, operator=operator)
    await eventually(lambda: Conversation.objects.get(pk=conversation.pk).ai_paused)
    told = Told()
    await told.join(notify.user_group(operator.pk))

    # The holder was last active 89 s ago: warned; then past the idle time: handed back.
    await db(Conversation.objects.filter(pk=conversation.pk).update)(
        holder_active_at=timezone.now() - timedelta(seconds=89)
    )
    warning = await told.next()
    while "Back to the AI in" not in warning:
        warning = await told.next()
    await db(Conversation.objects.filter(pk=conversation.pk).update)(
        holder_active_at=timezone.now() - timedelta(seconds=91)
    )
    await sim.wait_for("session.resume", session_id=session_id, timeout=15)
    notice = await told.next()
    while "went back to the AI" not in notice:
        notice = await told.next()
    await eventually(lambda: Conversation.objects.get(pk=conversation.pk).held_by_id is None)
    assert await db(AuditEntry.objects.filter(action="auto_hand_back", conversation_id=conversation.pk).exists)()
    assert await db(Command.objects.filter(kind="resume", status="confirmed").count)() == 1
    await told.close()
    await bridge.stop()


async def test_keep_it_restarts_the_idle_clock(operator, conversation):
    await db(services.conversation_take_over)(conversation=conversation, operator=operator)
    await db(Conversation.objects.filter(pk=conversation.pk).update)(
        holder_active_at=timezone.now() - timedelta(seconds=800)
    )
    await db(services.conversation_keep)(conversation=conversation, operator=operator)
    kept = await db(Conversation.objects.get)(pk=conversation.pk)
    assert (timezone.now() - kept.holder_active_at).total_seconds() < 60
    assert await db(AuditEntry.objects.filter(action="keep").exists)()
