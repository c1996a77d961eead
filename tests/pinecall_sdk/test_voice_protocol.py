"""The protocol core's voice part, sans I/O: phone channels, per-call confirmations,
error routing, call bookkeeping, agent ids as the server may spell them."""

from __future__ import annotations

from typing import Any

import pytest

from pinecall_sdk import BotSpeakingEvent, CallEndedEvent, ErrorEvent
from pinecall_sdk import protocol
from pinecall_sdk.protocol import Command, ProtocolCore

from .test_protocol import frames_out, in_flight, make_core, pause, registered, summary

CALL = "CA0123456789abcdef0123456789abcdef"
OTHER = "CAffffffffffffffffffffffffffffffff"
NUMBER = "+13186330963"


def call_cmd(core: ProtocolCore, frame: dict[str, Any], message_id: str | None = None) -> Command:
    return core.submit("support", frame, call_id=frame["call_id"], message_id=message_id)


def started(core: ProtocolCore, call_id: str = CALL, agent_id: str = "support") -> None:
    core.receive({"event": "call.started", "agent_id": agent_id, "call_id": call_id})


# --- phone channels ---------------------------------------------------------------------------


def test_phones_follow_whatsapp_after_every_registration_and_channel_added_marks_them():
    core = make_core()
    core.set_phone("support", NUMBER, {"ringing": True, "voice": None})
    core.set_phone("support", "sip:support@example.com", {})
    core.connection_opened()
    frames_out(core)
    core.receive({"event": "agent.created", "agent_id": "support"})
    assert frames_out(core) == [
        {"event": "channel.add", "agent_id": "support", "type": "phone", "ref": NUMBER, "ringing": True},
        {"event": "channel.add", "agent_id": "support", "type": "phone", "ref": "sip:support@example.com"},
    ]
    phones = core.agents["support"].phones
    assert [p.status for p in phones.values()] == ["pending", "pending"]
    effects = core.receive({"event": "channel.added", "agent_id": "support", "type": "phone", "ref": NUMBER})
    assert summary(effects) == [("deliver", "channel.added", "support")]
    assert phones[NUMBER].status == "added"

    core.connection_lost()
    assert phones[NUMBER].status == "pending"
    core.connection_opened()
    frames_out(core)
    core.receive({"event": "agent.resumed", "agent_id": "support"})
    assert [f["ref"] for f in frames_out(core)] == [NUMBER, "sip:support@example.com"]


def test_a_phone_added_while_registered_goes_after_the_queued_commands_and_expects_nothing():
    core = registered()
    first = pause(core, "wa-1")
    core.set_phone("support", NUMBER, {})
    assert [f["event"] for f in frames_out(core)] == ["session.pause", "channel.add"]
    assert core.agents["support"].inflight == [first]


def test_phone_in_use_refuses_that_number_only_and_fails_no_command():
    core = registered()
    core.set_phone("support", NUMBER, {})
    core.set_phone("support", "+34910000000", {})
    waiting = pause(core, "wa-1")
    in_flight(core, waiting)
    frame = {"event": "error", "code": "PHONE_IN_USE", "message": "in use", "phone": NUMBER,
             "agent_id": "support"}
    effects = core.receive(frame)
    assert summary(effects) == [("deliver", "error", "support")]
    report = effects[0].event
    assert isinstance(report, ErrorEvent) and report.code == "PHONE_IN_USE" and report.phone == NUMBER
    assert NUMBER in report.message and "another agent" in report.message and report.raw == frame
    assert not report.fatal
    phone = core.agents["support"].phones[NUMBER]
    assert phone.status == "refused" and phone.error.code == "PHONE_IN_USE"
    assert core.agents["support"].inflight == [waiting]  # the pause still waits for its answer

    # Forgotten on the next registration; adding it again clears the refusal.
    core.connection_lost()
    core.connection_opened()
    frames_out(core)
    core.receive({"event": "agent.resumed", "agent_id": "support"})
    assert [f.get("ref") for f in frames_out(core)] == ["+34910000000"]
    core.set_phone("support", NUMBER, {})
    assert core.agents["support"].phones[NUMBER].status == "pending"


