"""Telling operators' browsers, and waking the worker, over the channel layer.

Services call these from `transaction.on_commit`. Fragments are rendered here,
once per change, by the same templates the pages include; consumers only
forward `event["html"]`. Each fragment is htmx out-of-band HTML that the
browser's WebSocket extension swaps in.

Fragments are rendered once for every operator, so they carry nothing
per-user: where a user's view differs (their buttons, "You hold this"), the
fragment carries a small element that makes each browser fetch its own state
(`hx-trigger="load"`) from a view rendered by the same partials the page uses.

The channel layer delivers at most once: a browser that (re)connects asks for
what it missed, and `catch_up()` renders it (see `dashboard.consumers`).
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction
from django.template.loader import render_to_string
from django.utils import timezone

logger = logging.getLogger(__name__)

OPERATORS_GROUP = "operators"  # every logged-in operator's socket: inbox rows, agent state
WORKER_CHANNEL = "pinecall"  # the worker's channel (`manage.py runworker pinecall`)

# A row saved just before a page's render may commit just after it: catch-up looks
# back this much further than the page says it knows.
CATCH_UP_MARGIN = timedelta(seconds=2)
# Under this gap since the page's state, a (re)connect re-renders the conversation's
# header only if its row changed meanwhile (a page that just loaded is up to date).
QUIET_RECONNECT = timedelta(seconds=10)


def after_commit(notify, *args) -> None:
    """Call `notify(*args)` once the current transaction commits (services use this).

    Nobody hears of a row that was rolled back, and a failure to notify is
    logged, never raised into the write that succeeded. Inside `coalesced()`
    the call waits for the end of the block, and repeats of it are dropped.
    """
    transaction.on_commit(lambda: _notify(notify, args), robust=True)


_local = threading.local()


def _key(args: tuple) -> tuple:
    return tuple((type(a).__name__, getattr(a, "pk", id(a))) for a in args)


def _notify(notify, args: tuple) -> None:
    pending = getattr(_local, "pending", None)
    if pending is None:
        notify(*args)
    else:
        pending.setdefault((notify, _key(args)), args)


@contextmanager
def coalesced():
    """Gather the notifications of many writes and send each distinct one once.

    The worker stores events in batches: a burst of fifty messages in one
    conversation then moves its inbox row once, not fifty times. Order of
    first appearance is kept; objects are rendered as they are at the end.
    """
    pending: dict = {}
    rows: set[int] = set()
    _local.pending, _local.rows = pending, rows
    try:
        yield
    finally:
        # Notifying can queue more (a message queues its inbox row): drain until quiet.
        while pending:
            (notify, _), args = next(iter(pending.items()))
            del pending[(notify, _)]
            try:
                notify(*args)
            except Exception:
                logger.exception("could not notify operators (%s)", notify.__name__)
        _local.pending = _local.rows = None
        _send_inbox_rows(rows)


_sender = None


def send_through(sender) -> None:
    """Route group sends through `sender(group, message)` instead of waiting on each.

    The worker installs one that hands them, in order, to its event loop, so
    storing an event never waits for Redis.
    """
    global _sender
    _sender = sender


def conversation_group(conversation_id: int) -> str:
    return f"conversation-{conversation_id}"


def user_group(user_pk: int) -> str:
    """Every open socket of one person (each of their tabs and devices)."""
    return f"user-{user_pk}"


def user_sessions_revoked(user_pk: int, *, session_key: str | None = None) -> None:
    """Close this person's sockets: they logged out, were deactivated or lost a role.

    With `session_key`, only the sockets of that login session (a logout on one
    device leaves the others open). Pages show "Signed out · reload".
    """
    layer = get_channel_layer()
    if layer is None:
        return
    message = {"type": "live.revoked", "session_key": session_key or ""}
    try:
        async_to_sync(layer.group_send)(user_group(user_pk), message)
    except Exception:  # Redis down: the session itself is already gone or changed
        logger.warning("could not close the sockets of user %s", user_pk, exc_info=True)


def _send_html(group: str, html: str) -> None:
    if not html.strip():
        return
    if _sender is not None:
        _sender(group, {"type": "live.html", "html": html})
        return
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(group, {"type": "live.html", "html": html})
    except Exception:  # Redis down: the database is the record, browsers catch up
        logger.warning("could not notify group %s", group, exc_info=True)


def message_added(message) -> None:
    """A new line in a conversation, and its inbox row moving to the top."""
    _send_html(conversation_group(message.conversation_id), render_message(message, new=True))
    if message.direction != "note":
        _send_inbox_row(message.conversation)


def message_changed(message) -> None:
    """A delivery tick moved, or a human send was confirmed or failed."""
    _send_html(conversation_group(message.conversation_id), render_message(message, new=False))


def conversation_changed(conversation) -> None:
    """Who holds it, whether it is paused or ended: its header and its inbox row."""
    conversation.refresh_from_db()
    _send_html(conversation_group(conversation.pk), render_conversation(conversation))
    _send_inbox_row(conversation)


def inbox_row_changed(conversation) -> None:
    """Only its inbox row: a conversation nobody can have open yet."""
    _send_inbox_row(conversation)


def command_changed(command) -> None:
    """An operator's action was confirmed or failed at Pinecall."""
    group = (
        conversation_group(command.conversation_id) if command.conversation_id else OPERATORS_GROUP
    )
    _send_html(group, render_to_string("conversations/_command_live.html", {"command": command}))


