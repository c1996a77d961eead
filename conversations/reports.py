"""The supervisor's reports and the audit trail: reads only.

Every figure comes from the `Takeover` episodes (exact times written with the
events), the conversations and the outbox, in a fixed number of queries whatever
the range. Percentiles are PostgreSQL's `percentile_cont`; on SQLite (the
embedded product, small data) the same interpolation runs in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from datetime import timezone as dt_timezone

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection
from django.db.models import Aggregate, Count, Exists, FloatField, OuterRef, Q, QuerySet
from django.db.models.functions import Trunc
from django.utils import timezone

from conversations.models import AuditEntry, Command, Conversation, Message, Takeover
from conversations.permissions import can_pause_wide, can_take_over, display_name

# The longest range a report covers (a year and a day: a leap year's range fits).
MAX_RANGE_DAYS = 366
DEFAULT_RANGE_DAYS = 7
# Ranges this short are drawn per hour.
HOURLY_UP_TO_DAYS = 2

# The histogram of time to a person: bucket edges in seconds (the last one is open).
WAIT_BUCKETS = [0, 30, 60, 120, 300, 600, 1200, 1800, 3600]
WAIT_BUCKET_LABELS = [
    "0–30 s", "30–60 s", "1–2 min", "2–5 min", "5–10 min", "10–20 min", "20–30 min", "30–60 min", "≥ 60 min",
]

# What each episode figure counts: the one predicate the figures and the list of the
# conversations behind them share.
EPISODE_FIGURES = {
    "needs_human": Q(needs_human_at__isnull=False),
    "taken": Q(taken_at__isnull=False),
    "handed_back": Q(end__in=Takeover.HANDED_BACK),
    "manual": Q(end=Takeover.End.MANUAL),
    "auto": Q(end=Takeover.End.AUTO),
    "fallbacks": Q(end=Takeover.End.FALLBACK),
}
# The durations whose percentiles are reported: (figure, column, fraction).
PERCENTILES = [
    ("wait_p50", "wait_seconds", 0.5),
    ("wait_p90", "wait_seconds", 0.9),
    ("reply_p50", "reply_seconds", 0.5),
    ("handling_p50", "handling_seconds", 0.5),
]
# The figures the conversations list can show, beyond the episode ones.
LIST_FIGURES = {"conversations", "ai_alone", "failed", "wait", *EPISODE_FIGURES}


# ---------------------------------------------------------------- the range and who sees what


@dataclass(frozen=True)
class Range:
    """[start, end) in the current time zone, from the first day to the last, inclusive."""

    first: date
    last: date

    @property
    def start(self) -> datetime:
        return timezone.make_aware(datetime.combine(self.first, datetime.min.time()))

    @property
    def end(self) -> datetime:
        return timezone.make_aware(datetime.combine(self.last + timedelta(days=1), datetime.min.time()))

    @property
    def hourly(self) -> bool:
        return (self.last - self.first).days + 1 <= HOURLY_UP_TO_DAYS

    @property
    def step(self) -> timedelta:
        return timedelta(hours=1) if self.hourly else timedelta(days=1)

    def buckets(self) -> list[datetime]:
        """The start of each hour or day of the range (a DST day has 23 or 25 hours)."""
        if not self.hourly:
            return [
                timezone.make_aware(datetime.combine(self.first + timedelta(days=i), datetime.min.time()))
                for i in range((self.last - self.first).days + 1)
            ]
        # Stepped in UTC: wall-clock arithmetic would skip or repeat an hour at a DST change.
        out, at, end = [], self.start.astimezone(dt_timezone.utc), self.end
        while at < end:
            out.append(timezone.localtime(at))
            at += self.step
        return out


def default_range(today: date | None = None) -> Range:
    today = today or timezone.localdate()
    return Range(first=today - timedelta(days=DEFAULT_RANGE_DAYS - 1), last=today)


def scoped_operator(user: AbstractBaseUser) -> int | None:
    """Operators see their own figures only; supervisors and viewers see everyone's (None)."""
    if can_take_over(user) and not can_pause_wide(user):
        return user.pk
    return None


# ---------------------------------------------------------------- percentiles


class PercentileCont(Aggregate):
    """PostgreSQL's ordered-set aggregate: the interpolated percentile of a column."""

    function = "percentile_cont"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression, fraction: float, **extra):
        super().__init__(expression, fraction=repr(float(fraction)), **extra)


