"""Unit tests of the client's pure parts: event parsing, errors, backoff, arguments."""

from __future__ import annotations

import json

import pytest

from pinecall_sdk import (
    AgentDisplacedEvent,
    ChannelAddedEvent,
    ErrorEvent,
    Event,
    HistoryDataEvent,
    Pinecall,
    PinecallError,
    PinecallInvalidArgument,
    PinecallTimeout,
    SessionPausedEvent,
    WhatsAppMessageEvent,
    WhatsAppSessionEndedEvent,
    WhatsAppStatusEvent,
    parse_event,
    protocol,
    reconnect_delay,
)
from pinecall_sdk.protocol import Policy

from .conftest import pc_dispatcher, pc_nothing_pending


# --- parse_event ---------------------------------------------------------------------


def test_parse_message_keeps_wire_names_and_raw():
    frame = {
        "event": "whatsapp.message",
        "agent_id": "support",
        "session_id": "wa-abc",
        "from": "34612345678",
        "name": "Ana",
        "type": "audio",
        "text": "transcript",
        "message_id": "wamid.1",
        "paused": True,
        "something_new": {"x": 1},
    }
    ev = parse_event(frame)
    assert isinstance(ev, WhatsAppMessageEvent)
    assert (ev.event, ev.agent_id, ev.session_id, ev.from_, ev.name) == (
        "whatsapp.message", "support", "wa-abc", "34612345678", "Ana",
    )
    assert (ev.type, ev.text, ev.message_id, ev.paused) == ("audio", "transcript", "wamid.1", True)
    assert ev.raw is frame
    assert ev.raw["from"] == "34612345678"
    assert ev.get("something_new") == {"x": 1}


def test_parse_unknown_event_is_generic():
    ev = parse_event({"event": "whatsapp.reaction", "agent_id": "a", "emoji": "x"})
    assert type(ev) is Event
    assert ev.event == "whatsapp.reaction" and ev.agent_id == "a" and ev.get("emoji") == "x"


def test_parse_error_message_from_old_error_key():
    ev = parse_event({"event": "error", "code": "SESSION_NOT_FOUND", "error": "no such session"})
    assert isinstance(ev, ErrorEvent)
    assert ev.code == "SESSION_NOT_FOUND" and ev.message == "no such session"
    assert parse_event({"event": "error", "code": "X", "message": "new"}).message == "new"


def test_parse_session_ended_and_status_and_paused():
    ended = parse_event({
        "event": "whatsapp.session_ended", "session_id": "wa-1", "reason": "idle_timeout",
        "started_at": "2025-01-01T00:00:00.000Z", "ended_at": "2025-01-01T01:00:00.000Z",
        "duration": 3600.0, "message_count": 2, "transcript": [{"role": "user", "content": "hi"}],
        "messages": [],
    })
    assert isinstance(ended, WhatsAppSessionEndedEvent)
    assert ended.duration == 3600.0 and ended.message_count == 2 and ended.transcript[0]["content"] == "hi"
    status = parse_event({"event": "whatsapp.status", "status": "read", "recipient": "34", "message_id": "m"})
    assert isinstance(status, WhatsAppStatusEvent) and status.status == "read" and status.agent_id is None
    paused = parse_event({"event": "session.paused", "agent_id": "a", "contact": "34"})
    assert isinstance(paused, SessionPausedEvent) and paused.contact == "34" and paused.session_id is None
    displaced = parse_event({"event": "agent.displaced", "agent_id": "a", "reason": "Displaced"})
    assert isinstance(displaced, AgentDisplacedEvent) and displaced.reason == "Displaced"


def test_parse_null_or_missing_is_absent():
    ev = parse_event({"event": "whatsapp.message", "session_id": "wa-1", "text": None, "paused": None})
    assert ev.text is None and ev.paused is None
    # a direct send to a contact has no session: still an event, not a malformed frame
    ev = parse_event({"event": "whatsapp.response", "to": "34", "text": "hi", "source": "human"})
    assert ev.session_id is None and ev.source == "human"


