"""Health and metrics endpoints: open to probes, closed to everyone else."""

import pytest
from django.test import Client

from tests.factories import ConversationFactory


@pytest.fixture
def anonymous():
    return Client()


def test_healthz_answers_without_login_or_database(anonymous, django_assert_num_queries, db):
    with django_assert_num_queries(0):
        response = anonymous.get("/healthz")
    assert response.status_code == 200 and response.content == b"ok\n"


@pytest.mark.django_db
def test_readyz_checks_the_database_and_the_channel_layer(anonymous):
    response = anonymous.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"ready": True, "database": "ok", "channel_layer": "ok"}


@pytest.mark.django_db
def test_readyz_says_what_is_unavailable(anonymous, monkeypatch):
    from django.db import OperationalError

    from dashboard import health

    class Broken:
        def __enter__(self):
            raise OperationalError("connection refused")

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(health.connection, "cursor", lambda: Broken())
    response = anonymous.get("/readyz")
    assert response.status_code == 503
    assert response.json()["database"] == "unavailable: OperationalError"


@pytest.mark.django_db
def test_metrics_are_not_public(anonymous, settings):
    settings.METRICS_TOKEN = ""
    assert anonymous.get("/metrics").status_code == 404
    settings.METRICS_TOKEN = "s3cret"
    assert anonymous.get("/metrics").status_code == 404
    assert anonymous.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 404


@pytest.mark.django_db
def test_metrics_report_the_outbox_and_dead_letters(anonymous, settings, operator):
    from conversations import services
    from conversations.models import DeadLetter

    settings.METRICS_TOKEN = "s3cret"
    conversation = ConversationFactory()
    services.conversation_take_over(conversation=conversation, operator=operator)
    DeadLetter.objects.create(event="whatsapp.message", frame={}, reason="test")
    response = anonymous.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret")
    assert response.status_code == 200
    text = response.content.decode()
    assert "dashboard_outbox_depth 1.0" in text
    assert "dashboard_dead_letters_unresolved 1.0" in text
    assert "dashboard_outbox_oldest_pending_seconds" in text
    assert 'dashboard_workers{role="active"} 0.0' in text
