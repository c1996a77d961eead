"""Login throttling, the Content-Security-Policy, and bidi isolation of names and texts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from axes.models import AccessAttempt
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from conversations.models import AuditEntry
from tests.factories import ConversationFactory, MessageFactory, OperatorFactory

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "templates"
PASSWORD = "pass-word-123"  # the factories' password


def fail_logins(client: Client, username: str, times: int, url: str = "/login/"):
    response = None
    for _ in range(times):
        response = client.post(url, {"username": username, "password": "wrong"})
    return response


# ---------------------------------------------------------------- login throttling


class TestLoginThrottling:
    def test_four_failures_still_say_only_wrong_password(self, client, operator, settings):
        response = fail_logins(client, operator.username, settings.AXES_FAILURE_LIMIT - 1)
        assert response.status_code == 200
        assert b"don't match" in response.content
        assert not AuditEntry.objects.filter(action="login").exists()

    def test_the_fifth_failure_locks_with_a_clear_message(self, client, operator, settings):
        assert settings.AXES_FAILURE_LIMIT == 5
        response = fail_logins(client, operator.username, 5)
        assert response.status_code == 429
        body = response.content.decode()
        assert "Too many failed attempts" in body and "try again in 15 minutes" in body
        assert 'name="password"' in body  # the login page, not a bare error

        # Even the right password is refused now, and nobody is logged in.
        response = client.post("/login/", {"username": operator.username, "password": PASSWORD})
        assert response.status_code == 429
        assert "_auth_user_id" not in client.session
        assert client.get("/").status_code == 302

    def test_the_lockout_is_audited_with_username_and_ip(self, client, operator):
        fail_logins(client, operator.username, 5)
        client.post("/login/", {"username": operator.username, "password": PASSWORD})
        entries = AuditEntry.objects.filter(action="login", outcome="refused")
        assert entries.count() == 2  # the locking failure and the refused attempt
        entry = entries.first()
        assert entry.operator == operator
        assert repr(operator.username) in entry.detail and "127.0.0.1" in entry.detail

    def test_an_unknown_username_is_audited_too(self, client):
        fail_logins(client, "nobody-here", 5)
        entry = AuditEntry.objects.get(action="login")
        assert entry.operator is None and "'nobody-here'" in entry.detail

    def test_the_lockout_expires(self, client, operator, settings):
        fail_logins(client, operator.username, 5)
        # Ten minutes later: five to go.
        AccessAttempt.objects.update(attempt_time=timezone.now() - timedelta(minutes=10))
        response = client.post("/login/", {"username": operator.username, "password": PASSWORD})
        assert response.status_code == 429
        assert "try again in 5 minutes" in response.content.decode()
        # After the cool-off: the right password works again.
        AccessAttempt.objects.update(
            attempt_time=timezone.now() - settings.AXES_COOLOFF_TIME - timedelta(seconds=1)
        )
        response = client.post("/login/", {"username": operator.username, "password": PASSWORD})
        assert response.status_code == 302 and response["Location"] == "/"

    def test_only_that_username_from_that_address(self, client, operator, other_operator):
        fail_logins(client, operator.username, 5)
        # Another user from the same address, and the same user from another address.
        other = Client()
        assert (
            other.post("/login/", {"username": other_operator.username, "password": PASSWORD})
        ).status_code == 302
        elsewhere = Client(REMOTE_ADDR="10.1.2.3")
        response = elsewhere.post("/login/", {"username": operator.username, "password": PASSWORD})
        assert response.status_code == 302

    def test_a_forwarded_for_header_does_not_dodge_it(self, client, operator):
        """The address is Daphne's (REMOTE_ADDR), never a header the client sets."""
        for n in range(5):
            client.post(
                "/login/",
                {"username": operator.username, "password": "wrong"},
                HTTP_X_FORWARDED_FOR=f"10.0.0.{n}",
            )
        response = client.post(
            "/login/",
            {"username": operator.username, "password": PASSWORD},
            HTTP_X_FORWARDED_FOR="10.0.0.99",
        )
        assert response.status_code == 429

    def test_the_admin_login_is_throttled_too(self, client):
        admin = get_user_model().objects.create_superuser("root", password=PASSWORD)
        response = fail_logins(client, admin.username, 5, url="/admin/login/")
        assert response.status_code == 429
        body = response.content.decode()
        assert "Too many failed attempts" in body and 'id="login-form"' in body
        response = client.post("/admin/login/", {"username": "root", "password": PASSWORD})
        assert response.status_code == 429
        assert AuditEntry.objects.filter(action="login", operator=admin).count() == 2

    def test_a_success_resets_the_count(self, client, operator):
        fail_logins(client, operator.username, 4)
        assert client.post(
            "/login/", {"username": operator.username, "password": PASSWORD}
        ).status_code == 302
        client.post("/logout/")
        response = fail_logins(client, operator.username, 4)
        assert response.status_code == 200  # four again, not eight

    def test_limits_come_from_the_environment(self):
        env = {**os.environ, "AXES_FAILURE_LIMIT": "3", "AXES_COOLOFF_MINUTES": "2"}
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "import django; django.setup(); from django.conf import settings; "
                "print(settings.AXES_FAILURE_LIMIT, settings.AXES_COOLOFF_TIME.total_seconds())",
            ],
            cwd=ROOT,
            env={**env, "DJANGO_SETTINGS_MODULE": "dashboard.settings"},
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.split() == ["3", "120.0"]


