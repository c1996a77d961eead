"""The operators' live socket, through the real ASGI application (origin check,
session auth, routing) with channels' WebsocketCommunicator.

The channel layer is the in-memory one, or Redis when REDIS_URL is set.
"""

from __future__ import annotations

import os
import re
import time

import pytest
from asgiref.sync import sync_to_async
from channels.layers import channel_layers, get_channel_layer
from channels.testing import WebsocketCommunicator
from django.db import connections
from django.test import Client

from conversations import services
from conversations.notify import OPERATORS_GROUP, conversation_group
from dashboard.asgi import application
from tests.factories import (
    ConversationFactory,
    MessageFactory,
    OperatorFactory,
    SupervisorFactory,
    ViewerFactory,
)

pytestmark = pytest.mark.django_db(transaction=True)

ORIGIN = "http://127.0.0.1:8000"


@pytest.fixture(autouse=True)
def fresh_channel_layer():
    """A channel layer per test: its queues belong to the test's event loop."""
    channel_layers.backends.clear()
    yield
    channel_layers.backends.clear()


@pytest.fixture(autouse=True)
async def close_thread_connections():
    """The ORM calls ran on asgiref's thread: close its connection before the flush."""
    yield
    await sync_to_async(connections.close_all)()


def session_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


@pytest.fixture
def ana(db):
    return OperatorFactory(first_name="Ana", last_name="Silva")


@pytest.fixture
def ana_cookie(ana):
    return session_cookie(ana)


def socket(
    path: str, cookie: str | None = None, origin: str | None = ORIGIN
) -> WebsocketCommunicator:
    headers = [(b"host", b"127.0.0.1:8000")]  # the page's own origin is ORIGIN
    if origin:
        headers.append((b"origin", origin.encode()))
    if cookie:
        headers.append((b"cookie", f"sessionid={cookie}".encode()))
    return WebsocketCommunicator(application, path, headers=headers)


async def receive_until_cursor(comm: WebsocketCommunicator) -> list[str]:
    """Everything the consumer sends on connect: the catch-up, ending with the cursor;
    then, on a conversation's socket, who has it open (its presence bar, the row's mark)."""
    received = []
    while True:
        html = await comm.receive_from(timeout=3)
        received.append(html)
        if 'id="live-cursor"' in html:
            break
    if re.search(rb"(^|&)conversation=[1-9]", comm.scope["query_string"]):
        bar, mark = await comm.receive_from(timeout=3), await comm.receive_from(timeout=3)
        assert 'class="presence"' in bar and 'class="row-viewing"' in mark, (bar, mark)
        received += [bar, mark]
    return received


async def test_anonymous_is_refused():
    comm = socket("/ws/live/")
    connected, code = await comm.connect()
    assert not connected
    assert code == 4401
    await comm.disconnect()  # let the refused consumer finish


async def test_cross_origin_is_refused(ana_cookie):
    comm = socket("/ws/live/", ana_cookie, origin="http://evil.example.com")
    connected, _ = await comm.connect()
    assert not connected
    await comm.disconnect()


async def test_missing_origin_is_refused(ana_cookie):
    comm = socket("/ws/live/", ana_cookie, origin=None)
    connected, _ = await comm.connect()
    assert not connected
    await comm.disconnect()


async def test_logged_in_operator_is_accepted_and_catches_up(ana_cookie):
    comm = socket("/ws/live/", ana_cookie)
    connected, _ = await comm.connect()
    assert connected
    first = await receive_until_cursor(comm)
    # No `since`: the page knows nothing, so it gets the agent's state and a cursor.
    assert any('id="agent-state"' in html and 'hx-swap-oob="true"' in html for html in first)
    assert 'data-since="' in first[-1]
    await comm.disconnect()


async def test_a_viewer_may_watch_without_buttons(db):
    viewer = await sync_to_async(ViewerFactory)()
    cookie = await sync_to_async(session_cookie)(viewer)
    conversation = await sync_to_async(ConversationFactory)()
    comm = socket(f"/ws/live/?conversation={conversation.pk}&after=0", cookie)
    connected, _ = await comm.connect()
    assert connected
    received = "\n".join(await receive_until_cursor(comm))
    assert f'id="conv-header-{conversation.pk}"' in received
    assert "take-over" not in received and "/agent/pause/" not in received
    assert "Replying needs the operator permission" in received
    await comm.disconnect()


