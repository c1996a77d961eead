"""Telling operators' browsers, and waking the worker, over the channel layer.

Services call these from `transaction.on_commit`. Fragments are rendered here,
once per change, by the same templates the pages include; consumers only
forward `event["html"]`. The channel layer delivers at most once: a browser that
reconnects asks for what it missed (see `dashboard.consumers`).
"""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction
from django.template.loader import render_to_string

logger = logging.getLogger(__name__)

OPERATORS_GROUP = "operators"  # every logged-in operator's socket: inbox rows, agent state
WORKER_CHANNEL = "pinecall"  # the worker's channel (`manage.py runworker pinecall`)


def after_commit(notify, *args) -> None:
    """Call `notify(*args)` once the current transaction commits.

    Nobody hears of a row that was rolled back, and a failure to notify is
    logged, never raised into the write that succeeded.
    """
    transaction.on_commit(lambda: notify(*args), robust=True)


def conversation_group(conversation_id: int) -> str:
    return f"conversation-{conversation_id}"


def _send_html(group: str, html: str) -> None:
    layer = get_channel_layer()
    if layer is None or not html.strip():
        return
    try:
        async_to_sync(layer.group_send)(group, {"type": "live.html", "html": html})
    except Exception:  # Redis down: the database is the record, browsers catch up
        logger.warning("could not notify group %s", group, exc_info=True)


def message_added(message) -> None:
    """A new line in a conversation, and its inbox row moving to the top."""
    _send_html(
        conversation_group(message.conversation_id),
        render_to_string("conversations/_message_live.html", {"message": message, "new": True}),
    )
    _send_inbox_row(message.conversation)


def message_changed(message) -> None:
    """A delivery tick moved, or a human send was confirmed or failed."""
    _send_html(
        conversation_group(message.conversation_id),
        render_to_string("conversations/_message_live.html", {"message": message, "new": False}),
    )


def conversation_changed(conversation) -> None:
    """Who holds it, whether it is paused or ended: its header and its inbox row."""
    conversation.refresh_from_db()
    _send_html(
        conversation_group(conversation.pk),
        render_to_string("conversations/_conversation_live.html", {"conversation": conversation}),
    )
    _send_inbox_row(conversation)


def command_changed(command) -> None:
    """An operator's action was confirmed or failed at Pinecall."""
    group = (
        conversation_group(command.conversation_id) if command.conversation_id else OPERATORS_GROUP
    )
    _send_html(group, render_to_string("conversations/_command_live.html", {"command": command}))


def agent_state_changed(state) -> None:
    """The kill switch or the worker's link changed: every page shows it."""
    _send_html(
        OPERATORS_GROUP,
        render_to_string("conversations/_agent_state.html", {"agent_state": state, "oob": True}),
    )


def _send_inbox_row(conversation) -> None:
    _send_html(
        OPERATORS_GROUP,
        render_to_string("conversations/_inbox_row_live.html", {"conversation": conversation}),
    )


def wake_worker() -> None:
    """Tell the worker the outbox has something; it also polls, so a lost wake only delays."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.send)(WORKER_CHANNEL, {"type": "outbox.wake"})
    except Exception:
        logger.warning("could not wake the worker; it will find the command on its next poll")
