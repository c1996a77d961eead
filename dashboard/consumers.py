"""Operators' live socket: thin. It checks the user, joins groups, forwards fragments.

One endpoint, `/ws/live/`, with query parameters:

- `conversation=<pk>`: also join that conversation's group (the page shows it);
- `after=<message id>`: the newest message the page shows;
- `since=<epoch seconds>`: the server time the page's state dates from;
- `call=<pk>`: also join that voice call's group (its lines and live captions);
- `calls=1`: also join the call list's group.

On connect, after joining the groups, the first thing sent is what the page
missed (`rendering.catch_up`: newer messages, moved ticks, changed inbox rows, this
user's header, composer and agent banner), ending with a new cursor (the
`since` for the next reconnect); then every fragment the groups receive is
forwarded as it is. htmx's ws extension swaps them in.

Every socket also joins its user's group (`notify.user_group`): logging out,
being deactivated or losing a role closes it with 4401 (`live.revoked`), and
the page says "Signed out · reload".

A conversation's socket renders that viewer's own header and composer when
the conversation changes (`conversation.state`), so no browser has to ask.
It is also the page's presence: while open it counts as "viewing" (renewed
every `presence.RENEW_EVERY`), and the one thing a page may send on it is
`{"typing": true}`, shown to the conversation's other viewers, never stored.
"""

import asyncio
import json
import logging
import time
import weakref
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from conversations import metrics, notify, presence, selectors
from conversations.permissions import TAKE_OVER_PERMISSION
from dashboard import fanout, rendering

logger = logging.getLogger(__name__)

# The largest frame a page sends ({"typing": true}); anything bigger is ignored unread.
MAX_FRAME = 256
# A typist's page says so every few seconds; more often than this is dropped.
TYPING_EVERY = 2.0
# A page that closed is told to the others this long after its consumer stopped.
LEAVE_TOLD_AFTER = 0.5
# Who has a conversation open is told this long after a change, with whatever else
# changed meanwhile, and at most once per PRESENCE_TOLD_EVERY by one process for all:
# 1,000 operators opening one conversation would otherwise send each a bar per
# arrival (a million frames).
PRESENCE_TOLD_AFTER = 0.25
PRESENCE_TOLD_EVERY = 1.0


def _param(params: dict, name: str, kind):
    try:
        value = kind(params[name][0])
    except (KeyError, IndexError, ValueError, OverflowError):
        return None
    if kind is float and value != value:  # NaN
        return None
    return value


