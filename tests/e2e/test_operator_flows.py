"""Operators' flows in a real Chromium against Daphne, the worker and the simulator."""

import itertools
import os
import re
import uuid
from pathlib import Path

import pytest
from playwright.sync_api import expect

DOCS = Path(__file__).resolve().parents[2] / "docs"
# The README's screenshots are rewritten only when asked (`make screenshots`).
WRITE_DOCS = os.environ.get("SCREENSHOTS") == "1"
expect.set_options(timeout=15_000)
_phones = itertools.count(34655500001)


def new_contact() -> str:
    return str(next(_phones))


def wait_live(page) -> None:
    """The page's live socket is open and has caught up: what happens next reaches it."""
    expect(page.locator("#live-status")).to_have_attribute("data-state", "live")


def expect_confirmed_holder(page, text: str) -> None:
    """The header shows a confirmed hold (no "Taking over…" left): a lasting state."""
    expect(page.locator("[data-badge]")).to_contain_text(text)
    expect(page.locator("[data-badge=pending]")).to_have_count(0)
    expect(page.locator(".conv-alert")).to_have_count(0)


def take_over(page, stack, session_id: str) -> None:
    """Click Take over and wait until Pinecall confirmed and the page settled."""
    page.click("[data-action=take-over]")
    stack.sim.wait_for("session.pause", session_id=session_id)
    expect_confirmed_holder(page, "You hold")
    expect(page.locator(".note").last).to_contain_text("took over")


def conversation_pk(stack, phone: str) -> str:
    return stack.shell(
        "from conversations.models import Conversation\n"
        f"print(Conversation.objects.filter(contact_phone={phone!r}).latest('started_at').pk)"
    )


def open_conversation(page, stack, phone: str) -> None:
    pk = conversation_pk(stack, phone)
    page.goto(f"{stack.base_url}/c/{pk}/")
    expect(page).to_have_url(re.compile(rf"/c/{pk}/"))
    wait_live(page)


def wait_stored(stack, phone: str, text: str) -> None:
    """Wait until the worker has stored the customer's message (it may take a moment)."""
    code = (
        "import time\n"
        "from conversations.models import Message\n"
        "for _ in range(100):\n"
        f"    if Message.objects.filter(text={text!r}, conversation__contact_phone={phone!r}).exists():\n"
        "        break\n"
        "    time.sleep(0.1)\n"
        "else:\n"
        "    raise SystemExit('not stored')\n"
    )
    stack.shell(code)


@pytest.fixture(scope="module")
def operators(stack):
    return {
        "ana": stack.create_user("ana", role="Supervisors", first_name="Ana"),
        "bruno": stack.create_user("bruno", role="Operators", first_name="Bruno"),
    }


def test_an_anonymous_browser_lands_on_the_login_page(new_page, stack):
    page = new_page()
    page.goto(f"{stack.base_url}/")
    expect(page).to_have_url(re.compile(r"/login/\?next=/$"))
    expect(page.locator("input[name=password]")).to_be_visible()


def test_a_customer_message_appears_without_reload(new_page, stack, operators):
    page = new_page(username="ana")
    page.evaluate("window.__sameDocument = true")
    phone, token = new_contact(), uuid.uuid4().hex[:8]
    name = f"Live Lena {token}"

    # The row arrives live. Its preview soon moves on to the AI's reply, so the
    # lasting facts are checked: the row, and the customer's bubble once opened.
    stack.sim.customer_says(phone=phone, name=name, text=f"Hello {token}")
    row = page.locator(".row", has_text=name)
    expect(row).to_have_count(1)
    assert page.evaluate("window.__sameDocument === true"), "the inbox reloaded"

    row.click()
    pk = conversation_pk(stack, phone)
    expect(page).to_have_url(re.compile(rf"/c/{pk}/"))
    wait_live(page)
    expect(page.locator("[data-author=customer]").first).to_contain_text(f"Hello {token}")
    page.evaluate("window.__sameDocument = true")
    stack.sim.customer_says(phone=phone, text=f"Second {token}")
    expect(page.locator("[data-author=customer]").last).to_contain_text(f"Second {token}")
    assert page.evaluate("window.__sameDocument === true"), "the page reloaded"


