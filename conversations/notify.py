"""Telling operators' browsers, and waking the worker, over the channel layer: transport only.

Services and the ingest name what changed (`notify.after_commit(notify.message_added,
message)`); the web layer renders it. This module knows groups, timing and
delivery, not HTML: `dashboard.rendering` registers, when the app is ready, a
handler per change that renders the fragments and hands them back to
`send_html`. So the domain never imports the web layer, and a process without
it (a bare shell) notifies nobody instead of failing.

Rules it keeps:
- after the commit only (Zulip's `send_event_on_commit`): nobody hears of a
  row that was rolled back, and a failure to notify never fails the write;
- coalesced in the worker's batches: a burst moves an inbox row once;
- at most once: a browser that reconnects catches up from the database.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
from asgiref.sync import SyncToAsync, async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction

from conversations import selectors

logger = logging.getLogger(__name__)

OPERATORS_GROUP = "operators"  # every logged-in operator's socket: inbox rows, agent state
WORKER_CHANNEL = "pinecall"  # the worker's channel (`manage.py runworker pinecall`)


def conversation_group(conversation_id: int) -> str:
    return f"conversation-{conversation_id}"


def user_group(user_pk: int) -> str:
    """Every open socket of one person (each of their tabs and devices)."""
    return f"user-{user_pk}"


# ---------------------------------------------------------------- what changed

# name -> the web layer's handler (see `register`).
_handlers: dict[str, Callable] = {}


def register(**handlers: Callable) -> None:
    """The web layer's renderers, one per change below (`dashboard.rendering`)."""
    _handlers.update(handlers)


def _emit(name: str, *args, **kwargs) -> None:
    handler = _handlers.get(name)
    if handler is not None:
        handler(*args, **kwargs)


def message_added(message) -> None:
    """A new line in a conversation (and its inbox row moving to the top)."""
    _emit("message_added", message)


def message_changed(message) -> None:
    """A delivery tick moved, or a human send was confirmed or failed."""
    _emit("message_changed", message)


def conversation_changed(conversation) -> None:
    """Who holds it, whether it is paused or ended: its header and its inbox row."""
    _emit("conversation_changed", conversation)


def conversation_awaiting(conversation, command) -> None:
    """A take over or hand back has asked Pinecall and waits for its answer.

    Pinecall's confirmation tells every viewer (`conversation_changed`, from the
    worker), usually tens of milliseconds later. Telling them of the wait too would
    render every viewer's header and the inbox row twice per action, the first time
    in the very window the confirmation needs the CPU, and flash "taking over…" for
    an instant. So the others hear of the wait only if it is still open after
    `LIVE_PENDING_GRACE_SECONDS` (a slow Pinecall, a worker that is down). The
    operator who acted sees it at once: their POST's answer shows it.
    """
    grace = settings.LIVE_PENDING_GRACE_SECONDS
    if grace <= 0:
        conversation_changed(conversation)
    else:
        _later(grace, _announce_if_awaiting, conversation.pk, command.pk)


def _announce_if_awaiting(conversation_id: int, command_id: int) -> None:
    conversation = selectors.conversation_awaiting_command(conversation_id, command_id)
    if conversation is not None:
        conversation_changed(conversation)


def inbox_row_changed(conversation) -> None:
    """Only its inbox row: a conversation nobody can have open yet."""
    inbox_row(conversation)


def command_changed(command) -> None:
    """An operator's action was confirmed or failed at Pinecall."""
    _emit("command_changed", command)


def agent_state_changed(state) -> None:
    """The kill switch or the worker's link changed: every page shows it."""
    _emit("agent_state_changed", state)


def worker_heartbeat(state) -> None:
    """The worker is alive: pages compare its time with their clock."""
    _emit("worker_heartbeat", state)


def database_state_changed(*, available: bool) -> None:
    """The worker cannot reach the database (or can again); told without a query."""
    _emit("database_state_changed", available=available)


def user_notice(user_pk: int, kind: str, **context) -> None:
    """Something for one person only (the conversation taken from them, a hand-back warning)."""
    _emit("user_notice", user_pk, kind, **context)


def call_group(call_id: str) -> str:
    """Every open page of one voice call (by Pinecall's `call_id`): its lines and live captions.

    Group names allow letters, digits, `-`, `_` and `.` only, under 100 characters.
    """
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", call_id)
    if len(safe) > 90 or safe != call_id:
        safe = safe[:60] + "." + hashlib.sha256(call_id.encode()).hexdigest()[:16]
    return f"call-{safe}"


CALLS_GROUP = "calls"  # the /calls/ list's sockets


def call_changed(call) -> None:
    """A call started, ended, was forwarded or asks for a person: its header and list row."""
    _emit("call_changed", call)


