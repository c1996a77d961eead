"""The fragments the domain's notifications broadcast (rendered by dashboard.rendering),
and the catch-up a reconnecting page gets."""

from __future__ import annotations

import re
import threading
import time

import pytest
from asgiref.sync import async_to_sync
from channels.layers import channel_layers, get_channel_layer

from django.db import connection

from conversations import notify, selectors, services
from dashboard import rendering
from conversations.models import AgentState, Command
from tests.factories import ConversationFactory, MessageFactory, OperatorFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def layer(settings):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    channel_layers.backends.clear()
    yield get_channel_layer()
    channel_layers.backends.clear()


def listen(layer, group: str) -> str:
    channel = f"test-{group}"
    async_to_sync(layer.group_add)(group, channel)
    return channel


def received(layer, channel: str) -> str:
    return async_to_sync(layer.receive)(channel)["html"]


def assert_nothing_more(layer, channel: str) -> None:
    queue = layer.channels.get(channel)
    assert queue is None or queue.empty(), "more frames were sent"


class TestBroadcasts:
    def test_message_added_goes_to_the_conversation_and_the_inbox(self, layer):
        message = MessageFactory(text="Is it in stock?")
        conv = listen(layer, notify.conversation_group(message.conversation_id))
        ops = listen(layer, notify.OPERATORS_GROUP)
        notify.message_added(message)
        bubble = received(layer, conv)
        assert f'id="messages-{message.conversation_id}" hx-swap-oob="beforeend"' in bubble
        assert f'id="msg-{message.pk}"' in bubble and "Is it in stock?" in bubble
        row = received(layer, ops)
        assert 'id="inbox-incoming" hx-swap-oob="beforeend"' in row
        assert f'id="row-{message.conversation_id}"' in row and 'data-state="active"' in row

    def test_a_burst_sends_the_newest_page_of_rows_and_reloads_the_lists_when_quiet(
        self, layer, settings, django_capture_on_commit_callbacks
    ):
        settings.INBOX_PAGE_SIZE = 3
        ops = listen(layer, notify.OPERATORS_GROUP)
        messages = [MessageFactory(text=f"burst {n}") for n in range(5)]
        with notify.coalesced(), django_capture_on_commit_callbacks(execute=True):
            for message in messages:
                notify.after_commit(notify.message_added, message)
        frame = received(layer, ops)  # one frame: three rows, the hint, the counts
        assert_nothing_more(layer, ops)
        rows = frame.split('<div id="inbox-incoming"')[1:]
        # The newest three, oldest first (each lands on top of the one before).
        assert len(rows) == 3
        assert [f'id="row-{m.conversation_id}"' in html for m, html in zip(messages[2:], rows)] == [True] * 3
        assert frame.count('id="inbox-sync"') == 1 and 'data-refresh="quiet"' in frame
        assert 'id="tab-count-needs"' in frame

    def test_a_batch_within_a_page_sends_every_row_and_no_reload(
        self, layer, settings, django_capture_on_commit_callbacks
    ):
        settings.INBOX_PAGE_SIZE = 3
        ops = listen(layer, notify.OPERATORS_GROUP)
        messages = [MessageFactory(text=f"few {n}") for n in range(3)]
        with notify.coalesced(), django_capture_on_commit_callbacks(execute=True):
            for message in messages:
                notify.after_commit(notify.message_added, message)
        frame = received(layer, ops)  # one frame: three rows, the counts
        assert_nothing_more(layer, ops)
        assert frame.count('id="inbox-incoming"') == 3
        assert 'id="inbox-sync"' not in frame and 'id="tab-count-needs"' in frame

    def test_message_changed_replaces_the_bubble(self, layer):
        message = MessageFactory(ai=True, status="delivered")
        conv = listen(layer, notify.conversation_group(message.conversation_id))
        notify.message_changed(message)
        html = received(layer, conv)
        assert f'id="msg-{message.pk}"' in html and 'hx-swap-oob="true"' in html
        assert "beforeend" not in html and "tick-delivered" in html

    def test_receipts_in_one_batch_show_the_last_one(self, layer, django_capture_on_commit_callbacks):
        """The worker stores a burst in one batch: three receipts of one reply move its
        bubble once, to "read" (the newest write), not to the first receipt's "sent"."""
        from conversations import ingest

        message = MessageFactory(ai=True)
        conv = listen(layer, notify.conversation_group(message.conversation_id))
        phone = message.conversation.contact_phone
        with notify.coalesced(), django_capture_on_commit_callbacks(execute=True):
            for status in ("sent", "delivered", "read"):
                ingest.ingest_status(message_id="wamid.out", status=status, recipient=phone)
        html = received(layer, conv)
        assert f'id="msg-{message.pk}"' in html and "tick-read" in html
        notify.send_html(notify.conversation_group(message.conversation_id), "<i id='next'></i>")
        assert received(layer, conv) == "<i id='next'></i>"  # and only once

    def test_conversation_changed_tells_each_socket_to_render_its_own_state(self, layer):
        conversation = ConversationFactory()
        conv = listen(layer, notify.conversation_group(conversation.pk))
        notify.conversation_changed(conversation)
        event = async_to_sync(layer.receive)(conv)
        assert event["type"] == "conversation.state" and event["conversation_id"] == conversation.pk
        assert event["version"]  # one per change: a process's viewers share its reads
        assert "html" not in event  # nothing per-user in a broadcast

    def test_each_viewer_gets_their_own_header_from_one_read_of_the_facts(
        self, django_assert_max_num_queries
    ):
        holder, other = OperatorFactory(), OperatorFactory()
        conversation = ConversationFactory(held=True, held_by=holder)
        mine = rendering.conversation_state_for_viewer(conversation.pk, holder, "v1")
        with django_assert_max_num_queries(2):  # the other's permissions only
            theirs = rendering.conversation_state_for_viewer(conversation.pk, other, "v1")
        assert f'id="conv-header-{conversation.pk}" data-holder="me"' in mine
        assert f'id="conv-header-{conversation.pk}" data-holder="other"' in theirs
        assert f'id="composer-text-{conversation.pk}"' in mine
        assert f'id="composer-text-{conversation.pk}"' not in theirs
        assert "Take over from" in theirs

    @pytest.mark.django_db(transaction=True)
    def test_viewers_rendering_one_change_at_once_share_one_read(self, monkeypatch):
        holder, other = OperatorFactory(), OperatorFactory()
        conversation = ConversationFactory(held=True, held_by=holder)
        real, reads, go = selectors.conversation_facts_find, [], threading.Event()

        def held_read(pk):
            reads.append(pk)
            go.wait(10)  # the first read is slow: the other viewer arrives meanwhile
            return real(pk)

        monkeypatch.setattr(selectors, "conversation_facts_find", held_read)
        html = {}

        def render(user):
            try:
                html[user.pk] = rendering.conversation_state_for_viewer(conversation.pk, user, "v2")
            finally:
                connection.close()

        first = threading.Thread(target=render, args=(holder,))
        first.start()
        deadline = time.monotonic() + 10
        while not reads and time.monotonic() < deadline:
            time.sleep(0.01)
        second = threading.Thread(target=render, args=(other,))
        second.start()
        second.join(0.5)  # not done: it waits for the first one's read
        go.set()
        first.join(10), second.join(10)
        assert reads == [conversation.pk]
        assert 'data-holder="me"' in html[holder.pk] and 'data-holder="other"' in html[other.pk]

    def test_agent_state_broadcast_has_no_buttons(self, layer, settings):
        state = AgentState.objects.create(agent_id=settings.PINECALL_AGENT_ID, ai_paused=True)
        ops = listen(layer, notify.OPERATORS_GROUP)
        notify.agent_state_changed(state)
        html = received(layer, ops)
        assert 'id="agent-state"' in html and 'hx-swap-oob="true"' in html
        assert "AI paused everywhere" in html
        assert "/agent/resume/" not in html and 'hx-get="/agent/state/"' in html

    def test_a_failed_command_tells_its_operator_why(self, layer):
        operator = OperatorFactory()
        conversation = ConversationFactory()
        command = services.conversation_take_over(conversation=conversation, operator=operator)
        command = services.command_fail(
            command=command, code="PINECALL_ERROR", message="Agent offline"
        )
        mine = listen(layer, notify.user_group(operator.pk))
        notify.command_changed(command)
        html = received(layer, mine)  # to that operator's sockets only
        assert "Take over failed" in html and "Agent offline" in html

    def test_the_kill_switch_confirmation_is_for_everyone(self, layer):
        operator = OperatorFactory()
        command = Command.objects.create(
            kind="pause", scope="agent", agent_id="support", status="confirmed", operator=operator
        )
        ops = listen(layer, notify.OPERATORS_GROUP)
        notify.command_changed(command)
        html = received(layer, ops)
        assert "The AI is paused everywhere" in html and 'data-for-user' not in html


