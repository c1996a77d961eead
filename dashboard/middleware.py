"""The dashboard's own middleware: 503 for an unreachable database, and the CSP header."""

from __future__ import annotations

import logging

from csp.middleware import CSPMiddleware, PolicyParts
from django.core.exceptions import DisallowedHost
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string

logger = logging.getLogger(__name__)

DATABASE_UNAVAILABLE = "The database is unavailable, so nothing was done. Try again in a moment."


class DatabaseUnavailableMiddleware:
    """Turns a database outage during a view into 503 "try again".

    An htmx action gets a toast (the composer keeps its text: only a success
    clears it); a page gets the 503 page. Neither needs a query to render.
    """

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not isinstance(exception, (OperationalError, InterfaceError)):
            return None
        logger.warning("database unavailable during %s %s: %s", request.method, request.path, exception)
        if request.headers.get("HX-Request") == "true":
            html = render_to_string(
                "conversations/_toast.html",
                {"message": DATABASE_UNAVAILABLE, "level": "error"},
            )
            response = HttpResponse(html, status=503)
        else:
            response = HttpResponse(render_to_string("503.html"), status=503)
        response["Retry-After"] = "5"
        return response


class SiteCSPMiddleware(CSPMiddleware):
    """django-csp's policy, with the site's own WebSocket origin in connect-src.

    CSP Level 3 lets 'self' match ws:/wss: on the page's host and port, but older
    browsers do not: naming the origin costs nothing. It is the Host the request
    came with, already checked against ALLOWED_HOSTS.
    """

    def get_policy_parts(self, request, response, report_only: bool = False) -> PolicyParts:
        parts = super().get_policy_parts(request, response, report_only)
        if report_only:
            return parts
        try:
            host = request.get_host()
        except DisallowedHost:
            return parts
        origin = f"{'wss' if request.is_secure() else 'ws'}://{host}"
        update = dict(parts.update or {})
        update["connect-src"] = [*update.get("connect-src", []), origin]
        parts.update = update
        return parts
