import pytest

from tests.factories import ConversationFactory


@pytest.fixture
def make_conversation(db):
    """ConversationFactory, for tests that set a session id or a state of their own."""
    return ConversationFactory


@pytest.fixture(autouse=True)
def close_sync_thread_connections():
    """Async tests reach the ORM on asgiref's one sync thread: close its connection after
    each test, or PostgreSQL refuses to drop the test database at the end."""
    yield
    from asgiref.sync import SyncToAsync
    from django.db import connections

    SyncToAsync.single_thread_executor.submit(connections.close_all).result(10)
