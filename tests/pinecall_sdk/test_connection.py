"""The connection's pure parts: the fatal-or-retry classifier, the backoff, the one State.

How the connection behaves over real sockets (reconnects, stops, hang-ups) is in
test_client_raw.py and test_client_sim.py, which also check ``pc.state``.
"""

from __future__ import annotations

import pytest
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.frames import Close as CloseFrame
from websockets.http11 import Response

from pinecall_sdk import Pinecall, PinecallError, PinecallTimeout
from pinecall_sdk.connection import Close, State, Verdict, classify, failure_code
from pinecall_sdk.protocol import Policy

from .conftest import pc_connection

FATAL, RETRY = Verdict.FATAL, Verdict.RETRY


def closed(code: int, reason: str = "") -> ConnectionClosedError:
    return ConnectionClosedError(CloseFrame(code, reason), None)


def http(status: int) -> InvalidStatus:
    return InvalidStatus(Response(status, "", Headers()))


@pytest.mark.parametrize(
    "failure, verdict, code",
    [
        # a rejected key: never retried in a loop
        (PinecallError("invalid API key", code="UNAUTHORIZED"), FATAL, "UNAUTHORIZED"),
        (Close(1008, "policy violation"), FATAL, "UNAUTHORIZED"),
        (Close(1008), FATAL, "UNAUTHORIZED"),
        (closed(1008, "invalid API key"), FATAL, "UNAUTHORIZED"),
        (http(401), FATAL, "UNAUTHORIZED"),
        (http(403), FATAL, "UNAUTHORIZED"),
        # displaced: another connection took the agent over
        (Close(4000, "Displaced by a new connection"), FATAL, "DISPLACED"),
        (Close(1000, "agent displaced"), FATAL, "DISPLACED"),
        (closed(4000, "Displaced"), FATAL, "DISPLACED"),
        (PinecallError("every agent displaced", code="DISPLACED"), FATAL, "DISPLACED"),
        # registration refusals that are final
        (PinecallError("taken", code="AGENT_CONFLICT_FATAL"), FATAL, "AGENT_CONFLICT_FATAL"),
        (PinecallError("full", code="SERVER_AT_CAPACITY"), FATAL, "SERVER_AT_CAPACITY"),
        # the client's own ends
        (PinecallError("closed", code="CLOSED"), FATAL, "CLOSED"),
        (PinecallError("a bug", code="INTERNAL"), FATAL, "INTERNAL"),
        # worth another try: network errors, timeouts, abnormal and ordinary closes
        (PinecallError("held", code="AGENT_CONFLICT"), RETRY, "AGENT_CONFLICT"),
        (PinecallError("held", code="AGENT_IN_USE"), RETRY, "AGENT_IN_USE"),
        (PinecallError("refused", code="CONNECTION_FAILED"), RETRY, "CONNECTION_FAILED"),
        (PinecallError("dropped", code="CONNECTION_LOST"), RETRY, "CONNECTION_LOST"),
        (PinecallTimeout("slow", code="CONNECTION_TIMEOUT"), RETRY, "CONNECTION_TIMEOUT"),
        (PinecallError("no code"), RETRY, "CONNECTION_FAILED"),
        (ConnectionRefusedError(111, "Connection refused"), RETRY, "CONNECTION_FAILED"),
        (OSError("network unreachable"), RETRY, "CONNECTION_FAILED"),
        (TimeoutError(), RETRY, "CONNECTION_TIMEOUT"),
        (InvalidHandshake("bad upgrade"), RETRY, "CONNECTION_FAILED"),
        (InvalidURI("ws//x", "no scheme"), RETRY, "CONNECTION_FAILED"),
        (http(503), RETRY, "CONNECTION_FAILED"),
        (RuntimeError("a proxy's odd error"), RETRY, "CONNECTION_FAILED"),
        (Close(None), RETRY, "CONNECTION_LOST"),  # no close frame: the network dropped
        (Close(1006, ""), RETRY, "CONNECTION_LOST"),
        (Close(1000, "bye"), RETRY, "CONNECTION_LOST"),
        (Close(1001, "going away"), RETRY, "CONNECTION_LOST"),
        (Close(1009, "frame too big"), RETRY, "CONNECTION_LOST"),
        (Close(1011, "internal error"), RETRY, "CONNECTION_LOST"),
        (Close(1012, "Service restart"), RETRY, "CONNECTION_LOST"),
        (Close(4000, "replaced"), RETRY, "CONNECTION_LOST"),
        (ConnectionClosedError(None, None), RETRY, "CONNECTION_LOST"),
        (ConnectionClosedOK(CloseFrame(1000, ""), None), RETRY, "CONNECTION_LOST"),
    ],
)
def test_classify(failure, verdict, code):
    assert classify(failure) is verdict
    assert failure_code(failure) == code


def test_close_of_a_websockets_exception():
    assert Close.of(closed(1008, "bad key")) == Close(1008, "bad key")
    assert Close.of(ConnectionClosedError(None, None)) == Close(None)


def test_reconnect_backoff_is_the_documented_one():
    policy = Policy()  # 1 s * 2**attempt, at most 30 s, plus 0-25 % jitter
    for attempt, base in enumerate([1, 2, 4, 8, 16, 30, 30, 30]):
        assert base <= policy.reconnect_delay(attempt) <= base * 1.25
    assert Policy(reconnect_jitter=0.0).reconnect_delay(10_000) == 30


def test_a_new_client_is_idle_and_usable():
    pc = Pinecall(api_key="k", url="ws://x")
    assert pc.state is State.IDLE and not pc.connected
    assert pc_connection(pc).unusable_error() is None
