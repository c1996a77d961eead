"""The WebSocket origin check: scheme, host and port must be the site's own (or trusted)."""

from __future__ import annotations

import pytest
from channels.testing import WebsocketCommunicator

from dashboard.asgi import application
from dashboard.origins import origin_allowed, parse_origin, site_origin


def scope(host: str | None, origin: str | None, *, scheme: str | None = None, extra=()) -> dict:
    headers = []
    if host is not None:
        headers.append((b"host", host.encode()))
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    headers.extend(extra)
    s = {"type": "websocket", "path": "/ws/live/", "headers": headers}
    if scheme:
        s["scheme"] = scheme
    return s


class TestOriginAllowed:
    def test_the_exact_origin_is_accepted(self):
        assert origin_allowed(scope("127.0.0.1:8000", "http://127.0.0.1:8000"))
        assert origin_allowed(scope("localhost", "http://localhost"))
        assert origin_allowed(scope("LOCALHOST:80", "http://localhost"))  # default port, case

    def test_same_host_on_another_port_is_refused(self):
        assert not origin_allowed(scope("127.0.0.1:8000", "http://127.0.0.1:8001"))
        assert not origin_allowed(scope("127.0.0.1:8000", "http://127.0.0.1"))
        assert not origin_allowed(scope("127.0.0.1", "http://127.0.0.1:8080"))

    def test_another_scheme_is_refused(self):
        assert not origin_allowed(scope("127.0.0.1:8000", "https://127.0.0.1:8000"))
        assert not origin_allowed(scope("localhost", "https://localhost", scheme="ws"))
        assert not origin_allowed(scope("localhost", "http://localhost", scheme="wss"))
        assert not origin_allowed(scope("localhost", "file://localhost"))

    def test_another_host_is_refused(self):
        assert not origin_allowed(scope("127.0.0.1:8000", "http://evil.example.com:8000"))
        assert not origin_allowed(scope("127.0.0.1:8000", "http://localhost:8000"))

    def test_missing_null_or_repeated_origin_is_refused(self):
        assert not origin_allowed(scope("127.0.0.1:8000", None))
        assert not origin_allowed(scope("127.0.0.1:8000", "null"))
        assert not origin_allowed(
            scope(
                "127.0.0.1:8000",
                "http://127.0.0.1:8000",
                extra=[(b"origin", b"http://evil.example.com")],
            )
        )

    def test_a_host_not_in_allowed_hosts_is_refused(self, settings):
        """A rebinding name pointing at this server is not the site, whatever it says."""
        settings.ALLOWED_HOSTS = ["dashboard.example.com"]
        assert not origin_allowed(scope("evil.example.com", "http://evil.example.com"))
        assert origin_allowed(scope("dashboard.example.com", "http://dashboard.example.com"))

    def test_tls_from_the_scope_or_the_proxy_header(self, settings):
        settings.ALLOWED_HOSTS = ["dashboard.example.com"]
        host = "dashboard.example.com"
        assert origin_allowed(scope(host, "https://dashboard.example.com", scheme="wss"))
        # Daphne with --proxy-headers: TLS ended at the proxy, which says so.
        proxied = [(b"x-forwarded-proto", b"https")]
        assert origin_allowed(scope(host, "https://dashboard.example.com", extra=proxied))
        assert not origin_allowed(scope(host, "http://dashboard.example.com", extra=proxied))
        assert site_origin(scope(host, None, extra=proxied)) == ("https", host, 443)

    def test_no_proxy_header_setting_means_the_header_is_ignored(self, settings):
        settings.SECURE_PROXY_SSL_HEADER = None
        proxied = [(b"x-forwarded-proto", b"https")]
        assert not origin_allowed(scope("localhost", "https://localhost", extra=proxied))

    def test_csrf_trusted_origins_are_accepted_exactly(self, settings):
        settings.CSRF_TRUSTED_ORIGINS = ["https://ops.example.com", "https://*.example.org"]
        host = "127.0.0.1:8000"
        assert origin_allowed(scope(host, "https://ops.example.com"))
        assert origin_allowed(scope(host, "https://ops.example.com:443"))
        assert not origin_allowed(scope(host, "http://ops.example.com"))
        assert not origin_allowed(scope(host, "https://ops.example.com:8443"))
        assert origin_allowed(scope(host, "https://a.example.org"))
        assert origin_allowed(scope(host, "https://example.org"))
        assert not origin_allowed(scope(host, "https://badexample.org"))

    def test_parse_origin(self):
        assert parse_origin("HTTPS://Example.COM") == ("https", "example.com", 443)
        assert parse_origin("http://[::1]:8000") == ("http", "::1", 8000)
        assert parse_origin("http://x:notaport") is None
        assert parse_origin("http://example.com/path") is None

    def test_ipv6_host(self, settings):
        settings.ALLOWED_HOSTS = ["[::1]"]
        assert origin_allowed(scope("[::1]:8000", "http://[::1]:8000"))
        assert not origin_allowed(scope("[::1]:8000", "http://[::1]:8001"))


@pytest.mark.django_db(transaction=True)
class TestThroughTheApplication:
    """The ASGI application refuses before the session is read (anonymous: 4401 otherwise)."""

    async def connect(self, host: str, origin: str | None):
        headers = [(b"host", host.encode())]
        if origin:
            headers.append((b"origin", origin.encode()))
        comm = WebsocketCommunicator(application, "/ws/live/", headers=headers)
        connected, code = await comm.connect()
        await comm.disconnect()
        return connected, code

    async def test_other_port_and_scheme_are_denied_outright(self):
        # Denied by the origin check: a plain close, before the consumer runs.
        assert await self.connect("127.0.0.1:8000", "http://127.0.0.1:9000") == (False, 1000)
        assert await self.connect("127.0.0.1:8000", "https://127.0.0.1:8000") == (False, 1000)
        assert await self.connect("127.0.0.1:8000", None) == (False, 1000)

    async def test_the_exact_origin_reaches_the_consumer(self):
        # Reaches the consumer, which refuses the anonymous user with its own code.
        assert await self.connect("127.0.0.1:8000", "http://127.0.0.1:8000") == (False, 4401)
