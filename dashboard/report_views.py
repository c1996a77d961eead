"""The supervisor's pages: reports with charts, the audit trail, and the CSV downloads.

Reads go through `conversations.reports`; the one write (an export is audited)
through `conversations.services`. Operators see their own figures; supervisors and
viewers everyone's; the audit page is for supervisors.
"""

from __future__ import annotations

from urllib.parse import urlencode

from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, QueryDict
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET

from conversations import reports, selectors, services
from conversations.models import AuditEntry
from conversations.permissions import can_pause_wide, display_name
from dashboard import charts, exports
from dashboard.report_forms import AuditForm, FigureForm, RangeForm
from dashboard.views import _live_url, login_required

LIST_PAGE_SIZE = 50
AUDIT_PAGE_SIZE = 50

FIGURE_TITLES = {
    "conversations": "Conversations",
    "ai_alone": "Handled by the AI alone",
    "needs_human": "Customers who needed a person",
    "taken": "Taken over",
    "handed_back": "Handed back",
    "manual": "Handed back by hand",
    "auto": "Handed back automatically",
    "fallbacks": "Back to the AI: nobody took over",
    "failed": "With a failed command",
    "wait": "Time to a person",
}


def _query(**params) -> str:
    return urlencode({k: v for k, v in params.items() if v not in (None, "")})


def _range_params(period: reports.Range) -> dict:
    return {"start": period.first.isoformat(), "end": period.last.isoformat()}


def _figure_url(period: reports.Range, show: str, **params) -> str:
    return f"{reverse('report_conversations')}?{_query(**_range_params(period), show=show, **params)}"


def _page_context(request: HttpRequest) -> dict:
    """What base.html needs: the live socket (toasts and notices still arrive here)."""
    since = timezone.now().timestamp()
    return {"live_since": since, "live_url": _live_url(since=since)}


def _point_label(period: reports.Range, at) -> str:
    return at.strftime("%H:%M") if period.hourly else at.strftime("%b %d")


def _charts(report: reports.Report) -> dict:
    period = report.range
    operator = report.operator_id
    points = report.series
    labels = [_point_label(period, p["at"]) for p in points]
    keys = [("needs_human", "Needed a person"), ("taken", "Taken over")]
    if report.conversations is not None:
        keys.insert(0, ("conversations", "Conversations"))
    series = [
        charts.Series(
            key=key,
            label=label,
            values=[p[key] for p in points],
            hrefs=[_figure_url(period, key, at=p["at"].isoformat(), operator=operator) for p in points],
        )
        for key, label in keys
    ]
    unit = "hour" if period.hourly else "day"
    timeline = charts.line_chart(
        chart_id="chart-timeline",
        title=f"Conversations, customers who needed a person and takeovers per {unit}",
        desc=f"From {period.first:%d %B %Y} to {period.last:%d %B %Y}; the table below gives every value.",
        x_title="Hour" if period.hourly else "Day",
        y_title="Count",
        x_labels=labels,
        series=series,
    )
    histogram = charts.bar_chart(
        chart_id="chart-wait",
        title="Time to a person",
        desc="How long customers waited from needing a person to a confirmed take over; the table below gives every bar.",
        x_title="Waited",
        y_title="Takeovers",
        labels=reports.WAIT_BUCKET_LABELS,
        values=report.wait_histogram,
        hrefs=[_figure_url(period, "wait", bucket=i, operator=operator) for i in range(len(reports.WAIT_BUCKETS))],
    )
    return {
        "timeline_chart": timeline,
        "timeline_keys": keys,
        "timeline_rows": [
            {"label": label, "cells": [(p[key], s.hrefs[i]) for (key, _), s in zip(keys, series)]}
            for i, (label, p) in enumerate(zip(labels, points))
        ],
        "wait_chart": histogram,
        "wait_rows": [
            {"label": label, "value": value, "href": _figure_url(period, "wait", bucket=i, operator=operator)}
            for i, (label, value) in enumerate(zip(reports.WAIT_BUCKET_LABELS, report.wait_histogram))
        ],
    }


def _figure_links(period: reports.Range, operator_id: int | None) -> dict:
    return {key: _figure_url(period, key, operator=operator_id) for key in FIGURE_TITLES}


@login_required
@require_GET
def reports_page(request: HttpRequest) -> HttpResponse:
    form = RangeForm(request.GET or None)
    period = form.period()
    operator_id = reports.scoped_operator(request.user)
    report = reports.report(period, operator_id=operator_id)
    operator_rows = [
        {"figures": f, "links": _figure_links(period, f.operator.pk)} for f in report.operators
    ]
    range_query = _query(**_range_params(period))
    return render(
        request,
        "reports/reports.html",
        {
            **_page_context(request),
            "form": form,
            "period": period,
            "report": report,
            "links": _figure_links(period, operator_id),
            "operator_rows": operator_rows,
            "scoped": operator_id is not None,
            "range_query": range_query,
            **_charts(report),
        },
    )


@login_required
@require_GET
def report_conversations(request: HttpRequest) -> HttpResponse:
    """The conversations behind one figure of the report, newest first, a page at a time."""
    form = FigureForm(request.GET)
    period = form.period()
    data = form.cleaned_data if form.is_valid() else {}
    show = data.get("show") or "conversations"
    scoped = reports.scoped_operator(request.user)
    operator_id = scoped or data.get("operator")
    at = data.get("at")
    qs = reports.figure_conversations(
        period, figure=show, operator_id=operator_id, bucket=data.get("bucket"), at=at
    )
    rows, next_before = reports.keyset_page(qs, before=data.get("before"), size=LIST_PAGE_SIZE)
    params = QueryDict(mutable=True)
    params.update({k: v for k, v in request.GET.items() if k != "before"})
    if next_before:
        params["before"] = next_before
    title = FIGURE_TITLES.get(show, "Conversations")
    if show == "wait" and data.get("bucket") is not None:
        title += f": {reports.WAIT_BUCKET_LABELS[data['bucket']]}"
    return render(
        request,
        "reports/conversations.html",
        {
            **_page_context(request),
            "form": form,
            "period": period,
            "title": title,
            "at": at,
            "rows": rows,
            "next_url": f"?{params.urlencode()}" if next_before else "",
            "back_url": f"{reverse('reports')}?{_query(**_range_params(period))}",
        },
    )