def test_phone_in_use_without_agent_id_finds_the_agent_that_has_the_number():
    core = registered("support", "sales")
    core.set_phone("sales", NUMBER, {})
    effects = core.receive({"event": "error", "code": "PHONE_IN_USE", "phone": NUMBER})
    assert summary(effects) == [("deliver", "error", "sales")]


def test_command_frames_of_the_voice_part():
    assert protocol.say_frame(CALL, "msg_x", "Hello", True) == {
        "event": "bot.reply", "call_id": CALL, "message_id": "msg_x", "text": "Hello",
        "in_reply_to": "", "add_to_history": True}
    assert protocol.say_frame(CALL, "msg_x", "Hello", False) == {
        "event": "bot.reply", "call_id": CALL, "message_id": "msg_x", "text": "Hello", "in_reply_to": ""}
    assert protocol.forward_frame(CALL, "+15551234567") == {
        "event": "call.forward", "call_id": CALL, "to": "+15551234567", "message": "", "announce": False}
    assert protocol.cancel_frame(CALL) == {"event": "bot.cancel", "call_id": CALL}
    assert protocol.cancel_frame(CALL, "msg_x") == {"event": "bot.cancel", "call_id": CALL, "message_id": "msg_x"}
    assert protocol.call_frame("call.hold", CALL) == {"event": "call.hold", "call_id": CALL}
    assert protocol.accept_frame("support", CALL) == {"event": "call.accept", "agent_id": "support", "call_id": CALL}
    assert protocol.reject_frame("support", CALL, "busy") == {
        "event": "call.reject", "agent_id": "support", "call_id": CALL, "reason": "busy"}
    assert protocol.phone_frame("support", NUMBER, {"language": "es", "stt": None}) == {
        "event": "channel.add", "agent_id": "support", "type": "phone", "ref": NUMBER, "language": "es"}


@pytest.mark.parametrize("ref, ok", [
    ("+13186330963", True), ("+1234567", True), ("+123456789012345", True), ("sip:a@b.example", True),
    ("13186330963", False), ("+123456", False), ("+1234567890123456", False), ("+1 318 633 0963", False),
    ("sip:", False), ("sip:a b", False), ("", False), (None, False), (13186330963, False),
])
def test_phone_refs_are_e164_or_sip(ref, ok):
    assert protocol.check_phone_ref(ref) is ok


# --- confirmations ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind, answer, extra", [
    ("call.hold", "call.held", {}),
    ("call.unhold", "call.unheld", {}),
    ("call.mute", "call.muted", {}),
    ("call.unmute", "call.unmuted", {"muted_transcript": "hello?"}),
    ("call.forward", "call.forwarded", {"to": "+15551234567"}),
])
def test_a_call_confirmation_matches_a_command_of_that_call_only(kind, answer, extra):
    core = registered()
    frame = protocol.forward_frame if kind == "call.forward" else None
    make = (lambda c: frame(c, "+15551234567")) if frame else (lambda c: protocol.call_frame(kind, c))
    mine, other = call_cmd(core, make(CALL)), call_cmd(core, make(OTHER))
    in_flight(core, mine, other)
    assert summary(core.receive({"event": answer, "agent_id": "support", **extra})) == [
        ("deliver", answer, "support")]  # no call id: never matched blindly
    effects = core.receive({"event": answer, "agent_id": "support", "call_id": OTHER, **extra})
    assert summary(effects) == [("confirm", other.seq), ("deliver", answer, "support")]
    assert core.agents["support"].inflight == [mine]


def test_bot_speaking_confirms_the_reply_with_that_message_id():
    core = registered()
    first = call_cmd(core, protocol.say_frame(CALL, "msg_1", "one", True), "msg_1")
    second = call_cmd(core, protocol.say_frame(CALL, "msg_2", "two", True), "msg_2")
    in_flight(core, first, second)
    # The AI's own line on the same call confirms nothing.
    effects = core.receive({"event": "bot.speaking", "agent_id": "support", "call_id": CALL,
                            "message_id": "msg_ai", "text": ""})
    assert summary(effects) == [("deliver", "bot.speaking", "support")]
    effects = core.receive({"event": "bot.speaking", "agent_id": "support", "call_id": CALL,
                            "message_id": "msg_2", "text": "two"})
    assert summary(effects) == [("confirm", second.seq), ("deliver", "bot.speaking", "support")]
    assert isinstance(effects[0].event, BotSpeakingEvent)


