"""Every voice event of the protocol document, parsed with its fields.

The table-driven test sends one frame per event through the simulator's ``inject``
to a real client, over a real socket, and checks the typed event its ``"*"``
handler gets: the class, and every field under its wire name.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

import pinecall_sdk
from pinecall_sdk import (
    EVENT_CLASSES,
    VOICE_EVENTS,
    CallEndedEvent,
    CallEvent,
    LlmToolCallEvent,
    UserSpeakingEvent,
    parse_event,
)

from .conftest import PcRecorder

CALL = "CA5f0e1d2c3b4a59687766554433221100"
BASE = {"agent_id": "support", "call_id": CALL, "session_id": CALL, "seq": 7, "ts": 1767261600.25}

#: One frame per event of the document's table, every documented field set.
VOICE_FRAMES: dict[str, dict[str, Any]] = {
    "call.ringing": {"from": "+14155550123", "to": "+13186330963", "direction": "inbound"},
    "call.rejected": {"reason": "busy"},
    "call.dialing": {"to": "+14155550123", "from": "+13186330963"},
    "call.started": {
        "from": "+14155550123", "to": "+13186330963", "direction": "inbound",
        "metadata": {"campaign": "spring"}, "language": "en", "transport": "phone",
        "extension": "12", "owner": "line", "routed_from": "reception",
        "line_transcript": [{"who": "caller", "text": "sales please", "at": 1767261590.5}],
    },
    "call.updated": {"language": "es"},
    "speech.started": {"turn_id": 3, "confidence": 0.91, "timestamp": 1767261600.5},
    "user.speaking": {"text": "where is my", "confidence": 0.7, "message_id": "um_1",
                      "confirmed_text": "where is", "turn_id": 3},
    "speech.ended": {"turn_id": 3, "duration_ms": 1800, "timestamp": 1767261602.3},
    "user.message": {"message_id": "um_1", "text": "where is my order", "confidence": 0.95,
                     "turn_id": 3, "language": "en", "lag_ms": 180, "phone_number": "+14155550123"},
    "eager.turn": {"turn_id": 3, "message_id": "um_1", "text": "where is my order",
                   "probability": 0.81, "latency_ms": 90},
    "turn.pause": {"turn_id": 3, "probability": 0.4, "latency_ms": 120},
    "turn.resumed": {"turn_id": 3, "timestamp": 1767261603.0},
    "turn.end": {"turn_id": 3, "probability": 0.97, "latency_ms": 240, "text": "where is my order",
                 "message_id": "um_1"},
    "turn.continued": {"turn_id": 3, "timestamp": 1767261603.5},
    "llm.before": {"turn": 3},
    "llm.preparing_timeout": {"turn": 3, "waited_ms": 1500, "budget_ms": 1500},
    "llm.tool_call": {"msg_id": "msg_7", "tool_calls": [
        {"id": "call_1", "name": "lookup_order", "arguments": {"order_id": "48213"}}]},
    "bot.speaking": {"message_id": "msg_7", "text": "Your order left yesterday."},
    "bot.word": {"message_id": "msg_7", "word": "Your", "word_index": 0, "start_time": 0.0,
                 "end_time": 0.25},
    "message.confirmed": {"message_id": "msg_7", "text": "Your order left yesterday."},
    "bot.finished": {"message_id": "msg_7", "duration_ms": 1200},
    "bot.interrupted": {"message_id": "msg_7", "played_ms": 600, "words_spoken": 2,
                        "last_word": "order", "reason": "user_spoke"},
    "barge_in": {"cancelled_message_id": "msg_7"},
    "reply.rejected": {"message_id": "msg_8", "in_reply_to": "um_1", "expected_reply_to": "um_2",
                       "reason": "message_obsolete"},
    "message.aborted": {"message_id": "msg_8", "reason": "cancelled"},
    "skill.loaded": {"skill": "returns", "by": "llm"},
    "skill.unloaded": {"skill": "returns", "by": "client"},
    "call.dtmf_received": {"digit": "4", "digits": "124"},
    "audio.metrics": {"source": "user", "energy_db": -32.5, "rms": 0.02, "peak": 0.3,
                      "is_speech": True, "vad_prob": 0.88, "timestamp": 1767261600.6},
    "session.idle_warning": {"remaining_seconds": 10, "idle_timeout_seconds": 30},
    "session.timeout": {"reason": "idle_timeout"},
    "credits.exhausted": {},
    "credits.rejected": {},
    "call.forwarded": {"to": "+15551234567"},
    "call.held": {},
    "call.unheld": {},
    "call.muted": {},
    "call.unmuted": {"muted_transcript": "hello? anyone?"},
    "call.dtmf_sent": {"digits": "12#"},
    "call.error": {"error": "media stream failed", "code": "MEDIA_ERROR"},
    "call.ended": {"reason": "hangup", "duration_seconds": 42.5, "started_at": 1767261600.0,
                   "ended_at": 1767261642.5, "messages": [{"role": "user", "content": "hi"}],
                   "direction": "inbound", "from": "+14155550123", "to": "+13186330963"},
    "call.recording": {"audio": "UklGRg==", "duration_ms": 42500, "format": "wav", "sample_rate": 8000},
}

#: The event names of the document's table (pinecall-voice-protocol.md), as written there.
DOCUMENTED = """call.ringing call.rejected call.dialing call.started call.updated speech.started
user.speaking speech.ended user.message eager.turn turn.pause turn.resumed turn.end
turn.continued llm.before llm.preparing_timeout llm.tool_call bot.speaking bot.word
message.confirmed bot.finished bot.interrupted barge_in reply.rejected message.aborted
skill.loaded skill.unloaded call.dtmf_received audio.metrics session.idle_warning
session.timeout credits.exhausted credits.rejected call.forwarded call.held call.unheld
call.muted call.unmuted call.dtmf_sent call.error call.ended call.recording""".split()


def attribute(key: str) -> str:
    return "from_" if key == "from" else key


def test_every_documented_event_has_a_class_and_a_frame_here():
    assert set(DOCUMENTED) == set(VOICE_EVENTS) == set(VOICE_FRAMES)
    for name, cls in VOICE_EVENTS.items():
        assert EVENT_CLASSES[name] is cls and issubclass(cls, CallEvent)
        assert getattr(pinecall_sdk, cls.__name__) is cls  # exported
        assert set(VOICE_FRAMES[name]) <= set(cls._schema)


@pytest.fixture
async def voice_client(pc_sim, pc_make):
    pc = pc_make(pc_sim.url)
    support = pc.agent("support", llm="openai/gpt-4.1-mini")
    recorder = PcRecorder()
    support.on("*", recorder)
    await pc.connect()
    await support.wait_registered(timeout=3)
    return pc, support, recorder


@pytest.mark.parametrize("name", sorted(VOICE_FRAMES))
async def test_each_voice_event_reaches_the_agent_typed_with_its_wire_fields(pc_sim, voice_client, name):
    _, _, recorder = voice_client
    frame = {"event": name, **BASE, **VOICE_FRAMES[name]}
    assert await pc_sim.inject(frame, agent_id="support") == 1
    ev = await recorder.wait_for(name)
    assert type(ev) is VOICE_EVENTS[name] and ev.raw == frame
    for key, value in {**BASE, **VOICE_FRAMES[name]}.items():
        assert getattr(ev, attribute(key)) == value, key
    assert ev.call == CALL


def test_tool_calls_in_both_shapes_and_the_older_message_id():
    ev = parse_event({"event": "llm.tool_call", "call_id": CALL, "message_id": "msg_old", "tool_calls": [
        {"id": "t1", "function": {"name": "lookup_order", "arguments": '{"order_id": "1"}'}},
        {"id": "t2", "name": "transfer", "arguments": {}},
        "not a call",
    ]})
    assert isinstance(ev, LlmToolCallEvent) and ev.msg_id == "msg_old" and ev.message_id == "msg_old"
    assert ev.calls == [{"id": "t1", "name": "lookup_order", "arguments": '{"order_id": "1"}'},
                        {"id": "t2", "name": "transfer", "arguments": {}}]
    both = parse_event({"event": "llm.tool_call", "msg_id": "new", "message_id": "old"})
    assert both.msg_id == "new"


def test_call_events_are_read_leniently(pc_fresh_readings, caplog):
    with caplog.at_level(logging.WARNING, logger="pinecall_sdk"):
        ev = parse_event({"event": "user.speaking", "call_id": 12345, "text": ["no"], "turn_id": "4",
                          "confidence": "0.5", "seq": 2.0, "ts": "2026-01-01T00:00:00Z"})
    assert isinstance(ev, UserSpeakingEvent)
    assert (ev.call_id, ev.text, ev.turn_id, ev.confidence, ev.seq, ev.ts) == (
        "12345", None, 4, 0.5, 2, "2026-01-01T00:00:00Z")
    assert "'text' was list" in caplog.text
    ended = parse_event({"event": "call.ended", "started_at": "2026-01-01T00:00:00Z", "messages": {}})
    assert isinstance(ended, CallEndedEvent) and ended.started_at == "2026-01-01T00:00:00Z"
    assert ended.messages is None and ended.local is False
    empty = parse_event({"event": "call.unmuted", "call_id": CALL, "muted_transcript": None})
    assert empty.muted_transcript is None and empty.agent_id is None


def test_errors_carry_call_id_and_phone():
    ev = parse_event({"event": "error", "code": "PHONE_IN_USE", "phone": "+13186330963",
                      "agent_id": "support", "call_id": CALL})
    assert (ev.code, ev.phone, ev.call_id) == ("PHONE_IN_USE", "+13186330963", CALL)


@pytest.mark.parametrize("agent_id", ["org_42:support", "Support", "org_42:SUPPORT"])
async def test_agent_ids_as_the_server_spells_them_reach_our_agent(pc_sim, voice_client, agent_id):
    _, _, recorder = voice_client
    await pc_sim.inject({"event": "user.message", "agent_id": agent_id, "call_id": CALL, "text": "hi"})
    ev = await recorder.wait_for("user.message")
    assert ev.agent_id == agent_id and ev.text == "hi"  # the wire's value, on our agent's handler
