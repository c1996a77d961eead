"""A burst bigger than an inbox page, watched from an open inbox in a real Chromium.

When one of the worker's batches moves more rows than a page holds, only the
newest page of rows is sent live, with a hint that makes the page reload its
list once the burst is over. What the operator sees must not depend on that
shortcut: the newest page, newest first, each row previewing its last message,
"Load more" for the rest, exactly as a freshly loaded inbox shows them.
"""

import asyncio
import time
import uuid

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import expect

from tests.e2e.test_operator_flows import new_contact, wait_live

PAGE = 50  # settings.INBOX_PAGE_SIZE
CUSTOMERS = 150  # enough to pile up beyond a page between two of the worker's batches

# What an operator reads in each row of the list, plus the row's identity and version.
ROWS_JS = """() => Array.from(document.querySelectorAll('#inbox-list .row')).map(r => ({
  id: r.id,
  sort: r.dataset.sort,
  version: r.dataset.version,
  state: r.dataset.state,
  name: (r.querySelector('.row-name') || {}).textContent || '',
  author: ((r.querySelector('.row-author') || {}).textContent || '').trim(),
  preview: (r.querySelector('.row-preview bdi') || {}).textContent || '',
}))"""

# True once the list starts with the expected rows (names and previews, in this
# order) and offers "Load more" after them.
SETTLED_JS = """(expected) => {
  const rows = Array.from(document.querySelectorAll('#inbox-list .row')).slice(0, expected.length);
  if (rows.length < expected.length || !document.querySelector('#inbox-list #inbox-more button')) return false;
  return rows.every((r, i) =>
    (r.querySelector('.row-name') || {}).textContent === expected[i][0] &&
    (r.querySelector('.row-preview bdi') || {}).textContent === expected[i][1]);
}"""

# Counts the live frames that told this page a batch sent only its newest rows.
COUNT_QUIET_HINTS_JS = """() => {
  window.__quietHints = 0;
  document.addEventListener('htmx:wsBeforeMessage', (e) => {
    if (String(e.detail.message).indexOf('data-refresh="quiet"') >= 0) window.__quietHints += 1;
  });
}"""


@pytest.fixture(scope="module")
def burst_operator(stack):
    return stack.create_user("burst_olga", role="Operators", first_name="Olga")


async def _burst(sim, customers):
    """Every customer writes at once: no await between them, so their frames leave together."""
    return [(await sim.customer_says(phone=phone, name=name, text=text))["session_id"]
            for phone, name, text in customers]


