"""The protocol core, sans I/O: plain dicts in, effects and frames out.

No sockets and no event loop: every test drives a ``ProtocolCore`` with decoded
frames (or raw text, for decoding), a fake clock and a fixed policy.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from pinecall_sdk import ErrorEvent, PinecallError, RegisteredEvent, SessionPausedEvent
from pinecall_sdk import protocol
from pinecall_sdk.protocol import (
    REGISTRATION_OVERDUE,
    RETRY_REGISTRATION,
    AgentDown,
    Command,
    Confirm,
    Confirmation,
    Deliver,
    HangUp,
    Later,
    Phase,
    Policy,
    ProtocolCore,
    Registered,
    Reject,
    handshake,
)

PHONE = "34612345678"
WHATSAPP = {"phone_number_id": "123", "access_token": "tok", "verify_token": None, "app_secret": "s",
            "phone": None}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_core(*agent_ids: str, policy: Policy | None = None, clock: Clock | None = None) -> ProtocolCore:
    core = ProtocolCore(policy=lambda: policy or Policy(reconnect_jitter=0.0), clock=clock or Clock())
    for agent_id in agent_ids or ("support",):
        core.add_agent(agent_id, {})
    return core


def frames_out(core: ProtocolCore) -> list[dict[str, Any]]:
    out = []
    while (frame := core.next_frame()) is not None:
        out.append(frame)
    return out


def summary(effects: list) -> list[tuple]:
    """Effects as short tuples, to compare whole sequences."""
    rows: list[tuple] = []
    for e in effects:
        if isinstance(e, Deliver):
            rows.append(("deliver", e.event.event, e.agent_id))
        elif isinstance(e, Confirm):
            rows.append(("confirm", e.command.seq))
        elif isinstance(e, Reject):
            rows.append(("reject", e.command.seq, e.error.code))
        elif isinstance(e, Registered):
            rows.append(("registered", e.agent_id))
        elif isinstance(e, AgentDown):
            rows.append(("down", e.agent_id, e.error.code))
        elif isinstance(e, Later):
            rows.append(("later", e.delay, e.timer.kind, e.timer.agent_id))
        elif isinstance(e, HangUp):
            rows.append(("hangup", e.error.code))
    return rows


def registered(*agent_ids: str, **options: Any) -> ProtocolCore:
    """A core on a live connection with every agent registered, nothing left to write."""
    core = make_core(*agent_ids, **options)
    core.connection_opened()
    for agent_id in agent_ids or ("support",):
        core.receive({"event": "agent.created", "agent_id": agent_id})
    frames_out(core)
    return core


def pause(core: ProtocolCore, session_id: str | None = None, contact: str | None = None,
          agent_id: str = "support", kind: str = "session.pause") -> Command:
    frame = protocol.target_frame(kind, agent_id, session_id, contact)
    return core.submit(agent_id, frame, session_id=session_id, contact=contact)


def in_flight(core: ProtocolCore, *cmds: Command) -> None:
    """Write what is queued: the commands are now in flight."""
    frames_out(core)
    assert all(c.sent for c in cmds)


# --- registration steps ------------------------------------------------------------------------


def test_connect_create_channel_then_queued_commands_in_order():
    core = make_core()
    core.agents["support"].config.update(language="en")
    core.set_whatsapp("support", WHATSAPP)
    first = pause(core, "wa-1")
    second = core.submit("support", protocol.send_frame("support", None, PHONE, "hi"), contact=PHONE)
    assert frames_out(core) == []  # no connection: nothing goes out

    effects = core.connection_opened()
    assert summary(effects) == [("later", 10.0, REGISTRATION_OVERDUE, "support")]
    assert frames_out(core) == [{"event": "agent.create", "agent_id": "support", "language": "en"}]
    assert core.agents["support"].phase is Phase.REGISTERING and not first.sent

    effects = core.receive({"event": "agent.created", "agent_id": "support"})
    assert summary(effects) == [
        ("deliver", "agent.created", "support"), ("registered", "support"),
        ("deliver", "registered", "support"),
    ]
    assert effects[2].event == RegisteredEvent(agent_id="support", resumed=False)
    assert frames_out(core) == [
        {"event": "channel.add", "agent_id": "support", "type": "whatsapp", "ref": "123",
         "accessToken": "tok", "appSecret": "s"},
        {"event": "session.pause", "agent_id": "support", "session_id": "wa-1"},
        {"event": "session.send", "agent_id": "support", "contact": PHONE, "text": "hi"},
    ]
    assert core.agents["support"].inflight == [first, second] and first.sent and second.sent
    assert core.settled()


def test_a_drop_fails_what_was_sent_and_keeps_what_was_queued():
    core = registered()
    sent = pause(core, "wa-1")
    in_flight(core, sent)
    queued = pause(core, "wa-2")
    assert summary(core.connection_lost()) == [("reject", sent.seq, "CONNECTION_LOST")]  # not resent
    state = core.agents["support"]
    assert state.phase is Phase.OFFLINE and not state.inflight
    assert list(state.outbox) == [queued] and not queued.sent
    assert frames_out(core) == []  # nowhere to write it

    core.connection_opened()
    assert [f["event"] for f in frames_out(core)] == ["agent.create"]
    effects = core.receive({"event": "agent.resumed", "agent_id": "support"})
    assert effects[2].event.resumed is True
    assert frames_out(core) == [{"event": "session.pause", "agent_id": "support", "session_id": "wa-2"}]


def test_protocol_frames_go_before_commands_and_commands_in_submission_order():
    core = registered("a", "b")
    cmds = [pause(core, "wa-1", agent_id="b"), pause(core, "wa-2", agent_id="a"), pause(core, "wa-3", agent_id="b")]
    core.receive({"event": "ping"})
    core.ping()
    assert [f.get("session_id", f["event"]) for f in frames_out(core)] == ["pong", "ping", "wa-1", "wa-2", "wa-3"]
    assert all(c.sent for c in cmds)


def test_a_channel_added_while_registered_follows_the_queued_commands_and_expects_nothing():
    core = registered()
    cmd = pause(core, "wa-1")
    core.set_whatsapp("support", WHATSAPP)
    assert [f["event"] for f in frames_out(core)] == ["session.pause", "channel.add"]
    assert core.agents["support"].inflight == [cmd]  # the channel.add is not waiting for anything


def test_an_agent_declared_on_a_live_connection_registers_at_once():
    core = registered()
    effects = core.add_agent("sales", {"language": "es", "llm": None})
    assert summary(effects) == [("later", 10.0, REGISTRATION_OVERDUE, "sales")]
    assert frames_out(core) == [{"event": "agent.create", "agent_id": "sales", "language": "es"}]
    assert not core.settled()


def test_an_unexpected_registration_answer_is_only_delivered():
    core = registered()
    assert summary(core.receive({"event": "agent.created", "agent_id": "support"})) == [
        ("deliver", "agent.created", "support")]
    assert summary(core.receive({"event": "agent.created", "agent_id": "nobody"})) == [
        ("deliver", "agent.created", None)]


def test_a_late_registration_answer_is_logged_and_stale_timers_are_ignored(caplog):
    core = make_core()
    (later,) = core.connection_opened()
    with caplog.at_level(logging.WARNING, logger="pinecall_sdk"):
        assert core.timer_fired(later.timer) == []
    assert "no agent.created/agent.resumed after 10.0 s; still waiting" in caplog.text
    caplog.clear()
    core.receive({"event": "agent.created", "agent_id": "support"})
    core.connection_lost()
    core.connection_opened()
    with caplog.at_level(logging.WARNING, logger="pinecall_sdk"):
        assert core.timer_fired(later.timer) == []  # of an earlier connection
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# --- confirmations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "targets, confirmation, matched",
    [
        # session.paused: exactly the target, first in first out
        ([("wa-1", None), ("wa-2", None)], {"session_id": "wa-2"}, 1),
        ([("wa-1", None), ("wa-1", None)], {"session_id": "wa-1"}, 0),
        ([(None, PHONE), ("wa-1", None)], {"contact": PHONE}, 0),
        ([("wa-1", None), (None, None)], {}, 1),
        # state changed by someone else: no command it answers
        ([("wa-1", None)], {"session_id": "wa-9"}, None),
        ([("wa-1", None)], {}, None),
        ([(None, None)], {"session_id": "wa-1"}, None),
        ([(None, PHONE)], {"contact": "34999"}, None),
    ],
)
def test_paused_confirms_only_a_command_with_exactly_its_target(targets, confirmation, matched):
    core = registered()
    cmds = [pause(core, sid, contact) for sid, contact in targets]
    in_flight(core, *cmds)
    effects = core.receive({"event": "session.paused", "agent_id": "support", **confirmation})
    if matched is None:
        assert summary(effects) == [("deliver", "session.paused", "support")]  # state, delivered
        assert core.agents["support"].inflight == cmds
    else:
        assert summary(effects) == [("confirm", cmds[matched].seq), ("deliver", "session.paused", "support")]
        assert isinstance(effects[0].event, SessionPausedEvent)
        assert cmds[matched] not in core.agents["support"].inflight


def test_resumed_answers_resumes_only():
    core = registered()
    paused, resumed = pause(core, "wa-1"), pause(core, "wa-1", kind="session.resume")
    in_flight(core, paused, resumed)
    effects = core.receive({"event": "session.resumed", "agent_id": "support", "session_id": "wa-1"})
    assert summary(effects)[0] == ("confirm", resumed.seq)


@pytest.mark.parametrize(
    "targets, confirmation, matched",
    [
        ([("wa-1", PHONE), ("wa-2", None)], {"session_id": "wa-2"}, 1),
        ([("wa-1", None), (None, PHONE)], {"contact": PHONE}, 1),
        # a contact send answered with the session the server used
        ([("wa-1", None), (None, PHONE)], {"session_id": "wa-9"}, 1),
        # nothing fits: the oldest send in flight (session.sent is never unsolicited)
        ([("wa-1", None), ("wa-2", None)], {"session_id": "wa-9"}, 0),
        ([("wa-1", None)], {}, 0),
    ],
)
def test_sent_matches_the_target_then_a_compatible_one_then_the_oldest(targets, confirmation, matched):
    core = registered()
    cmds = [core.submit("support", protocol.send_frame("support", sid, contact, "x"), session_id=sid,
                        contact=contact) for sid, contact in targets]
    in_flight(core, *cmds)
    effects = core.receive({"event": "session.sent", "agent_id": "support", **confirmation})
    assert summary(effects) == [("confirm", cmds[matched].seq), ("deliver", "session.sent", "support")]


def history(core: ProtocolCore, call_id: str, request_id: str) -> Command:
    frame = protocol.history_frame("support", call_id, request_id)
    return core.submit("support", frame, session_id=call_id, request_id=request_id)


def test_history_data_by_request_id_then_call_id_then_first_in_first_out():
    core = registered()
    one, two, three = history(core, "wa-1", "r1"), history(core, "wa-2", "r2"), history(core, "wa-3", "r3")
    in_flight(core, one, two, three)
    assert summary(core.receive({"event": "history.data", "request_id": "r2", "call_id": "wa-x"}))[0] == (
        "confirm", two.seq)
    # a request_id nobody sent: a stale answer, an event only (no agent_id: the client's handlers)
    assert summary(core.receive({"event": "history.data", "request_id": "old", "call_id": "wa-1"})) == [
        ("deliver", "history.data", None)]
    assert summary(core.receive({"event": "history.data", "call_id": "wa-3"}))[0] == ("confirm", three.seq)
    assert summary(core.receive({"event": "history.data"})) == [
        ("confirm", one.seq), ("deliver", "history.data", "support")]  # to the command's agent
    assert summary(core.receive({"event": "history.data"})) == [("deliver", "history.data", None)]


def test_history_data_with_an_error_rejects_and_is_delivered():
    core = registered()
    cmd = history(core, "wa-1", "r1")
    in_flight(core, cmd)
    effects = core.receive({"event": "history.data", "request_id": "r1", "error": {"message": "gone"}})
    assert summary(effects) == [("reject", cmd.seq, "SESSION_NOT_FOUND"), ("deliver", "history.data", "support")]
    assert effects[0].error.message == "history.get for session 'wa-1' (agent 'support'): gone"
    assert effects[0].error.frame["error"] == {"message": "gone"}


def test_a_new_confirmation_is_one_row_in_the_table(monkeypatch):
    """Where the voice part goes: a command's frame, and the event that confirms it."""
    monkeypatch.setitem(protocol.CONFIRMATIONS, "call.hung_up",
                        Confirmation("call.hangup", lambda ev, cmds: cmds[0] if cmds else None))
    core = registered()
    cmd = core.submit("support", {"event": "call.hangup", "agent_id": "support", "call_id": "c1"})
    in_flight(core, cmd)
    effects = core.receive({"event": "call.hung_up", "agent_id": "support", "call_id": "c1"})
    assert summary(effects) == [("confirm", cmd.seq), ("deliver", "call.hung_up", "support")]