def call_line_added(line) -> None:
    """A final line of a call (the caller's, the AI's, a supervisor's)."""
    _emit("call_line_added", line)


def call_line_changed(line) -> None:
    """A line's wording was confirmed, or it was cut off."""
    _emit("call_line_changed", line)


def call_caption(call_id: str, kind: str, **fields) -> None:
    """A live-only caption (a caller's draft, a bot word, a cut): never stored."""
    _emit("call_caption", call_id, kind, **fields)


def send_html_if_listened(group: str, render: Callable[[], str]) -> None:
    """`send_html(group, render())`, rendered only if some socket is in `group`.

    Inside `coalesced()` the question is asked once for the whole batch, at
    its end (after the other notifications, before the inbox rows).
    """
    fragments = getattr(_local, "fragments", None)
    if fragments is not None:
        fragments.append((group, render))
    elif listened([group]):
        send_html(group, render())


def inbox_row(conversation) -> None:
    """A conversation's inbox row moved; inside `coalesced()`, once per batch, read fresh."""
    rows = getattr(_local, "rows", None)
    if rows is not None:
        rows.add(conversation.pk)
        return
    _emit("inbox_rows", {conversation.pk})


# ---------------------------------------------------------------- when


def after_commit(notify: Callable, *args, **kwargs) -> None:
    """Call `notify(*args)` once the current transaction commits (services use this).

    Nobody hears of a row that was rolled back, and a failure to notify is
    logged, never raised into the write that succeeded. Inside `coalesced()`
    the call waits for the end of the block, and repeats of it are dropped.
    """
    transaction.on_commit(lambda: _notify(notify, args, kwargs), robust=True)


_local = threading.local()


def _key(args: tuple) -> tuple:
    return tuple((type(a).__name__, getattr(a, "pk", id(a))) for a in args)


def _notify(notify: Callable, args: tuple, kwargs: dict) -> None:
    pending = getattr(_local, "pending", None)
    if pending is None:
        notify(*args, **kwargs)
    else:
        # The newest write's objects (three receipts in one batch: the bubble shows
        # "read", not "sent"), in the place of the first (a dict keeps that order).
        pending[(notify, _key(args))] = (args, kwargs)


@contextmanager
def coalesced(*, rows_later: set[int] | None = None):
    """Gather the notifications of many writes and send each distinct one once.

    The worker stores events in batches: a burst of fifty messages in one
    conversation then moves its inbox row once, not fifty times. Order of
    first appearance is kept; objects are rendered as they are at the end.
    With `rows_later`, the inbox rows that moved are added to it instead of sent:
    the caller sends them (`inbox_rows_moved`) once the other fragments are out.
    """
    pending: dict = {}
    rows: set[int] = set()
    fragments: list[tuple[str, Callable[[], str]]] = []
    _local.pending, _local.rows, _local.fragments = pending, rows, fragments
    try:
        yield
    finally:
        # Notifying can queue more (a message queues its inbox row): drain until quiet.
        while pending:
            (notify, _), (args, kwargs) = next(iter(pending.items()))
            del pending[(notify, _)]
            try:
                notify(*args, **kwargs)
            except Exception:
                logger.exception("could not notify operators (%s)", notify.__name__)
        _local.pending = _local.rows = _local.fragments = None
        if fragments:
            heard = listened({group for group, _ in fragments})
            for group, render in fragments:
                if group in heard:
                    try:
                        send_html(group, render())
                    except Exception:
                        logger.exception("could not send a fragment to %s", group)
        if rows and rows_later is not None:
            rows_later.update(rows)
        elif rows:
            inbox_rows_moved(rows)


def inbox_rows_moved(conversation_ids: set[int]) -> None:
    """These conversations' inbox rows, read fresh and sent (and the tabs' counts)."""
    try:
        _emit("inbox_rows", conversation_ids)
    except Exception:
        logger.exception("could not send the inbox rows")


def _later(delay: float, fn: Callable, *args) -> None:
    """`fn(*args)` on a thread of the pool in `delay` seconds, or now if this thread
    has no event loop to wait on (a shell, a sync test).

    On the event loop that serves this request (asgiref's, the one `async_to_sync`
    sends through), so that its sends take the same path as the request's own. At
    most once, like everything here: a process that stops first drops the call.
    """
    loop = _serving_loop()
    if loop is None:
        fn(*args)
        return

    def start() -> None:
        task = loop.create_task(database_sync_to_async(fn, thread_sensitive=False)(*args))
        _later_tasks.add(task)
        task.add_done_callback(_later_done)

    loop.call_soon_threadsafe(loop.call_later, delay, start)


_later_tasks: set[asyncio.Task] = set()


def _later_done(task: asyncio.Task) -> None:
    _later_tasks.discard(task)
    if not task.cancelled() and task.exception() is not None:
        logger.error("could not notify operators later", exc_info=task.exception())