async def _ai_replies(sim, session_ids, timeout=30.0):
    """Each session's last message once the AI has answered it (polled, never assumed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        histories = [sim.session_history(sid) for sid in session_ids]
        if all(h and h[-1]["role"] == "assistant" for h in histories):
            return [h[-1]["content"] for h in histories]
        if loop.time() > deadline:
            raise AssertionError("the simulated AI did not answer every customer")
        await asyncio.sleep(0.05)


def watch_errors(page) -> list:
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    return errors


def open_inbox(page, stack) -> None:
    page.goto(f"{stack.base_url}/")
    wait_live(page)
    expect(page.locator("#inbox-list")).to_have_attribute("data-filter", "active")
    expect(page.locator(".tab.is-active")).to_have_attribute("data-filter", "active")


def load_all(page, count: int) -> list[dict]:
    """Click "Load more" as an operator would until `count` rows are listed (or no more)."""
    rows = page.locator("#inbox-list .row")
    while rows.count() < count and page.locator("#inbox-more button").count():
        before = rows.count()
        page.click("#inbox-more button")
        page.wait_for_function(
            "(n) => document.querySelectorAll('#inbox-list .row').length > n", arg=before
        )
    return page.evaluate(ROWS_JS)


def test_a_burst_bigger_than_a_page_ends_up_listed_as_a_fresh_inbox_lists_it(
    new_page, stack, burst_operator
):
    page = new_page(username=burst_operator)
    errors = watch_errors(page)
    watch_inbox(page)
    open_inbox(page, stack)
    page.evaluate(COUNT_QUIET_HINTS_JS)
    page.evaluate("window.__sameDocument = true")

    token = uuid.uuid4().hex[:6]
    customers = [
        (new_contact(), f"Burst{n:03d} {token}", f"Hello, question {n} from burst {token}")
        for n in range(CUSTOMERS)
    ]
    session_ids = stack.sim.call(_burst(stack.sim.sim, customers))
    # The AI answers each of them: its reply is then every conversation's last message.
    last_texts = stack.sim.call(_ai_replies(stack.sim.sim, session_ids), timeout=40)

    # Newest first: the customer who wrote last (and was answered last) on top.
    newest_first = [(name, text) for (_, name, _), text in zip(customers, last_texts)][::-1]
    expected_page = newest_first[:PAGE]
    try:
        page.wait_for_function(SETTLED_JS, arg=[list(row) for row in expected_page], timeout=45_000)
        # And the hint's reload has come back (rows listed before the burst, from other
        # tests, sit below the live ones until it does).
        inbox_quiet(page)
    except PlaywrightTimeout:
        pass  # the assertions below say what the list shows instead
    shown = page.evaluate(ROWS_JS)
    assert [(row["name"], row["preview"]) for row in shown[:PAGE]] == expected_page
    assert all(row["author"] == "AI:" and row["state"] == "active" for row in shown[:PAGE])
    listed_names = {row["name"] for row in shown}
    unlisted = [name for name, _ in newest_first if name not in listed_names]
    assert page.locator("#inbox-list #inbox-more button").count() == 1, (
        f"no \"Load more\" after {len(shown)} rows: {len(unlisted)} of the burst's "
        f"{CUSTOMERS} conversations cannot be reached without reloading ({unlisted[:3]}…)"
    )

    # The premise: a batch did move more than a page, so only its newest rows came live.
    assert page.evaluate("window.__quietHints") >= 1, (
        "no batch moved more than a page of rows: the burst did not exercise the hint"
    )

    # A freshly loaded inbox (a second tab) lists the same first page, row for row.
    fresh = page.context.new_page()
    fresh_errors = watch_errors(fresh)
    open_inbox(fresh, stack)
    fresh_rows = fresh.evaluate(ROWS_JS)
    assert len(fresh_rows) == PAGE
    assert shown[:PAGE] == fresh_rows
    expect(fresh.locator("#inbox-list #inbox-more button")).to_be_visible()

    # "Load more" brings the rest of the burst, in order, without gaps or repeats.
    listed = [(row["name"], row["preview"]) for row in load_all(page, CUSTOMERS)]
    assert listed[:CUSTOMERS] == newest_first
    assert len({row["id"] for row in page.evaluate(ROWS_JS)}) == len(listed)
    fresh_listed = [(row["name"], row["preview"]) for row in load_all(fresh, CUSTOMERS)]
    assert fresh_listed[:CUSTOMERS] == newest_first

    assert page.evaluate("window.__sameDocument === true"), "the inbox page was reloaded"
    assert errors == [] and fresh_errors == []


# ------------------------------------------------- the pages loaded, through a refresh
#
# A burst's hint makes the page reload its list (`refreshInbox()` in app.js). The
# reload must keep the pages the operator loaded with "Load more", and a reload and a
# "Load more" on their way at the same time must not drop one another's rows.

QUIET_FOR = 2000  # ms, app.js: a burst's hint reloads the list once the rows stop coming

# Installed before the page's own scripts run, on `window`: htmx's events bubble up to
# it after app.js's listeners (on `document`) have seen them, so a request app.js
# called off (preventDefault) is not counted as one on its way.
INBOX_WATCH_JS = """(() => {
  const w = window.__inbox = {
    loadedAt: Date.now(), lastHint: 0, quietHints: 0, hints: 0,
    asked: {'inbox-body': 0, 'inbox-more': 0},
    inflight: {'inbox-body': 0, 'inbox-more': 0},
    landed: {'inbox-body': 0, 'inbox-more': 0},
    firstMoreAt: 0, lastBodyAt: 0,
  };
  const idOf = (e) => (e.detail && e.detail.target && e.detail.target.id) || '';
  window.addEventListener('htmx:wsBeforeMessage', (e) => {
    const message = String(e.detail.message);
    if (message.indexOf('id="inbox-sync"') < 0) return;
    w.hints += 1;
    if (message.indexOf('data-refresh="quiet"') >= 0) w.quietHints += 1;
    w.lastHint = Date.now();
  });
  window.addEventListener('htmx:beforeRequest', (e) => {
    const id = idOf(e);
    if (!(id in w.asked)) return;
    w.asked[id] += 1;
    if (id === 'inbox-more' && !w.firstMoreAt) w.firstMoreAt = Date.now();
    if (id === 'inbox-body') w.lastBodyAt = Date.now();
    if (e.defaultPrevented) return;
    // Back once its XHR ends, after htmx has dealt with it (a "Load more" swapped out of
    // the page by a reload reports its htmx:afterRequest to no one).
    w.inflight[id] += 1;
    e.detail.xhr.addEventListener('loadend', () => { w.inflight[id] -= 1; w.landed[id] += 1; });
  });
})();"""

# Nothing has told the list to reload for `quiet` ms (a hint's reload has been asked
# for: QUIET_FOR < quiet) and none of the list's requests named in `idle` is on its way.
INBOX_QUIET_JS = """([quiet, idle]) => {
  const w = window.__inbox;
  return !!w && Date.now() - Math.max(w.lastHint, w.loadedAt) > quiet &&
    idle.every((id) => w.inflight[id] === 0);
}"""
BOTH = ["inbox-body", "inbox-more"]


def watch_inbox(page) -> None:
    """Counts, from the next document on, the list's reloads, "Load more"s and hints."""
    page.context.add_init_script(INBOX_WATCH_JS)


