"""Notes and mentions on the live sockets (the real ASGI app, as in test_consumers)."""

from __future__ import annotations

import time

import pytest
from asgiref.sync import sync_to_async

from conversations import operator_tools
from tests.dashboard.test_consumers import (  # noqa: F401  (fixtures)
    close_thread_connections,
    fresh_channel_layer,
    session_cookie,
    socket,
)
from tests.factories import ConversationFactory, OperatorFactory

pytestmark = pytest.mark.django_db(transaction=True)


async def connected(path: str, user):
    """A socket past its catch-up (ending with the cursor) and, on a conversation's page,
    its presence bar and the row's mark (their order differs between channel layers)."""
    comm = socket(path, await sync_to_async(session_cookie)(user))
    assert (await comm.connect())[0]
    while 'id="live-cursor"' not in await comm.receive_from(timeout=3):
        pass
    if "conversation=" in path:
        presence = [await comm.receive_from(timeout=3), await comm.receive_from(timeout=3)]
        assert any('class="presence"' in html for html in presence)
        assert any('class="row-viewing"' in html for html in presence)
    return comm


async def test_a_mention_reaches_the_mentioned_operators_socket_only():
    ana = await sync_to_async(OperatorFactory)(username="ana", first_name="Ana")
    bruno = await sync_to_async(OperatorFactory)(username="bruno", first_name="Bruno")
    carla = await sync_to_async(OperatorFactory)(username="carla", first_name="Carla")
    conversation = await sync_to_async(ConversationFactory)(contact_name="Nora <b>N</b>")
    since = time.time()
    watching = f"/ws/live/?conversation={conversation.pk}&after=0&since={since}"
    carla_page = await connected(watching, carla)  # first: her presence mark is not for Bruno's test
    bruno_inbox = await connected(f"/ws/live/?since={since}", bruno)

    await sync_to_async(operator_tools.note_create)(
        conversation=conversation, operator=ana, text="@Bruno can you call her back?"
    )

    notice = await bruno_inbox.receive_from(timeout=3)
    assert 'data-notice="mention"' in notice and f'href="/c/{conversation.pk}/"' in notice
    assert "Ana" in notice and "@Bruno can you call her back?" in notice
    assert "Nora &lt;b&gt;N&lt;/b&gt;" in notice and "<b>N</b>" not in notice
    assert await bruno_inbox.receive_nothing(timeout=0.3)  # not on his inbox page: no note line

    # Carla has the conversation open: the note appears in its timeline, and she is told nothing.
    line = await carla_page.receive_from(timeout=3)
    assert f'id="messages-{conversation.pk}" hx-swap-oob="beforeend"' in line and 'class="internal-note"' in line
    assert await carla_page.receive_nothing(timeout=0.3)
    await bruno_inbox.disconnect()
    await carla_page.disconnect()