def test_take_over_send_and_hand_back_from_the_browser(new_page, stack, operators):
    phone = new_contact()
    session_id = stack.sim.customer_says(phone=phone, name="Hugo Held", text="I need a person")[
        "session_id"
    ]
    wait_stored(stack, phone, "I need a person")
    page = new_page(username="ana")
    open_conversation(page, stack, phone)

    take_over(page, stack, session_id)
    assert stack.sim.sim.is_paused(session_id)

    composer = page.locator("textarea[name=text]")
    composer.fill("Hi Hugo, Ana here.")
    composer.press("Shift+Enter")
    composer.type("How can I help?")
    composer.press("Enter")
    frame = stack.sim.wait_for("session.send", session_id=session_id)
    assert frame["text"] == "Hi Hugo, Ana here.\nHow can I help?"
    assert frame["contact"] == phone
    human = page.locator("[data-author=human]").last
    expect(human).to_contain_text("How can I help?")
    expect(human).to_contain_text("Ana")
    expect(composer).to_have_value("")
    history = stack.sim.sim.session_history(session_id)
    assert any(
        e["role"] == "assistant" and e["content"] == "Hi Hugo, Ana here.\nHow can I help?"
        for e in history
    )

    page.click("[data-action=hand-back]")
    stack.sim.wait_for("session.resume", session_id=session_id)
    expect(page.locator("[data-badge=ai]")).to_be_visible()
    expect(page.locator(".note").last).to_contain_text("Handed back")


def test_a_second_operator_sees_the_holder_change_live(new_page, stack, operators):
    phone = new_contact()
    session_id = stack.sim.customer_says(phone=phone, name="Two Ops", text="hello both")[
        "session_id"
    ]
    wait_stored(stack, phone, "hello both")
    ana, bruno = new_page(username="ana"), new_page(username="bruno")
    open_conversation(ana, stack, phone)
    open_conversation(bruno, stack, phone)
    expect(bruno.locator("[data-action=take-over]")).to_be_visible()

    ana.click("[data-action=take-over]")
    stack.sim.wait_for("session.pause", session_id=session_id)
    expect_confirmed_holder(ana, "You hold")
    expect_confirmed_holder(bruno, "Ana")
    expect(bruno.locator("textarea[name=text]")).to_have_count(0)
    take_from_ana = bruno.locator("[data-action=take-over-force]")
    expect(take_from_ana).to_be_visible()

    # Bruno must confirm explicitly; then he holds it and Ana sees that live.
    take_from_ana.click()
    dialog = bruno.locator("#confirm-dialog")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("Ana holds this conversation")
    dialog.locator("#confirm-ok").click()
    expect_confirmed_holder(bruno, "You hold")
    expect_confirmed_holder(ana, "Bruno")
    expect(bruno.locator("textarea[name=text]")).to_be_visible()
    expect(ana.locator("textarea[name=text]")).to_have_count(0)


def test_a_confirmation_survives_the_header_changing_under_the_dialog(new_page, stack, operators):
    """A live update swaps the header while the dialog is open: the confirmed action
    still goes out (htmx drops requests from elements that left the page)."""
    phone = new_contact()
    session_id = stack.sim.customer_says(phone=phone, name="Swap Sam", text="hi there")[
        "session_id"
    ]
    wait_stored(stack, phone, "hi there")
    ana, bruno = new_page(username="ana"), new_page(username="bruno")
    open_conversation(ana, stack, phone)
    take_over(ana, stack, session_id)
    open_conversation(bruno, stack, phone)
    bruno.click("[data-action=take-over-force]")
    expect(bruno.locator("#confirm-dialog")).to_be_visible()
    # Replace the header under the open dialog, as a live state update does.
    bruno.evaluate(
        "window.__asked = document.querySelector('[data-action=take-over-force]');"
        "htmx.ajax('GET', location.pathname + 'state/', {swap: 'none'})"
    )
    bruno.wait_for_function("() => !document.body.contains(window.__asked)")
    expect(bruno.locator("[data-action=take-over-force]")).to_have_count(1)
    bruno.locator("#confirm-ok").click()
    expect_confirmed_holder(bruno, "You hold")
    expect_confirmed_holder(ana, "Bruno")