def inbox_quiet(page, *, idle=BOTH, quiet: int = QUIET_FOR + 1000, timeout=30_000) -> dict:
    """Waits until no hint came for `quiet` ms and no list request is on its way."""
    page.wait_for_function(INBOX_QUIET_JS, arg=[quiet, list(idle)], timeout=timeout)
    return page.evaluate("window.__inbox")


def _customers(count: int, label: str) -> list[tuple[str, str, str]]:
    token = uuid.uuid4().hex[:6]
    return [
        (new_contact(), f"{label}{n:03d} {token}", f"Hello, question {n} from {label} {token}")
        for n in range(count)
    ]


def run_burst(stack, customers) -> list[tuple[str, str]]:
    """The customers write at once and the AI answers each: (name, last text), newest first."""
    session_ids = stack.sim.call(_burst(stack.sim.sim, customers))
    last_texts = stack.sim.call(_ai_replies(stack.sim.sim, session_ids), timeout=40)
    return [(name, text) for (_, name, _), text in zip(customers, last_texts)][::-1]


def burst_shown(page, newest_first) -> None:
    """The list shows the burst's newest page (each row with the AI's answer): it is over."""
    page.wait_for_function(
        SETTLED_JS, arg=[list(row) for row in newest_first[:PAGE]], timeout=30_000
    )


def seeded_operator_page(new_page, stack, operator, *, customers: int):
    """`customers` conversations more than there were (answered, quiet), then an inbox
    opened on them, its list's requests and hints counted, settled."""
    run_burst(stack, _customers(customers, "Seed"))
    page = new_page(username=operator)
    errors = watch_errors(page)
    watch_inbox(page)
    open_inbox(page, stack)
    inbox_quiet(page)
    return page, errors


def load_one_more(page) -> None:
    before = page.locator("#inbox-list .row").count()
    page.click("#inbox-more button")
    page.wait_for_function(
        "(n) => document.querySelectorAll('#inbox-list .row').length > n", arg=before
    )
    inbox_quiet(page, quiet=0)


def fresh_inbox(page, stack, *, pages: int):
    """A second tab, freshly loaded, with `pages` pages loaded: its rows, whether it offers
    "Load more" after them, and its errors."""
    fresh = page.context.new_page()
    fresh_errors = watch_errors(fresh)
    open_inbox(fresh, stack)
    inbox_quiet(fresh)
    for _ in range(pages - 1):
        load_one_more(fresh)
    rows = fresh.evaluate(ROWS_JS)
    assert len(rows) == pages * PAGE, f"the fresh tab lists {len(rows)} rows"
    return rows, fresh.locator("#inbox-list #inbox-more button").count() == 1, fresh_errors


def assert_lists_as_fresh(page, stack, *, pages: int, why: str) -> None:
    """The list, settled, holds `pages` pages, row for row as a fresh tab shows them."""
    shown = page.evaluate(ROWS_JS)
    more = page.locator("#inbox-list #inbox-more button").count() == 1
    fresh_rows, fresh_more, fresh_errors = fresh_inbox(page, stack, pages=pages)
    assert len(shown) == pages * PAGE, (
        f"{why}: the list holds {len(shown)} rows, not the {pages * PAGE} of the "
        f"{pages} pages loaded (its requests: {page.evaluate('window.__inbox')})"
    )
    assert shown == fresh_rows, f"{why}: the list differs from a freshly loaded tab's"
    assert more == fresh_more
    assert fresh_errors == []