async def test_a_supervisor_gets_the_kill_switch_on_catch_up(db):
    supervisor = await sync_to_async(SupervisorFactory)()
    comm = socket("/ws/live/", await sync_to_async(session_cookie)(supervisor))
    assert (await comm.connect())[0]
    received = "\n".join(await receive_until_cursor(comm))
    assert 'id="agent-state"' in received and 'hx-post="/agent/pause/"' in received
    await comm.disconnect()


async def test_forwards_what_the_groups_receive(ana_cookie):
    conversation = await sync_to_async(ConversationFactory)()
    since = time.time()
    comm = socket(f"/ws/live/?conversation={conversation.pk}&after=0&since={since}", ana_cookie)
    assert (await comm.connect())[0]
    await receive_until_cursor(comm)
    layer = get_channel_layer()
    await layer.group_send(
        OPERATORS_GROUP, {"type": "live.html", "html": "<div id='a'>to all</div>"}
    )
    assert await comm.receive_from(timeout=3) == "<div id='a'>to all</div>"
    await layer.group_send(
        conversation_group(conversation.pk), {"type": "live.html", "html": "<div id='b'>one</div>"}
    )
    assert await comm.receive_from(timeout=3) == "<div id='b'>one</div>"
    # Another conversation's group is not joined.
    await layer.group_send(
        conversation_group(conversation.pk + 1), {"type": "live.html", "html": "x"}
    )
    assert await comm.receive_nothing(timeout=0.3)
    await comm.disconnect()


async def test_a_service_call_reaches_the_page(ana, ana_cookie):
    conversation = await sync_to_async(ConversationFactory)()
    path = f"/ws/live/?conversation={conversation.pk}&after=0&since={time.time()}"
    comm = socket(path, ana_cookie)
    assert (await comm.connect())[0]
    await receive_until_cursor(comm)

    await sync_to_async(services.conversation_take_over)(conversation=conversation, operator=ana)
    # The shared row (and the tab counts) and this socket's own header come by different
    # paths (the fan-out; a render in this consumer): in either order.
    header = f'id="conv-header-{conversation.pk}" data-holder="me"'
    received = []
    while len(received) < 6 and not (header in "".join(received) and "inbox-incoming" in "".join(received)):
        received.append(await comm.receive_from(timeout=3))
    joined = "\n".join(received)
    # The header: this socket rendered Ana's own; the inbox row: moved into place by app.js.
    assert header in joined
    assert f'id="composer-text-{conversation.pk}"' in joined
    assert 'id="inbox-incoming" hx-swap-oob="beforeend"' in joined
    assert f'id="row-{conversation.pk}"' in joined and "taking over…" in joined
    await comm.disconnect()


async def _header_frames(comm: WebsocketCommunicator, pk: int, until: str) -> list[str]:
    """This socket's frames up to the first header of conversation `pk` that shows `until`."""
    received = []
    while not any(f'id="conv-header-{pk}"' in f and until in f for f in received):
        received.append(await comm.receive_from(timeout=5))
    return received


async def test_others_see_an_unconfirmed_take_over_after_the_grace(ana, settings):
    settings.LIVE_PENDING_GRACE_SECONDS = 0.2
    conversation = await sync_to_async(ConversationFactory)()
    bruno = await sync_to_async(OperatorFactory)(first_name="Bruno", last_name="Costa")
    comm = socket(f"/ws/live/?conversation={conversation.pk}&after=0&since={time.time()}",
                  await sync_to_async(session_cookie)(bruno))
    assert (await comm.connect())[0]
    await receive_until_cursor(comm)

    # Pinecall never answers: after the grace, Bruno is told that Ana is waiting for it.
    await sync_to_async(services.conversation_take_over)(conversation=conversation, operator=ana)
    frames = await _header_frames(comm, conversation.pk, 'data-badge="pending"')
    assert "<bdi>Ana Silva</bdi> is taking over…" in frames[-1]
    await comm.disconnect()


