"""Fixtures shared by every test suite (factories in tests/factories.py)."""

from __future__ import annotations

import pytest
from django.test import Client

from tests.factories import (
    ConversationFactory,
    OperatorFactory,
    SupervisorFactory,
    ViewerFactory,
)


@pytest.fixture(autouse=True)
def _test_settings(settings, tmp_path):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    # Each test's in-process worker spools in a directory of its own.
    settings.WORKER_SPOOL_DIR = tmp_path / "spool"


@pytest.fixture(autouse=True)
def _nobody_viewing():
    """Presence outlives a test (a socket left open): ids repeat between tests."""
    from conversations import presence

    presence.clear()
    yield


@pytest.fixture
def operator(db):
    return OperatorFactory(first_name="Ana", last_name="Silva")


@pytest.fixture
def other_operator(db):
    return OperatorFactory(first_name="Bruno", last_name="Costa")


@pytest.fixture
def viewer(db):
    return ViewerFactory(first_name="Vera", last_name="Watch")


@pytest.fixture
def supervisor(db):
    return SupervisorFactory(first_name="Sam", last_name="Boss")


@pytest.fixture
def conversation(db):
    return ConversationFactory()


def _client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def operator_client(operator):
    return _client_for(operator)


@pytest.fixture
def other_operator_client(other_operator):
    return _client_for(other_operator)


@pytest.fixture
def viewer_client(viewer):
    return _client_for(viewer)


@pytest.fixture
def supervisor_client(supervisor):
    return _client_for(supervisor)


def pytest_configure(config):
    # whitenoise looks for collectstatic's output, which tests do not need.
    config.addinivalue_line("filterwarnings", "ignore:No directory at:UserWarning")
