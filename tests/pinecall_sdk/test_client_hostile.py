"""Hostile and odd frames, over real sockets: none of them stops the client.

Each case sends its frames to the client's connection through the simulator, then
a customer writes 50 ordinary messages: all 50 must reach the handler, on the same
connection, with nothing logged that a UTF-8 log file could not take.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from typing import Any, Callable

import pytest

from pinecall_sdk import Event, WhatsAppMessageEvent

from .conftest import PcRecorder, pc_connection

PHONE = "34612345678"
FIVE_MB = 5 * 2**20
NESTING = 100_000


def message(**fields: Any) -> dict[str, Any]:
    """A whatsapp.message marked ``hostile`` (an unknown key: it stays in ``raw``)."""
    return {"event": "whatsapp.message", "agent_id": "support", "hostile": True, **fields}


def escaped(frame: dict[str, Any]) -> str:
    """JSON with NUL and lone surrogates as escapes: how they travel in a text frame."""
    return json.dumps(frame)  # ensure_ascii: \\u0000, \\ud800


def nothing_delivered(events: list[Event]) -> None:
    assert events == []


def fields(event: WhatsAppMessageEvent) -> tuple[Any, ...]:
    return (event.agent_id, event.session_id, event.from_, event.name, event.type, event.text,
            event.message_id, event.paused)


def check_wrong_types(events: list[Event]) -> None:
    assert all(isinstance(e, WhatsAppMessageEvent) for e in events)
    assert [fields(e) for e in events] == [
        ("support", "12", "34612345678", None, None, "12345", "987.5", True),
        ("support", None, None, "7", "true", None, "false", False),
        # agent_id unreadable: routed like an event without one, to the WhatsApp agent
        (None, "wa-x", None, None, None, None, None, None),
        (None, None, None, None, None, None, None, None),  # every field missing
    ]
    assert events[0].raw["text"] == 12345 and events[1].raw["text"] == {"body": "hi"}


def check_big_message(events: list[Event]) -> None:
    (event,) = events
    assert event.message_id == "big" and len(event.text) == FIVE_MB and set(event.text) == {"y"}


def check_unknown_events(events: list[Event]) -> None:
    assert [type(e) for e in events] == [Event, Event, Event]
    assert [e.event for e in events] == ["whatsapp.reaction", "fatal", "\ud800odd"]
    assert events[0].get("emoji") == "\U0001f44d"


def check_nul_and_surrogates(events: list[Event]) -> None:
    assert [e.text for e in events] == ["a\x00b\ud800c\udfffd", "\x00", "\udc80"]
    assert events[0].name == "N\x00me\ud83d"


def check_binary_json(events: list[Event]) -> None:
    (event,) = events
    assert isinstance(event, WhatsAppMessageEvent) and event.text == "binary but JSON"


CASES: dict[str, tuple[list[str | bytes | dict[str, Any]], Callable[[list[Event]], None]]] = {
    "nesting_100k_array": (["[" * NESTING + "]" * NESTING], nothing_delivered),
    "nesting_100k_inside_a_message": (
        ['{"event":"whatsapp.message","agent_id":"support","text":'
         + '{"a":' * NESTING + "1" + "}" * NESTING + "}"],
        nothing_delivered,
    ),
    "five_mb_of_junk": (["x" * FIVE_MB], nothing_delivered),
    "five_mb_valid_message": ([json.dumps(message(text="y" * FIVE_MB, message_id="big"))],
                              check_big_message),
    "five_mb_binary_not_utf8": ([bytes(range(128, 256)) * (FIVE_MB // 128)], nothing_delivered),
    "binary_not_utf8": ([b"\xff\xfe{\x00\xc3("], nothing_delivered),
    "binary_utf8_json": ([json.dumps(message(text="binary but JSON")).encode()], check_binary_json),
    "wrong_types_in_every_field": (
        [
            message(session_id=12, **{"from": 34612345678}, name={"first": "Ana"}, type=["text"],
                    text=12345, message_id=987.5, paused="yes"),
            message(session_id=["wa-1"], **{"from": {"n": 1}}, name=7, type=True,
                    text={"body": "hi"}, message_id=False, paused=0),
            message(agent_id=["support"], session_id="wa-x", **{"from": []}, name=[], type={},
                    text=[["nested"]], message_id={}, paused="maybe"),
            {"event": "whatsapp.message", "hostile": True},
        ],
        check_wrong_types,
    ),
    "top_level_not_an_object": (
        ["[]", '"x"', "null", "42", "true", "{}", '{"event": null}', '{"event": ["whatsapp.message"]}',
         '{"event": ""}', "", "   ", "\x00", '{"event": "whatsapp.message"'],
        nothing_delivered,
    ),
    "unknown_events": (
        [
            {"event": "whatsapp.reaction", "agent_id": "support", "hostile": True, "emoji": "\U0001f44d"},
            # a wire event named like the client's failure signal is just an event
            {"event": "fatal", "agent_id": "support", "hostile": True},
            escaped({"event": "\ud800odd", "agent_id": "support", "hostile": True}),
        ],
        check_unknown_events,
    ),
    "nul_and_lone_surrogates_in_text": (
        [
            escaped(message(text="a\x00b\ud800c\udfffd", name="N\x00me\ud83d")),
            escaped(message(text="\x00")),
            escaped(message(text="\udc80")),
        ],
        check_nul_and_surrogates,
    ),
    "lone_surrogates_in_logged_fields": (
        [
            # an error no command waits for is logged with its code and message
            escaped({"event": "error", "code": "X\ud800", "message": "bad \udfff \x00 news"}),
            escaped({"event": "agent.created", "agent_id": "\ud800nobody"}),
            escaped({"event": "whatsapp.message", "agent_id": "\udc00other", "text": "x"}),
        ],
        nothing_delivered,
    ),
}


class StrictUtf8Handler(logging.StreamHandler):
    """A log handler writing UTF-8 strictly, like a log file; records what it could not write."""

    def __init__(self) -> None:
        self.output = io.BytesIO()
        super().__init__(io.TextIOWrapper(self.output, encoding="utf-8", errors="strict",
                                          write_through=True))
        self.failures: list[BaseException | None] = []

    def handleError(self, record: logging.LogRecord) -> None:
        self.failures.append(sys.exc_info()[1])

    def text(self) -> str:
        return self.output.getvalue().decode("utf-8")


@pytest.fixture
def strict_log(pc_fresh_readings):
    logger = logging.getLogger("pinecall_sdk")
    handler = StrictUtf8Handler()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.mark.parametrize("case", list(CASES))
async def test_hostile_frames_then_50_messages_all_arrive(pc_sim, pc_support, strict_log, case):
    pc, support = pc_support
    frames, check = CASES[case]
    got = PcRecorder()
    support.on("*", got)
    lifecycle = PcRecorder()
    for name in ("disconnected", "reconnecting", "connected"):
        pc.on(name, lifecycle)
    fatal: list[BaseException] = []
    pc.on("fatal", fatal.append)
    connection = pc_connection(pc).ws

    for frame in frames:
        assert await pc_sim.inject(frame, agent_id="support") == 1
    sent = [(await pc_sim.customer_says(phone=PHONE, name="Ana", text=f"message {n}"))["message_id"]
            for n in range(50)]

    await got.wait_for("whatsapp.message", lambda e: e.message_id == sent[-1], timeout=10)
    received = [e.message_id for e in got.of("whatsapp.message") if not e.get("hostile")]
    assert received == sent  # all 50, in order, once
    check([e for e in got.events if e.get("hostile")])

    assert pc.connected and pc_connection(pc).ws is connection  # the same connection throughout
    assert lifecycle.events == [] and fatal == [] and pc.failure is None
    assert strict_log.failures == []  # every log line could be written as UTF-8


async def test_log_lines_escape_nul_and_lone_surrogates(pc_sim, pc_support, strict_log):
    pc, support = pc_support
    errors = PcRecorder()
    pc.on("error", errors)
    await pc_sim.inject(escaped({"event": "error", "code": "X\ud800", "message": "bad \x00 news"}))
    error = await errors.wait_for("error")
    assert (error.code, error.message) == ("X\ud800", "bad \x00 news")  # delivered as sent
    assert strict_log.failures == []
    assert "server error: X\\ud800 bad \\x00 news" in strict_log.text()


async def test_a_frame_above_max_frame_size_costs_a_reconnect_not_the_client(pc_sim, pc_make):
    pc = pc_make(pc_sim.url)
    pc.max_frame_size = 2**20  # the 16 MiB default, shrunk for the test
    support = pc.agent("support")
    support.add_whatsapp(phone_number_id="123", access_token="t")
    lifecycle = PcRecorder()
    pc.on("disconnected", lifecycle)
    support.on("registered", lifecycle)
    got = PcRecorder()
    support.on("whatsapp.message", got)
    await pc.connect()
    await lifecycle.wait_for("registered")

    await pc_sim.inject("x" * (2 * 2**20), agent_id="support")
    disconnected = await lifecycle.wait_for("disconnected")
    assert disconnected.reconnect is True  # websockets failed the connection (1009 sent)
    await lifecycle.wait_for("registered", count=2)
    sent = await pc_sim.customer_says(phone=PHONE, text="still there?")
    await got.wait_for("whatsapp.message", lambda e: e.message_id == sent["message_id"])
    assert pc.connected and pc.failure is None