@pytest.mark.parametrize("answer, code", [("reply.rejected", "REPLY_REJECTED"),
                                          ("message.aborted", "MESSAGE_ABORTED")])
def test_a_dropped_line_fails_its_reply(answer, code):
    core = registered()
    cmd = call_cmd(core, protocol.say_frame(CALL, "msg_1", "one", True), "msg_1")
    in_flight(core, cmd)
    effects = core.receive({"event": answer, "agent_id": "support", "call_id": CALL,
                            "message_id": "msg_1", "reason": "message_obsolete"})
    assert summary(effects) == [("reject", cmd.seq, code), ("deliver", answer, "support")]
    assert "message_obsolete" in effects[0].error.message and CALL in effects[0].error.message


@pytest.mark.parametrize("answer", ["bot.interrupted", "bot.finished"])
def test_a_cancel_is_confirmed_when_the_line_stops_or_ends(answer):
    core = registered()
    any_line = call_cmd(core, protocol.cancel_frame(CALL), None)
    one_line = call_cmd(core, protocol.cancel_frame(OTHER, "msg_2"), "msg_2")
    in_flight(core, any_line, one_line)
    assert summary(core.receive({"event": answer, "agent_id": "support", "call_id": OTHER,
                                 "message_id": "msg_1"})) == [("deliver", answer, "support")]
    effects = core.receive({"event": answer, "agent_id": "support", "call_id": OTHER, "message_id": "msg_2"})
    assert summary(effects)[0] == ("confirm", one_line.seq)
    effects = core.receive({"event": answer, "agent_id": "support", "call_id": CALL, "message_id": "msg_9"})
    assert summary(effects)[0] == ("confirm", any_line.seq)


def test_call_ended_confirms_a_hangup_and_fails_the_other_commands_of_that_call():
    core = registered()
    started(core)
    hangup = call_cmd(core, protocol.call_frame("call.hangup", CALL))
    hold = call_cmd(core, protocol.call_frame("call.hold", CALL))
    cancel = call_cmd(core, protocol.cancel_frame(CALL))
    elsewhere = call_cmd(core, protocol.call_frame("call.hold", OTHER))
    session = pause(core, "wa-1")
    in_flight(core, hangup, hold, cancel, elsewhere, session)
    effects = core.receive({"event": "call.ended", "agent_id": "support", "call_id": CALL,
                            "reason": "client_hangup"})
    assert summary(effects) == [
        ("confirm", hangup.seq), ("reject", hold.seq, "CALL_ENDED"), ("confirm", cancel.seq),
        ("deliver", "call.ended", "support"),
    ]
    assert "client_hangup" in effects[1].error.message
    assert core.agents["support"].inflight == [elsewhere, session]
    assert CALL not in core.calls


def test_call_error_fails_the_commands_of_that_call_with_its_code():
    core = registered()
    hold = call_cmd(core, protocol.call_frame("call.hold", CALL))
    in_flight(core, hold)
    effects = core.receive({"event": "call.error", "agent_id": "support", "call_id": CALL,
                            "error": "media failed", "code": "MEDIA"})
    assert summary(effects) == [("reject", hold.seq, "MEDIA"), ("deliver", "call.error", "support")]


# --- errors -------------------------------------------------------------------------------------


def test_an_error_about_a_call_fails_a_command_of_that_call_never_another():
    core = registered()
    session = pause(core, "wa-1")
    mine = call_cmd(core, protocol.call_frame("call.hold", CALL))
    in_flight(core, session, mine)
    effects = core.receive({"event": "error", "code": "CALL_NOT_FOUND", "message": "no such call",
                            "call_id": CALL})
    assert summary(effects) == [("reject", mine.seq, "CALL_NOT_FOUND")]
    assert effects[0].error.message == f"call.hold for call {CALL!r} (agent 'support'): no such call"
    # An error about a call nobody waits for is only an event: the pause is not failed.
    effects = core.receive({"event": "error", "code": "CALL_NOT_FOUND", "call_id": OTHER})
    assert summary(effects) == [("deliver", "error", None)]
    assert core.agents["support"].inflight == [session]