def test_html_from_a_customer_is_shown_as_text_and_never_runs(new_page, stack, operators):
    phone = new_contact()
    payload = "<img src=x onerror=alert(1)><script>alert(2)</script>"
    stack.sim.customer_says(phone=phone, name="<b>Mallory</b>", text=payload)
    wait_stored(stack, phone, payload)
    page = new_page(username="ana")
    expect(page.locator("body")).to_contain_text("<b>Mallory</b>")
    open_conversation(page, stack, phone)
    bubble = page.locator("[data-author=customer]").last
    expect(bubble).to_contain_text(payload)
    assert bubble.locator("img, script").count() == 0
    # And live: a second one pushed over the socket.
    stack.sim.customer_says(phone=phone, text=payload + " again")
    expect(page.locator("[data-author=customer]").last).to_contain_text(payload + " again")
    assert page.locator("[data-author=customer] img").count() == 0
    assert page.dialogs == [], "customer HTML ran"


def test_screenshots_for_the_readme(new_page, stack, operators, tmp_path):
    """The inbox and a conversation held by an operator, at desktop and phone widths.

    Written to docs/ only by `make screenshots`; a test run leaves the tree as it was.
    """
    out = DOCS if WRITE_DOCS else tmp_path
    phone = new_contact()
    session_id = stack.sim.customer_says(
        phone=phone, name="Sofía Reyes", text="Hi! My order #48213 arrived damaged, the box was crushed."
    )["session_id"]
    stack.sim.customer_says(phone=phone, type="audio", text="I'd like a replacement, not a refund please.")
    stack.sim.customer_says(phone=phone, text="Can I talk to a real person?")
    wait_stored(stack, phone, "Can I talk to a real person?")
    page = new_page(username="ana")
    open_conversation(page, stack, phone)
    take_over(page, stack, session_id)
    composer = page.locator("textarea[name=text]")
    composer.fill("Hi Sofía, I'm Ana from the support team. I'm sorry about that! A replacement is on its way today.")
    composer.press("Enter")
    human = page.locator("[data-author=human]").last
    expect(human).to_contain_text("replacement is on its way")
    stack.sim.customer_says(phone=phone, text="Thank you so much!")
    expect(page.locator("[data-author=customer]").last).to_contain_text("Thank you so much!")
    # Settled: the reply read by the customer, and the unread count cleared.
    expect(human.locator(".tick-read")).to_have_count(1)
    pk = conversation_pk(stack, phone)
    expect(page.locator(f"#row-{pk} .unread")).to_have_count(0)
    page.screenshot(path=str(out / "screenshot-desktop.png"))
    url = page.url

    phone_page = new_page(username="ana", width=390, height=844)
    expect(phone_page.locator(f"#row-{pk}")).to_be_visible()
    phone_page.screenshot(path=str(out / "screenshot-inbox-phone.png"))
    phone_page.goto(url)
    wait_live(phone_page)
    expect(phone_page.locator("[data-author=customer]").last).to_contain_text("Thank you so much!")
    phone_page.screenshot(path=str(out / "screenshot-conversation-phone.png"))
    page.goto(f"{stack.base_url}/")
    wait_live(page)
    expect(page.locator(f"#row-{pk}")).to_be_visible()
    page.screenshot(path=str(out / "screenshot-inbox-desktop.png"))
    for name in [
        "screenshot-desktop.png",
        "screenshot-inbox-desktop.png",
        "screenshot-inbox-phone.png",
        "screenshot-conversation-phone.png",
    ]:
        assert (out / name).stat().st_size > 10_000


def test_typing_right_after_take_over_is_neither_lost_nor_blocked(new_page, stack, operators):
    """The header says "you can already write": the first reply must survive the
    state updates that arrive while Pinecall confirms the pause."""
    phone = new_contact()
    session_id = stack.sim.customer_says(phone=phone, name="Quick Quinn", text="hello?")["session_id"]
    wait_stored(stack, phone, "hello?")
    page = new_page(username="ana")
    open_conversation(page, stack, phone)
    page.click("[data-action=take-over]")
    composer = page.locator("textarea[name=text]")
    composer.fill("Right here, Quinn!")
    composer.press("Enter")
    frame = stack.sim.wait_for("session.send", session_id=session_id)
    assert frame["text"] == "Right here, Quinn!"
    expect(page.locator("[data-author=human]").last).to_contain_text("Right here, Quinn!")
    expect(composer).to_have_value("")
    # Once the pause is confirmed and its state refreshes have landed, the text is
    # still gone (a refresh must not bring the sent draft back).
    stack.sim.wait_for("session.pause", session_id=session_id)
    expect_confirmed_holder(page, "You hold")
    expect(page.locator("[data-author=human] .tick-read")).to_have_count(1)
    expect(page.locator("textarea[name=text]")).to_have_value("")


