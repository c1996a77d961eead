"""The fragments' fan-out on Redis pub/sub (`conversations.notify`, `dashboard.fanout`):
one PUBLISH per fragment, written by each web process to its own sockets of the group.

Needs Redis (REDIS_URL); a TCP proxy in front of it fakes Redis going away and back.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from urllib.parse import urlsplit

import pytest
from asgiref.sync import sync_to_async

from conversations import notify
from dashboard import fanout
from tests.support.tcp_proxy import TcpProxy


@pytest.fixture
def redis_url():
    url = os.environ.get("REDIS_URL", "")
    if not url:
        pytest.skip("the fan-out runs with Redis only (REDIS_URL)")
    import redis

    try:
        redis.Redis.from_url(url).ping()
    except redis.ConnectionError:
        pytest.skip(f"Redis is not reachable at {url}")
    return url


@pytest.fixture
def proxied(settings, redis_url):
    """The fan-out's Redis behind a proxy that the test can cut (the channel layer's is not)."""
    parts = urlsplit(redis_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379).start()
    settings.REDIS_URL = parts._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()
    settings.LIVE_FANOUT = "pubsub"
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [redis_url]}}
    }
    yield proxy
    proxy.stop()


class Socket:
    """What the fan-out needs of a consumer: `deliver(html)` and `state_changed(event)`."""

    def __init__(self) -> None:
        self.frames: asyncio.Queue[str] = asyncio.Queue()
        self.states: asyncio.Queue[dict] = asyncio.Queue()

    async def deliver(self, html: str) -> None:
        await self.frames.put(html)

    def state_changed(self, event: dict) -> None:
        self.states.put_nowait(event)

    async def next(self) -> str:
        return await asyncio.wait_for(self.frames.get(), 5)


async def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "not within the time"
        await asyncio.sleep(0.02)


async def test_a_fragment_reaches_every_socket_of_its_group_once(proxied):
    a, b, elsewhere = Socket(), Socket(), Socket()
    await fanout.join(["conversation-1", "operators"], a)
    await fanout.join(["conversation-1"], b)
    await fanout.join(["conversation-2"], elsewhere)

    await sync_to_async(notify.send_html)("conversation-1", "<p id='one'></p>")
    await notify.group_send("operators", {"type": "live.html", "html": "<p id='all'></p>"})

    assert await a.next() == "<p id='one'></p>" and await b.next() == "<p id='one'></p>"
    assert await a.next() == "<p id='all'></p>"
    assert elsewhere.frames.empty() and b.frames.empty()
    fanout.leave(["conversation-1", "operators"], a)
    await notify.group_send("conversation-1", {"type": "live.html", "html": "<p id='two'></p>"})
    assert await b.next() == "<p id='two'></p>" and a.frames.empty()


async def test_a_state_change_is_published_and_closing_a_socket_stays_on_the_channel_layer(proxied):
    """"Render your own header" reaches each socket of the group through the fan-out, in
    one PUBLISH; closing a socket is not a fragment: the channel layer carries it."""
    from channels.layers import channel_layers, get_channel_layer

    channel_layers.backends.clear()
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add("conversation-3", channel)
    await layer.group_add("user-3", channel)
    socket, other = Socket(), Socket()
    await fanout.join(["conversation-3", "user-3"], socket)
    await fanout.join(["conversation-4"], other)
    await notify.group_send("conversation-3", {"type": "conversation.state", "conversation_id": 3, "version": "v7"})
    assert await asyncio.wait_for(socket.states.get(), 5) == {
        "type": "conversation.state", "conversation_id": 3, "version": "v7"
    }
    await notify.group_send("user-3", {"type": "live.revoked", "session_key": ""})
    assert (await asyncio.wait_for(layer.receive(channel), 5))["type"] == "live.revoked"
    await notify.group_send("conversation-4", {"type": "live.html", "html": "<p id='after'></p>"})
    assert await other.next() == "<p id='after'></p>"  # published after the state change
    assert socket.frames.empty() and socket.states.empty() and other.states.empty()
    await layer.flush()
    channel_layers.backends.clear()


async def test_redis_going_away_loses_fragments_but_not_the_fan_out(proxied):
    """At most once: what is sent while Redis is away is lost (a failed send is logged,
    never raised into the write); once Redis is back the subscription is made again."""
    socket = Socket()
    await fanout.join(["operators"], socket)
    state = fanout._by_loop[asyncio.get_running_loop()]

    proxied.cut()
    await wait_until(lambda: not state.subscribed.is_set())
    await sync_to_async(notify.send_html)("operators", "<p id='lost'></p>")  # logged, not raised

    proxied.restore()
    await wait_until(state.subscribed.is_set)
    await notify.group_send("operators", {"type": "live.html", "html": "<p id='back'></p>"})
    assert await socket.next() == "<p id='back'></p>"


async def test_deployments_on_other_redis_databases_do_not_hear_each_other(proxied, settings):
    socket = Socket()
    await fanout.join(["operators"], socket)
    ours = settings.REDIS_URL
    db = int(urlsplit(ours).path.strip("/") or 0)
    settings.REDIS_URL = urlsplit(ours)._replace(path=f"/{(db + 1) % 16}").geturl()
    await notify.group_send("operators", {"type": "live.html", "html": "<p id='theirs'></p>"})
    settings.REDIS_URL = ours
    await notify.group_send("operators", {"type": "live.html", "html": "<p id='ours'></p>"})
    assert await socket.next() == "<p id='ours'></p>"


# ---------------------------------------------------------------- who listens: render only what is open


def listeners(redis_url: str, group: str) -> int:
    import redis

    return redis.Redis.from_url(redis_url).zcard(notify.listening_key(group))


@pytest.fixture
def fresh_answers():
    notify._listened_until.clear()
    yield
    notify._listened_until.clear()


async def test_a_group_counts_as_listened_from_its_first_socket_until_its_last_leaves(
    proxied, redis_url, fresh_answers
):
    group = f"conversation-{secrets.randbelow(10**9)}"
    assert notify.listened([group]) == set()
    first, second = Socket(), Socket()
    await fanout.join([group], first)
    # Said before `join` returns, i.e. before the page's catch-up reads the database.
    assert notify.listened([group]) == {group}
    await fanout.join([group], second)
    fanout.leave([group], first)
    notify._listened_until.clear()
    assert notify.listened([group]) == {group}  # one socket is still there

    fanout.leave([group], second)
    await wait_until(lambda: listeners(redis_url, group) == 0)
    notify._listened_until.clear()
    assert notify.listened([group]) == set()


async def test_a_page_that_rejoins_at_once_is_not_withdrawn_by_its_old_socket(proxied, redis_url, fresh_answers):
    """A reload: the old socket's last leave and the new one's join race on one process."""
    group = f"conversation-{secrets.randbelow(10**9)}"
    old, new = Socket(), Socket()
    await fanout.join([group], old)
    fanout.leave([group], old)  # schedules the withdrawal
    await fanout.join([group], new)
    await asyncio.sleep(0.2)  # the withdrawal task has run (or skipped) by now; the state must last
    notify._listened_until.clear()
    assert notify.listened([group]) == {group}
    assert listeners(redis_url, group) == 1


async def test_groups_are_announced_again_when_redis_comes_back_empty(proxied, redis_url, fresh_answers):
    import redis

    group = f"conversation-{secrets.randbelow(10**9)}"
    socket = Socket()
    await fanout.join([group], socket)
    state = fanout._by_loop[asyncio.get_running_loop()]

    proxied.cut()
    await wait_until(lambda: not state.subscribed.is_set())
    # Nobody can say who listens: the worker renders for all rather than miss one.
    assert notify.listened([group, "conversation-0"]) == {group, "conversation-0"}
    redis.Redis.from_url(redis_url).delete(notify.listening_key(group))  # as a restarted Redis
    proxied.restore()
    await wait_until(state.subscribed.is_set)
    notify._listened_until.clear()
    assert notify.listened([group]) == {group}


@pytest.mark.django_db(transaction=True)
async def test_the_worker_renders_a_conversations_lines_only_while_a_page_has_it_open(
    proxied, redis_url, fresh_answers, monkeypatch
):
    from conversations import worker
    from conversations.models import Conversation
    from dashboard import rendering
    from pinecall_sdk.events import parse_event

    session = f"s-listen-{secrets.randbelow(10**9)}"
    rendered = []
    render_message = rendering.render_message

    def counting(message, *, new):
        rendered.append(message.text)
        return render_message(message, new=new)

    monkeypatch.setattr(rendering, "render_message", counting)

    def customer_says(text: str) -> None:
        event = parse_event(
            {
                "event": "whatsapp.message",
                "agent_id": "demo",
                "session_id": session,
                "from": "+34600111222",
                "message_id": f"wamid.{secrets.token_hex(8)}",
                "type": "text",
                "text": text,
            }
        )
        worker.store_batch([event], "demo")

    async def until_a_frame_says(socket: Socket, text: str) -> str:
        while text not in (frame := await socket.next()):
            pass
        return frame

    import redis

    # Left by other tests' processes (their loops closed without leaving): as if crashed.
    redis.Redis.from_url(redis_url).delete(*(notify.listening_key(f"conversation-{pk}") for pk in range(1, 50)))
    inbox = Socket()
    await fanout.join(["operators"], inbox)
    await sync_to_async(customer_says)("nobody has this open")
    await until_a_frame_says(inbox, "nobody has this open")  # its inbox row still moves
    assert rendered == []

    conversation = await sync_to_async(Conversation.objects.get)(session_id=session)
    assert rendered == []
    page = Socket()
    await fanout.join([notify.conversation_group(conversation.pk)], page)
    await sync_to_async(customer_says)("now somebody does")
    assert f'id="messages-{conversation.pk}"' in await until_a_frame_says(page, "now somebody does")

    fanout.leave([notify.conversation_group(conversation.pk)], page)
    await wait_until(lambda: listeners(redis_url, notify.conversation_group(conversation.pk)) == 0)
    notify._listened_until.clear()
    await sync_to_async(customer_says)("closed again")
    await until_a_frame_says(inbox, "closed again")
    assert rendered == ["now somebody does"]
