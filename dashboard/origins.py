"""Which pages may open an operator's socket: the site's own origin, exactly.

Channels' AllowedHostsOriginValidator compares only the Origin's host with
ALLOWED_HOSTS, so a page on the same host but another port or scheme (another
app on :8080, plain http beside https) could open a socket with the operator's
cookies. Here an Origin is accepted only if its scheme, host and port are those
of the socket's own site, or of an entry of CSRF_TRUSTED_ORIGINS; a missing
Origin is refused.

The site's origin as the server sees it: the scheme from the ASGI scope
(`wss` means https), or https when the proxy says so in the header of
SECURE_PROXY_SSL_HEADER (Daphne's `--proxy-headers` does not put it in a
WebSocket's scope); host and port from the Host header, which must be one of
ALLOWED_HOSTS, as for pages.
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host

DEFAULT_PORTS = {"http": 80, "https": 443}


class Origin(NamedTuple):
    scheme: str
    host: str
    port: int


def parse_origin(value: str) -> Origin | None:
    """'https://Example.com' -> ('https', 'example.com', 443); None if it is not one."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        return None
    return Origin(scheme, parts.hostname.lower(), port or DEFAULT_PORTS[scheme])


def _headers(scope) -> dict[bytes, bytes]:
    # A repeated header is suspicious: the last one wins, and is then compared exactly.
    return {name.lower(): value for name, value in scope.get("headers", [])}


def _is_https(scope, headers: dict[bytes, bytes]) -> bool:
    if scope.get("scheme") in ("wss", "https"):
        return True
    proxy_header = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
    if proxy_header:
        meta_name, secure_value = proxy_header
        # "HTTP_X_FORWARDED_PROTO" -> b"x-forwarded-proto"
        name = meta_name.removeprefix("HTTP_").lower().replace("_", "-").encode("latin-1")
        value = headers.get(name, b"").decode("latin-1").split(",")[0].strip()
        return value == secure_value
    return False


def site_origin(scope) -> Origin | None:
    """The origin of the site this socket was opened on, or None if its Host is not ours."""
    headers = _headers(scope)
    host = headers.get(b"host", b"").decode("latin-1").strip().lower()
    domain, port = split_domain_port(host)
    allowed = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed:
        allowed = [".localhost", "127.0.0.1", "[::1]"]
    if not domain or not validate_host(domain, allowed):
        return None
    scheme = "https" if _is_https(scope, headers) else "http"
    if port:
        if not port.isdigit():
            return None
        port_number = int(port)
    else:
        port_number = DEFAULT_PORTS[scheme]
    # "[::1]" as urlsplit gives an Origin's IPv6 host: without brackets.
    return Origin(scheme, domain.strip("[]"), port_number)


def _trusted_matches(origin: Origin, pattern: str) -> bool:
    """An entry of CSRF_TRUSTED_ORIGINS, with Django's `https://*.example.com` wildcard."""
    wildcard = "://*." in pattern
    trusted = parse_origin(pattern.replace("://*.", "://", 1) if wildcard else pattern)
    if trusted is None or (trusted.scheme, trusted.port) != (origin.scheme, origin.port):
        return False
    if wildcard:
        return origin.host == trusted.host or origin.host.endswith("." + trusted.host)
    return origin.host == trusted.host


def origin_allowed(scope) -> bool:
    values = [value for name, value in scope.get("headers", []) if name.lower() == b"origin"]
    if len(values) != 1:
        return False  # none, or ambiguous
    origin = parse_origin(values[0].decode("latin-1"))
    if origin is None:
        return False
    if origin == site_origin(scope):
        return True
    return any(_trusted_matches(origin, pattern) for pattern in settings.CSRF_TRUSTED_ORIGINS)


class SameOriginValidator:
    """ASGI middleware: a WebSocket from any other origin is refused before anything else runs."""

    def __init__(self, application) -> None:
        self.application = application

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket":
            raise ValueError("SameOriginValidator is for WebSocket connections only")
        if origin_allowed(scope):
            return await self.application(scope, receive, send)
        return await WebsocketDenier()(scope, receive, send)
