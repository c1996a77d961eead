"""Python client for the Pinecall SDK wire protocol (WhatsApp + human takeover).

See ``pinecall_sdk.client`` for the guarantees, and the protocol description in
the project's shared docs. The server simulator lives in ``pinecall_sdk.simulator``.
"""

from .client import DEFAULT_URL, Agent, Pinecall, reconnect_delay
from .errors import PinecallError, PinecallInvalidArgument, PinecallTimeout
from .events import (
    EVENT_CLASSES,
    AgentCreatedEvent,
    AgentDisplacedEvent,
    AgentResumedEvent,
    AuthenticatedEvent,
    ChannelAddedEvent,
    ConnectedEvent,
    DisconnectedEvent,
    ErrorEvent,
    Event,
    HistoryDataEvent,
    PingEvent,
    PongEvent,
    ReconnectingEvent,
    RegisteredEvent,
    SessionPausedEvent,
    SessionResumedEvent,
    SessionSentEvent,
    WhatsAppMessageEvent,
    WhatsAppResponseEvent,
    WhatsAppSessionEndedEvent,
    WhatsAppSessionStartedEvent,
    WhatsAppStatusEvent,
    parse_event,
)

__all__ = [
    "Pinecall",
    "Agent",
    "PinecallError",
    "PinecallTimeout",
    "PinecallInvalidArgument",
    "reconnect_delay",
    "parse_event",
    "DEFAULT_URL",
    "EVENT_CLASSES",
    "Event",
    "ConnectedEvent",
    "AuthenticatedEvent",
    "PingEvent",
    "PongEvent",
    "ErrorEvent",
    "AgentCreatedEvent",
    "AgentResumedEvent",
    "AgentDisplacedEvent",
    "WhatsAppSessionStartedEvent",
    "WhatsAppMessageEvent",
    "WhatsAppResponseEvent",
    "WhatsAppStatusEvent",
    "WhatsAppSessionEndedEvent",
    "SessionPausedEvent",
    "SessionResumedEvent",
    "SessionSentEvent",
    "ChannelAddedEvent",
    "HistoryDataEvent",
    "DisconnectedEvent",
    "ReconnectingEvent",
    "RegisteredEvent",
]