def agent_state_changed(state) -> None:
    """The kill switch or the worker's link changed: every page shows it."""
    _send_html(OPERATORS_GROUP, render_agent_state(state))


def worker_heartbeat(state) -> None:
    """The worker is alive: pages compare this time with their clock."""
    _send_html(
        OPERATORS_GROUP,
        render_to_string("conversations/_worker_heartbeat.html", {"agent_state": state, "oob": True}),
    )


def database_state_changed(*, available: bool) -> None:
    """The worker cannot reach the database (or can again): every page says so.

    Rendered without a query, since the database is what is missing.
    """
    _send_html(
        OPERATORS_GROUP,
        render_to_string("conversations/_db_status.html", {"available": available, "oob": True}),
    )


def _send_inbox_row(conversation) -> None:
    rows = getattr(_local, "rows", None)
    if rows is not None:
        # Many writes may move this row: it is rendered once, fresh, at the end.
        rows.add(conversation.pk)
        return
    _send_html(OPERATORS_GROUP, render_inbox_row(conversation))


def _send_inbox_rows(conversation_ids: set[int]) -> None:
    """The inbox rows a batch moved, read fresh in one query and sent once each."""
    if not conversation_ids:
        return
    from conversations.models import Conversation

    rows = Conversation.objects.select_related("held_by").filter(pk__in=conversation_ids)
    for conversation in rows.order_by("last_message_at", "id"):  # the newest lands on top
        _send_html(OPERATORS_GROUP, render_inbox_row(conversation))


def wake_worker() -> None:
    """Tell the worker the outbox has something; it also polls, so a lost wake only delays."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.send)(WORKER_CHANNEL, {"type": "outbox.wake"})
    except Exception:
        logger.warning("could not wake the worker; it will find the command on its next poll")


# ---------------------------------------------------------------- rendering, shared with catch-up


def render_message(message, *, new: bool) -> str:
    return render_to_string("conversations/_message_live.html", {"message": message, "new": new})


def render_conversation(conversation) -> str:
    return render_to_string("conversations/_conversation_live.html", {"conversation": conversation})


def render_inbox_row(conversation) -> str:
    return render_to_string("conversations/_inbox_row_live.html", {"conversation": conversation})


def render_agent_state(state) -> str:
    return render_to_string(
        "conversations/_agent_state.html", {"agent_state": state, "oob": True}
    )


def render_cursor(now: datetime) -> str:
    """The page's catch-up position, read by app.js when the socket reconnects."""
    return render_to_string("conversations/_live_cursor.html", {"since": now.timestamp()})


