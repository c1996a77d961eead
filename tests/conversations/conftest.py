import itertools

import pytest
from django.contrib.auth.models import Permission, User

from conversations.models import Conversation

_phones = itertools.count(34600000001)


ROLE_PERMISSIONS = {
    "Viewers": [],
    "Operators": ["take_over_conversation"],
    "Supervisors": ["take_over_conversation", "pause_contact_or_agent"],
}


def make_user(username: str, role: str) -> User:
    # Permissions directly, not the migration's groups: transactional tests flush those.
    user = User.objects.create_user(username=username, password="pw", first_name=username.title())
    user.user_permissions.add(
        *Permission.objects.filter(
            content_type__app_label="conversations", codename__in=ROLE_PERMISSIONS[role]
        )
    )
    return User.objects.get(pk=user.pk)  # fresh: no stale permission cache


@pytest.fixture
def operator(db):
    return make_user("ana", "Operators")


@pytest.fixture
def other_operator(db):
    return make_user("bruno", "Operators")


@pytest.fixture
def viewer(db):
    return make_user("vera", "Viewers")


@pytest.fixture
def supervisor(db):
    return make_user("sofia", "Supervisors")


@pytest.fixture
def make_conversation(db):
    from django.utils import timezone

    def make(**fields) -> Conversation:
        phone = str(next(_phones))
        defaults = {
            "session_id": f"wa-{phone[-12:]:0>12}",
            "agent_id": "support",
            "contact_phone": phone,
            "contact_name": "Ana Customer",
            "last_customer_message_at": timezone.now(),
            "last_message_at": timezone.now(),
        }
        defaults.update(fields)
        return Conversation.objects.create(**defaults)

    return make


@pytest.fixture(autouse=True)
def close_sync_thread_connections():
    """Async tests reach the ORM on asgiref's one sync thread: close its connection after
    each test, or PostgreSQL refuses to drop the test database at the end."""
    yield
    from asgiref.sync import SyncToAsync
    from django.db import connections

    SyncToAsync.single_thread_executor.submit(connections.close_all).result(10)