def _serving_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        pass
    # A sync view's thread: asgiref records the loop it came from (and its process).
    local = SyncToAsync.threadlocal
    if getattr(local, "main_event_loop_pid", None) != os.getpid():
        return None
    loop = getattr(local, "main_event_loop", None)
    return loop if loop is not None and not loop.is_closed() else None


# ---------------------------------------------------------------- how

_sender = None


def send_through(sender, *, replacing=None) -> None:
    """Route group sends through `sender(group, message)` instead of waiting on each.

    The worker installs one that publishes a fragment from its ORM thread while
    nothing waits before it, and otherwise hands sends, in order, to its event
    loop: storing waits for Redis at most `PUBLISH_NOW_TIMEOUT`, once, when Redis
    stalls. With `replacing`, only if that one is still the one installed (a
    bridge removing its own, never another's).
    """
    global _sender
    if replacing is None or _sender is replacing:
        _sender = sender


def send_html(group: str, html: str) -> None:
    """One rendered fragment to every socket of `group` (at most once)."""
    if html.strip():
        send(group, {"type": "live.html", "html": html})


def send(group: str, message: dict) -> None:
    if _sender is not None:
        _sender(group, message)
        return
    try:
        if _published(message):
            _sync_redis().publish(fanout_channel(group), _payload(message))
            return
        layer = get_channel_layer()
        if layer is not None:
            async_to_sync(layer.group_send)(group, message)
    except Exception:  # Redis down: the database is the record, browsers catch up
        logger.warning("could not notify group %s", group, exc_info=True)


async def group_send(group: str, message: dict) -> None:
    """`send` from an event loop (the worker's broadcasts, a consumer's own fragments)."""
    if _published(message):
        await _async_redis().publish(fanout_channel(group), _payload(message))
        return
    layer = get_channel_layer()
    if layer is not None:
        await layer.group_send(group, message)


def user_sessions_revoked(user_pk: int, *, session_key: str | None = None) -> None:
    """Close this person's sockets: they logged out, were deactivated or lost a role.

    With `session_key`, only the sockets of that login session (a logout on one
    device leaves the others open). Pages show "Signed out · reload".
    """
    send(user_group(user_pk), {"type": "live.revoked", "session_key": session_key or ""})


def wake_worker() -> None:
    """Tell the worker the outbox has something; it also polls, so a lost wake only delays.

    With Redis, one PUBLISH from this thread (the worker listens, `worker_wake_channel`):
    the channel layer's send would first hop to the event loop and back, and every
    action's round trip starts with this.
    """
    try:
        if fanout_enabled():
            _sync_redis().publish(worker_wake_channel(), "")
            return
        layer = get_channel_layer()
        if layer is not None:
            async_to_sync(layer.send)(WORKER_CHANNEL, {"type": "outbox.wake"})
    except Exception:
        logger.warning("could not wake the worker; it will find the command on its next poll")


def worker_wake_channel() -> str:
    """Outside the fragments' prefix: web processes never hear it."""
    return f"wake:{fanout_prefix()}{WORKER_CHANNEL}"


# ---------------------------------------------------------------- the fan-out of fragments
#
# With Redis, a rendered fragment for a group is one PUBLISH: every web process
# receives it once and writes it to its own sockets of that group
# (`dashboard.fanout`). The channel layer would store a copy per socket, each
# popped by its process in a Redis round trip of its own: at 100 sockets, most of
# the time to their screens. The rules stay: at most once; the database is the
# record, and a page that reconnects catches up. A state change (each socket then
# renders its viewer's own header) is published the same way; everything else
# (closing a socket, waking the worker) stays on the channel layer.


def fanout_enabled() -> bool:
    """Where the channel layer is on Redis: the fan-out shares its server."""
    backend = (settings.CHANNEL_LAYERS.get("default") or {}).get("BACKEND", "")
    return settings.LIVE_FANOUT == "pubsub" and bool(settings.REDIS_URL) and backend.startswith("channels_redis.")


# Published besides fragments: "the conversation changed, render your viewer's own
# header" (`conversation.state`), so a confirmation reaches each web process in one
# PUBLISH instead of a channel-layer copy per socket. No fragment starts with it.
STATE_MARK = "\x00conversation.state:"


def _published(message: dict) -> bool:
    return message.get("type") in ("live.html", "conversation.state") and fanout_enabled()


def _payload(message: dict) -> str:
    if message["type"] == "live.html":
        return message["html"]
    return STATE_MARK + json.dumps(
        {"conversation_id": message["conversation_id"], "version": message.get("version", "")}
    )


def state_from_payload(data: str) -> dict | None:
    """The `conversation.state` event a published payload carries; None for a fragment."""
    if not data.startswith(STATE_MARK):
        return None
    return {"type": "conversation.state", **json.loads(data[len(STATE_MARK):])}