@pytest.mark.parametrize(
    "frame, words",
    [
        ([1, 2], "JSON object"),
        ("text", "JSON object"),
        (None, "JSON object"),
        ({"agent_id": "a"}, "no 'event'"),
        ({"event": 5}, "'event'"),
        ({"event": ""}, "'event'"),
        ({"event": None}, "'event'"),
    ],
)
def test_parse_rejects_only_what_cannot_be_an_event(frame, words):
    with pytest.raises(ValueError) as info:
        parse_event(frame)
    assert words in str(info.value)


@pytest.mark.parametrize(
    "frame, attribute, value",
    [
        # strings: numbers and booleans become their JSON text; containers are absent
        ({"event": "whatsapp.message", "text": 12}, "text", "12"),
        ({"event": "whatsapp.message", "text": 1.5}, "text", "1.5"),
        ({"event": "whatsapp.message", "text": True}, "text", "true"),
        ({"event": "whatsapp.message", "text": {"body": "hi"}}, "text", None),
        ({"event": "whatsapp.message", "text": ["hi"]}, "text", None),
        ({"event": "whatsapp.message", "session_id": 12}, "session_id", "12"),
        ({"event": "whatsapp.message", "from": 34612345678}, "from_", "34612345678"),
        ({"event": "session.paused", "session_id": ["wa-1"]}, "session_id", None),
        ({"event": "agent.created", "agent_id": 7}, "agent_id", "7"),
        ({"event": "error", "code": 404}, "code", "404"),
        # booleans
        ({"event": "whatsapp.message", "paused": "yes"}, "paused", True),
        ({"event": "whatsapp.message", "paused": "False"}, "paused", False),
        ({"event": "whatsapp.message", "paused": 1}, "paused", True),
        ({"event": "whatsapp.message", "paused": 0}, "paused", False),
        ({"event": "whatsapp.message", "paused": "maybe"}, "paused", None),
        ({"event": "whatsapp.message", "paused": 7}, "paused", None),
        ({"event": "whatsapp.message", "paused": {}}, "paused", None),
        # numbers: finite only, booleans are not numbers, numeric strings are
        ({"event": "whatsapp.session_ended", "duration": True}, "duration", None),
        ({"event": "whatsapp.session_ended", "duration": "3.5"}, "duration", 3.5),
        ({"event": "whatsapp.session_ended", "duration": "soon"}, "duration", None),
        ({"event": "whatsapp.session_ended", "duration": float("nan")}, "duration", None),
        ({"event": "whatsapp.session_ended", "message_count": "2"}, "message_count", 2),
        ({"event": "whatsapp.session_ended", "message_count": 2.0}, "message_count", 2),
        ({"event": "whatsapp.session_ended", "message_count": 2.5}, "message_count", None),
        ({"event": "whatsapp.session_ended", "message_count": "9" * 5000}, "message_count", None),
        ({"event": "error", "retry_after_s": [5]}, "retry_after_s", None),
        # times: ISO strings and epoch numbers alike
        ({"event": "whatsapp.session_ended", "started_at": "2025-01-01T00:00:00Z"}, "started_at",
         "2025-01-01T00:00:00Z"),
        ({"event": "whatsapp.session_ended", "started_at": 1735689600.5}, "started_at", 1735689600.5),
        ({"event": "whatsapp.session_ended", "ended_at": False}, "ended_at", None),
        # lists
        ({"event": "whatsapp.session_ended", "transcript": "x"}, "transcript", None),
        ({"event": "history.data", "messages": {"role": "user"}}, "messages", None),
    ],
)
def test_parse_reads_wrong_types_leniently(frame, attribute, value, pc_fresh_readings, caplog):
    ev = parse_event(frame)
    got = getattr(ev, attribute)
    assert got == value and type(got) is type(value)
    assert ev.raw is frame  # the value as sent
    if type(value) is not type(next(v for k, v in frame.items() if k != "event")):
        assert len([r for r in caplog.records if "reported once" in r.getMessage()]) == 1
        parse_event(dict(frame))
        assert len([r for r in caplog.records if "reported once" in r.getMessage()]) == 1