class TestCatchUp:
    def test_messages_newer_than_after(self):
        conversation = ConversationFactory()
        messages = [MessageFactory(conversation=conversation) for _ in range(4)]
        out = rendering.catch_up(
            user=OperatorFactory(), conversation_id=conversation.pk, after=messages[1].pk, since=time.time()
        )
        joined = "".join(out)
        assert f'id="msg-{messages[2].pk}"' in joined and f'id="msg-{messages[3].pk}"' in joined
        assert f'id="msg-{messages[1].pk}"' not in joined
        assert 'id="live-cursor"' in out[-1]

    def test_too_much_missed_replaces_the_list(self, settings):
        settings.CONVERSATION_PAGE_SIZE = 3
        conversation = ConversationFactory()
        for _ in range(6):
            MessageFactory(conversation=conversation)
        out = rendering.catch_up(user=OperatorFactory(), conversation_id=conversation.pk, after=0, since=time.time())
        assert f'<div class="messages" id="messages-{conversation.pk}"' in out[0]
        assert 'hx-swap-oob="true"' in out[0] and "data-earlier" in out[0]

    def test_many_changed_rows_reload_the_inbox(self, settings):
        settings.INBOX_PAGE_SIZE = 3
        since = time.time()
        for _ in range(5):
            ConversationFactory()
        out = rendering.catch_up(user=OperatorFactory(), since=since)
        assert any('id="inbox-sync"' in html and "data-refresh" in html for html in out)
        assert not any('id="row-' in html for html in out)

    def test_quiet_reconnect_sends_only_what_changed(self):
        conversation = ConversationFactory()
        time.sleep(0.01)
        since = time.time() + 3  # the page rendered after every change
        out = rendering.catch_up(user=OperatorFactory(), conversation_id=conversation.pk, after=0, since=since)
        joined = "".join(out)
        assert "conv-header" not in joined
        assert f'id="row-{conversation.pk}"' not in joined
        assert 'id="agent-state"' in joined and 'id="live-cursor"' in out[-1]

    def test_per_user_state_when_the_user_is_known(self, operator):
        conversation = ConversationFactory(held=True, held_by=operator)
        out = "".join(rendering.catch_up(user=operator, conversation_id=conversation.pk, after=0))
        assert f'id="conv-header-{conversation.pk}" data-holder="me"' in out
        assert "You hold this conversation" in out
        assert f'id="composer-text-{conversation.pk}"' in out