# ---------------------------------------------------------------- Content-Security-Policy


def csp(response) -> dict[str, list[str]]:
    header = response["Content-Security-Policy"]
    directives = {}
    for part in header.split(";"):
        name, *values = part.split()
        directives[name] = values
    return directives


def assert_policy(response) -> None:
    policy = csp(response)
    assert policy["default-src"] == ["'self'"]
    assert policy["script-src"] == ["'self'"]  # no 'unsafe-inline', no 'unsafe-eval'
    assert policy["style-src"] == ["'self'", "'unsafe-inline'"]
    assert policy["connect-src"][0] == "'self'"
    assert policy["img-src"] == ["'self'", "data:"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert policy["form-action"] == ["'self'"]
    assert policy["base-uri"] == ["'self'"]


class TestContentSecurityPolicy:
    @pytest.fixture
    def superuser_client(self, db):
        admin = get_user_model().objects.create_superuser("root", password=PASSWORD)
        client = Client()
        client.force_login(admin)
        return client

    def test_on_the_operators_pages(self, operator_client):
        conversation = ConversationFactory()
        for url in ["/", f"/c/{conversation.pk}/", f"/c/{conversation.pk}/state/", "/agent/state/"]:
            response = operator_client.get(url)
            assert response.status_code == 200, url
            assert_policy(response)

    def test_on_an_action(self, operator_client):
        conversation = ConversationFactory()
        response = operator_client.post(f"/c/{conversation.pk}/take-over/", HTTP_HX_REQUEST="true")
        assert_policy(response)

    def test_on_the_login_pages(self, client):
        assert_policy(client.get("/login/"))
        assert_policy(client.get("/admin/login/"))

    def test_on_admin(self, superuser_client):
        ConversationFactory()
        for url in ["/admin/", "/admin/conversations/conversation/", "/admin/auth/user/"]:
            response = superuser_client.get(url)
            assert response.status_code == 200, url
            assert_policy(response)

    def test_on_error_pages(self, operator_client, settings):
        response = operator_client.get("/c/999999/")
        assert response.status_code == 404
        assert_policy(response)
        csrf_client = Client(enforce_csrf_checks=True)
        csrf_client.force_login(OperatorFactory())
        response = csrf_client.post("/c/1/take-over/")
        assert response.status_code == 403
        assert_policy(response)
        settings.ROOT_URLCONF = "tests.dashboard.failing_urls"
        failing = Client(raise_request_exception=False)
        response = failing.get("/boom/")
        assert response.status_code == 500
        assert_policy(response)

    def test_on_the_503_page(self, operator_client, monkeypatch):
        from django.db import OperationalError

        from conversations import selectors

        def outage(**kwargs):
            raise OperationalError("server closed the connection unexpectedly")

        monkeypatch.setattr(selectors, "inbox_page", outage)
        response = operator_client.get("/")
        assert response.status_code == 503
        assert_policy(response)

    def test_the_sites_websocket_origin_is_allowed_to_connect(self, operator_client, settings):
        assert csp(operator_client.get("/"))["connect-src"] == ["'self'", "ws://testserver"]
        settings.ALLOWED_HOSTS = ["dashboard.example.com"]
        response = operator_client.get("/", HTTP_HOST="dashboard.example.com", secure=True)
        assert csp(response)["connect-src"] == ["'self'", "wss://dashboard.example.com"]

    def test_htmx_may_not_eval(self, operator_client):
        body = operator_client.get("/").content.decode()
        config = re.search(r'<meta name="htmx-config" content=\'([^\']+)\'', body).group(1)
        assert '"allowEval": false' in config and '"allowScriptTags": false' in config


INLINE_SCRIPT = re.compile(r"<script\b(?![^>]*\bsrc=)[^>]*>", re.IGNORECASE)
EVENT_HANDLER = re.compile(r"""[\s"'](on[a-z]+)\s*=""", re.IGNORECASE)
HX_ON = re.compile(r"\bhx-on[:\-]", re.IGNORECASE)
JS_URL = re.compile(r"javascript:", re.IGNORECASE)


def test_no_template_has_inline_script_or_event_handlers():
    """The CSP refuses them: each would be a silently dead feature (hx-on runs through eval)."""
    offenders = []
    templates = sorted(TEMPLATES.rglob("*.html"))
    assert len(templates) > 20
    for path in templates:
        text = path.read_text()
        for pattern in (INLINE_SCRIPT, EVENT_HANDLER, HX_ON, JS_URL):
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {match.group(0).strip()}")
    assert offenders == []


def test_the_scan_would_catch_them():
    samples = [
        "<script>alert(1)</script>",
        '<button onclick="go()">',
        "<div hx-on::after-request=\"this.remove()\">",
        "<div hx-on-click='x'>",
        '<a href="javascript:void(0)">',
    ]
    for sample in samples:
        assert any(p.search(sample) for p in (INLINE_SCRIPT, EVENT_HANDLER, HX_ON, JS_URL)), sample
    assert not INLINE_SCRIPT.search('<script src="/static/js/app.js" defer></script>')
    assert not EVENT_HANDLER.search('<div data-online hx-get="/c/1/state/">')


# ---------------------------------------------------------------- bidi isolation

EVIL = "\u202eevil\u202c Bob"


def bdi_around(html: str, text: str) -> bool:
    return re.search(r"<bdi[^>]*>" + re.escape(text) + r"</bdi>", html) is not None


class TestBidiIsolation:
    def test_names_in_the_inbox_row_and_the_header(self, operator_client):
        conversation = ConversationFactory(contact_name=EVIL)
        assert bdi_around(operator_client.get("/").content.decode(), EVIL)
        body = operator_client.get(f"/c/{conversation.pk}/").content.decode()
        row = re.search(rf'<a class="row[^"]*"\s+id="row-{conversation.pk}".*?</a>', body, re.S)
        assert bdi_around(row.group(0), EVIL)
        header = re.search(r'<h1 class="who-name">.*?</h1>', body, re.S).group(0)
        assert bdi_around(header, EVIL)

    def test_message_texts_and_the_preview(self, operator_client):
        conversation = ConversationFactory()
        MessageFactory(conversation=conversation, text=EVIL + " wrote this")
        body = operator_client.get(f"/c/{conversation.pk}/").content.decode()
        assert bdi_around(body, EVIL + " wrote this")  # the bubble
        assert re.search(r'class="row-preview"><bdi>' + re.escape(EVIL), body)

    def test_a_holders_name_in_the_header_composer_and_toast(self, operator_client):
        holder = OperatorFactory(first_name=EVIL, last_name="")
        conversation = ConversationFactory(held=True, held_by=holder)
        body = operator_client.get(f"/c/{conversation.pk}/state/").content.decode()
        assert f"<bdi>{EVIL}</bdi> holds this conversation" in body  # badge and composer
        assert f"Take over from <bdi>{EVIL}</bdi>" in body
        toast = operator_client.post(
            f"/c/{conversation.pk}/take-over/", HTTP_HX_REQUEST="true"
        ).content.decode()
        assert re.search(
            r'class="toast toast-error"[^>]*><bdi>' + re.escape(EVIL) + "</bdi> holds", toast
        )

    def test_isolated_in_css_too(self):
        css = (ROOT / "static" / "css" / "app.css").read_text()
        assert re.search(r"bdi[^{]*\{\s*unicode-bidi:\s*isolate", css)

    def test_admin_links_its_bidi_stylesheet(self, db):
        admin = get_user_model().objects.create_superuser("root", password=PASSWORD)
        client = Client()
        client.force_login(admin)
        ConversationFactory(contact_name=EVIL)
        body = client.get("/admin/conversations/conversation/").content.decode()
        assert re.search(r'<link rel="stylesheet" href="/static/css/admin[.\w]*\.css">', body)
        css = (ROOT / "static" / "css" / "admin.css").read_text()
        assert "#result_list td" in css and "unicode-bidi: plaintext" in css
