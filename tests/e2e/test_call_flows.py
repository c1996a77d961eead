"""Voice calls in a real Chromium: the list, live captions, stepping in."""

import re

import pytest
from playwright.sync_api import expect

from tests.e2e.test_operator_flows import wait_live

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
