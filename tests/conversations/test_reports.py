"""The reports' figures on a small hand-made history with known answers.

The history is made through the services (as the worker and the views make it),
with the clock set for each event, so the episodes hold exactly the times the
answers below are computed from.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from django.utils import timezone

from conversations import ingest, reports, services
from conversations.models import Command, Takeover
from tests.factories import ConversationFactory, OperatorFactory

pytestmark = pytest.mark.django_db


class Clock:
    def __init__(self, monkeypatch):
        self.at = timezone.now()
        monkeypatch.setattr(timezone, "now", lambda: self.at)

    def set(self, at: datetime) -> None:
        self.at = at


@pytest.fixture
def clock(monkeypatch):
    return Clock(monkeypatch)


def wait(conversation, at):
    services.needs_human_start(conversation, reason="asked", words="a human", at=at)
    conversation.save(update_fields=services.NEEDS_HUMAN_FIELDS)


def take(clock, conversation, operator, *, at, confirmed_at=None):
    clock.set(at)
    command = services.conversation_take_over(conversation=conversation, operator=operator)
    clock.set(confirmed_at or at)
    services.command_confirm(command=command)
    return command


def reply(clock, conversation, operator, *, at):
    clock.set(at)
    services.conversation_send(conversation=conversation, operator=operator, text=f"Hello at {at:%H:%M:%S}")


def hand_back(clock, conversation, operator, *, at):
    clock.set(at)
    command = services.conversation_hand_back(conversation=conversation, operator=operator)
    services.command_confirm(command=command)


@pytest.fixture
def history(clock):
    """Seven conversations started today, an hour apart from T (see each story)."""
    T = timezone.make_aware(datetime.combine(timezone.localdate(), datetime.min.time())) + timedelta(hours=1)
    s = lambda seconds: T + timedelta(seconds=seconds)  # noqa: E731
    ana = OperatorFactory(first_name="Ana", last_name="Silva")
    bruno = OperatorFactory(first_name="Bruno", last_name="Costa")
    policy = services.handoff_policy_get()
    policy.idle_seconds, policy.fallback_seconds = 300, 600
    policy.save()
    c = {i: ConversationFactory(started_at=s(i)) for i in range(1, 8)}

    # 1: waits, Ana takes it after 60 s, replies 30 s later, hands back at 660 s.
    wait(c[1], s(0))
    take(clock, c[1], ana, at=s(50), confirmed_at=s(60))
    reply(clock, c[1], ana, at=s(90))
    hand_back(clock, c[1], ana, at=s(660))
    # 6: Ana takes over without anyone waiting (1 s to confirm), hands back at 100 s.
    take(clock, c[6], ana, at=s(0), confirmed_at=s(1))
    hand_back(clock, c[6], ana, at=s(100))
    # 2: waits, Ana takes it after 120 s, replies after 60 s, idles: handed back automatically.
    wait(c[2], s(0))
    take(clock, c[2], ana, at=s(120))
    reply(clock, c[2], ana, at=s(180))
    assert services.handoff_tick(agent_id=c[2].agent_id, now=s(480))["auto_hand_backs"] == 1
    clock.set(s(500))
    services.command_confirm(command=Command.objects.filter(conversation=c[2], kind="resume").get())
    # 4: waits, the AI steps aside, nobody takes it: back to the AI after the fallback.
    wait(c[4], s(0))
    services.handoff_step_aside(conversation=c[4], policy=policy)
    assert services.handoff_tick(agent_id=c[4].agent_id, now=s(601))["fallbacks"] == 1
    # 3: waits, Bruno takes it after 600 s, the conversation ends while he holds it.
    wait(c[3], s(0))
    take(clock, c[3], bruno, at=s(600))
    services.conversation_end(c[3], reason="idle_timeout", ended_at=s(900))
    # 7: Bruno clicks Take over, Pinecall refuses the pause.
    clock.set(s(0))
    command = services.conversation_take_over(conversation=c[7], operator=bruno)
    services.command_fail(command=command, code="AGENT_OFFLINE", message="the agent is offline")
    # 5: the AI alone.
    return {"c": c, "ana": ana, "bruno": bruno, "range": reports.default_range()}


def test_the_episodes_hold_the_events_times(history):
    c = history["c"]
    one = Takeover.objects.get(conversation=c[1])
    assert (one.wait_seconds, one.reply_seconds, one.handling_seconds, one.end) == (60, 30, 600, "manual")
    assert Takeover.objects.get(conversation=c[2]).end == "auto"
    assert Takeover.objects.get(conversation=c[3]).end == "ended"
    assert Takeover.objects.get(conversation=c[4]).end == "fallback"
    assert Takeover.objects.get(conversation=c[7]).end == "failed"
    assert not Takeover.objects.filter(conversation=c[5]).exists()


def test_everyones_figures(history, django_assert_max_num_queries):
    with django_assert_max_num_queries(8):
        r = reports.report(history["range"])
    t = r.totals
    assert (r.conversations, r.ai_alone) == (7, 1)
    assert r.ai_alone_share == pytest.approx(1 / 7)
    assert (t.needs_human, t.taken, t.handed_back, t.manual, t.auto, t.fallbacks, t.failed) == (4, 4, 3, 2, 1, 1, 1)
    assert t.wait_p50 == pytest.approx(120)
    assert t.wait_p90 == pytest.approx(504)  # 120 + 0.8 * (600 - 120)
    assert t.reply_p50 == pytest.approx(45)
    assert t.handling_p50 == pytest.approx(380)
    assert t.hand_back_rate == pytest.approx(0.75)
    # 60 s, 120 s and 600 s: the bars 1-2 min, 2-5 min and 10-20 min.
    assert r.wait_histogram == [0, 0, 1, 1, 0, 1, 0, 0, 0]
    today = [p for p in r.series if p["conversations"]]
    assert [(p["conversations"], p["needs_human"], p["taken"]) for p in today] == [(7, 4, 4)]


def test_per_operator_figures(history):
    rows = {f.operator.first_name: f for f in reports.report(history["range"]).operators}
    ana, bruno = rows["Ana"], rows["Bruno"]
    assert (ana.taken, ana.manual, ana.auto, ana.failed, ana.hand_back_rate) == (3, 2, 1, 0, 1.0)
    assert (ana.wait_p50, ana.wait_p90) == (pytest.approx(90), pytest.approx(114))
    assert (ana.reply_p50, ana.handling_p50) == (pytest.approx(45), pytest.approx(380))
    assert (bruno.taken, bruno.failed, bruno.hand_back_rate, bruno.wait_p50) == (1, 1, 0.0, pytest.approx(600))


def test_an_operator_sees_only_their_own(history):
    ana = history["ana"]
    assert reports.scoped_operator(ana) == ana.pk
    r = reports.report(history["range"], operator_id=ana.pk)
    assert r.conversations is None and r.ai_alone is None
    assert [f.operator for f in r.operators] == [ana]
    assert (r.totals.needs_human, r.totals.taken, r.totals.failed, r.totals.fallbacks) == (2, 3, 0, 0)


def test_supervisors_and_viewers_see_everyone(supervisor, viewer):
    assert reports.scoped_operator(supervisor) is None
    assert reports.scoped_operator(viewer) is None


def test_a_range_without_the_history_counts_nothing(history):
    before = reports.Range(first=history["range"].first - timedelta(days=30), last=history["range"].first - timedelta(days=1))
    r = reports.report(before)
    assert (r.conversations, r.totals.taken, r.totals.wait_p50, r.totals.hand_back_rate) == (0, 0, None, None)


@pytest.mark.parametrize(
    "figure, extra, expected",
    [
        ("conversations", {}, [1, 2, 3, 4, 5, 6, 7]),
        ("ai_alone", {}, [5]),
        ("needs_human", {}, [1, 2, 3, 4]),
        ("taken", {}, [1, 2, 3, 6]),
        ("fallbacks", {}, [4]),
        ("failed", {}, [7]),
        ("wait", {"bucket": 5}, [3]),
        ("manual", {"operator": "ana"}, [1, 6]),
        ("taken", {"operator": "bruno"}, [3]),
    ],
)
def test_each_figure_lists_the_conversations_it_counts(history, figure, extra, expected):
    extra = dict(extra)
    if "operator" in extra:
        extra["operator_id"] = history[extra.pop("operator")].pk
    qs = reports.figure_conversations(history["range"], figure=figure, **extra)
    by_story = {conversation.pk: i for i, conversation in history["c"].items()}
    assert sorted(by_story[c.pk] for c in qs) == expected


def test_percentile_matches_percentile_cont():
    assert reports.percentile([], 0.5) is None
    assert reports.percentile([7], 0.9) == 7
    assert reports.percentile([600, 60, 120], 0.9) == pytest.approx(504)
    assert reports.percentile([1, 2, 3, 4], 0.5) == pytest.approx(2.5)


def test_a_forced_take_over_ends_the_first_holders_episode(clock, operator, supervisor, conversation):
    take(clock, conversation, operator, at=timezone.now())
    services.conversation_take_over(conversation=conversation, operator=supervisor, force=True)
    first, second = Takeover.objects.filter(conversation=conversation).order_by("id")
    assert (first.taken_by, first.end) == (operator, "reassigned")
    assert (second.taken_by, second.end, second.needs_human_at) == (supervisor, "", None)


def test_hourly_buckets_for_short_ranges():
    day = timezone.localdate()
    assert len(reports.Range(first=day, last=day).buckets()) in (23, 24, 25)
    assert len(reports.Range(first=day - timedelta(days=6), last=day).buckets()) == 7


def test_a_customer_asking_for_a_person_starts_an_episode_at_ingest():
    ingest.ingest_customer_message(
        agent_id="support", session_id="s-ask", contact_phone="34600000999", message_id="wamid.ask",
        text="Can I talk to a real person please?",
    )
    episode = Takeover.objects.get(conversation__session_id="s-ask")
    assert (episode.needs_human_reason, episode.taken_by, episode.end) == ("asked", None, "")
    assert episode.needs_human_at == episode.conversation.needs_human_since


def test_the_admin_lists_episodes(admin_client, operator, conversation):
    services.conversation_take_over(conversation=conversation, operator=operator)
    response = admin_client.get("/admin/conversations/takeover/")
    assert response.status_code == 200 and str(conversation) in response.content.decode()
