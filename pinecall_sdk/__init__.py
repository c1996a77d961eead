"""Python client for the Pinecall SDK wire protocol (WhatsApp, voice calls, human takeover).

See ``pinecall_sdk.client`` for the guarantees, and the protocol description in
the project's shared docs. The server simulator lives in ``pinecall_sdk.simulator``.
"""

from . import events as _events
from .client import DEFAULT_URL, Agent, Pinecall, reconnect_delay
from .errors import PinecallError, PinecallInvalidArgument, PinecallTimeout
from .events import *  # noqa: F403 -- every typed event; the list is events.__all__
from .protocol import PhoneChannel

__all__ = [
    "Pinecall",
    "Agent",
    "PinecallError",
    "PinecallTimeout",
    "PinecallInvalidArgument",
    "reconnect_delay",
    "DEFAULT_URL",
    "PhoneChannel",
    *_events.__all__,
]
