"""The fragments through the channel layer again (a copy per socket), as before the fan-out.

`LIVE_FANOUT=layer`: every rendered fragment is a channels_redis group_send, one
list entry per member socket, each popped by its Daphne process in a Redis round
trip of its own; the default since this change is one PUBLISH per fragment that
each process writes to its own sockets (`dashboard.fanout`). Run it against the
default in the same session to compare (`--only fanout --variant layer_fanout`).
"""

from dashboard.settings import *  # noqa: F401,F403

LIVE_FANOUT = "layer"
