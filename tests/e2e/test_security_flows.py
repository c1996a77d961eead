"""Security in a real Chromium: no CSP violation anywhere (the live socket included), one
command for a double click, and a composer that counts what the server counts."""

from __future__ import annotations

import itertools
import re
import uuid

import pytest
from playwright.sync_api import expect

from tests.e2e.conftest import PASSWORD
from tests.e2e.test_operator_flows import (
    conversation_pk,
    expect_confirmed_holder,
    open_conversation,
    wait_live,
    wait_stored,
)

expect.set_options(timeout=15_000)
_phones = itertools.count(34655700001)

# Every CSP violation any page of the context sees, reported to the test at once (a
# navigation would lose what the page kept itself).
WATCH_CSP = """
document.addEventListener("securitypolicyviolation", function (e) {
  window.reportCspViolation(
    location.pathname + ": " + e.violatedDirective + " " + e.blockedURI + " " + (e.sample || ""));
});
"""


def new_contact() -> str:
    return str(next(_phones))


@pytest.fixture(scope="module")
def people(stack):
    stack.create_user("sec_sara", role="Supervisors", first_name="Sara")
    stack.shell(
        "from django.contrib.auth.models import User\n"
        f"User.objects.create_superuser('sec_root', password={PASSWORD!r})\n"
    )
    return {"supervisor": "sec_sara", "admin": "sec_root"}


def watched_page(new_page):
    """A page whose CSP violations are collected from its very first load."""
    page = new_page()
    page.csp_violations = []
    page.context.expose_function("reportCspViolation", lambda v: page.csp_violations.append(v))
    page.on(
        "console",
        lambda msg: page.csp_violations.append(msg.text)
        if "Content Security Policy" in msg.text or "Content-Security-Policy" in msg.text
        else None,
    )
    page.context.add_init_script(WATCH_CSP)
    return page


def log_in(page, stack, username: str, path: str = "/login/") -> None:
    page.goto(f"{stack.base_url}{path}")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit], input[type=submit]")


def csp_violations(page) -> list[str]:
    return list(page.csp_violations)


def take_over_and_settle(page, stack, session_id: str) -> None:
    after = len(stack.sim.sim.received)
    page.click("[data-action=take-over]")
    stack.sim.wait_for("session.pause", session_id=session_id, after=after)
    expect_confirmed_holder(page, "You hold")


def test_no_csp_violation_while_using_the_inbox_and_a_conversation(new_page, stack, people):
    page = watched_page(new_page)
    log_in(page, stack, people["supervisor"])
    page.wait_for_url(f"{stack.base_url}/")
    wait_live(page)  # the WebSocket connects under connect-src
    policy = page.evaluate(
        "fetch(location.href).then(r => r.headers.get('content-security-policy'))"
    )
    assert "script-src 'self'" in policy and "unsafe-eval" not in policy

    phone, token = new_contact(), uuid.uuid4().hex[:8]
    session_id = stack.sim.customer_says(phone=phone, name=f"Csp Cleo {token}", text="hello")[
        "session_id"
    ]
    expect(page.locator(".row", has_text=f"Csp Cleo {token}")).to_have_count(1)  # live row
    page.fill("#inbox-q", token)  # the search (htmx, pushes the URL)
    expect(page.locator("#inbox-list .row")).to_have_count(1)
    page.locator(".row", has_text=token).click()
    pk = conversation_pk(stack, phone)
    expect(page).to_have_url(re.compile(rf"/c/{pk}/"))
    wait_live(page)

    take_over_and_settle(page, stack, session_id)
    composer = page.locator("textarea[name=text]")
    composer.fill("Under a strict policy")
    composer.press("Enter")
    expect(page.locator("[data-author=human]").last).to_contain_text("Under a strict policy")
    stack.sim.customer_says(phone=phone, text="thanks")
    expect(page.locator("[data-author=customer]").last).to_contain_text("thanks")
    page.click("[data-action=pause-contact]")
    page.locator("#confirm-ok").click()  # the styled dialog
    stack.sim.wait_for("session.pause", contact=phone)
    after = len(stack.sim.sim.received)
    page.click("[data-action=hand-back]")
    stack.sim.wait_for("session.resume", session_id=session_id, after=after)
    expect(page.locator(".note").last).to_contain_text("Handed back")
    page.goto(f"{stack.base_url}/")
    wait_live(page)
    assert csp_violations(page) == []


