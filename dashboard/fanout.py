"""This web process's end of the fragment fan-out (`conversations.notify`, "the fan-out").

One Redis pub/sub subscription per process and event loop, to every group's
channel at once (a pattern); a published fragment is written to each of this
process's sockets in that group, in memory, and a published state change
(`notify.STATE_MARK`) asks each of them to render its viewer's own header.
Consumers `join` their groups on connect (after the subscription is confirmed,
so nothing published after the join is missed) and `leave` on disconnect.

At most once, like the channel layer: when Redis goes away the subscription is
made again (with a growing pause) and what was published meanwhile is lost; the
database is the record, and a page that reconnects catches up.

Each process also announces which groups it has sockets in (`notify.listened`
reads it), so the worker renders a conversation's fragments only while somebody
has it open. A group is announced before its first socket's catch-up reads the
database, renewed every `notify.LISTENING_RENEW` seconds, and announced again
with every (re)subscription: what is committed before the announcement, the
catch-up reads; what after, the worker renders.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import redis.asyncio as aioredis
from django.conf import settings

from conversations import notify

logger = logging.getLogger(__name__)


class Fanout:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.members: dict[str, set] = {}  # group -> consumers with an async `deliver(html)`
        self.subscribed = asyncio.Event()
        self.token = uuid.uuid4().hex  # this process and loop, in the groups' listener sets
        # Announcing and withdrawing one after the other: a withdrawal sent after a
        # rejoin's announcement would leave an open page's group unrendered.
        self.announcing = asyncio.Lock()
        self.client = aioredis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=2.0, socket_connect_timeout=2.0
        )
        self.task = loop.create_task(self._run())
        self.renewal = loop.create_task(self._renew())

    async def _run(self) -> None:
        prefix = notify.fanout_prefix()

        async def subscribed() -> None:
            # Redis may have restarted empty: announce every group again.
            await self.announce(list(self.members))
            self.subscribed.set()

        def lost(error: Exception, delay: float) -> None:
            self.subscribed.clear()
            logger.warning("live fan-out: Redis subscription lost (%s); again in %.2f s", error, delay)

        await notify.listen(
            subscribe=lambda pubsub: pubsub.psubscribe(prefix + "*"),
            on_ready=subscribed,
            on_message=lambda channel, data: self._deliver(channel[len(prefix):], data),
            on_lost=lost,
        )

    async def announce(self, groups: list[str]) -> None:
        """Say (for `notify.LISTENING_TTL`) that this process has sockets in `groups`."""
        if not groups:
            return
        async with self.announcing, self.client.pipeline(transaction=False) as pipe:
            expires = time.time() + notify.LISTENING_TTL
            for group in groups:
                key = notify.listening_key(group)
                pipe.zadd(key, {self.token: expires})
                pipe.zremrangebyscore(key, "-inf", time.time())  # processes that died
                pipe.expire(key, int(notify.LISTENING_TTL) * 2)
            await pipe.execute()

    async def withdraw(self, group: str) -> None:
        try:
            async with self.announcing:
                if not self.members.get(group):  # not joined again meanwhile
                    await self.client.zrem(notify.listening_key(group), self.token)
        except Exception as error:  # it expires anyway; until then the worker renders for nobody
            logger.info("live fan-out: could not withdraw %s (%s)", group, error)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(notify.LISTENING_RENEW)
            try:
                await self.announce(list(self.members))
            except Exception as error:  # the subscription's own retry announces again
                logger.warning("live fan-out: could not renew the groups listened to (%s)", error)

    async def _deliver(self, group: str, html: str) -> None:
        state = notify.state_from_payload(html)
        if state is not None:
            # Each viewer renders its own (on the pool, in its own task): none waits for another.
            for consumer in list(self.members.get(group, ())):
                consumer.state_changed(state)
            return
        for consumer in list(self.members.get(group, ())):
            try:
                await consumer.deliver(html)
            except Exception:
                logger.warning("live fan-out: a socket of %s refused a fragment", group, exc_info=True)


_by_loop: dict[asyncio.AbstractEventLoop, Fanout] = {}


def _fanout() -> Fanout:
    loop = asyncio.get_running_loop()
    fanout = _by_loop.get(loop)
    if fanout is None:
        for gone in [other for other in _by_loop if other.is_closed()]:
            del _by_loop[gone]
        fanout = _by_loop[loop] = Fanout(loop)
    return fanout


async def join(groups: list[str], consumer, *, timeout: float = 2.0) -> None:
    """Deliver these groups' fragments to `consumer`, once the subscription stands.

    If Redis does not answer within `timeout`, the socket opens anyway (its page
    catches up when it reconnects; the subscription keeps being retried).
    """
    if not notify.fanout_enabled():
        return
    fanout = _fanout()
    new = []
    for group in groups:
        members = fanout.members.setdefault(group, set())
        if not members:
            new.append(group)
        members.add(consumer)
    try:
        await asyncio.wait_for(fanout.subscribed.wait(), timeout)
        # Before the page's catch-up reads the database (see the module's docstring).
        await asyncio.wait_for(fanout.announce(new), timeout)
    except TimeoutError:
        logger.warning("live fan-out: not subscribed yet; this socket may miss fragments")
    except Exception as error:  # Redis away: the subscription's retry announces again
        logger.warning("live fan-out: could not announce %s (%s)", new, error)


def leave(groups: list[str], consumer) -> None:
    fanout = _by_loop.get(asyncio.get_running_loop())
    if fanout is None:
        return
    for group in groups:
        members = fanout.members.get(group)
        if members is not None:
            members.discard(consumer)
            if not members:
                del fanout.members[group]
                fanout.loop.create_task(fanout.withdraw(group))