def test_a_withdrawn_command_is_never_sent_and_its_late_answer_is_only_an_event():
    core = registered()
    queued = pause(core, "wa-1")
    core.withdraw(queued)
    assert frames_out(core) == []
    sent = pause(core, "wa-2")
    in_flight(core, sent)
    core.withdraw(sent)
    assert summary(core.receive({"event": "session.paused", "agent_id": "support", "session_id": "wa-2"})) == [
        ("deliver", "session.paused", "support")]


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error, matched",
    [
        ({"code": "SESSION_NOT_FOUND", "session_id": "wa-2"}, 1),
        ({"code": "SESSION_NOT_FOUND", "contact": PHONE}, 2),
        ({"code": "INVALID_COMMAND", "message": "nope"}, 0),  # the oldest in flight
        ({"code": "INVALID_COMMAND", "agent_id": "support", "session_id": "wa-9"}, 0),
        ({"code": "SESSION_NOT_FOUND", "error": "gone", "session_id": "wa-2"}, 1),  # older servers
    ],
)
def test_an_error_fails_the_command_of_its_session_or_contact_else_the_oldest(error, matched):
    core = registered()
    cmds = [pause(core, "wa-1"), pause(core, "wa-2"), pause(core, contact=PHONE)]
    in_flight(core, *cmds)
    effects = core.receive({"event": "error", **error})
    assert summary(effects) == [("reject", cmds[matched].seq, error["code"])]  # not delivered
    assert effects[0].error.frame == {"event": "error", **error}


