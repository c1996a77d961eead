"""Proposed change: channels_redis's Redis Pub/Sub channel layer.

The list-based RedisChannelLayer stores one copy of a group message per member
channel, and each Daphne process pops them one BZPOPMIN at a time: fan-out to N
sockets costs N Redis round trips in series. The Pub/Sub layer publishes once per
group; each process receives it once and hands it to its local consumers. It
delivers at most once, with no buffering for absent listeners — which the
architecture already assumes (the database is the record; the worker also polls).
"""

from dashboard.settings import *  # noqa: F401,F403
from dashboard.settings import CHANNEL_LAYERS, REDIS_URL

if REDIS_URL:
    CHANNEL_LAYERS["default"] = {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL]},
    }
