"""The handoff loop in a real Chromium: the queue's count moves live, alerts fire, the countdown."""

import itertools
import re

import pytest
from playwright.sync_api import expect

from tests.e2e.conftest import PASSWORD
from tests.e2e.test_operator_flows import open_conversation, take_over, wait_live, wait_stored

_phones = itertools.count(34677700001)


@pytest.fixture(scope="module")
def handoff_operators(stack):
    name = stack.create_user("hana", role="Supervisors", first_name="Hana")
    stack.shell(
        "from django.contrib.auth.models import User\n"
        "from conversations.models import AlertPreferences\n"
        "AlertPreferences.objects.update_or_create(user=User.objects.get(username='hana'),"
        " defaults={'sound': True, 'title': True, 'desktop': True})\n"
    )
    return name


def test_a_customer_asking_for_a_person_moves_the_count_and_raises_the_alerts(browser, stack, handoff_operators):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.grant_permissions(["notifications"], origin=stack.base_url)
    # Record notifications instead of showing them (the page's own code raises them).
    context.add_init_script(
        "window.__notes = [];"
        "window.Notification = function (title, options) { window.__notes.push(title); this.close = function () {}; };"
        "window.Notification.permission = 'granted';"
        "window.Notification.requestPermission = function () { return Promise.resolve('granted'); };"
    )
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.goto(f"{stack.base_url}/login/")
    page.fill("input[name=username]", "hana")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{stack.base_url}/")
    wait_live(page)
    count = page.locator("#tab-count-needs")
    before = int(count.get_attribute("data-count"))

    phone = str(next(_phones))
    stack.sim.customer_says(phone=phone, name="Queue Quinn", text="Can I talk to a real person?")
    expect(count).to_have_attribute("data-count", str(before + 1))
    expect(page).to_have_title(re.compile(rf"^\({before + 1}\) Needs a human"))
    page.wait_for_function("() => window.__notes.length > 0")
    assert "need" in page.evaluate("window.__notes[0]")
    expect(page.locator("[data-action=take-next]")).to_be_enabled()
    context.close()


def test_the_countdown_appears_and_keep_it_resets_it(new_page, stack, handoff_operators):
    phone = str(next(_phones))
    session_id = stack.sim.customer_says(phone=phone, name="Idle Ida", text="hello there")["session_id"]
    wait_stored(stack, phone, "hello there")
    page = new_page(username="hana")
    open_conversation(page, stack, phone)
    take_over(page, stack, session_id)
    # The holder went quiet: two minutes left before the AI gets it back.
    stack.shell(
        "from datetime import timedelta\n"
        "from django.utils import timezone\n"
        "from conversations.models import Conversation\n"
        "from conversations import selectors\n"
        f"c = Conversation.objects.get(session_id={session_id!r})\n"
        "idle = selectors.handoff_policy(c.agent_id).idle_seconds\n"
        "Conversation.objects.filter(pk=c.pk).update(holder_active_at=timezone.now() - timedelta(seconds=idle - 120))\n"
    )
    page.reload()
    wait_live(page)
    countdown = page.locator(".idle-countdown")
    expect(countdown).to_be_visible()
    expect(countdown).to_contain_text(re.compile(r"Back to the AI in [12]:\d\d"))
    countdown.locator("[data-action=keep]").click()
    expect(page.locator(".idle-countdown")).to_be_hidden()
    assert stack.shell(
        "from conversations.models import AuditEntry\n"
        "print(AuditEntry.objects.filter(action='keep').count())"
    ) == "1"