RESUBSCRIBE_MAX_SECONDS = 5.0


async def listen(*, subscribe, on_ready, on_message, on_lost) -> None:
    """Listen on Redis pub/sub for good.

    `await subscribe(pubsub)`; once Redis confirms, `await on_ready()`; then
    `await on_message(channel, data)` for each message. Redis away: `on_lost(error,
    delay)`, and all again after `delay`, growing; what was published meanwhile
    is lost (at most once: the database is the record).
    """
    delay = 0.25
    while True:
        client = aioredis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2.0)
        pubsub = client.pubsub()
        try:
            await subscribe(pubsub)
            # The confirmation: from here on, every PUBLISH reaches this listener.
            while (await pubsub.get_message(timeout=None)) is None:
                pass
            await on_ready()
            delay = 0.25
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                if message is not None:
                    await on_message(message["channel"].decode(), message["data"].decode())
        except asyncio.CancelledError:
            raise
        except Exception as error:
            on_lost(error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESUBSCRIBE_MAX_SECONDS)
        finally:
            try:
                await pubsub.aclose()
                await client.aclose()
            except Exception:
                pass


def fanout_prefix() -> str:
    """Pub/sub channels ignore Redis's numbered databases: the db number keeps two
    deployments (or test runs) on one server apart."""
    db = (urlsplit(settings.REDIS_URL).path or "/0").strip("/") or "0"
    return f"live:{db}:"


def fanout_channel(group: str) -> str:
    return fanout_prefix() + group


# ---------------------------------------------------------------- who listens
#
# A conversation's fragments are rendered only while some page has it open: in
# a burst most conversations have nobody watching, and rendering is most of
# what storing a message costs after its SQL. Each web process announces the
# groups it has sockets in (`dashboard.fanout`), in a sorted set per group
# scored by when the announcement expires.

LISTENING_TTL = 60.0  # seconds an announcement lasts unrenewed (clock skew between hosts included)
LISTENING_RENEW = 15.0
# A "yes" is reused this long: a group that has just lost its last socket costs a
# few renders for nobody; a "no" is never reused (a page that just opened gets all).
LISTENED_REUSED_FOR = 2.0

_listened_until: dict[str, float] = {}


def listening_key(group: str) -> str:
    return f"live:listening:{group}"


def listened(groups) -> set[str]:
    """Which of `groups` have a socket in some web process now.

    Without the fan-out, or when Redis cannot say: all of them (render for
    nobody rather than miss somebody).
    """
    groups = set(groups)
    if not groups or not fanout_enabled():
        return groups
    now = time.monotonic()
    heard = {group for group in groups if _listened_until.get(group, 0.0) > now}
    ask = sorted(groups - heard)
    if not ask:
        return heard
    try:
        pipe = _sync_redis().pipeline(transaction=False)
        for group in ask:
            pipe.zcount(listening_key(group), time.time(), "+inf")
        counts = pipe.execute()
    except Exception as error:
        logger.warning("could not ask who listens (%s); rendering for all", error)
        return groups
    for group, count in zip(ask, counts):
        if count:
            heard.add(group)
            _listened_until[group] = now + LISTENED_REUSED_FOR
        else:
            _listened_until.pop(group, None)
    if len(_listened_until) > 10_000:  # bounded: forget the answers that ran out
        for group in [g for g, until in _listened_until.items() if until <= now]:
            _listened_until.pop(group, None)
    return heard


# Made on first use, for the configured URL (tests point it elsewhere), one per timeout.
_sync_clients: dict[float, tuple[str, redis.Redis]] = {}
_async_clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sync_redis(timeout: float = 2.0) -> redis.Redis:
    url = settings.REDIS_URL
    made = _sync_clients.get(timeout)
    if made is None or made[0] != url:
        made = _sync_clients[timeout] = (
            url, redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        )
    return made[1]


PUBLISH_NOW_TIMEOUT = 0.2  # seconds: how long `publish_now` may hold its thread


def publish_now(group: str, message: dict) -> bool:
    """PUBLISH a fan-out message (a fragment, a state change) from this thread, waiting
    at most `PUBLISH_NOW_TIMEOUT` for Redis. False, nothing sent, for any other message
    (those go over the channel layer); raises if Redis does not answer in time."""
    if not _published(message):
        return False
    _sync_redis(PUBLISH_NOW_TIMEOUT).publish(fanout_channel(group), _payload(message))
    return True


def _async_redis() -> aioredis.Redis:
    """One client per event loop (a client's connections belong to the loop that made them)."""
    loop = asyncio.get_running_loop()
    url = settings.REDIS_URL
    made = _async_clients.get(loop)
    if made is None or made[0] != url:
        made = _async_clients[loop] = (
            url, aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        )
    return made[1]
