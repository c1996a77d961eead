"""The reports page in a real Chromium: its charts are drawn, each bar leads to its conversations."""

import os
import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

DOCS = Path(__file__).resolve().parents[2] / "docs"
WRITE_DOCS = os.environ.get("SCREENSHOTS") == "1"
expect.set_options(timeout=15_000)

# A week of takeovers, as the services write them: customers waiting 20 s to 25 min,
# handed back by hand or automatically, some falling back to the AI.
SEED = """
from datetime import timedelta
from django.contrib.auth.models import User
from django.utils import timezone
from conversations.models import Conversation, Takeover
people = [User.objects.get(username=name) for name in ("report_sup", "report_op")]
now = timezone.now()
for i in range(140):
    started = now - timedelta(hours=i * 1.15 + 0.5)
    c = Conversation.objects.create(session_id=f"rep-{i}", agent_id="support", contact_phone=f"3466{i:07d}",
                                    contact_name=f"Customer {i}", started_at=started)
    if i % 3:
        continue
    asked = started + timedelta(minutes=2)
    if i % 5 == 0:
        Takeover.objects.create(conversation=c, agent_id="support", conversation_started_at=started,
                                started_at=asked, needs_human_at=asked, ended_at=asked + timedelta(minutes=10),
                                end="fallback")
        continue
    wait = 20 + (i * 37) % 1500
    taken = asked + timedelta(seconds=wait)
    Takeover.objects.create(
        conversation=c, agent_id="support", conversation_started_at=started, started_at=asked, needs_human_at=asked,
        taken_by=people[i % 2],
        claimed_at=taken, taken_at=taken, first_reply_at=taken + timedelta(seconds=30),
        ended_at=taken + timedelta(minutes=8), end="manual" if i % 4 else "auto",
        wait_seconds=wait, reply_seconds=30, handling_seconds=480,
    )
print("seeded")
"""


@pytest.fixture(scope="module")
def reports_data(stack):
    stack.create_user("report_sup", role="Supervisors", first_name="Sam")
    stack.create_user("report_op", role="Operators", first_name="Olga")
    assert stack.shell(SEED) == "seeded"


def test_the_reports_page_draws_its_charts_and_each_bar_opens_its_conversations(
    new_page, stack, reports_data, tmp_path
):
    page = new_page(username="report_sup", width=1280, height=900)
    page.click("#nav-reports")
    expect(page).to_have_url(re.compile(r"/reports/"))
    timeline = page.locator("svg#chart-timeline")
    expect(timeline).to_be_visible()
    expect(timeline.locator("circle.chart-point")).to_have_count(7 * 3)
    expect(timeline.locator("polyline.series-taken")).to_have_count(1)
    bars = page.locator("svg#chart-wait rect.chart-bar")
    expect(bars).to_have_count(9)
    heights = [float(bars.nth(i).get_attribute("height")) for i in range(9)]
    assert sum(h > 0 for h in heights) >= 3, heights
    expect(page.locator("#report-figures")).to_contain_text("Taken over")
    # The charts draw inside the strict CSP: nothing was refused.
    assert page.evaluate("document.querySelectorAll('[style]').length") == 0

    page.screenshot(path=str((DOCS if WRITE_DOCS else tmp_path) / "screenshot-reports.png"), full_page=True)

    tallest = max(range(9), key=lambda i: heights[i])
    title = bars.nth(tallest).locator("title").text_content()
    count = int(title.rsplit(":", 1)[1])
    bars.nth(tallest).click(force=True)
    expect(page).to_have_url(re.compile(r"/reports/conversations/\?.*show=wait"))
    expect(page.locator("#figure-conversations tbody tr")).to_have_count(min(count, 50))


def test_an_operator_sees_their_own_figures(new_page, stack, reports_data):
    page = new_page(username="report_op")
    page.goto(f"{stack.base_url}/reports/")
    expect(page.locator("svg#chart-wait")).to_be_visible()
    expect(page.locator(".report-table").first).to_contain_text("Olga")
    expect(page.locator(".report-table").first).not_to_contain_text("Sam")
    expect(page.locator("#nav-audit")).to_have_count(0)