class LiveConsumer(AsyncWebsocketConsumer):
    # The newest state change not yet rendered, and the task rendering them (`state_changed`).
    _state_wanted: dict | None = None
    _state_render: asyncio.Future | None = None

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        params = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        conversation_id = _param(params, "conversation", int)
        if conversation_id is not None and conversation_id <= 0:
            conversation_id = None
        self.session_key = getattr(self.scope.get("session"), "session_key", None) or ""
        self.user = user
        self.conversation_id = conversation_id
        self.groups_joined = [notify.OPERATORS_GROUP, notify.user_group(user.pk)]
        if conversation_id:
            self.groups_joined.append(notify.conversation_group(conversation_id))
        call_pk = _param(params, "call", int)
        call = None
        if call_pk is not None and call_pk > 0:
            call = await database_sync_to_async(selectors.call_find)(call_pk)
            if call is not None:
                self.groups_joined.append(notify.call_group(call.call_id))
        if params.get("calls"):
            self.groups_joined.append(notify.CALLS_GROUP)
        for group in self.groups_joined:
            await self.channel_layer.group_add(group, self.channel_name)
        # Fragments published from here on wait until the catch-up is sent (its order).
        self.held: list[str] | None = []
        await fanout.join(self.groups_joined, self)
        await self.accept()
        self.counted = True
        metrics.LIVE_SOCKETS.inc()
        # Joined first, then read: nothing falls between the two (duplicates are
        # possible, and the page ignores a message it already shows).
        missed = await database_sync_to_async(rendering.catch_up)(
            user=user,
            conversation_id=conversation_id,
            after=_param(params, "after", int),
            since=_param(params, "since", float),
        )
        for html in missed:
            await self.send(text_data=html)
        if call is not None:
            for html in await database_sync_to_async(rendering.call_catch_up)(call.pk):
                await self.send(text_data=html)
        while self.held:
            await self.send(text_data=self.held.pop(0))
        self.held = None
        if conversation_id:
            self.can_type = await database_sync_to_async(user.has_perm)(TAKE_OVER_PERMISSION)
            self.typed_at = 0.0
            await self._presence_here()
            _presence_renewal().add(self)

    async def disconnect(self, code):
        if getattr(self, "counted", False):
            self.counted = False
            metrics.LIVE_SOCKETS.dec()
        fanout.leave(getattr(self, "groups_joined", []), self)
        if self._state_render is not None:
            self._state_render.cancel()
        for group in getattr(self, "groups_joined", []):
            await self.channel_layer.group_discard(group, self.channel_name)
        renewal = _renewals.get(asyncio.get_running_loop())
        if renewal is not None and renewal.discard(self):
            await database_sync_to_async(presence.gone)(self.conversation_id, self.user.pk, self.channel_name)
            # Told from outside this consumer, a moment after it stopped: channels-redis
            # can drop a message that arrives just as a stopping consumer's receive is
            # cancelled (django/channels#1683), and this one would arrive right then.
            _tell_presence_soon(self.conversation_id, after=LEAVE_TOLD_AFTER, not_before=True)

    async def receive(self, text_data=None, bytes_data=None):
        """Actions are HTTP POSTs; a page only says that its operator is typing."""
        if not text_data or len(text_data) > MAX_FRAME or not getattr(self, "can_type", False):
            return
        try:
            frame = json.loads(text_data)
        except ValueError:
            return
        if not isinstance(frame, dict) or frame.get("typing") is not True:
            return
        now = time.monotonic()
        if now - self.typed_at < TYPING_EVERY:
            return
        self.typed_at = now
        await self.channel_layer.group_send(
            notify.conversation_group(self.conversation_id),
            {"type": "live.html", "html": rendering.render_typing(self.conversation_id, self.user)},
        )

    # ------------------------------------------------------------ presence

    async def _presence_here(self) -> None:
        await database_sync_to_async(presence.here)(self.conversation_id, self.user.pk, self.channel_name)
        _tell_presence_soon(self.conversation_id, after=PRESENCE_TOLD_AFTER)

    # ------------------------------------------------------------ from the groups

    async def live_html(self, event):
        await self.send(text_data=event["html"])

    async def deliver(self, html: str) -> None:
        """A fragment of one of this socket's groups, from this process's fan-out."""
        if self.held is not None:
            self.held.append(html)
        else:
            await self.send(text_data=html)

    async def conversation_state(self, event):
        """The conversation changed (over the channel layer): this viewer's own header."""
        html = await self._render_state(event)
        if html:
            await self.send(text_data=html)

    def state_changed(self, event) -> None:
        """The conversation changed (from the fan-out): this viewer's own header, rendered
        in a task of this socket's, one at a time and the newest change last."""
        self._state_wanted = event
        if self._state_render is None or self._state_render.done():
            self._state_render = asyncio.ensure_future(self._render_wanted_states())

    async def _render_wanted_states(self) -> None:
        while self._state_wanted is not None:
            event, self._state_wanted = self._state_wanted, None
            try:
                html = await self._render_state(event)
                if html:
                    await self.deliver(html)
            except Exception:  # the next change, or a reconnect's catch-up, brings it
                logger.warning("could not render the state of conversation %s", event.get("conversation_id"), exc_info=True)

    async def _render_state(self, event) -> str:
        """Rendered on a thread of the pool, not on the one thread that every sync view
        of this process shares: the state confirming an operator's action must not
        wait behind the POST that asked for it (or behind anybody's page)."""
        return await database_sync_to_async(rendering.conversation_state_for_viewer, thread_sensitive=False)(
            event["conversation_id"], self.user, event.get("version", "")
        )

    async def live_revoked(self, event):
        """This person's access changed: close, unless it names another login session."""
        if event.get("session_key") and event["session_key"] != self.session_key:
            return
        await self.close(code=4401)


