"""Operators' live socket: thin. It checks the user, joins groups, forwards fragments."""

from channels.generic.websocket import AsyncWebsocketConsumer

from conversations.live import OPERATORS_GROUP


class LiveConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        self.groups_joined = [OPERATORS_GROUP]
        for group in self.groups_joined:
            await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()

    async def disconnect(self, code):
        for group in getattr(self, "groups_joined", []):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def live_html(self, event):
        await self.send(text_data=event["html"])