def test_parse_whatsapp_message_with_every_field_wrong_never_raises():
    ev = parse_event({
        "event": "whatsapp.message", "agent_id": ["support"], "session_id": {"id": 1},
        "from": None, "name": 3.25, "type": [], "text": {"nested": [1, {"deep": True}]},
        "message_id": False, "paused": "n/a",
    })
    assert isinstance(ev, WhatsAppMessageEvent)
    assert (ev.agent_id, ev.session_id, ev.from_, ev.name, ev.type, ev.text, ev.message_id, ev.paused) == (
        None, None, None, "3.25", None, None, "false", None)
    missing = parse_event({"event": "whatsapp.message"})
    assert (missing.session_id, missing.text, missing.paused) == (None, None, None)


def test_parse_keeps_nul_and_lone_surrogates_as_decoded():
    text = "a\x00b\ud800c\udfffd"
    ev = parse_event(json.loads(json.dumps({"event": "whatsapp.message", "text": text})))
    assert ev.text == text


def test_parse_history_data_and_channel_added():
    data = parse_event({"event": "history.data", "request_id": "r1", "call_id": "wa-1",
                        "messages": [{"role": "user", "content": "hi"}]})
    assert isinstance(data, HistoryDataEvent)
    assert (data.request_id, data.call_id, data.messages, data.error) == (
        "r1", "wa-1", [{"role": "user", "content": "hi"}], None)
    for error, text in (("no such session", "no such session"), ({"message": "gone"}, "gone"),
                        (True, "error"), ("", "error"), ({"code": 404}, "error"), (False, None)):
        assert parse_event({"event": "history.data", "error": error}).error == text
    added = parse_event({"event": "channel.added", "agent_id": "a", "type": "whatsapp", "ref": 123})
    assert isinstance(added, ChannelAddedEvent) and (added.type, added.ref) == ("whatsapp", "123")


# --- errors --------------------------------------------------------------------------


def test_error_classes():
    err = PinecallError.from_frame({"event": "error", "code": "SESSION_NOT_FOUND", "error": "gone"})
    assert err.code == "SESSION_NOT_FOUND" and err.message == "gone" and err.frame["error"] == "gone"
    assert err.raw is err.frame
    assert "SESSION_NOT_FOUND" in str(err)
    timeout = PinecallTimeout("slow")
    assert isinstance(timeout, PinecallError) and isinstance(timeout, TimeoutError)
    assert timeout.code == "TIMEOUT"
    bad = PinecallInvalidArgument("nope")
    assert isinstance(bad, ValueError) and bad.code == "INVALID_ARGUMENT"


# --- backoff -------------------------------------------------------------------------