def test_an_error_nobody_waits_for_goes_to_the_handlers(caplog):
    core = registered()
    with caplog.at_level(logging.WARNING, logger="pinecall_sdk"):
        effects = core.receive({"event": "error", "code": "RATE_LIMITED", "message": "slow down"})
    assert summary(effects) == [("deliver", "error", None)]  # no agent_id: the client's handlers
    assert isinstance(effects[0].event, ErrorEvent) and not effects[0].event.fatal
    assert "server error: RATE_LIMITED slow down" in caplog.text


def test_a_rejected_key_hangs_up_and_is_reported_later():
    core = registered()
    effects = core.receive({"event": "error", "code": "UNAUTHORIZED", "message": "invalid API key"})
    assert summary(effects) == [("hangup", "UNAUTHORIZED")]
    assert effects[0].error.message == "invalid API key"


# --- registration refusals ------------------------------------------------------------------------


def conflict(**fields: Any) -> dict[str, Any]:
    return {"event": "error", "code": "AGENT_CONFLICT", "agent_id": "support", "message": "held",
            "retry_after_s": 5, "holder_alive": True, **fields}


def test_a_conflict_is_retried_with_backoff_then_given_up():
    clock = Clock()
    core = make_core(clock=clock, policy=Policy(reconnect_jitter=0.0, conflict_give_up_after=90.0,
                                                conflict_base_delay=1.0, conflict_max_delay=15.0))
    queued = pause(core, contact=PHONE)
    core.connection_opened()
    frames_out(core)

    effects = core.receive(conflict())
    assert summary(effects) == [("later", 5.0, RETRY_REGISTRATION, "support")]  # retry_after_s wins
    assert core.agents["support"].phase is Phase.BACKING_OFF
    assert frames_out(core) == [] and not queued.sent
    # during the backoff an answer to the old agent.create is not a registration
    assert summary(core.receive({"event": "agent.created", "agent_id": "support"})) == [
        ("deliver", "agent.created", "support")]

    clock.now += 5
    retry = effects[0].timer
    assert summary(core.timer_fired(retry)) == [("later", 10.0, REGISTRATION_OVERDUE, "support")]
    assert [f["event"] for f in frames_out(core)] == ["agent.create"]
    assert core.timer_fired(retry) == []  # fired twice: the second is stale

    effects = core.receive(conflict(retry_after_s=None))
    assert summary(effects) == [("later", 2.0, RETRY_REGISTRATION, "support")]  # 1 s * 2**1
    clock.now += 86  # 91 s after the first refusal
    core.timer_fired(effects[0].timer)
    frames_out(core)
    effects = core.receive(conflict())
    assert summary(effects) == [
        ("reject", queued.seq, "AGENT_CONFLICT"), ("down", "support", "AGENT_CONFLICT"),
        ("deliver", "error", "support"),
    ]
    report = effects[2].event
    assert report.fatal and report.code == "AGENT_CONFLICT" and report.retry_after_s == 5
    assert "gave up registering after 91.0 s of AGENT_CONFLICT (held)" in report.message
    state = core.agents["support"]
    assert state.phase is Phase.REFUSED and state.failure.code == "AGENT_CONFLICT"
    with pytest.raises(PinecallError) as info:
        pause(core, "wa-1")
    assert info.value.code == "AGENT_CONFLICT"
    assert core.settled()  # nothing more will happen on this connection

    # the next connection tries again
    core.connection_lost()
    core.connection_opened()
    assert state.phase is Phase.REGISTERING and state.failure is None


