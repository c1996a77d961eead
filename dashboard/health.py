"""Endpoints for load balancers, process managers and Prometheus: no login, no page.

- `/healthz`: the process is alive (no database, no session: always fast);
- `/readyz`: the database and the channel layer answer (503 naming what does not);
- `/metrics`: Prometheus text, only with `Authorization: Bearer $METRICS_TOKEN`
  (404 without a configured token, so it is never public by accident).
"""

from __future__ import annotations



from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from conversations.metrics import DatabaseCollector, token_accepted

_database_registry = CollectorRegistry()
_database_registry.register(DatabaseCollector())


@never_cache
@require_GET
def healthz(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok\n", content_type="text/plain")


def _database_ok() -> str:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as error:
        return f"unavailable: {type(error).__name__}"
    return "ok"


def _channel_layer_ok() -> str:
    layer = get_channel_layer()
    if layer is None:
        return "not configured"
    try:
        # A round trip through the layer: a private channel, sent to and read back.
        channel = async_to_sync(layer.new_channel)("readyz.")
        async_to_sync(layer.send)(channel, {"type": "readyz.probe"})
        async_to_sync(layer.receive)(channel)
    except Exception as error:
        return f"unavailable: {type(error).__name__}"
    return "ok"


@never_cache
@require_GET
def readyz(request: HttpRequest) -> HttpResponse:
    checks = {"database": _database_ok(), "channel_layer": _channel_layer_ok()}
    ready = all(value in ("ok", "not configured") for value in checks.values())
    return JsonResponse({"ready": ready, **checks}, status=200 if ready else 503)


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    if not token_accepted(request.headers.get("Authorization", "")):
        return HttpResponse(status=404)
    body = generate_latest(REGISTRY) + generate_latest(_database_registry)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)