def test_admin_works_under_the_policy(new_page, stack, people):
    page = watched_page(new_page)
    log_in(page, stack, people["admin"], path="/admin/login/?next=/admin/")
    page.wait_for_url(f"{stack.base_url}/admin/")
    assert csp_violations(page) == []  # the login page and the index
    page.goto(f"{stack.base_url}/admin/conversations/conversation/")
    expect(page.locator("#result_list")).to_be_visible()
    expect(page.locator("#changelist-filter")).to_be_visible()
    # Admin's own scripts run: the actions' "select all" checkbox ticks every row.
    page.check("#action-toggle")
    expect(page.locator(".action-counter")).to_contain_text("selected")
    # Customers' names keep their own direction in the list.
    direction = page.evaluate(
        "getComputedStyle(document.querySelector('#result_list td')).unicodeBidi"
    )
    assert direction == "plaintext"
    page.locator("#result_list tbody th a").first.click()  # a conversation's change page
    expect(page).to_have_url(re.compile(r"/admin/conversations/conversation/\d+/change/"))
    expect(page.locator("#content-main")).to_be_visible()
    assert csp_violations(page) == []


def test_a_double_click_on_hand_back_sends_one_resume(new_page, stack, people):
    phone = new_contact()
    session_id = stack.sim.customer_says(phone=phone, name="Double Dora", text="hi")[
        "session_id"
    ]
    wait_stored(stack, phone, "hi")
    page = new_page(username=people["supervisor"])
    open_conversation(page, stack, phone)
    take_over_and_settle(page, stack, session_id)
    pk = conversation_pk(stack, phone)

    # Count the hand-back requests the page makes, and their answers.
    page.evaluate(
        """() => {
          window.__handBacks = {sent: 0, answered: 0};
          document.addEventListener("htmx:beforeRequest", function (e) {
            if (!/\\/hand-back\\/$/.test(e.detail.requestConfig.path)) return;
            window.__handBacks.sent += 1;
            e.detail.xhr.addEventListener("loadend", function () {
              window.__handBacks.answered += 1;
            });
          });
        }"""
    )
    start = len(stack.sim.sim.received)
    page.dblclick("[data-action=hand-back]")
    page.wait_for_function(
        "() => __handBacks.sent > 0 && __handBacks.answered === __handBacks.sent"
    )
    stack.sim.wait_for("session.resume", session_id=session_id, after=start)
    expect(page.locator("[data-badge=ai]")).to_be_visible()

    # A witness: the next action's frame comes after anything the double click queued.
    take_over_and_settle(page, stack, session_id)
    frames = stack.sim.sim.received[start:]
    resumes = [f for f in frames if f.get("event") == "session.resume"]
    assert len(resumes) == 1, resumes
    count = stack.shell(
        "from conversations.models import Command\n"
        f"print(Command.objects.filter(conversation_id={pk}, kind='resume').count())"
    )
    assert count == "1"


def test_two_simultaneous_hand_backs_make_one_resume(new_page, stack, people):
    """Past the button's own guard (two tabs, a retry): two POSTs at once, one command."""
    phone = new_contact()
    session_id = stack.sim.customer_says(phone=phone, name="Twin Tess", text="hey")["session_id"]
    wait_stored(stack, phone, "hey")
    page = new_page(username=people["supervisor"])
    open_conversation(page, stack, phone)
    take_over_and_settle(page, stack, session_id)
    pk = conversation_pk(stack, phone)
    start = len(stack.sim.sim.received)
    statuses = page.evaluate(
        """(pk) => {
          const token = JSON.parse(document.body.getAttribute("hx-headers"))["X-CSRFToken"];
          const post = () => fetch(`/c/${pk}/hand-back/`, {
            method: "POST", headers: {"X-CSRFToken": token, "HX-Request": "true"}});
          return Promise.all([post(), post()]).then(rs => rs.map(r => r.status));
        }""",
        int(pk),
    )
    assert statuses == [200, 200]
    stack.sim.wait_for("session.resume", session_id=session_id, after=start)
    expect(page.locator("[data-badge=ai]")).to_be_visible()
    take_over_and_settle(page, stack, session_id)
    resumes = [f for f in stack.sim.sim.received[start:] if f.get("event") == "session.resume"]
    assert len(resumes) == 1, resumes