# ---------------------------------------------------------------- presence, renewed once per process


class PresenceRenewal:
    """Keeps this process's open conversation pages "viewing": one Redis pipeline every
    `presence.RENEW_EVERY` for all of them (a task per socket cost each idle socket
    its memory). When someone's page vanished without closing (its process was
    killed), their mark expires: said once noticed."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.sockets: set[LiveConsumer] = set()
        self.task = loop.create_task(self._run())

    def add(self, consumer: "LiveConsumer") -> None:
        self.sockets.add(consumer)

    def discard(self, consumer: "LiveConsumer") -> bool:
        """False when it was not renewed here (it never counted as viewing)."""
        if consumer in self.sockets:
            self.sockets.remove(consumer)
            return True
        return False

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(presence.RENEW_EVERY)
            pages = [(c.conversation_id, c.user.pk, c.channel_name) for c in self.sockets]
            if not pages:
                continue
            conversations = {conversation_id for conversation_id, _, _ in pages}
            try:
                await database_sync_to_async(presence.here_many)(pages)
                now = await database_sync_to_async(presence.viewers_of)(conversations)
            except Exception:  # the sockets stay; presence is a courtesy
                logger.warning("could not renew presence", exc_info=True)
                continue
            for conversation_id in conversations:
                told = _viewers_told.get(conversation_id)
                if told is not None and sorted(now.get(conversation_id, [])) != told:
                    _tell_presence_soon(conversation_id, after=PRESENCE_TOLD_AFTER)


_renewals: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _presence_renewal() -> PresenceRenewal:
    loop = asyncio.get_running_loop()
    renewal = _renewals.get(loop)
    if renewal is None:
        renewal = _renewals[loop] = PresenceRenewal(loop)
    return renewal


# ---------------------------------------------------------------- presence, told once per moment

# event loop -> conversation id -> the pending tell (one per conversation and process)
_presence_due: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# conversation id -> the viewers this process told last (renewals compare with it)
_viewers_told: dict[int, list[int]] = {}


def _tell_presence_soon(conversation_id: int, *, after: float, not_before: bool = False) -> None:
    """Tell who has it open `after` seconds from now, with whatever else changes meanwhile.

    A tell already pending covers this change; `not_before` pushes it back to at
    least `after` from now (a page that just closed: see LEAVE_TOLD_AFTER).
    """
    loop = asyncio.get_running_loop()
    due = _presence_due.setdefault(loop, {})
    at = loop.time() + after
    pending = due.get(conversation_id)
    if pending is not None:
        if not not_before or pending.when() >= at:
            return
        pending.cancel()

    def tell():
        due.pop(conversation_id, None)
        asyncio.ensure_future(_tell_presence(conversation_id))

    due[conversation_id] = loop.call_at(at, tell)


async def _tell_presence(conversation_id: int) -> None:
    """Who has the conversation open now: to its viewers, and as the inbox row's mark
    (fragments like any other: one message per process through the fan-out)."""
    try:
        wait = await database_sync_to_async(presence.claim_telling)(conversation_id, PRESENCE_TOLD_EVERY)
        if wait > 0:  # told a moment ago (maybe by another process): again once it may
            _tell_presence_soon(conversation_id, after=wait, not_before=True)
            return
        viewers, bar, mark = await database_sync_to_async(rendering.render_presence)(conversation_id)
        if viewers:
            _viewers_told[conversation_id] = sorted(viewers)
        else:
            _viewers_told.pop(conversation_id, None)
        await notify.group_send(notify.conversation_group(conversation_id), {"type": "live.html", "html": bar})
        await notify.group_send(notify.OPERATORS_GROUP, {"type": "live.html", "html": mark})
    except Exception:  # Redis or the database away: the next change tells it
        logger.warning("could not tell who has conversation %s open", conversation_id, exc_info=True)