def test_the_backoff_is_cut_to_what_is_left_of_the_give_up_window():
    clock = Clock()
    core = make_core(clock=clock, policy=Policy(reconnect_jitter=0.0, conflict_give_up_after=3.0))
    core.connection_opened()
    assert summary(core.receive(conflict()))[0] == ("later", 3.0, RETRY_REGISTRATION, "support")


@pytest.mark.parametrize(
    "frame, code, words",
    [
        ({"code": "AGENT_CONFLICT_FATAL", "message": "taken for good"}, "AGENT_CONFLICT_FATAL", "taken for good"),
        ({"code": "SERVER_AT_CAPACITY", "message": "full", "used": 1, "limit": 1}, "SERVER_AT_CAPACITY",
         "full (used 1 of 1)"),
        # a refusal the client does not know, for an agent registering with no command in flight
        ({"code": "BAD_CONFIG", "message": "no such llm", "agent_id": "support"}, "BAD_CONFIG", "no such llm"),
        ({"message": "no", "agent_id": "support"}, "REGISTRATION_FAILED", "no"),
    ],
)
def test_other_refusals_are_given_up_at_once(frame, code, words):
    core = make_core()
    core.connection_opened()
    effects = core.receive({"event": "error", **frame})  # a known refusal without agent_id: the one registering
    assert summary(effects) == [("down", "support", code), ("deliver", "error", "support")]
    assert effects[1].event.fatal and words in effects[1].event.message


