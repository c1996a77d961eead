"""Who has a conversation open: both stores (this process's memory; Redis when the
suite runs with REDIS_URL), expiry of pages that vanished, and Redis being away."""

from __future__ import annotations

import os
import time

import pytest

from conversations import presence
from tests.support.processes import free_port


@pytest.fixture(params=["memory", "redis"])
def store(request, settings):
    if request.param == "redis":
        if not os.environ.get("REDIS_URL"):
            pytest.skip("Redis: the suite runs with REDIS_URL in CI")
        settings.REDIS_URL = os.environ["REDIS_URL"]
    else:
        settings.REDIS_URL = ""
    presence.reset_backend()
    presence.clear()
    yield request.param
    presence.clear()
    presence.reset_backend()


def test_each_person_once_however_many_tabs(store):
    presence.here(7, 1, "tab-a")
    presence.here(7, 1, "tab-b")
    presence.here(7, 2, "tab-c")
    presence.here(8, 3, "tab-d")
    assert presence.viewers(7) == [1, 2]
    assert presence.viewers_of([7, 8, 9]) == {7: [1, 2], 8: [3]}


def test_a_closed_page_leaves_and_the_other_tab_stays(store):
    presence.here(7, 1, "tab-a")
    presence.here(7, 1, "tab-b")
    presence.gone(7, 1, "tab-a")
    assert presence.viewers(7) == [1]
    presence.gone(7, 1, "tab-b")
    assert presence.viewers(7) == []


def test_a_page_that_stopped_renewing_expires(store, monkeypatch):
    presence.here(7, 1, "killed-daphne")
    presence.here(7, 2, "alive")
    # Later than the first member's lifetime: only a renewed member is still there.
    later = time.time() + presence.TTL + 1
    monkeypatch.setattr(presence.time, "time", lambda: later)
    presence.here(7, 2, "alive")
    assert presence.viewers(7) == [2]


def test_redis_away_means_nobody_viewing_not_an_error(settings):
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    presence.reset_backend()
    try:
        presence.here(7, 1, "tab")
        assert presence.viewers(7) == []
        assert presence.viewers_of([7, 8]) == {}
        presence.gone(7, 1, "tab")
    finally:
        presence.reset_backend()


def test_one_process_at_a_time_tells_a_conversations_presence(store):
    """Every web process asks before telling: the first may, the others wait their turn."""
    assert presence.claim_telling(7, 30.0) == 0.0
    wait = presence.claim_telling(7, 30.0)
    assert 0.0 < wait <= 30.0
    assert presence.claim_telling(8, 30.0) == 0.0  # another conversation: its own turn