def test_reconnect_delay_formula():
    low = lambda: 0.0  # noqa: E731
    high = lambda: 1.0  # noqa: E731
    assert [reconnect_delay(n, rand=low) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert reconnect_delay(0, rand=high) == pytest.approx(1.25)
    assert reconnect_delay(3, rand=high) == pytest.approx(10.0)
    assert reconnect_delay(10, rand=high) == pytest.approx(37.5)
    assert reconnect_delay(10_000, rand=low) == 30  # no overflow for a long outage
    for n in range(8):
        base = min(2**n, 30)
        for _ in range(50):
            assert base <= reconnect_delay(n) <= base * 1.25
    assert reconnect_delay(2, base=0.01, cap=0.1, jitter=0, rand=high) == pytest.approx(0.04)


def test_client_delay_uses_its_attributes():
    # The client's decisions read Policy.of(pc), a snapshot of its options at that moment.
    pc = Pinecall(api_key="k", url="ws://x")
    assert (pc.reconnect_base_delay, pc.reconnect_max_delay, pc.reconnect_jitter) == (1.0, 30.0, 0.25)
    assert Policy.of(pc) == Policy()  # the documented defaults
    pc.reconnect_base_delay, pc.reconnect_max_delay, pc.reconnect_jitter = 0.1, 0.5, 0.0
    assert [Policy.of(pc).reconnect_delay(n) for n in range(4)] == [0.1, 0.2, 0.4, 0.5]
    # conflicts: the backoff, but never less than the server's retry_after_s (capped for tests)
    pc.conflict_base_delay, pc.conflict_max_delay = 0.01, 0.08
    assert Policy.of(pc).conflict_delay(0, retry_after_s=None) == pytest.approx(0.01)
    assert Policy.of(pc).conflict_delay(9, retry_after_s=None) == pytest.approx(0.08)
    assert Policy.of(pc).conflict_delay(0, retry_after_s=5) == pytest.approx(5)
    pc.conflict_retry_after_cap = 0.3
    assert Policy.of(pc).conflict_delay(0, retry_after_s=5) == pytest.approx(0.3)


# --- construction and arguments ------------------------------------------------------


def test_url_and_key_defaults(monkeypatch):
    monkeypatch.delenv("PINECALL_URL", raising=False)
    monkeypatch.delenv("PINECALL_API_KEY", raising=False)
    pc = Pinecall()
    assert pc.ws_url == "wss://voice.pinecall.io/client" and pc.api_key is None
    monkeypatch.setenv("PINECALL_URL", "ws://127.0.0.1:9/")
    monkeypatch.setenv("PINECALL_API_KEY", "env-key")
    pc = Pinecall()
    assert pc.ws_url == "ws://127.0.0.1:9/client" and pc.api_key == "env-key"
    pc = Pinecall(api_key="arg", url="ws://h:1///")
    assert pc.ws_url == "ws://h:1/client" and pc.api_key == "arg"
    assert (pc.command_timeout, pc.connect_timeout, pc.ping_interval) == (10.0, 10.0, 30.0)
    assert pc.connected is False


def test_agent_config_and_handlers():
    pc = Pinecall(api_key="k", url="ws://x")
    agent = pc.agent("support", language="en", llm=None, prompt="p")
    assert pc.agent("support") is agent
    assert agent.config == {"language": "en", "prompt": "p"}
    assert protocol.create_frame(agent.agent_id, agent.config) == {
        "event": "agent.create", "agent_id": "support", "language": "en", "prompt": "p"}
    assert agent.registered is False

    @agent.on("whatsapp.message")
    def handler(event):
        pass

    message = Event(event="whatsapp.message")
    assert pc_dispatcher(pc).handlers_for(message, "support") == [handler]
    assert pc_dispatcher(pc).handlers_for(message, None) == []  # the agent's, not the client's
    with pytest.raises(ValueError):
        agent.add_whatsapp(phone_number_id="", access_token="t")
    agent.add_whatsapp(phone_number_id="123", access_token="tok", verify_token="", app_secret="s")
    assert agent.whatsapp["verify_token"] is None  # "" is unset
    assert protocol.channel_frame(agent.agent_id, agent.whatsapp) == {
        "event": "channel.add", "agent_id": "support", "type": "whatsapp", "ref": "123",
        "accessToken": "tok", "appSecret": "s",
    }


@pytest.mark.parametrize(
    "call",
    [
        lambda a: a.send_message(text="hi"),
        lambda a: a.send_message(session_id="wa-1", text=""),
        lambda a: a.send_message(session_id="wa-1", text="   "),
        lambda a: a.send_message(session_id="wa-1"),
        lambda a: a.send_message(contact="34", text=5),
        lambda a: a.send_message(session_id="", text="hi"),
        lambda a: a.pause("wa-1", contact="34"),
        lambda a: a.pause(5),
        lambda a: a.resume(contact=""),
        lambda a: a.pause("wa-1", timeout=0),
        lambda a: a.get_history(""),
        lambda a: a.get_history(None),
        lambda a: a.get_history(5),
        lambda a: a.get_history("wa-1", timeout=-1),
    ],
)
async def test_bad_arguments_raise_before_anything(call):
    pc = Pinecall(api_key="k", url="ws://x")
    agent = pc.agent("support")
    with pytest.raises(PinecallInvalidArgument) as info:
        await call(agent)
    assert isinstance(info.value, ValueError) and info.value.code == "INVALID_ARGUMENT"
    assert pc_nothing_pending(pc)
