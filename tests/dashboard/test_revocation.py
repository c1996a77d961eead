"""Logging out, deactivation and a lost role close the person's open sockets (4401), on the
in-memory channel layer and on Redis (when REDIS_URL is set)."""

from __future__ import annotations

import os

import pytest
from asgiref.sync import sync_to_async
from channels.layers import channel_layers, get_channel_layer
from django.contrib.auth.models import Group, Permission
from django.db import connections
from django.test import Client

from conversations.notify import OPERATORS_GROUP, user_group
from tests.dashboard.test_consumers import receive_until_cursor, socket
from tests.factories import OperatorFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)

CLOSED = {"type": "websocket.close", "code": 4401}


@pytest.fixture(params=["memory", "redis"])
def layer(request, settings):
    if request.param == "redis":
        url = os.environ.get("REDIS_URL")
        if not url:
            pytest.skip("set REDIS_URL to run these on the Redis channel layer")
        settings.CHANNEL_LAYERS = {
            "default": {
                "BACKEND": "channels_redis.core.RedisChannelLayer",
                "CONFIG": {"hosts": [url], "expiry": 60},
            }
        }
    else:
        settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    channel_layers.backends.clear()
    yield request.param
    channel_layers.backends.clear()


@pytest.fixture(autouse=True)
async def close_thread_connections():
    yield
    await sync_to_async(connections.close_all)()


def logged_in_client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


async def open_socket(client: Client):
    comm = socket("/ws/live/", client.cookies["sessionid"].value)
    connected, _ = await comm.connect()
    assert connected
    await receive_until_cursor(comm)
    return comm


async def still_open(comm, marker: str) -> None:
    """A positive witness: a message sent now arrives, so nothing before it closed the socket
    (a channel delivers in order)."""
    html = f"<div id='{marker}'></div>"
    await get_channel_layer().group_send(OPERATORS_GROUP, {"type": "live.html", "html": html})
    assert await comm.receive_from(timeout=3) == html


def operator_in_group():
    group, _ = Group.objects.get_or_create(name="Operators")
    group.permissions.add(Permission.objects.get(codename="take_over_conversation"))
    user = UserFactory()
    user.groups.add(group)
    return user


def deactivate(user, client):
    user.is_active = False
    user.save()


def remove_the_group(user, client):
    user.groups.remove(Group.objects.get(name="Operators"))


def remove_from_the_group(user, client):
    Group.objects.get(name="Operators").user_set.remove(user)


def clear_the_groups(user, client):
    user.groups.clear()


def clear_the_groups_members(user, client):
    Group.objects.get(name="Operators").user_set.clear()


def take_the_permission_from_the_group(user, client):
    Group.objects.get(name="Operators").permissions.clear()


def log_out(user, client):
    client.post("/logout/")


@pytest.mark.parametrize(
    "change",
    [
        log_out,
        deactivate,
        remove_the_group,
        remove_from_the_group,
        clear_the_groups,
        clear_the_groups_members,
        take_the_permission_from_the_group,
    ],
)
async def test_the_socket_is_closed_within_a_second(layer, change):
    user = await sync_to_async(operator_in_group)()
    client = await sync_to_async(logged_in_client)(user)
    comm = await open_socket(client)
    await sync_to_async(change)(user, client)
    assert await comm.receive_output(timeout=1) == CLOSED
    await comm.wait()


async def test_losing_a_direct_permission_closes_too(layer):
    user = await sync_to_async(OperatorFactory)()
    comm = await open_socket(await sync_to_async(logged_in_client)(user))
    perm = await sync_to_async(Permission.objects.get)(codename="take_over_conversation")
    await sync_to_async(user.user_permissions.remove)(perm)
    assert await comm.receive_output(timeout=1) == CLOSED
    await comm.wait()


async def test_a_logout_closes_that_login_only(layer):
    """The same person logged in elsewhere (another device) stays connected there."""
    user = await sync_to_async(OperatorFactory)()
    here = await sync_to_async(logged_in_client)(user)
    elsewhere = await sync_to_async(logged_in_client)(user)
    here_socket, elsewhere_socket = await open_socket(here), await open_socket(elsewhere)
    await sync_to_async(here.post)("/logout/")
    assert await here_socket.receive_output(timeout=1) == CLOSED
    await still_open(elsewhere_socket, "elsewhere")
    await elsewhere_socket.disconnect()


async def test_other_changes_close_nothing(layer):
    user = await sync_to_async(operator_in_group)()
    other = await sync_to_async(OperatorFactory)()
    comm = await open_socket(await sync_to_async(logged_in_client)(user))

    def unrelated_changes():
        user.first_name = "Renamed"
        user.save()  # still active
        user.groups.add(Group.objects.create(name="Extra"))
        other.is_active = False
        other.save()  # someone else

    await sync_to_async(unrelated_changes)()
    await still_open(comm, "still")
    await comm.disconnect()


async def test_only_that_persons_group_is_told(layer):
    user = await sync_to_async(OperatorFactory)()
    comm = await open_socket(await sync_to_async(logged_in_client)(user))
    await get_channel_layer().group_send(
        user_group(user.pk + 1000), {"type": "live.revoked", "session_key": ""}
    )
    await still_open(comm, "mine")
    await get_channel_layer().group_send(
        user_group(user.pk), {"type": "live.revoked", "session_key": ""}
    )
    assert await comm.receive_output(timeout=1) == CLOSED
    await comm.wait()
