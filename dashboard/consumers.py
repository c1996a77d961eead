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
"""

from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from conversations import metrics, notify, selectors
from dashboard import rendering


def _param(params: dict, name: str, kind):
    try:
        value = kind(params[name][0])
    except (KeyError, IndexError, ValueError, OverflowError):
        return None
    if kind is float and value != value:  # NaN
        return None
    return value


class LiveConsumer(AsyncWebsocketConsumer):
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

    async def disconnect(self, code):
        if getattr(self, "counted", False):
            self.counted = False
            metrics.LIVE_SOCKETS.dec()
        for group in getattr(self, "groups_joined", []):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None):
        """The page never talks on this socket; actions are HTTP POSTs."""

    async def live_html(self, event):
        await self.send(text_data=event["html"])

    async def live_revoked(self, event):
        """This person's access changed: close, unless it names another login session."""
        if event.get("session_key") and event["session_key"] != self.session_key:
            return
        await self.close(code=4401)
