"""The reports page, the list behind each figure, the audit page and the CSV downloads."""

from __future__ import annotations

import csv
import io
import re
import tracemalloc
from datetime import timedelta

import pytest
from django.http import StreamingHttpResponse
from django.utils import timezone

from conversations import services
from conversations.models import AuditEntry
from dashboard import charts
from dashboard.exports import csv_cell
from tests.factories import ConversationFactory, MessageFactory, OperatorFactory

pytestmark = pytest.mark.django_db


def taken_over(conversation, operator):
    """A customer waited, `operator` took over and Pinecall confirmed."""
    services.needs_human_start(conversation, reason="asked", at=timezone.now() - timedelta(seconds=90))
    conversation.save(update_fields=services.NEEDS_HUMAN_FIELDS)
    command = services.conversation_take_over(conversation=conversation, operator=operator)
    services.command_confirm(command=command)


def rows_of(response) -> list[list[str]]:
    body = b"".join(response.streaming_content).decode()
    return list(csv.reader(io.StringIO(body)))


# ---------------------------------------------------------------- the reports page


class TestReportsPage:
    def test_supervisor_sees_figures_charts_and_every_operator(self, supervisor_client, operator, other_operator):
        taken_over(ConversationFactory(), operator)
        taken_over(ConversationFactory(), other_operator)
        ConversationFactory()
        response = supervisor_client.get("/reports/")
        assert response.status_code == 200
        html = response.content.decode()
        assert 'id="chart-timeline"' in html and 'id="chart-wait"' in html
        assert html.count("<circle") >= 7 * 3 and html.count('class="chart-bar"') == 9
        assert "<title" in html and "<desc" in html
        assert "Ana" in html and "Bruno" in html
        assert 'href="/reports/conversations/?' in html
        assert ' style="' not in html  # the strict CSP: classes only

    def test_an_operator_sees_only_their_own_row(self, operator_client, operator, other_operator):
        taken_over(ConversationFactory(), operator)
        taken_over(ConversationFactory(), other_operator)
        html = operator_client.get("/reports/").content.decode()
        assert "your own takeovers" in html
        assert "<bdi>Ana Silva</bdi>" in html and "Bruno" not in html
        assert "Handled by the AI alone" not in html

    def test_a_viewer_reads_the_report_with_nothing_to_press(self, viewer_client, operator):
        taken_over(ConversationFactory(), operator)
        response = viewer_client.get("/reports/")
        assert response.status_code == 200
        assert b"Ana Silva" in response.content
        assert b'method="post"' not in response.content.split(b'<main id="main"')[1]

    def test_the_query_count_does_not_grow_with_the_data(self, supervisor_client, django_assert_max_num_queries):
        taken_over(ConversationFactory(), OperatorFactory())
        supervisor_client.get("/reports/")  # sessions, the policy: created on the first request
        with django_assert_max_num_queries(20) as few:
            supervisor_client.get("/reports/")
        for _ in range(5):
            taken_over(ConversationFactory(), OperatorFactory())
        with django_assert_max_num_queries(len(few.captured_queries)):
            supervisor_client.get("/reports/")

    @pytest.mark.parametrize(
        "query, message",
        [
            ("start=2026-12-09&end=2026-12-01", "swap the two dates"),
            ("start=2020-01-01&end=2026-01-01", "at most 366 days"),
            ("start=yesterday", "Enter a valid date"),
        ],
    )
    def test_a_bad_range_says_so(self, supervisor_client, query, message):
        response = supervisor_client.get(f"/reports/?{query}")
        assert response.status_code == 200
        assert message in response.content.decode()

    def test_two_days_are_drawn_per_hour(self, supervisor_client):
        today = timezone.localdate()
        html = supervisor_client.get(f"/reports/?start={today - timedelta(days=1)}&end={today}").content.decode()
        assert "per hour" in html and html.count('class="chart-point series-taken"') in (47, 48, 49)

    def test_login_required(self, client):
        for url in ("/reports/", "/reports/conversations/", "/audit/", "/audit.csv", "/reports/days.csv"):
            assert client.get(url).status_code == 302


