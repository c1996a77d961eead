"""Voice calls in a real Chromium: the list, live captions, stepping in."""

import re

import pytest
from playwright.sync_api import expect

from tests.e2e.test_operator_flows import DOCS, WRITE_DOCS, wait_live

NUMBER = "+14155550100"
expect.set_options(timeout=15_000)


def call_pk(stack, call_id: str) -> str:
    return stack.shell(
        "import time\n"
        "from conversations.models import Call\n"
        "for _ in range(100):\n"
        f"    call = Call.objects.filter(call_id={call_id!r}).first()\n"
        "    if call: break\n"
        "    time.sleep(0.1)\n"
        "print(call.pk)"
    )


@pytest.fixture(scope="module")
def call_supervisor(stack):
    return stack.create_user("carla", role="Supervisors", first_name="Carla")


def test_a_call_live_then_stepped_in_and_forwarded(new_page, stack, call_supervisor):
    page = new_page(username="carla")
    page.goto(f"{stack.base_url}/calls/")
    wait_live(page)
    stack.sim.wait_for("channel.add", type="phone", timeout=30)
    call_id = stack.sim.place_call(
        to=NUMBER, from_="+14155550177", script=["Where is my order number one two three", {"silence": 60}]
    )
    # The row arrives live, with a ticking duration.
    row = page.locator("#calls-live .call-row", has_text="+14155550177")
    expect(row).to_have_count(1)
    expect(row.locator(".call-duration")).to_have_text(re.compile(r"^0:0[1-9]"))

    pk = call_pk(stack, call_id)
    page.goto(f"{stack.base_url}/calls/{pk}/")
    wait_live(page)
    expect(page.locator("[data-speaker=caller]").first).to_contain_text("Where is my order")
    expect(page.locator("[data-speaker=ai]").first).not_to_be_empty()

    page.fill("#call-say-text", "A person is joining you now.")
    page.click("[data-action=call-say]")
    expect(page.locator("[data-speaker=supervisor]")).to_contain_text("A person is joining you now.")

    page.fill("#call-forward-to", "+34600000000")
    page.click("[data-action=call-forward]")
    stack.sim.wait_for("call.forward", call_id=call_id)
    expect(page.locator(".call-forwarded")).to_contain_text("left Pinecall")
    expect(page.locator(".call-forwarded")).to_contain_text("+34600000000")
    expect(page.locator("#call-header")).to_have_attribute("data-state", "ended")


# Records, in the page, how many words each live AI caption held as they arrived.
WATCH_CAPTIONS = """() => {
  window.captionCounts = {};
  new MutationObserver(() => {
    document.querySelectorAll("[data-speaker=ai].is-live").forEach((line) => {
      const seen = (window.captionCounts[line.id] = window.captionCounts[line.id] || []);
      const n = line.querySelectorAll(".word").length;
      if (n && n !== seen[seen.length - 1]) seen.push(n);
    });
  }).observe(document.getElementById("call-lines"), {childList: true, subtree: true});
}"""


def test_a_supervisor_watches_captions_grow_and_steps_in_with_screenshots(new_page, stack, call_supervisor, tmp_path):
    out = DOCS if WRITE_DOCS else tmp_path
    page = new_page(username="carla")
    page.goto(f"{stack.base_url}/calls/")
    wait_live(page)
    stack.sim.wait_for("channel.add", type="phone", timeout=30)
    call_id = stack.sim.place_call(
        to=NUMBER, from_="+14155550188", script=["Hello, I have a question", {"silence": 90}]
    )
    pk = call_pk(stack, call_id)
    sim = stack.sim.sim
    # A caller asking for a person: the Calls tab's badge (the handoff alerts follow it), first row.
    stack.sim.call(sim.caller_says(call_id, "Can I talk to a real person please"))
    expect(page.locator("#calls-waiting")).to_have_attribute("data-count", "1")
    expect(page.locator("#calls-live .call-row").first).to_contain_text("Asks for a person")
    page.screenshot(path=str(out / "screenshot-calls.png"))

    page.goto(f"{stack.base_url}/calls/{pk}/")
    wait_live(page)
    expect(page.locator(".call-needs-human")).to_contain_text("asked for a person")
    page.evaluate(WATCH_CAPTIONS)
    stack.sim.call(sim.caller_says(call_id, "Where is my order number four five six"))
    expect(page.locator("[data-speaker=caller]", has_text="order number four five six")).to_have_count(1)
    # The AI's answer grew on the screen a word at a time, then became its final line.
    page.wait_for_function("() => Object.values(window.captionCounts).some((seen) => seen.length >= 3)")
    grown = [seen for seen in page.evaluate("window.captionCounts").values() if len(seen) >= 3]
    assert grown and all(seen == sorted(seen) for seen in grown), grown

    page.fill("#call-say-text", "A colleague is joining you now.")
    page.click("[data-action=call-say]")
    said = stack.sim.wait_for("bot.reply", call_id=call_id, text="A colleague is joining you now.")
    stack.sim.call(sim.wait_sent("bot.speaking", timeout=20, call_id=call_id, message_id=said["message_id"]))
    expect(page.locator("[data-speaker=supervisor]")).to_contain_text("A colleague is joining you now.")

    page.click("[data-action=call-hold]")
    stack.sim.wait_for("call.hold", call_id=call_id)
    expect(page.locator("#call-header .badge-hold")).to_be_visible()
    expect(page.locator("[data-action=call-hold]")).to_be_hidden()
    # The newest line in view: the lines follow what is said (and the header growing).
    page.wait_for_function(
        "() => { const l = document.getElementById('call-lines');"
        " return l.scrollHeight - l.scrollTop - l.clientHeight < 2; }"
    )
    page.screenshot(path=str(out / "screenshot-call.png"))
    page.click("[data-action=call-unhold]")
    expect(page.locator("#call-header .badge-hold")).to_have_count(0)
    expect(page.locator("[data-action=call-hold]")).to_be_visible()

    page.click("[data-action=call-mute]")
    expect(page.locator("#call-header .badge-muted")).to_be_visible()
    stack.sim.call(sim.caller_says(call_id, "Just between us"))
    page.click("[data-action=call-unmute]")
    expect(page.locator(".line-while-muted")).to_contain_text("Just between us")
    expect(page.locator("#call-header .badge-muted")).to_have_count(0)

    # Forward to my own phone, set here the first time.
    page.click(".my-phone-edit summary")
    page.fill("#my-phone-number", "+34600000222")
    page.click("[data-action=save-my-phone]")
    page.click("[data-action=call-forward-to-me]")
    expect(page.locator("#confirm-dialog")).to_contain_text("+34600000222")
    page.locator("#confirm-ok").click()
    assert stack.sim.wait_for("call.forward", call_id=call_id)["to"] == "+34600000222"
    expect(page.locator(".call-forwarded")).to_contain_text("+34600000222")
    expect(page.locator("#call-header")).to_have_attribute("data-state", "ended")
    expect(page.locator("#calls-waiting")).to_have_attribute("data-count", "0")
    for name in ("screenshot-calls.png", "screenshot-call.png"):
        assert (out / name).stat().st_size > 10_000