def test_a_refusal_when_nothing_registers_is_only_an_error_event():
    core = registered()
    assert summary(core.receive(conflict())) == [("deliver", "error", "support")]


def test_reregister_tries_again_now():
    core = make_core()
    core.connection_opened()
    core.receive({"event": "error", "code": "AGENT_CONFLICT_FATAL"})
    frames_out(core)
    core.reregister("support")
    assert core.agents["support"].failure is None
    assert [f["event"] for f in frames_out(core)] == ["agent.create"]


# --- displacement --------------------------------------------------------------------------------


def test_displacing_one_agent_of_two_keeps_the_connection():
    core = registered("a", "b")
    cmd = pause(core, "wa-1", agent_id="a")
    in_flight(core, cmd)
    effects = core.receive({"event": "agent.displaced", "agent_id": "a", "reason": "taken"})
    assert summary(effects) == [
        ("deliver", "agent.displaced", "a"), ("reject", cmd.seq, "DISPLACED"), ("down", "a", "DISPLACED"),
        ("deliver", "error", "a"),
    ]
    assert core.agents["a"].phase is Phase.DISPLACED
    # the last one: nothing left on this connection, hang up and do not reconnect
    effects = core.receive({"event": "agent.displaced", "agent_id": "b", "reason": "taken"})
    assert summary(effects)[-1] == ("hangup", "DISPLACED")
    # a new connection leaves displaced agents alone; reregister takes one back
    core.connection_lost()
    core.connection_opened()
    assert frames_out(core) == []
    core.reregister("a")
    assert frames_out(core) == [{"event": "agent.create", "agent_id": "a"}]