class TestFigureConversations:
    def test_lists_the_conversations_behind_a_figure_a_page_at_a_time(self, supervisor_client, operator, monkeypatch):
        monkeypatch.setattr("dashboard.report_views.LIST_PAGE_SIZE", 2)
        taken = [ConversationFactory(contact_name=f"Taken {i}") for i in range(3)]
        for c in taken:
            taken_over(c, operator)
        ConversationFactory(contact_name="Never taken")
        page = supervisor_client.get("/reports/conversations/?show=taken").content.decode()
        assert "Taken 2" in page and "Taken 1" in page and "Taken 0" not in page and "Never taken" not in page
        older = page.split('href="?')[1].split('"')[0].replace("&amp;", "&")
        page2 = supervisor_client.get(f"/reports/conversations/?{older}").content.decode()
        assert "Taken 0" in page2 and "Taken 1" not in page2 and 'rel="next"' not in page2

    def test_a_point_of_the_series_lists_its_day(self, supervisor_client, operator):
        taken_over(ConversationFactory(contact_name="Today's"), operator)
        html = supervisor_client.get("/reports/").content.decode()
        today_point = re.findall(r'<a href="([^"]*show=taken[^"]*)"><circle', html)[-1].replace("&amp;", "&")
        assert "Today&#x27;s" in supervisor_client.get(today_point).content.decode()
        yesterday_point = re.findall(r'<a href="([^"]*show=taken[^"]*)"><circle', html)[-2].replace("&amp;", "&")
        assert "No conversations." in supervisor_client.get(yesterday_point).content.decode()

    def test_an_operator_is_held_to_their_own(self, operator_client, other_operator):
        taken_over(ConversationFactory(contact_name="Bruno's customer"), other_operator)
        page = operator_client.get(f"/reports/conversations/?show=taken&operator={other_operator.pk}")
        assert b"Bruno&#x27;s customer" not in page.content and b"No conversations." in page.content

    def test_bad_parameters_show_the_default(self, supervisor_client):
        assert supervisor_client.get("/reports/conversations/?show=nope&bucket=99&at=x").status_code == 200


# ---------------------------------------------------------------- the audit page


class TestAuditPage:
    @pytest.fixture
    def entries(self, operator, other_operator, conversation):
        services.conversation_take_over(conversation=conversation, operator=operator)
        with pytest.raises(services.ActionRefused):
            services.conversation_send(conversation=conversation, operator=other_operator, text="mine?")
        services.handoff_step_aside(conversation=ConversationFactory(), policy=services.handoff_policy_get())
        return AuditEntry.objects.order_by("id")

    def test_operators_and_viewers_cannot_open_it(self, operator_client, viewer_client):
        assert operator_client.get("/audit/").status_code == 403
        assert viewer_client.get("/audit/").status_code == 403
        assert operator_client.get("/audit.csv").status_code == 403

    def test_shows_who_did_what_and_how_it_ended(self, supervisor_client, entries, conversation):
        html = supervisor_client.get("/audit/").content.decode()
        assert "Took over" in html and "Refused" in html and "Automatic" in html
        assert f'href="/c/{conversation.pk}/"' in html

    @pytest.mark.parametrize(
        "query, actions",
        [
            ("outcome=refused", ["send"]),
            ("action=take_over", ["take_over"]),
            ("action=auto_pause", ["auto_pause"]),
        ],
    )
    def test_filters(self, supervisor_client, entries, query, actions):
        html = supervisor_client.get(f"/audit/?{query}").content.decode()
        tbody = html.split('id="audit-entries"')[1]
        labels = {a: str(AuditEntry.Action(a).label) for a in AuditEntry.Action.values}
        shown = [a for a, label in labels.items() if f"<td>{label}</td>" in tbody]
        assert shown == actions

    def test_filters_by_operator_and_day(self, supervisor_client, entries, other_operator):
        html = supervisor_client.get(f"/audit/?operator={other_operator.pk}").content.decode()
        tbody = html.split('id="audit-entries"')[1]
        assert "<td>Sent a message</td>" in tbody and "<td>Took over</td>" not in tbody
        tomorrow = timezone.localdate() + timedelta(days=1)
        assert "No entries match." in supervisor_client.get(f"/audit/?start={tomorrow}").content.decode()
        assert "No entries match." not in supervisor_client.get(f"/audit/?end={tomorrow}").content.decode()

    def test_pages_with_the_same_queries(self, supervisor_client, operator, monkeypatch, django_assert_max_num_queries):
        monkeypatch.setattr("dashboard.report_views.AUDIT_PAGE_SIZE", 3)
        AuditEntry.objects.bulk_create(
            AuditEntry(operator=operator, action="keep", agent_id="a", outcome="confirmed", detail=f"entry {i}")
            for i in range(7)
        )
        supervisor_client.get("/audit/")
        with django_assert_max_num_queries(12) as first:
            html = supervisor_client.get("/audit/").content.decode()
        assert "entry 6" in html and "entry 3" not in html
        seen = []
        url = "/audit/"
        while url:
            with django_assert_max_num_queries(len(first.captured_queries)):
                html = supervisor_client.get(url).content.decode()
            seen += re.findall(r"entry (\d)<", html)
            older = re.search(r'href="\?([^"]*)" rel="next"', html)
            url = "/audit/?" + older.group(1).replace("&amp;", "&") if older else ""
        assert seen == [str(i) for i in range(6, -1, -1)]

    def test_a_bad_filter_says_so(self, supervisor_client):
        response = supervisor_client.get("/audit/?action=nope&start=2026-12-09&end=2026-12-01")
        assert response.status_code == 200 and b"form-error" in response.content


# ---------------------------------------------------------------- CSV