class HeldRequests:
    """Holds the first request of the list's with this HX-Target; lets all others through."""

    def __init__(self, page, hx_target: str) -> None:
        self.page, self.hx_target, self.held = page, hx_target, []
        page.route("**/*", self._route)

    def _route(self, route) -> None:
        if route.request.headers.get("hx-target") == self.hx_target and not self.held:
            self.held.append(route)
        else:
            route.continue_()

    def wait_held(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.held:
            if time.monotonic() > deadline:
                raise AssertionError(f"no request for #{self.hx_target} within {timeout} s")
            self.page.wait_for_timeout(50)  # lets Playwright hand the route over

    def release(self) -> None:
        for route in self.held:
            route.continue_()
        self.page.unroute("**/*", self._route)


def test_an_operator_who_loaded_more_pages_keeps_them_through_a_bursts_refresh(
    new_page, stack, burst_operator
):
    # More than two pages of conversations (whatever else the session made).
    page, errors = seeded_operator_page(new_page, stack, burst_operator, customers=2 * PAGE + 10)
    page.evaluate("window.__sameDocument = true")
    load_one_more(page)
    assert page.locator("#inbox-list .row").count() == 2 * PAGE
    expect(page.locator("#inbox-list #inbox-more button")).to_be_visible()
    before = page.evaluate("window.__inbox")

    newest_first = run_burst(stack, _customers(CUSTOMERS, "Burst"))
    burst_shown(page, newest_first)
    after = inbox_quiet(page)
    # The premise: a batch moved more than a page, and its hint's reload came back.
    assert after["quietHints"] > before["quietHints"], "the burst sent no hint"
    assert after["landed"]["inbox-body"] > before["landed"]["inbox-body"], (
        "the burst's hint did not reload the list"
    )

    assert_lists_as_fresh(page, stack, pages=2, why="after the burst's reload")
    assert page.evaluate("window.__sameDocument === true"), "the inbox page was reloaded"
    assert errors == []


def test_a_load_more_clicked_while_a_refresh_is_in_flight_is_not_lost(
    new_page, stack, burst_operator
):
    page, errors = seeded_operator_page(new_page, stack, burst_operator, customers=PAGE + 10)
    expect(page.locator("#inbox-list #inbox-more button")).to_be_visible()
    refresh = HeldRequests(page, "inbox-body")

    customers = _customers(CUSTOMERS, "Burst")
    session_ids = stack.sim.call(_burst(stack.sim.sim, customers))
    refresh.wait_held()  # the burst's hint asked for the list again: on its way, held
    assert page.evaluate("window.__inbox.inflight['inbox-body']") == 1
    assert page.evaluate("window.__inbox.quietHints") >= 1, "the reload was not the burst's"

    page.click("#inbox-more button")
    # The click has been dealt with: its page came, or it waits for its turn.
    dealt = page.wait_for_function(
        "() => window.__inbox.asked['inbox-more'] >= 1 &&"
        " window.__inbox.inflight['inbox-more'] === 0 && window.__inbox"
    ).json_value()
    # The premise: the reload was still on its way (app.js stops waiting for a request
    # after STUCK_AFTER, 20 s).
    assert dealt["firstMoreAt"] - dealt["lastBodyAt"] < 18_000
    refresh.release()

    last_texts = stack.sim.call(_ai_replies(stack.sim.sim, session_ids), timeout=40)
    burst_shown(page, [(name, text) for (_, name, _), text in zip(customers, last_texts)][::-1])
    inbox_quiet(page)
    assert_lists_as_fresh(
        page, stack, pages=2, why="a \"Load more\" clicked while the list was reloading"
    )
    assert errors == []


def test_a_refresh_asked_while_a_load_more_is_in_flight_keeps_its_page(
    new_page, stack, burst_operator
):
    page, errors = seeded_operator_page(new_page, stack, burst_operator, customers=PAGE + 10)
    more = HeldRequests(page, "inbox-more")
    page.click("#inbox-more button")
    more.wait_held()
    assert page.evaluate("window.__inbox.inflight['inbox-more']") == 1
    before = page.evaluate("window.__inbox")

    newest_first = run_burst(stack, _customers(CUSTOMERS, "Burst"))
    burst_shown(page, newest_first)
    # Over, and its hint's reload has been asked for (QUIET_FOR after the last hint):
    # sent and back, or waiting for the page on its way.
    during = inbox_quiet(page, idle=["inbox-body"])
    assert during["quietHints"] > before["quietHints"], "the burst sent no hint"
    assert during["inflight"]["inbox-more"] == 1
    # The premise: the page was on its way when the reload was asked (app.js stops
    # waiting for a request after STUCK_AFTER, 20 s).
    assert during["lastHint"] + QUIET_FOR - during["firstMoreAt"] < 18_000, (
        "the burst took too long: the held \"Load more\" counted as stuck"
    )
    more.release()

    inbox_quiet(page)
    assert_lists_as_fresh(
        page, stack, pages=2, why="a reload asked for while a \"Load more\" was on its way"
    )
    assert errors == []