async def test_others_see_a_quickly_confirmed_take_over_only_once_confirmed(ana, settings, monkeypatch):
    from conversations import notify

    settings.LIVE_PENDING_GRACE_SECONDS = 60  # its timer does not fire in this test: it is called below
    conversation = await sync_to_async(ConversationFactory)()
    bruno = await sync_to_async(OperatorFactory)(first_name="Bruno", last_name="Costa")
    comm = socket(f"/ws/live/?conversation={conversation.pk}&after=0&since={time.time()}",
                  await sync_to_async(session_cookie)(bruno))
    assert (await comm.connect())[0]
    await receive_until_cursor(comm)

    command = await sync_to_async(services.conversation_take_over)(conversation=conversation, operator=ana)
    await sync_to_async(services.command_confirm)(command=command)
    frames = await _header_frames(comm, conversation.pk, 'data-badge="other"')
    assert "<bdi>Ana Silva</bdi> holds this conversation" in frames[-1]
    # No "taking over…" flashed before it: the confirmation was the first Bruno heard.
    assert not any('data-badge="pending"' in frame for frame in frames)

    # When the grace is over, a confirmed command is not announced again.
    announced = []
    monkeypatch.setattr(notify, "conversation_changed", announced.append)
    await sync_to_async(notify._announce_if_awaiting)(conversation.pk, command.pk)
    assert announced == []
    await comm.disconnect()


async def test_a_customer_message_is_pushed_escaped(ana_cookie):
    from conversations import ingest

    conversation = await sync_to_async(ConversationFactory)()
    path = f"/ws/live/?conversation={conversation.pk}&after=0&since={time.time()}"
    comm = socket(path, ana_cookie)
    assert (await comm.connect())[0]
    await receive_until_cursor(comm)
    await sync_to_async(ingest.ingest_customer_message)(
        agent_id=conversation.agent_id,
        session_id=conversation.session_id,
        contact_phone=conversation.contact_phone,
        message_id="wamid.xss",
        text="<script>alert(1)</script>",
    )
    bubble = await comm.receive_from(timeout=3)
    assert f'id="messages-{conversation.pk}" hx-swap-oob="beforeend"' in bubble
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in bubble and "<script>" not in bubble
    row = await comm.receive_from(timeout=3)
    assert f'id="row-{conversation.pk}"' in row and "<script>" not in row
    await comm.disconnect()


async def test_catch_up_sends_messages_newer_than_after(ana_cookie):
    conversation = await sync_to_async(ConversationFactory)()
    messages = [
        await sync_to_async(MessageFactory)(conversation=conversation, text=f"line {i}")
        for i in range(5)
    ]
    after = messages[1].pk
    comm = socket(
        f"/ws/live/?conversation={conversation.pk}&after={after}&since={time.time()}", ana_cookie
    )
    assert (await comm.connect())[0]
    received = await receive_until_cursor(comm)
    bubbles = [h for h in received if 'hx-swap-oob="beforeend"' in h and "messages-" in h]
    assert [f'id="msg-{m.pk}"' in html for m, html in zip(messages[2:], bubbles, strict=True)] == [
        True
    ] * 3
    assert "line 1" not in "".join(received)
    await comm.disconnect()


async def test_catch_up_after_a_long_gap_sends_state_rows_and_ticks(ana_cookie):
    conversation = await sync_to_async(ConversationFactory)()
    message = await sync_to_async(MessageFactory)(conversation=conversation, ai=True, status="read")
    other = await sync_to_async(ConversationFactory)(contact_name="Changed Meanwhile")
    long_ago = time.time() - 3600
    comm = socket(
        f"/ws/live/?conversation={conversation.pk}&after={message.pk}&since={long_ago}", ana_cookie
    )
    assert (await comm.connect())[0]
    received = "\n".join(await receive_until_cursor(comm))
    # The tick that moved while the page was away replaces its bubble.
    assert f'id="msg-{message.pk}"' in received and "tick-read" in received
    # This user's header and composer, rendered for them (no extra request).
    assert f'id="conv-header-{conversation.pk}" data-holder="ai"' in received
    assert f'id="composer-{conversation.pk}"' in received
    assert f'id="row-{other.pk}"' in received and "Changed Meanwhile" in received
    assert 'id="agent-state"' in received
    await comm.disconnect()