class TestCsv:
    @pytest.mark.parametrize("value", ["=1+1", "+1", "-1", "@SUM(A1)", "\t=1", "\r=1", "=HYPERLINK(\"x\")"])
    def test_a_formula_is_neutralised(self, value):
        assert csv_cell(value) == "'" + value

    @pytest.mark.parametrize("value, cell", [("hello", "hello"), (None, ""), (3, "3"), ("a=b", "a=b"), (-2, "-2")])
    def test_other_cells_stay_as_they_are(self, value, cell):
        assert csv_cell(value) == cell

    def test_the_transcript_is_escaped_and_the_export_audited(self, operator_client, operator, conversation):
        MessageFactory(conversation=conversation, text="=cmd|' /C calc'!A0")
        MessageFactory(conversation=conversation, ai=True, text="Your order arrives tomorrow")
        response = operator_client.get(f"/c/{conversation.pk}/transcript.csv")
        assert isinstance(response, StreamingHttpResponse)
        assert response["Content-Type"].startswith("text/csv")
        rows = rows_of(response)
        assert rows[0][:3] == ["time", "direction", "author"]
        assert rows[1][5] == "'=cmd|' /C calc'!A0" and rows[2][5] == "Your order arrives tomorrow"
        assert AuditEntry.objects.filter(action="export", operator=operator, conversation=conversation).exists()

    def test_a_viewer_downloads_a_transcript_too(self, viewer_client, conversation):
        assert viewer_client.get(f"/c/{conversation.pk}/transcript.csv").status_code == 200
        assert viewer_client.get("/c/999999/transcript.csv").status_code == 404

    def test_the_report_tables(self, supervisor_client, operator):
        taken_over(ConversationFactory(), operator)
        operators = rows_of(supervisor_client.get("/reports/operators.csv"))
        assert operators[0][0] == "operator" and operators[1][0] == "Ana Silva" and operators[-1][0] == "Everyone"
        assert operators[1][2] == "1" and float(operators[1][3]) == pytest.approx(90, abs=2)
        days = rows_of(supervisor_client.get("/reports/days.csv"))
        assert len(days) == 1 + 7 and sum(int(r[3]) for r in days[1:]) == 1
        assert supervisor_client.get("/reports/nope.csv").status_code == 404
        assert supervisor_client.get("/reports/days.csv?start=2026-12-09&end=2026-12-01").status_code == 422

    @pytest.mark.timeout(300)  # 100,000 rows written, then read back under tracemalloc
    def test_the_audit_trail_of_100000_rows_streams_in_chunks(self, supervisor_client, supervisor, conversation):
        AuditEntry.objects.bulk_create(
            (
                AuditEntry(
                    operator=supervisor, action="send", agent_id="support", conversation=conversation,
                    outcome="confirmed", detail=f"Sent message number {i} to the customer, with some text",
                )
                for i in range(100_000)
            ),
            batch_size=5000,
        )
        response = supervisor_client.get("/audit.csv?action=send")
        assert isinstance(response, StreamingHttpResponse)
        tracemalloc.start()
        size = lines = 0
        try:
            for chunk in response.streaming_content:
                size += len(chunk)
                lines += 1
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert lines == 100_001
        assert size > 10_000_000
        # Chunks of 1,000 rows at a time: a fraction of the whole file, never all of it.
        assert peak < size / 4, (peak, size)


# ---------------------------------------------------------------- the charts


class TestCharts:
    def test_labels_are_escaped_and_every_point_links(self):
        svg = charts.line_chart(
            chart_id="c", title="<b>t</b>", desc="d", x_title="Day", y_title="Count",
            x_labels=["<img src=x>", "b"],
            series=[charts.Series(key="taken", label="Taken", values=[1, 3], hrefs=["/a?x=1&y=2", "/b"])],
        )
        assert "<img" not in svg and "&lt;img src=x&gt;" in svg and "&lt;b&gt;t&lt;/b&gt;" in svg
        assert svg.count("<a href=") == 2 and 'href="/a?x=1&amp;y=2"' in svg

    def test_bars_grow_with_their_values(self):
        svg = charts.bar_chart(
            chart_id="h", title="t", desc="d", x_title="x", y_title="y", labels=["a", "b"], values=[1, 4],
            hrefs=["/1", "/2"],
        )
        heights = [float(h) for h in re.findall(r'class="chart-bar"[^>]* height="([\d.]+)"', svg)]
        assert len(heights) == 2 and heights[1] == pytest.approx(4 * heights[0])

    @pytest.mark.parametrize("value, top", [(0, 4), (3, 4), (5, 8), (9, 12), (100, 100), (101, 120), (1234, 2000)])
    def test_the_axis_ends_on_a_round_number(self, value, top):
        assert charts.nice_ceiling(value) == top


def test_the_conversation_page_offers_its_transcript(viewer_client, conversation):
    html = viewer_client.get(f"/c/{conversation.pk}/").content.decode()
    assert f'href="/c/{conversation.pk}/transcript.csv"' in html
