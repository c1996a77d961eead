"""The Redis channel layer as the worker and Daphne use it."""

import asyncio
import os

import pytest


@pytest.fixture
def redis_url():
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    import redis

    try:
        redis.Redis.from_url(url).ping()
    except redis.ConnectionError:
        if os.environ.get("CI"):
            pytest.fail(f"Redis is not reachable at {url}")
        pytest.skip(f"Redis is not reachable at {url}")
    return url


async def test_an_idle_receive_outlives_the_redis_client_read_timeout(redis_url):
    """A socket or the worker waits on the layer for long quiet stretches.

    redis-py 8 puts a 5 s read timeout under channels-redis' blocking pops,
    which turned every quiet moment into an exception; requirements pin 7.x.
    """
    from channels_redis.core import RedisChannelLayer

    layer = RedisChannelLayer(hosts=[redis_url])
    channel = await layer.new_channel()
    receive = asyncio.ensure_future(layer.receive(channel))
    await asyncio.sleep(6.5)
    assert not receive.done(), receive.exception()
    await layer.send(channel, {"type": "outbox.wake"})
    assert (await asyncio.wait_for(receive, 5))["type"] == "outbox.wake"
    await layer.close_pools()
