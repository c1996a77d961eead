"""Voice calls stored: one call per `call_id`, final lines only, idempotent."""

import pytest

from conversations import ingest, notify
from conversations.models import Call, CallUtterance

A = dict(agent_id="support", call_id="CA1")


def started(**extra):
    return ingest.ingest_call_started(
        **A, from_number="+14155550123", to_number="+14155550100", direction="inbound", **extra
    )


@pytest.mark.django_db
class TestCalls:
    def test_a_call_started_twice_is_one_call(self):
        started()
        started()
        call = Call.objects.get()
        assert (call.call_id, call.from_number, call.to_number, call.direction, call.state) == (
            "CA1", "+14155550123", "+14155550100", "inbound", "live"
        )

    def test_caller_and_ai_lines_once_each_by_message_id(self):
        started()
        for _ in range(2):
            ingest.ingest_call_caller_line(**A, message_id="um_1", text="Where is my order?")
            ingest.ingest_call_line_confirmed(**A, message_id="msg_1", text="Let me check.")
        lines = list(CallUtterance.objects.values_list("speaker", "text"))
        assert lines == [("caller", "Where is my order?"), ("ai", "Let me check.")]

    def test_a_line_for_a_call_never_seen_starting_creates_the_call(self):
        ingest.ingest_call_caller_line(**A, message_id="um_1", text="Hello")
        assert Call.objects.get().utterances.get().text == "Hello"

    def test_a_supervisor_line_stays_theirs_in_either_order(self):
        call = started()
        ingest.ingest_call_line_confirmed(**A, message_id="sup_1", text="A person here.")
        ingest.call_supervisor_line(call=call, message_id="sup_1", text="A person here.")
        ingest.call_supervisor_line(call=call, message_id="sup_2", text="One moment.")
        ingest.ingest_call_line_confirmed(**A, message_id="sup_2", text="One moment.")
        assert list(CallUtterance.objects.values_list("message_id", "speaker")) == [
            ("sup_1", "supervisor"), ("sup_2", "supervisor")
        ]

    def test_an_interruption_marks_the_line_whichever_came_first(self):
        started()
        ingest.ingest_call_line_confirmed(**A, message_id="msg_1", text="Your order is")
        ingest.ingest_call_interrupted(**A, message_id="msg_1", words_spoken=3)
        ingest.ingest_call_interrupted(**A, message_id="msg_2", words_spoken=1)
        ingest.ingest_call_line_confirmed(**A, message_id="msg_2", text="Sure")
        lines = list(CallUtterance.objects.values_list("message_id", "text", "interrupted", "words_spoken"))
        assert lines == [("msg_1", "Your order is", True, 3), ("msg_2", "Sure", True, 1)]

    def test_forwarded_then_ended_keeps_reason_duration_and_number(self):
        started()
        ingest.ingest_call_forwarded(**A, to="+34600000000")
        ingest.ingest_call_ended(**A, reason="forwarded", duration_seconds=12.5, ended_at=1_800_000_000)
        ingest.ingest_call_ended(**A, reason="connection_lost")
        call = Call.objects.get()
        assert (call.state, call.end_reason, call.duration_seconds, call.forwarded_to) == (
            "ended", "forwarded", 12.5, "+34600000000"
        )
        assert call.ended_at.timestamp() == 1_800_000_000

    def test_a_caller_asking_for_a_person_needs_a_human(self):
        started()
        ingest.ingest_call_caller_line(**A, message_id="um_1", text="Hi")
        assert Call.objects.get().needs_human_since is None
        ingest.ingest_call_caller_line(**A, message_id="um_2", text="I want to talk to a person please")
        assert Call.objects.get().needs_human_since is not None

    def test_a_call_event_without_call_id_is_refused(self):
        with pytest.raises(ValueError):
            ingest.ingest_call_started(agent_id="support", call_id="")


def test_call_groups_are_valid_channel_group_names():
    assert notify.call_group("CA0123abc") == "call-CA0123abc"
    odd = notify.call_group("sip:+1 415/ü" * 10)
    assert len(odd) < 100 and all(c.isalnum() or c in "-_." for c in odd)