def test_displaced_without_agent_id_is_every_agent():
    core = registered("a", "b")
    effects = core.receive({"event": "agent.displaced"})
    assert [row for row in summary(effects) if row[0] in ("down", "hangup")] == [
        ("down", "a", "DISPLACED"), ("down", "b", "DISPLACED"), ("hangup", "DISPLACED")]
    # displaced again: no second report (still nothing left to do: hang up)
    assert summary(core.receive({"event": "agent.displaced", "agent_id": "a"})) == [
        ("deliver", "agent.displaced", "a"), ("hangup", "DISPLACED")]


def test_displace_all_and_stop_all():
    core = registered()
    cmd = pause(core, "wa-1")
    assert summary(core.displace_all("Displaced by a new connection")) == [
        ("reject", cmd.seq, "DISPLACED"), ("down", "support", "DISPLACED"), ("deliver", "error", "support")]
    core = registered()
    cmd = pause(core, "wa-1")
    err = PinecallError("bad key", code="UNAUTHORIZED")
    effects = core.stop_all(err, report=True)
    assert summary(effects) == [
        ("reject", cmd.seq, "UNAUTHORIZED"), ("down", "support", "UNAUTHORIZED"), ("deliver", "error", None)]
    assert effects[0].error is not err  # a fresh exception per waiting call
    assert core.agents["support"].phase is Phase.OFFLINE