# What a page shows, as data: the conversation pane and its inbox row, without
# times and animations (which a reload legitimately renders anew).
SNAPSHOT_JS = """(pk) => {
  const text = (el) => (el ? el.textContent.replace(/\\s+/g, ' ').trim() : null);
  const row = document.getElementById('row-' + pk);
  const header = document.getElementById('conv-header-' + pk);
  const composer = document.getElementById('composer-' + pk);
  return {
    messages: Array.from(document.querySelectorAll('#messages-' + pk + ' [data-msg-id]')).map((m) => ({
      id: m.dataset.msgId,
      author: m.dataset.author || null,
      text: text(m.querySelector('.bubble-text, .text, p')) || text(m).replace(/\\d{1,2}:\\d{2}/g, ''),
      ticks: Array.from(m.querySelectorAll('[class*=tick-]')).map((t) => Array.from(t.classList).filter((c) => c.startsWith('tick-')).join(' ')),
    })),
    header: header && {
      holder: header.dataset.holder,
      badge: text(header.querySelector('[data-badge]')),
      actions: Array.from(header.querySelectorAll('[data-action]')).map((b) => b.dataset.action + (b.disabled ? ':off' : '')),
      alerts: Array.from(header.querySelectorAll('.conv-alert')).map(text),
    },
    composer: composer && { mode: composer.dataset.mode, notice: text(composer.querySelector('.composer-notice')) },
    row: row && {
      state: row.dataset.state, needs: row.dataset.needs, heldBy: row.dataset.heldBy,
      mine: row.classList.contains('is-mine'), active: row.classList.contains('is-active'),
      preview: text(row.querySelector('.row-preview')),
      chips: Array.from(row.querySelectorAll('.row-meta .chip')).filter((c) => c.offsetParent !== null).map((c) => text(c).replace(/\\d+\\s*\\w+ ago|now/g, '')),
      unread: text(row.querySelector('.unread')),
    },
    mineCount: (document.getElementById('tab-count-mine') || {}).textContent || null,
  };
}"""


def test_live_equals_reload(new_page, stack, operators):
    """After a conversation's whole life arrived live (messages, the AI's replies, a take
    over, a reply and its ticks, another operator's view), the page equals the same page
    reloaded: nothing the stream sent is missing, doubled or stale."""
    phone = new_contact()
    session_id = stack.sim.customer_says(phone=phone, name="Same Sam", text="hi, my parcel is late")["session_id"]
    wait_stored(stack, phone, "hi, my parcel is late")
    pk = conversation_pk(stack, phone)
    page = new_page(username="bruno")
    open_conversation(page, stack, phone)
    other = new_page(username="ana")  # the other operator, on the inbox: presence and rows
    wait_live(other)

    stack.sim.customer_says(phone=phone, text="order <b>#7781</b>")
    expect(page.locator("[data-author=customer]").last).to_contain_text("order <b>#7781</b>")
    expect(page.locator("[data-author=ai]")).to_have_count(2)  # the AI answered both
    take_over(page, stack, session_id)
    composer = page.locator("textarea[name=text]")
    composer.fill("Bruno here: it leaves the depot today.")
    composer.press("Enter")
    human = page.locator("[data-author=human]").last
    expect(human.locator(".tick-read")).to_have_count(1)
    stack.sim.customer_says(phone=phone, text="great, thanks")
    expect(page.locator("[data-author=customer]").last).to_contain_text("great, thanks")
    expect(page.locator(f"#row-{pk} .row-preview")).to_contain_text("great, thanks")
    expect(page.locator(f"#row-{pk} .unread")).to_have_count(0)  # read: the holder has it open

    live = page.evaluate(SNAPSHOT_JS, pk)
    page.reload()
    wait_live(page)
    reloaded = page.evaluate(SNAPSHOT_JS, pk)
    assert live == reloaded
    # And the snapshot says something: the whole life is in it.
    authors = [m["author"] for m in live["messages"] if m["author"]]
    assert authors.count("customer") == 3 and authors.count("human") == 1, authors
    assert live["header"]["holder"] == "me" and live["row"]["mine"] is True