# --- calls: routing and bookkeeping ---------------------------------------------------------


@pytest.mark.parametrize("agent_id", ["support", "org_42:support", "Support", "org_42:Support"])
def test_agent_ids_from_the_server_match_ours(agent_id):
    core = registered()
    effects = core.receive({"event": "user.message", "agent_id": agent_id, "call_id": CALL, "text": "hi"})
    assert summary(effects) == [("deliver", "user.message", "support")]


def test_slugified_names_and_org_prefixes_resolve():
    agents = {"Support_Team": 1, "sales desk": 2, "org:x": 3}
    assert protocol.resolve_agent("support-team", agents) == 1
    assert protocol.resolve_agent("acme:support-team", agents) == 1
    assert protocol.resolve_agent("Sales_Desk", agents) == 2
    assert protocol.resolve_agent("org:x", agents) == 3
    assert protocol.resolve_agent("acme:billing", agents) is None


def test_a_call_event_without_agent_id_goes_to_the_agent_whose_call_it_is():
    core = registered("support", "sales")
    started(core, agent_id="sales")
    effects = core.receive({"event": "bot.word", "call_id": CALL, "word": "Hi"})
    assert summary(effects) == [("deliver", "bot.word", "sales")]
    effects = core.receive({"event": "bot.word", "call_id": OTHER, "word": "Hi"})  # a call it never saw
    assert summary(effects) == [("deliver", "bot.word", None)]


def test_the_core_knows_what_the_bot_is_saying():
    core = registered()
    assert core.is_speaking(CALL) is None  # never seen
    core.receive({"event": "bot.word", "agent_id": "support", "call_id": CALL, "message_id": "m0"})
    assert core.is_speaking(CALL) is None  # seen mid-call: unknown until a line starts or ends
    core.receive({"event": "bot.finished", "agent_id": "support", "call_id": CALL, "message_id": "m0"})
    assert core.is_speaking(CALL) is False
    core.receive({"event": "bot.speaking", "agent_id": "support", "call_id": CALL, "message_id": "m1"})
    assert core.is_speaking(CALL) is True and core.is_speaking(CALL, "m1") is True
    assert core.is_speaking(CALL, "m2") is False
    core.receive({"event": "bot.finished", "agent_id": "support", "call_id": CALL, "message_id": "m0"})
    assert core.is_speaking(CALL) is True  # an older line's end does not silence the current one
    core.receive({"event": "bot.interrupted", "agent_id": "support", "call_id": CALL, "message_id": "m1"})
    assert core.is_speaking(CALL) is False
    started(core, OTHER)
    assert core.is_speaking(OTHER) is False
    core.receive({"event": "call.ended", "agent_id": "support", "call_id": OTHER})
    assert core.is_speaking(OTHER) is None and OTHER not in core.calls


def test_a_lost_connection_ends_the_calls_it_knew_locally():
    core = registered()
    started(core)
    hold = call_cmd(core, protocol.call_frame("call.hold", CALL))
    in_flight(core, hold)
    effects = core.connection_lost()
    assert summary(effects) == [("reject", hold.seq, "CONNECTION_LOST"), ("deliver", "call.ended", "support")]
    ended = effects[1].event
    assert isinstance(ended, CallEndedEvent) and ended.local and ended.reason == "connection_lost"
    assert ended.call_id == CALL and ended.raw["local"] is True
    assert core.calls == {}
    assert core.connection_lost() == []  # once


def test_a_rejected_call_is_forgotten():
    core = registered()
    core.receive({"event": "call.ringing", "agent_id": "support", "call_id": CALL})
    assert CALL in core.calls
    core.receive({"event": "call.rejected", "agent_id": "support", "call_id": CALL, "reason": "busy"})
    assert CALL not in core.calls
