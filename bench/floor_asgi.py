"""The transport floor's Daphne application: the dashboard's own, plus a tap.

`daphne bench.floor_asgi:application` serves exactly `dashboard.asgi:application`
(every socket still goes through the real consumer). Besides, each process
holds one Redis pub/sub subscription (`PATTERN`); a fragment published on
`bench-floor:<conversation pk>` is written, in memory, to every socket of this
process that is open on that conversation. That is the best transport this
stack can have on Redis: one message per Daphne process, no channel layer, no
consumer, no serialisation. The harness PUBLISHes and times the arrival on the
same sockets as the real path (bench/fanout.py, bench/scale.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
from urllib.parse import parse_qs

import redis.asyncio as aioredis

from bench.config import FLOOR_PREFIX as PREFIX
from dashboard.asgi import application as dashboard_application

logger = logging.getLogger("bench.floor")

PATTERN = PREFIX + "*"

# conversation pk (as published) -> the ASGI `send` of each open socket on it
_sockets: dict[str, set] = {}
_listener: asyncio.Task | None = None


async def _listen() -> None:
    client = aioredis.Redis.from_url(os.environ["REDIS_URL"])
    pubsub = client.pubsub()
    await pubsub.psubscribe(PATTERN)
    while True:
        try:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("floor subscription failed; retrying")
            await asyncio.sleep(0.5)
            continue
        if message is None:
            continue
        key = message["channel"].decode().removeprefix(PREFIX)
        frame = {"type": "websocket.send", "text": message["data"].decode()}
        for send in list(_sockets.get(key, ())):
            try:
                await send(frame)
            except Exception:
                _sockets.get(key, set()).discard(send)


async def application(scope, receive, send):
    global _listener
    if scope["type"] != "websocket":
        return await dashboard_application(scope, receive, send)
    if _listener is None:
        _listener = asyncio.ensure_future(_listen())
    params = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    key = (params.get("conversation") or [""])[0]
    members = _sockets.setdefault(key, set())

    async def tapped_send(message):
        if message["type"] == "websocket.accept" and key:
            members.add(send)
        elif message["type"] == "websocket.close":
            members.discard(send)
        await send(message)

    try:
        return await dashboard_application(scope, receive, tapped_send)
    finally:
        members.discard(send)
