"""The handoff loop in a real Chromium: the queue's count moves live, alerts fire, the countdown."""

import itertools
import re

import pytest
from playwright.sync_api import expect

from tests.e2e.conftest import PASSWORD
from tests.e2e.test_operator_flows import (
    DOCS,
    WRITE_DOCS,
    conversation_pk,
    open_conversation,
    take_over,
    wait_live,
    wait_stored,
)

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


def test_two_operators_see_each_other_viewing_and_typing(new_page, stack, handoff_operators):
    stack.create_user("pia", role="Operators", first_name="Pia")
    phone = str(next(_phones))
    session_id = stack.sim.customer_says(phone=phone, name="Present Pat", text="is anyone there?")["session_id"]
    wait_stored(stack, phone, "is anyone there?")
    pk = conversation_pk(stack, phone)
    inbox = new_page(username="pia")
    wait_live(inbox)
    mark = inbox.locator(f"#viewing-{pk}")
    expect(mark).to_be_hidden()

    hana = new_page(username="hana")
    open_conversation(hana, stack, phone)
    # Nobody else yet: no presence bar; Pia's inbox marks the row as open by Hana.
    expect(hana.locator(f"#presence-{pk}")).to_be_hidden()
    expect(mark).to_be_visible()
    expect(mark).to_have_attribute("title", "Open now: Hana")

    pia = new_page(username="pia")
    open_conversation(pia, stack, phone)
    hana_bar, pia_bar = hana.locator(f"#presence-{pk}"), pia.locator(f"#presence-{pk}")
    expect(hana_bar).to_be_visible()
    expect(hana_bar.locator(".presence-person:visible")).to_have_count(1)
    expect(hana_bar.locator(".presence-person:visible")).to_contain_text("Pia")
    expect(pia_bar.locator(".presence-person:visible")).to_have_count(1)
    expect(pia_bar.locator(".presence-person:visible")).to_contain_text("Hana")

    take_over(hana, stack, session_id)
    hana.locator("textarea[name=text]").press_sequentially("One moment please")
    typing = pia.locator(f"#typing-{pk}")
    expect(typing).to_contain_text("Hana is typing")
    expect(typing).to_be_visible()
    expect(hana.locator(f"#typing-{pk}")).to_be_hidden()  # not to herself
    # It fades by itself once she stops.
    expect(typing).to_be_hidden(timeout=15_000)

    pia.close()
    expect(hana_bar).to_be_hidden()
    expect(mark).to_have_attribute("title", "Open now: Hana")


def test_screenshots_of_the_queue_and_the_countdown(new_page, stack, handoff_operators, tmp_path):
    """The README's handoff pictures: the queue waiting for a person, a held conversation's countdown."""
    out = DOCS if WRITE_DOCS else tmp_path
    for name, text in [
        ("Lucía Fernández", "¿Puedo hablar con una persona, por favor?"),
        ("Marc Dubois", "Je voudrais parler à un conseiller."),
        ("Grace Kim", "Can I talk to a real person? Order #55120 never arrived."),
    ]:
        phone = str(next(_phones))
        stack.sim.customer_says(phone=phone, name=name, text=text)
        wait_stored(stack, phone, text)
    page = new_page(username="hana")
    page.goto(f"{stack.base_url}/?f=needs")
    wait_live(page)
    expect(page.locator("#inbox-list .row.is-needs").first).to_be_visible()
    page.screenshot(path=str(out / "screenshot-queue.png"))

    open_conversation(page, stack, phone)
    take_over(page, stack, stack.shell(
        "from conversations.models import Conversation\n"
        f"print(Conversation.objects.filter(contact_phone={phone!r}).latest('started_at').session_id)"
    ))
    stack.shell(
        "from datetime import timedelta\n"
        "from django.utils import timezone\n"
        "from conversations.models import Conversation\n"
        "from conversations import selectors\n"
        f"c = Conversation.objects.filter(contact_phone={phone!r}).latest('started_at')\n"
        "idle = selectors.handoff_policy(c.agent_id).idle_seconds\n"
        "Conversation.objects.filter(pk=c.pk).update(holder_active_at=timezone.now() - timedelta(seconds=idle - 150))\n"
    )
    page.reload()
    wait_live(page)
    expect(page.locator(".idle-countdown")).to_be_visible()
    page.screenshot(path=str(out / "screenshot-countdown.png"))
    for name in ["screenshot-queue.png", "screenshot-countdown.png"]:
        assert (out / name).stat().st_size > 10_000