# --- frames in: decoding, routing, keep-alive -------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    ["not json", "[]", "null", '{"event": 5}', '{"agent_id": "x"}', "[" * 100_000, b"\xff\xfe{",
     {"agent_id": "x"}, {"event": ""}],
)
def test_unreadable_frames_are_skipped_with_one_log_line(data, caplog):
    core = registered()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pinecall_sdk"):
        assert core.receive(data) == []
    (record,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "skipping a frame" in record.getMessage() and len(record.getMessage()) < 600


@pytest.mark.parametrize(
    "data",
    [
        {"event": "whatsapp.message", "agent_id": "support", "text": "hi"},
        json.dumps({"event": "whatsapp.message", "agent_id": "support", "text": "hi"}),
        json.dumps({"event": "whatsapp.message", "agent_id": "support", "text": "hi"}).encode(),
    ],
    ids=["dict", "text", "binary"],
)
def test_a_frame_is_read_from_a_dict_text_or_utf8_bytes(data):
    (effect,) = registered().receive(data)
    assert effect.event.text == "hi" and effect.agent_id == "support"


def test_routing_of_events_without_agent_id():
    core = registered("other", "support")
    core.set_whatsapp("support", WHATSAPP)
    message = {"event": "whatsapp.message", "session_id": "wa-x", "text": "hi"}
    assert summary(core.receive(message)) == [("deliver", "whatsapp.message", "support")]
    assert summary(core.receive({"event": "whatsapp.reaction", "agent_id": "other"})) == [
        ("deliver", "whatsapp.reaction", "other")]
    assert summary(core.receive({"event": "something.new"})) == [("deliver", "something.new", None)]
    assert summary(registered("solo").receive(message)) == [("deliver", "whatsapp.message", "solo")]


def test_ping_is_answered_and_pong_is_timed():
    clock = Clock()
    core = registered(clock=clock)
    assert summary(core.receive({"event": "ping"})) == [("deliver", "ping", None)]
    assert frames_out(core) == [{"event": "pong"}]
    assert core.last_pong is None
    core.receive({"event": "pong"})
    assert core.last_pong == clock.now


@pytest.mark.parametrize(
    "frame, connected, reply, code",
    [
        ({"event": "connected"}, True, None, None),
        ({"event": "authenticated"}, False, None, None),
        ({"event": "ping"}, False, {"event": "pong"}, None),
        ({"event": "error", "code": "UNAUTHORIZED", "message": "bad key"}, False, None, "UNAUTHORIZED"),
        ({"event": "error", "message": "no"}, False, None, "UNAUTHORIZED"),
        ({"event": "error", "code": "SERVER_AT_CAPACITY"}, False, None, "SERVER_AT_CAPACITY"),
        ("not json", False, None, None),
    ],
)
def test_handshake_steps(frame, connected, reply, code):
    step = handshake(frame)
    assert (step.connected is not None, step.reply, step.error.code if step.error else None) == (
        connected, reply, code)


def test_command_frames():
    assert protocol.connect_frame(None) == {"event": "connect", "api_key": ""}
    assert protocol.create_frame("a", {"language": "en", "voice": None}) == {
        "event": "agent.create", "agent_id": "a", "language": "en"}
    assert protocol.target_frame("session.pause", "a") == {"event": "session.pause", "agent_id": "a"}
    assert protocol.target_frame("session.resume", "a", contact=PHONE) == {
        "event": "session.resume", "agent_id": "a", "contact": PHONE}
    assert protocol.send_frame("a", "wa-1", PHONE, "hi") == {
        "event": "session.send", "agent_id": "a", "session_id": "wa-1", "contact": PHONE, "text": "hi"}
    first, second = protocol.history_frame("a", "wa-1"), protocol.history_frame("a", "wa-1")
    assert first["request_id"] != second["request_id"] and first["call_id"] == "wa-1"
    assert protocol.channel_frame("a", {**WHATSAPP, "verify_token": "v", "phone": "+34"}) == {
        "event": "channel.add", "agent_id": "a", "type": "whatsapp", "ref": "123", "accessToken": "tok",
        "verifyToken": "v", "appSecret": "s", "phone": "+34"}


def test_policy_conflict_delay_honours_retry_after_within_its_cap():
    policy = Policy(reconnect_jitter=0.0, conflict_base_delay=0.01, conflict_max_delay=0.08)
    assert policy.conflict_delay(0, None) == pytest.approx(0.01)
    assert policy.conflict_delay(9, None) == pytest.approx(0.08)
    assert policy.conflict_delay(0, 5) == pytest.approx(5)
    assert Policy(reconnect_jitter=0.0, conflict_retry_after_cap=0.3).conflict_delay(0, 5) == pytest.approx(1.0)
    assert Policy(reconnect_jitter=0.0, conflict_base_delay=0.01, conflict_retry_after_cap=0.3).conflict_delay(
        0, 5) == pytest.approx(0.3)