async def test_bad_query_parameters_are_ignored(ana_cookie):
    comm = socket("/ws/live/?conversation=abc&after=-&since=nan", ana_cookie)
    assert (await comm.connect())[0]
    assert 'id="live-cursor"' in (await receive_until_cursor(comm))[-1]
    await comm.disconnect()


@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="the in-memory layer never times out")
async def test_an_idle_socket_stays_connected_on_redis(ana_cookie):
    """An operator's page is idle for minutes: the consumer must outlive Redis's blocking reads.

    channels_redis waits 5 s per BZPOPMIN; redis-py 8's default socket_timeout is also 5 s,
    so without a longer socket_timeout in CHANNEL_LAYERS the read times out and the
    consumer dies (the browser reconnects every few seconds).
    """
    comm = socket(f"/ws/live/?since={time.time()}", ana_cookie)
    assert (await comm.connect())[0]
    await receive_until_cursor(comm)
    assert await comm.receive_nothing(timeout=7, interval=0.5)
    await get_channel_layer().group_send(
        OPERATORS_GROUP, {"type": "live.html", "html": "<div id='still'>here</div>"}
    )
    assert await comm.receive_from(timeout=3) == "<div id='still'>here</div>"
    await comm.disconnect()


# ---------------------------------------------------------------- presence and typing


async def test_viewers_see_each_other_and_the_inbox_marks_the_row(ana, ana_cookie):
    bruno = await sync_to_async(OperatorFactory)(first_name="Bruno", last_name="Costa")
    conversation = await sync_to_async(ConversationFactory)()
    inbox = socket(f"/ws/live/?since={time.time()}", ana_cookie)
    assert (await inbox.connect())[0]
    await receive_until_cursor(inbox)

    path = f"/ws/live/?conversation={conversation.pk}&after=0&since={time.time()}"
    first = socket(path, ana_cookie)
    assert (await first.connect())[0]
    bar = (await receive_until_cursor(first))[-2]
    assert 'data-viewers="%d"' % ana.pk in bar and "Ana Silva" in bar
    mark = await inbox.receive_from(timeout=3)
    assert f'id="viewing-{conversation.pk}"' in mark and "Open now: Ana Silva" in mark

    second = socket(path, await sync_to_async(session_cookie)(bruno))
    assert (await second.connect())[0]
    await receive_until_cursor(second)
    bar = await first.receive_from(timeout=3)
    assert f'data-viewers="{min(ana.pk, bruno.pk)} {max(ana.pk, bruno.pk)}"' in bar
    assert "Bruno Costa" in bar and "Ana Silva" in bar
    await first.receive_from(timeout=3)  # the inbox mark (this socket is an operator's too)

    await second.disconnect()
    bar = await first.receive_from(timeout=3)
    assert "Bruno Costa" not in bar and 'data-viewers="%d"' % ana.pk in bar
    await first.disconnect()
    await inbox.disconnect()


async def test_open_pages_stay_viewing_and_a_vanished_one_is_noticed(ana, ana_cookie, monkeypatch):
    """One renewal per process keeps every open page "viewing" past the TTL, and a page
    whose process died (its mark never removed) drops out of the bar once it expires."""
    from conversations import presence

    monkeypatch.setattr(presence, "TTL", 1.5)
    monkeypatch.setattr(presence, "RENEW_EVERY", 0.3)
    bruno = await sync_to_async(OperatorFactory)(first_name="Bruno", last_name="Costa")
    conversation = await sync_to_async(ConversationFactory)()
    # Bruno's page, on a Daphne that was killed: its mark stays until it expires.
    await sync_to_async(presence.here)(conversation.pk, bruno.pk, "socket-of-a-killed-process")
    page = socket(f"/ws/live/?conversation={conversation.pk}&after=0&since={time.time()}", ana_cookie)
    assert (await page.connect())[0]
    bar = (await receive_until_cursor(page))[-2]
    assert "Bruno Costa" in bar and "Ana Silva" in bar

    deadline = time.monotonic() + 10
    while "Bruno Costa" in bar:
        assert time.monotonic() < deadline, "the vanished page was never noticed"
        frame = await page.receive_from(timeout=5)
        if 'id="presence-' in frame:
            bar = frame
    assert 'data-viewers="%d"' % ana.pk in bar
    # Ana's own page outlived several TTLs: renewed, still viewing.
    assert await sync_to_async(presence.viewers)(conversation.pk) == [ana.pk]
    await page.disconnect()
    assert await sync_to_async(presence.viewers)(conversation.pk) == []