def test_a_crowded_conversation_names_nine_viewers_and_counts_the_rest(settings):
    """1,000 operators on one conversation: the bar and the row's mark stay small."""
    from conversations import presence

    settings.REDIS_URL = ""
    presence.reset_backend()
    conversation = ConversationFactory()
    people = [OperatorFactory(first_name=f"Op{i:02d}", last_name="Here") for i in range(12)]
    for person in people:
        presence.here(conversation.pk, person.pk, f"socket-{person.pk}")
    try:
        pks, bar, mark = rendering.render_presence(conversation.pk)
    finally:
        presence.clear()
        presence.reset_backend()
    assert pks == sorted(p.pk for p in people)
    assert bar.count('class="presence-person"') == 9 and "and 3 more" in bar
    assert "Op08 Here" in bar and "Op09 Here" not in bar
    first, second = sorted(p.pk for p in people)[:2]
    assert f'data-viewers="{first} {second}"' in mark and "and 3 more" in mark


def test_a_crowd_of_viewers_reads_the_names_it_shows_not_every_account(settings):
    """The inbox row's render for 1,000 viewers must not load 1,000 user rows."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from conversations import presence, selectors

    settings.REDIS_URL = ""
    presence.reset_backend()
    conversation = ConversationFactory()
    people = [OperatorFactory(first_name=f"Op{i:02d}", last_name="Crowd") for i in range(40)]
    for person in people:
        presence.here(conversation.pk, person.pk, f"socket-{person.pk}")
    try:
        with CaptureQueriesContext(connection) as queries:
            viewers = selectors.conversation_viewers([conversation.pk])[conversation.pk]
    finally:
        presence.clear()
        presence.reset_backend()
    assert [v.pk for v in viewers] == sorted(p.pk for p in people)  # everyone counted
    assert [v.name for v in viewers[:9]] == [f"Op{i:02d} Crowd" for i in range(9)]
    (users,) = [q["sql"] for q in queries.captured_queries if "auth_user" in q["sql"]]
    asked = re.search(r'"id" IN \(([^)]*)\)', users).group(1).split(",")
    assert len(asked) == selectors.NAMED_VIEWERS + 3  # a dozen accounts read, not 40
