"""This web process's end of the fragment fan-out (`conversations.notify`, "the fan-out").

One Redis pub/sub subscription per process and event loop, to every group's
channel at once (a pattern); a published fragment is written to each of this
process's sockets in that group, in memory. Consumers `join` their groups on
connect (after the subscription is confirmed, so nothing published after the
join is missed) and `leave` on disconnect.

At most once, like the channel layer: when Redis goes away the subscription is
made again (with a growing pause) and what was published meanwhile is lost; the
database is the record, and a page that reconnects catches up.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
from django.conf import settings

from conversations import notify

logger = logging.getLogger(__name__)

RETRY_MAX_SECONDS = 5.0


class Fanout:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.members: dict[str, set] = {}  # group -> consumers with an async `deliver(html)`
        self.subscribed = asyncio.Event()
        self.task = loop.create_task(self._run())

    async def _run(self) -> None:
        prefix = notify.fanout_prefix()
        delay = 0.25
        while True:
            client = aioredis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2.0)
            pubsub = client.pubsub()
            try:
                await pubsub.psubscribe(prefix + "*")
                # The confirmation: from here on, every PUBLISH reaches this process.
                while (await pubsub.get_message(timeout=None)) is None:
                    pass
                self.subscribed.set()
                delay = 0.25
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                    if message is not None:
                        await self._deliver(message["channel"][len(prefix):].decode(), message["data"].decode())
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Redis away: subscribe again; what was sent meanwhile is lost
                self.subscribed.clear()
                logger.warning("live fan-out: Redis subscription lost (%s); again in %.2f s", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
            finally:
                try:
                    await pubsub.aclose()
                    await client.aclose()
                except Exception:
                    pass

    async def _deliver(self, group: str, html: str) -> None:
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
    for group in groups:
        fanout.members.setdefault(group, set()).add(consumer)
    try:
        await asyncio.wait_for(fanout.subscribed.wait(), timeout)
    except TimeoutError:
        logger.warning("live fan-out: not subscribed yet; this socket may miss fragments")


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
