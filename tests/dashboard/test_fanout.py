"""The fragments' fan-out on Redis pub/sub (`conversations.notify`, `dashboard.fanout`):
one PUBLISH per fragment, written by each web process to its own sockets of the group.

Needs Redis (REDIS_URL); a TCP proxy in front of it fakes Redis going away and back.
"""

from __future__ import annotations

import asyncio
import os
from urllib.parse import urlsplit

import pytest
from asgiref.sync import sync_to_async

from conversations import notify
from dashboard import fanout
from tests.support.tcp_proxy import TcpProxy


@pytest.fixture
def redis_url():
    url = os.environ.get("REDIS_URL", "")
    if not url:
        pytest.skip("the fan-out runs with Redis only (REDIS_URL)")
    import redis

    try:
        redis.Redis.from_url(url).ping()
    except redis.ConnectionError:
        pytest.skip(f"Redis is not reachable at {url}")
    return url


@pytest.fixture
def proxied(settings, redis_url):
    """The fan-out's Redis behind a proxy that the test can cut (the channel layer's is not)."""
    parts = urlsplit(redis_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379).start()
    settings.REDIS_URL = parts._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()
    settings.LIVE_FANOUT = "pubsub"
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [redis_url]}}
    }
    yield proxy
    proxy.stop()


class Socket:
    """What the fan-out needs of a consumer: `deliver(html)`."""

    def __init__(self) -> None:
        self.frames: asyncio.Queue[str] = asyncio.Queue()

    async def deliver(self, html: str) -> None:
        await self.frames.put(html)

    async def next(self) -> str:
        return await asyncio.wait_for(self.frames.get(), 5)


async def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "not within the time"
        await asyncio.sleep(0.02)


async def test_a_fragment_reaches_every_socket_of_its_group_once(proxied):
    a, b, elsewhere = Socket(), Socket(), Socket()
    await fanout.join(["conversation-1", "operators"], a)
    await fanout.join(["conversation-1"], b)
    await fanout.join(["conversation-2"], elsewhere)

    await sync_to_async(notify.send_html)("conversation-1", "<p id='one'></p>")
    await notify.group_send("operators", {"type": "live.html", "html": "<p id='all'></p>"})

    assert await a.next() == "<p id='one'></p>" and await b.next() == "<p id='one'></p>"
    assert await a.next() == "<p id='all'></p>"
    assert elsewhere.frames.empty() and b.frames.empty()
    fanout.leave(["conversation-1", "operators"], a)
    await notify.group_send("conversation-1", {"type": "live.html", "html": "<p id='two'></p>"})
    assert await b.next() == "<p id='two'></p>" and a.frames.empty()


async def test_other_messages_stay_on_the_channel_layer(proxied):
    """Per-viewer renders and closing a socket are not fragments: the layer carries them."""
    from channels.layers import channel_layers, get_channel_layer

    channel_layers.backends.clear()
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add("conversation-3", channel)
    socket = Socket()
    await fanout.join(["conversation-3"], socket)
    await notify.group_send("conversation-3", {"type": "conversation.state", "conversation_id": 3})
    assert (await asyncio.wait_for(layer.receive(channel), 5))["type"] == "conversation.state"
    assert socket.frames.empty()
    await layer.flush()
    channel_layers.backends.clear()


async def test_redis_going_away_loses_fragments_but_not_the_fan_out(proxied):
    """At most once: what is sent while Redis is away is lost (a failed send is logged,
    never raised into the write); once Redis is back the subscription is made again."""
    socket = Socket()
    await fanout.join(["operators"], socket)
    state = fanout._by_loop[asyncio.get_running_loop()]

    proxied.cut()
    await wait_until(lambda: not state.subscribed.is_set())
    await sync_to_async(notify.send_html)("operators", "<p id='lost'></p>")  # logged, not raised

    proxied.restore()
    await wait_until(state.subscribed.is_set)
    await notify.group_send("operators", {"type": "live.html", "html": "<p id='back'></p>"})
    assert await socket.next() == "<p id='back'></p>"


async def test_deployments_on_other_redis_databases_do_not_hear_each_other(proxied, settings):
    socket = Socket()
    await fanout.join(["operators"], socket)
    ours = settings.REDIS_URL
    db = int(urlsplit(ours).path.strip("/") or 0)
    settings.REDIS_URL = urlsplit(ours)._replace(path=f"/{(db + 1) % 16}").geturl()
    await notify.group_send("operators", {"type": "live.html", "html": "<p id='theirs'></p>"})
    settings.REDIS_URL = ours
    await notify.group_send("operators", {"type": "live.html", "html": "<p id='ours'></p>"})
    assert await socket.next() == "<p id='ours'></p>"