def percentile(values: list[float], fraction: float) -> float | None:
    """percentile_cont's definition: linear interpolation between the closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _in_database() -> bool:
    return connection.vendor == "postgresql"


def _percentile_aggregates() -> dict:
    return {name: PercentileCont(column, fraction) for name, column, fraction in PERCENTILES}


def _percentiles_in_python(episodes: QuerySet) -> dict:
    """{operator id or None (everyone): {figure: value}} from one query over the range."""
    columns = sorted({column for _, column, _ in PERCENTILES})
    values: dict = {}
    for taken_by, *row in episodes.values_list("taken_by", *columns):
        for key in (None, taken_by) if taken_by is not None else (None,):
            per_column = values.setdefault(key, {c: [] for c in columns})
            for column, value in zip(columns, row):
                if value is not None:
                    per_column[column].append(value)
    return {
        key: {name: percentile(per_column[column], fraction) for name, column, fraction in PERCENTILES}
        for key, per_column in values.items()
    }


# ---------------------------------------------------------------- the figures


@dataclass
class Figures:
    """One row of the report: everyone's, or one operator's."""

    episodes: int = 0
    needs_human: int = 0
    taken: int = 0
    handed_back: int = 0
    manual: int = 0
    auto: int = 0
    fallbacks: int = 0
    failed: int = 0
    wait_p50: float | None = None
    wait_p90: float | None = None
    reply_p50: float | None = None
    handling_p50: float | None = None
    operator: AbstractBaseUser | None = None

    @property
    def hand_back_rate(self) -> float | None:
        return self.handed_back / self.taken if self.taken else None


@dataclass
class Report:
    range: Range
    operator_id: int | None  # the one operator it is limited to, if any
    totals: Figures
    operators: list[Figures]
    conversations: int | None  # None when limited to one operator
    ai_alone: int | None
    wait_histogram: list[int]
    series: list[dict] = field(default_factory=list)  # {"at", "conversations", "needs_human", "taken"}

    @property
    def ai_alone_share(self) -> float | None:
        if not self.conversations or self.ai_alone is None:
            return None
        return self.ai_alone / self.conversations


def episodes_in(period: Range, *, operator_id: int | None = None) -> QuerySet:
    """The episodes that started in the range (the one operator's, if given)."""
    qs = Takeover.objects.filter(started_at__gte=period.start, started_at__lt=period.end)
    return qs.filter(taken_by_id=operator_id) if operator_id else qs


def _failed_commands(period: Range, operator_id: int | None) -> QuerySet:
    qs = Command.objects.filter(
        status=Command.Status.FAILED, created_at__gte=period.start, created_at__lt=period.end
    )
    return qs.filter(operator_id=operator_id) if operator_id else qs


def _counts() -> dict:
    return {"episodes": Count("id"), **{k: Count("id", filter=q) for k, q in EPISODE_FIGURES.items()}}


def _wait_bucket_q(index: int) -> Q:
    q = Q(taken_at__isnull=False, wait_seconds__gte=WAIT_BUCKETS[index])
    if index + 1 < len(WAIT_BUCKETS):
        q &= Q(wait_seconds__lt=WAIT_BUCKETS[index + 1])
    return q


def report(period: Range, *, operator_id: int | None = None) -> Report:
    """Every figure of the reports page for the range, in eight queries at most."""
    episodes = episodes_in(period, operator_id=operator_id)
    in_db = _in_database()
    extra = _percentile_aggregates() if in_db else {}
    histogram = {f"h{i}": Count("id", filter=_wait_bucket_q(i)) for i in range(len(WAIT_BUCKETS))}
    totals_row = episodes.aggregate(**_counts(), **extra, **histogram)
    per_operator = list(
        episodes.filter(taken_by__isnull=False).values("taken_by").annotate(**_counts(), **extra).order_by()
    )
    percentiles = {} if in_db else _percentiles_in_python(episodes)
    failed = dict(
        _failed_commands(period, operator_id).values_list("operator").annotate(n=Count("id")).order_by()
    )
    users = get_user_model().objects.in_bulk([row["taken_by"] for row in per_operator] + [
        pk for pk in failed if pk is not None
    ])

    figure_names = [*_counts(), *(name for name, _, _ in PERCENTILES)]

    def figures(row: dict, key) -> Figures:
        values = {name: row.get(name) for name in figure_names}
        values.update(percentiles.get(key, {}))
        return Figures(**values, failed=sum(failed.values()) if key is None else failed.get(key, 0),
                       operator=users.get(key) if key is not None else None)

    totals = figures(totals_row, None)
    operators = [figures(row, row["taken_by"]) for row in per_operator]
    seen = {row["taken_by"] for row in per_operator}
    # An operator with failed commands only still has a row.
    operators += [
        Figures(failed=n, operator=users[pk]) for pk, n in failed.items() if pk in users and pk not in seen
    ]
    operators.sort(key=lambda f: display_name(f.operator).casefold())

    series = _series(period, episodes, with_conversations=operator_id is None)
    conversations = ai_alone = None
    if operator_id is None:
        conversations = sum(point["conversations"] for point in series)
        with_episode = (
            Takeover.objects.filter(
                conversation_started_at__gte=period.start, conversation_started_at__lt=period.end
            )
            .values("conversation_id")
            .distinct()
            .count()
        )
        ai_alone = conversations - with_episode
    return Report(
        range=period,
        operator_id=operator_id,
        totals=totals,
        operators=operators,
        conversations=conversations,
        ai_alone=ai_alone,
        wait_histogram=[totals_row[f"h{i}"] for i in range(len(WAIT_BUCKETS))],
        series=series,
    )


def _series(period: Range, episodes: QuerySet, *, with_conversations: bool) -> list[dict]:
    """Per hour or per day: conversations started, customers who needed a person, takeovers."""
    kind = "hour" if period.hourly else "day"
    tz = timezone.get_current_timezone()
    points = {at: {"at": at, "conversations": 0, "needs_human": 0, "taken": 0} for at in period.buckets()}

    def add(rows, *names):
        for row in rows:
            at = timezone.localtime(row["at"], tz)
            if at in points:
                for name in names:
                    points[at][name] += row[name]

    if with_conversations:
        add(
            Conversation.objects.filter(started_at__gte=period.start, started_at__lt=period.end)
            .annotate(at=Trunc("started_at", kind, tzinfo=tz))
            .values("at")
            .annotate(conversations=Count("started_at"))  # the index alone answers
            .order_by(),
            "conversations",
        )
    add(
        episodes.annotate(at=Trunc("started_at", kind, tzinfo=tz))
        .values("at")
        .annotate(
            needs_human=Count("id", filter=EPISODE_FIGURES["needs_human"]),
            taken=Count("id", filter=EPISODE_FIGURES["taken"]),
        )
        .order_by(),
        "needs_human",
        "taken",
    )
    return list(points.values())


# ---------------------------------------------------------------- the conversations behind a figure


def figure_conversations(
    period: Range,
    *,
    figure: str,
    operator_id: int | None = None,
    bucket: int | None = None,
    at: datetime | None = None,
) -> QuerySet:
    """The conversations a figure counts (newest first). `at` narrows to one point of the
    series (an hour or a day from `at`), `bucket` to one bar of the histogram."""
    if at is not None:
        period_start, period_end = at, at + period.step
    else:
        period_start, period_end = period.start, period.end
    conversations = Conversation.objects.select_related("held_by").order_by("-id")
    if figure in ("conversations", "ai_alone"):
        qs = conversations.filter(started_at__gte=period_start, started_at__lt=period_end)
        if figure == "ai_alone":
            qs = qs.exclude(Exists(Takeover.objects.filter(conversation=OuterRef("pk"))))
        if operator_id:
            qs = qs.filter(Exists(Takeover.objects.filter(conversation=OuterRef("pk"), taken_by_id=operator_id)))
        return qs
    if figure == "failed":
        commands = Command.objects.filter(
            status=Command.Status.FAILED, created_at__gte=period_start, created_at__lt=period_end,
            conversation=OuterRef("pk"),
        )
        if operator_id:
            commands = commands.filter(operator_id=operator_id)
        return conversations.filter(Exists(commands))
    episodes = Takeover.objects.filter(
        started_at__gte=period_start, started_at__lt=period_end, conversation=OuterRef("pk")
    )
    if operator_id:
        episodes = episodes.filter(taken_by_id=operator_id)
    if figure == "wait":
        episodes = episodes.filter(_wait_bucket_q(bucket or 0))
    elif figure in EPISODE_FIGURES:
        episodes = episodes.filter(EPISODE_FIGURES[figure])
    return conversations.filter(Exists(episodes))


def keyset_page(qs: QuerySet, *, before: int | None, size: int) -> tuple[list, int | None]:
    """One page of a query ordered by descending id, and the id to ask for the next one."""
    if before:
        qs = qs.filter(pk__lt=before)
    rows = list(qs[: size + 1])
    if len(rows) > size:
        return rows[:size], rows[size - 1].pk
    return rows, None


# ---------------------------------------------------------------- the audit trail


@dataclass(frozen=True)
class AuditFilter:
    operator_id: int | None = None
    action: str = ""
    outcome: str = ""
    first: date | None = None
    last: date | None = None


def audit_entries(f: AuditFilter) -> QuerySet:
    """The audit trail, newest first, narrowed by operator, action, outcome and days."""
    qs = AuditEntry.objects.select_related("operator", "command").order_by("-id")
    if f.operator_id:
        qs = qs.filter(operator_id=f.operator_id)
    if f.action:
        qs = qs.filter(action=f.action)
    if f.outcome:
        qs = qs.filter(outcome=f.outcome)
    if f.first:
        qs = qs.filter(created_at__gte=Range(f.first, f.first).start)
    if f.last:
        qs = qs.filter(created_at__lt=Range(f.last, f.last).end)
    return qs


def audit_people() -> QuerySet:
    """The people the audit page filters by: everyone with an account, by name."""
    return get_user_model().objects.order_by("first_name", "last_name", "username")


def transcript(conversation_id: int) -> QuerySet:
    """One conversation's messages and timeline notes, oldest first (for its CSV)."""
    return Message.objects.filter(conversation_id=conversation_id).select_related("operator").order_by("id")