def test_the_composer_counts_characters_as_the_server_does(new_page, stack, people):
    limit = int(
        stack.shell("from django.conf import settings\nprint(settings.MESSAGE_MAX_LENGTH)")
    )
    phone = new_contact()
    session_id = stack.sim.customer_says(phone=phone, name="Emoji Emma", text="😀?")[
        "session_id"
    ]
    wait_stored(stack, phone, "😀?")
    page = new_page(username=people["supervisor"])
    open_conversation(page, stack, phone)
    take_over_and_settle(page, stack, session_id)

    composer = page.locator("textarea[name=text]")
    counter = page.locator("[data-counter]")
    whole = "😀" * limit  # twice as many UTF-16 units: a native maxlength would cut it in half
    composer.fill(whole)
    expect(counter).to_have_text(f"{limit} / {limit}")
    composer.press("Enter")
    frame = stack.sim.wait_for("session.send", session_id=session_id)
    assert frame["text"] == whole
    expect(composer).to_have_value("")
    stored = stack.shell(
        "from conversations.models import Message\n"
        f"print(len(Message.objects.filter(conversation__contact_phone={phone!r}, "
        "author='human').latest('id').text))"
    )
    assert stored == str(limit)

    # One more: refused in the page with the reason, the text kept, nothing sent.
    after = len(stack.sim.sim.received)
    composer.fill(whole + "😀")
    expect(counter).to_have_text(f"{limit + 1} / {limit}")
    composer.press("Enter")
    expect(page.locator("[data-too-long]")).to_contain_text(
        f"at most {limit} characters (this has {limit + 1})"
    )
    expect(composer).to_have_value(whole + "😀")
    # Shortened, the reason goes; a witness send shows nothing else went out before it.
    composer.fill("short")
    expect(page.locator("[data-too-long]")).to_have_count(0)
    composer.press("Enter")
    stack.sim.wait_for("session.send", session_id=session_id, after=after, text="short")
    sends = [f for f in stack.sim.sim.received[after:] if f.get("event") == "session.send"]
    assert [f["text"] for f in sends] == ["short"]


def test_too_many_failed_logins_lock_with_a_clear_message(new_page, stack, people):
    """Through Daphne (axes' async middleware path): the login page says when to retry."""
    username = stack.create_user(f"sec_locked_{uuid.uuid4().hex[:6]}")
    page = new_page()
    page.goto(f"{stack.base_url}/login/")
    for attempt in range(5):
        page.fill("input[name=username]", username)
        page.fill("input[name=password]", "not-the-password")
        page.click("button[type=submit]")
        if attempt < 4:
            expect(page.locator(".alert-error")).to_contain_text("don't match")
    expect(page.locator("[data-lockout]")).to_contain_text(
        "Too many failed attempts for this account from your network: try again in 15 minutes."
    )
    # The right password is refused too, until the cool-off ends.
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    expect(page.locator("[data-lockout]")).to_be_visible()
    expect(page).to_have_url(re.compile(r"/login/"))
    audited = stack.shell(
        "from conversations.models import AuditEntry\n"
        f"print(AuditEntry.objects.filter(action='login', outcome='refused', "
        f"operator__username={username!r}).count())"
    )
    assert audited == "2"


def test_logging_out_closes_the_other_tabs_sockets(new_page, stack, people):
    page = new_page(username=people["supervisor"])
    other_tab = page.context.new_page()  # the same login session
    other_tab.goto(f"{stack.base_url}/")
    wait_live(other_tab)
    page.click("text=Log out")
    page.wait_for_url(re.compile(r"/login/"))
    expect(other_tab.locator("#live-status")).to_have_attribute("data-state", "off")
    expect(other_tab.locator("#live-status")).to_contain_text("Signed out · reload")