# ---------------------------------------------------------------- the audit trail


def _require_supervisor(request: HttpRequest) -> None:
    if not can_pause_wide(request.user):
        raise PermissionDenied("The audit trail is for supervisors.")


@login_required
@require_GET
def audit_page(request: HttpRequest) -> HttpResponse:
    _require_supervisor(request)
    form = AuditForm(request.GET or None)
    f = form.audit_filter()
    before = form.cleaned_data.get("before") if form.is_valid() else None
    rows, next_before = reports.keyset_page(reports.audit_entries(f), before=before, size=AUDIT_PAGE_SIZE)
    params = QueryDict(mutable=True)
    params.update({k: v for k, v in request.GET.items() if k != "before"})
    export_query = params.urlencode()
    if next_before:
        params["before"] = next_before
    return render(
        request,
        "reports/audit.html",
        {
            **_page_context(request),
            "form": form,
            "rows": rows,
            "next_url": f"?{params.urlencode()}" if next_before else "",
            "first_url": f"?{export_query}" if before else "",
            "export_url": f"{reverse('audit_csv')}?{export_query}",
        },
    )


# ---------------------------------------------------------------- CSV downloads


def _person(user) -> str:
    return display_name(user) if user is not None else ""


@login_required
@require_GET
def audit_csv(request: HttpRequest) -> HttpResponse:
    _require_supervisor(request)
    form = AuditForm(request.GET or None)
    if form.is_bound and not form.is_valid():
        return HttpResponse(" ".join(form.errors.get("__all__", ["Check the filters."])), status=422)
    f = form.audit_filter()
    services.export_logged(operator=request.user, what=f"audit trail ({request.GET.urlencode()})"[:500])
    entries = reports.audit_entries(f).iterator(chunk_size=exports.CHUNK_SIZE)
    # Labels looked up once: get_FOO_display() rebuilds its dict on every call.
    actions, outcomes = dict(AuditEntry.Action.choices), dict(AuditEntry.Outcome.choices)
    rows = (
        (
            e.created_at, _person(e.operator) if e.operator_id else "Automatic", actions.get(e.action, e.action),
            outcomes.get(e.outcome, e.outcome), e.detail, e.conversation_id or "", e.contact_phone,
            e.command.call_id if e.command_id and e.command.call_id else "", e.completed_at,
        )
        for e in entries
    )
    header = ["time", "who", "action", "outcome", "detail", "conversation", "contact", "call", "completed"]
    return exports.csv_response("audit.csv", header, rows)


@login_required
@require_GET
def report_csv(request: HttpRequest, table: str) -> HttpResponse:
    """The report's per-operator table or its series, for the range asked for."""
    if table not in ("operators", "days"):
        raise Http404("No such table.")
    form = RangeForm(request.GET or None)
    if form.is_bound and not form.is_valid():
        return HttpResponse(" ".join(form.errors.get("__all__", ["Check the dates."])), status=422)
    period = form.period()
    report = reports.report(period, operator_id=reports.scoped_operator(request.user))
    services.export_logged(operator=request.user, what=f"report {table} {period.first} to {period.last}")
    name = f"report-{table}-{period.first}-{period.last}.csv"
    if table == "days":
        header = ["from", "conversations", "needed_a_person", "taken_over"]
        rows = (
            (p["at"], p["conversations"] if report.conversations is not None else "", p["needs_human"], p["taken"])
            for p in report.series
        )
        return exports.csv_response(name, header, rows)
    header = [
        "operator", "episodes", "taken_over", "time_to_person_p50_s", "time_to_person_p90_s",
        "first_response_p50_s", "handling_p50_s", "handed_back", "hand_back_rate", "manual", "automatic",
        "failed_commands",
    ]

    def row(label: str, f: reports.Figures):
        rate = f.hand_back_rate
        return (
            label, f.episodes, f.taken, _rounded(f.wait_p50), _rounded(f.wait_p90), _rounded(f.reply_p50),
            _rounded(f.handling_p50), f.handed_back, "" if rate is None else round(rate, 4), f.manual, f.auto,
            f.failed,
        )

    rows = [row(_person(f.operator), f) for f in report.operators]
    if report.operator_id is None:
        rows.append(row("Everyone", report.totals))
    return exports.csv_response(name, header, rows)


def _rounded(value: float | None):
    return "" if value is None else round(value, 1)


@login_required
@require_GET
def transcript_csv(request: HttpRequest, pk: int) -> HttpResponse:
    """One conversation's messages and timeline notes, oldest first."""
    conversation = selectors.conversation_find(pk)
    if conversation is None:
        raise Http404("No such conversation.")
    services.export_logged(operator=request.user, what=f"transcript of conversation {pk}", conversation=conversation)
    messages = reports.transcript(pk).iterator(chunk_size=exports.CHUNK_SIZE)
    rows = (
        (m.created_at, m.get_direction_display(), m.get_author_display(), _person(m.operator), m.get_type_display(),
         m.text, m.status)
        for m in messages
    )
    header = ["time", "direction", "author", "operator", "type", "text", "status"]
    return exports.csv_response(f"conversation-{pk}.csv", header, rows)

