"""Canned replies, internal notes and the contact panel in a real Chromium."""

import re

import pytest
from playwright.sync_api import expect

from tests.e2e.test_operator_flows import (
    DOCS,
    WRITE_DOCS,
    new_contact,
    open_conversation,
    take_over,
    wait_stored,
)


@pytest.fixture(scope="module")
def operators(stack):
    """People of their own (the stack outlives a module): a supervisor and an operator."""
    return {
        "ana": stack.create_user("tools_ana", role="Supervisors", first_name="Ana"),
        "bruno": stack.create_user("tools_bruno", role="Operators", first_name="Bruno"),
    }


def a_customer(stack, *, name: str, text: str) -> tuple[str, str]:
    """A new customer who wrote, stored by the worker: (their phone, the session)."""
    phone = new_contact()
    session_id = stack.sim.customer_says(phone=phone, name=name, text=text)["session_id"]
    wait_stored(stack, phone, text)
    return phone, session_id


def sends_to(stack, session_id: str) -> list:
    return [f for f in list(stack.sim.sim.received) if f.get("event") == "session.send" and f.get("session_id") == session_id]


def test_the_picker_inserts_a_canned_reply_by_keyboard_and_sends_nothing(new_page, stack, operators, tmp_path):
    phone, session_id = a_customer(stack, name="Zoë <b>Quinn</b>", text="Where is my order?")
    stack.shell(
        "from conversations.models import CannedReply\n"
        "CannedReply.objects.get_or_create(shortcut='order-late', defaults={'title': 'Order late', 'text': 'Sorry {{customer_first_name}}, it is late.'})\n"
        "CannedReply.objects.get_or_create(shortcut='order-status', defaults={'title': 'Order status', "
        "'text': 'Hi {{customer_first_name}}, {{operator_first_name}} here: your order is on its way.'})\n"
    )
    page = new_page(username=operators["ana"])
    open_conversation(page, stack, phone)
    take_over(page, stack, session_id)

    composer = page.locator("[data-composer] textarea")
    composer.click()
    composer.type("Hello! /ord")
    picker = page.locator("[data-canned-picker]")
    expect(picker).to_be_visible()
    expect(picker.locator("[role=option]")).to_have_count(2)
    expect(composer).to_have_attribute("aria-expanded", "true")
    expect(picker.locator("[aria-selected=true]")).to_contain_text("/order-late")
    composer.press("ArrowDown")
    expect(picker.locator("[aria-selected=true]")).to_contain_text("/order-status")
    page.screenshot(path=str(tmp_path / "picker.png"))
    composer.press("Enter")

    expect(composer).to_have_value("Hello! Hi Zoë, Ana here: your order is on its way.")
    expect(picker).to_be_hidden()
    count = stack.shell(
        "import time\n"
        "from conversations.models import CannedReply\n"
        "for _ in range(100):\n"
        "    if CannedReply.objects.get(shortcut='order-status').usage_count: break\n"
        "    time.sleep(0.05)\n"
        "print(CannedReply.objects.get(shortcut='order-status').usage_count)"
    )
    assert count == "1"
    assert sends_to(stack, session_id) == []  # inserted for editing: nothing went out

    composer.type(" /zzz")  # nothing matches: Enter closes the picker, it does not send "/zzz"
    expect(picker.locator(".canned-empty")).to_be_visible()
    composer.press("Enter")
    expect(picker).to_be_hidden()
    assert sends_to(stack, session_id) == []
    composer.press("Escape")
    composer.press("Enter")  # now Enter sends what was edited
    frame = stack.sim.wait_for("session.send", session_id=session_id)
    assert frame["text"] == "Hello! Hi Zoë, Ana here: your order is on its way. /zzz"
    page.goto(f"{stack.base_url}/replies/")
    expect(page.locator(".canned-row", has_text="/order-status")).to_contain_text("used 1 time")
    page.screenshot(path=str(tmp_path / "replies.png"))


def test_a_note_appears_as_a_note_and_tells_the_mentioned_operator(new_page, stack, operators):
    phone, session_id = a_customer(stack, name="Marta Gil", text="The charger does not work")
    # An earlier conversation with the same person, and a call from them.
    stack.shell(
        "from datetime import timedelta\n"
        "from django.conf import settings\n"
        "from django.utils import timezone\n"
        "from conversations.models import Call, Conversation\n"
        "earlier = timezone.now() - timedelta(days=6)\n"
        f"Conversation.objects.create(session_id='earlier-{phone}', agent_id=settings.PINECALL_AGENT_ID, contact_phone='{phone}',"
        " contact_name='Marta Gil', state='ended', end_reason='idle_timeout', started_at=earlier, ended_at=earlier, message_count=4)\n"
        f"Call.objects.create(call_id='call-{phone}', agent_id=settings.PINECALL_AGENT_ID, from_number='+{phone}', state='ended',"
        " started_at=earlier, ended_at=earlier, end_reason='hangup', duration_seconds=95)\n"
    )
    bruno = new_page(username=operators["bruno"])
    expect(bruno.locator("#live-status")).to_have_attribute("data-state", "live")
    page = new_page(username=operators["ana"], width=1280, height=800)
    open_conversation(page, stack, phone)

    panel = page.locator("[data-contact-panel]")
    expect(panel).to_be_visible()  # a column at 1280 px
    expect(panel.locator("[data-cp=sessions] a")).to_have_count(1)
    expect(panel.locator("[data-cp=sessions]")).to_contain_text("Handled by the AI alone")
    expect(panel.locator("[data-cp=calls] a")).to_have_attribute("href", re.compile(r"/calls/\d+/"))
    expect(panel.locator("[data-cp=calls]")).to_contain_text("95 s")

    page.click("[data-compose-tab=note]")
    note_box = page.locator("[data-note-composer] textarea")
    expect(note_box).to_be_focused()
    note_box.type("@tools_bruno she already tried two chargers: replacement approved")
    note_box.press("Control+Enter")
    note = page.locator(".internal-note").last
    expect(note).to_contain_text("Internal note")
    expect(note).to_contain_text("replacement approved")
    expect(note_box).to_have_value("")

    toast = bruno.locator("[data-notice=mention]")
    expect(toast).to_contain_text("Ana mentioned you")
    expect(toast.locator("a")).to_have_attribute("href", re.compile(r"/c/\d+/"))
    assert sends_to(stack, session_id) == [] and not any(
        "replacement approved" in str(frame) for frame in list(stack.sim.sim.received)
    )

    # On reload the note is in its place in the timeline, and in the panel.
    page.reload()
    expect(page.locator(".internal-note")).to_contain_text("replacement approved")
    expect(panel.locator("[data-cp=notes]")).to_contain_text("replacement approved")
    if WRITE_DOCS:
        page.screenshot(path=str(DOCS / "screenshot-notes.png"))

    # Narrow: the panel is a drawer, opened and closed from the conversation.
    narrow = new_page(username=operators["ana"], width=820, height=900)
    narrow.goto(page.url)
    expect(narrow.locator("[data-contact-panel]")).to_be_hidden()
    narrow.click(".contact-toggle")
    expect(narrow.locator("[data-contact-panel]")).to_be_visible()
    narrow.keyboard.press("Escape")
    expect(narrow.locator("[data-contact-panel]")).to_be_hidden()