async def test_typing_is_shown_to_the_others_and_hostile_frames_are_ignored(ana, ana_cookie):
    bruno = await sync_to_async(OperatorFactory)(first_name="Bruno", last_name="Costa")
    vera = await sync_to_async(ViewerFactory)(first_name="Vera")
    conversation = await sync_to_async(ConversationFactory)()
    path = f"/ws/live/?conversation={conversation.pk}&after=0&since={time.time()}"
    watcher = socket(path, await sync_to_async(session_cookie)(bruno))
    assert (await watcher.connect())[0]
    await receive_until_cursor(watcher)
    typist = socket(path, ana_cookie)
    assert (await typist.connect())[0]
    await receive_until_cursor(typist)
    await watcher.receive_from(timeout=3)  # Ana arrived: the bar
    await watcher.receive_from(timeout=3)  # and the row's mark

    for frame in ["not json", "[1, 2]", '{"typing": "yes"}', '{"typing": true, "x": "' + "a" * 400 + '"}']:
        await typist.send_to(text_data=frame)
    await typist.send_to(bytes_data=b'{"typing": true}')
    viewer = socket(path, await sync_to_async(session_cookie)(vera))
    assert (await viewer.connect())[0]
    await receive_until_cursor(viewer)
    await viewer.send_to(text_data='{"typing": true}')  # a viewer cannot reply: not a typist
    await watcher.receive_from(timeout=3)  # Vera arrived: the bar
    await watcher.receive_from(timeout=3)  # and the row's mark

    await typist.send_to(text_data='{"typing": true}')
    await typist.send_to(text_data='{"typing": true}')  # too soon after: dropped
    shown = await watcher.receive_from(timeout=3)
    assert f'id="typing-{conversation.pk}"' in shown and f'data-user="{ana.pk}"' in shown
    assert "Ana Silva" in shown and "is typing" in shown
    # Nothing else came: the next frame is the one sent after.
    await get_channel_layer().group_send(
        conversation_group(conversation.pk), {"type": "live.html", "html": "<i id='next'></i>"}
    )
    assert await watcher.receive_from(timeout=3) == "<i id='next'></i>"
    for comm in (viewer, typist, watcher):
        await comm.disconnect()


async def test_a_change_renders_each_viewer_their_own_header(ana, ana_cookie):
    bruno = await sync_to_async(OperatorFactory)(first_name="Bruno", last_name="Costa")
    conversation = await sync_to_async(ConversationFactory)()
    path = f"/ws/live/?conversation={conversation.pk}&after=0&since={time.time()}"
    mine = socket(path, ana_cookie)
    assert (await mine.connect())[0]
    await receive_until_cursor(mine)
    theirs = socket(path, await sync_to_async(session_cookie)(bruno))
    assert (await theirs.connect())[0]
    await receive_until_cursor(theirs)
    await mine.receive_from(timeout=3), await mine.receive_from(timeout=3)  # Bruno arrived

    await sync_to_async(services.conversation_take_over)(conversation=conversation, operator=ana)

    async def header(comm):
        while True:
            html = await comm.receive_from(timeout=3)
            if f'id="conv-header-{conversation.pk}"' in html:
                return html

    assert 'data-holder="me"' in await header(mine)
    seen = await header(theirs)
    assert 'data-holder="other"' in seen and "Take over from" in seen and "Ana Silva" in seen
    await mine.disconnect()
    await theirs.disconnect()