def render_conversation_state_for(conversation, user) -> str:
    """One user's header and composer (out of band), as the page's state view renders them."""
    from conversations import selectors

    return render_to_string(
        "conversations/_conversation_state.html",
        {
            "conversation": conversation,
            "st": selectors.conversation_state(conversation=conversation, user=user),
            "max_length": settings.MESSAGE_MAX_LENGTH,
            "oob": True,
            "user": user,
        },
    )


def render_agent_state_for(state, user) -> str:
    """One user's agent banner (their kill switch buttons), out of band."""
    from django.contrib.auth.context_processors import PermWrapper

    from conversations import selectors

    return render_to_string(
        "conversations/_agent_state.html",
        {
            "agent_state": state,
            "agent_pending": selectors.agent_open_command(state.agent_id) or False,
            "workers": selectors.worker_processes(state.agent_id),
            "oob": True,
            "user": user,
            "perms": PermWrapper(user),
        },
    )


def catch_up(
    *,
    user=None,
    conversation_id: int | None = None,
    after: int | None = None,
    since: float | None = None,
) -> list[str]:
    """Everything a page missed, as the fragments the live stream would have sent.

    `after`: the newest message id the page shows (of `conversation_id`);
    `since`: the server time (epoch seconds) the page's state dates from, as
    rendered in the page or in the last catch-up's cursor. With `user`, the
    per-user parts (header, composer, agent banner) are rendered for them at
    once; without, as the broadcasts do (each browser then fetches its own).
    Ends with a new cursor.
    """
    from conversations import selectors
    from conversations.models import Conversation

    now = timezone.now()
    since_at = None
    if since is not None:
        try:
            since_at = datetime.fromtimestamp(since, tz=UTC) - CATCH_UP_MARGIN
        except (OverflowError, OSError, ValueError):
            since_at = None
    out: list[str] = []

    if conversation_id:
        conversation = (
            Conversation.objects.select_related("held_by").filter(pk=conversation_id).first()
        )
        if conversation is not None:
            limit = settings.CONVERSATION_PAGE_SIZE
            if after is not None:
                newer = selectors.messages_after(
                    conversation_id=conversation_id, after=after, limit=limit + 1
                )
                if len(newer) > limit:
                    # Too much missed: the newest page replaces the list, as on a reload.
                    messages, has_earlier = selectors.conversation_messages(
                        conversation_id=conversation_id
                    )
                    out.append(
                        render_to_string(
                            "conversations/_messages.html",
                            {
                                "conversation": conversation,
                                "messages": messages,
                                "has_earlier": has_earlier,
                                "oob": True,
                            },
                        )
                    )
                else:
                    out.extend(render_message(m, new=True) for m in newer)
                    if since_at is not None:
                        changed = selectors.messages_changed_since(
                            conversation_id=conversation_id, since=since_at, upto=after, limit=limit
                        )
                        out.extend(render_message(m, new=False) for m in changed)
            # Who holds it, pending actions: after a real gap, or when the row changed.
            if (
                since_at is None
                or now - since_at > QUIET_RECONNECT
                or conversation.updated_at >= since_at
            ):
                if user is not None:
                    out.append(render_conversation_state_for(conversation, user))
                else:
                    out.append(render_conversation(conversation))

    if since_at is not None:
        page = settings.INBOX_PAGE_SIZE
        rows = selectors.conversations_changed_since(since_at, limit=page + 1)
        if len(rows) > page:
            out.append(render_to_string("conversations/_inbox_refresh.html", {}))
        else:
            out.extend(render_inbox_row(row) for row in rows)
    state = selectors.agent_state_for_display(settings.PINECALL_AGENT_ID)
    out.append(
        render_agent_state_for(state, user) if user is not None else render_agent_state(state)
    )
    out.append(render_cursor(now))
    return out
