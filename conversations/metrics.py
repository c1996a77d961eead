"""What operations watch, as Prometheus metrics.

Two kinds: what a process counts as it runs (the worker's events, commands,
leadership; a web process's live sockets), kept in the process's registry, and
what the database knows (the outbox, dead letters), read at scrape time by
`DatabaseCollector` so every web process reports the same truth.
"""

from __future__ import annotations

import hmac

from django.conf import settings
from django.db.models import Min
from django.utils import timezone
from prometheus_client import Counter, Gauge
from prometheus_client.core import GaugeMetricFamily

from conversations.models import Command, DeadLetter, WorkerProcess
from conversations.selectors import worker_processes

# ---- the worker

EVENTS_STORED = Counter("pinecall_events_stored_total", "Pinecall events stored, by event.", ["event"])
DEAD_LETTERS = Counter("pinecall_dead_letters_total", "Events the database refused, kept as dead letters.")
COMMANDS = Counter("pinecall_commands_total", "Commands carried out, by kind and outcome.", ["kind", "outcome"])
INGEST_BACKLOG = Gauge("pinecall_ingest_backlog_events", "Events spooled and not stored yet.")
INGEST_LAG = Gauge("pinecall_ingest_lag_seconds", "Time from reading an event to storing it (last batch).")
CONNECTED = Gauge("pinecall_connected", "1 while this worker holds a registered Pinecall connection.")
ACTIVE = Gauge("pinecall_worker_active", "1 while this worker is the active one (0: standby).")
LEADER_CHANGES = Counter("pinecall_leader_changes_total", "Times this worker became the active one.")
DATABASE_AVAILABLE = Gauge("pinecall_database_available", "0 while this worker cannot reach the database.")

# ---- a web process

LIVE_SOCKETS = Gauge("dashboard_live_sockets", "Operators' live sockets open on this web process.")


class DatabaseCollector:
    """The outbox and the dead letters, read when scraped (a handful of indexed queries)."""

    def describe(self):
        return []  # nothing read at registration (the database may not exist yet)

    def collect(self):
        open_commands = Command.objects.filter(status__in=[Command.Status.PENDING, Command.Status.SENT])
        depth = GaugeMetricFamily("dashboard_outbox_depth", "Commands waiting for Pinecall.")
        depth.add_metric([], open_commands.count())
        yield depth
        oldest = open_commands.filter(status=Command.Status.PENDING).aggregate(at=Min("created_at"))["at"]
        age = GaugeMetricFamily(
            "dashboard_outbox_oldest_pending_seconds", "Age of the oldest command not yet sent (0: none)."
        )
        age.add_metric([], (timezone.now() - oldest).total_seconds() if oldest else 0.0)
        yield age
        dead = GaugeMetricFamily("dashboard_dead_letters_unresolved", "Dead letters nobody stored again yet.")
        dead.add_metric([], DeadLetter.objects.filter(resolved_at__isnull=True).count())
        yield dead
        workers = worker_processes(settings.PINECALL_AGENT_ID)
        alive = GaugeMetricFamily("dashboard_workers", "Worker processes heard from recently, by role.", labels=["role"])
        alive.add_metric([WorkerProcess.Role.ACTIVE], 1 if workers.active else 0)
        alive.add_metric([WorkerProcess.Role.STANDBY], len(workers.standbys))
        yield alive
        heartbeat = GaugeMetricFamily(
            "dashboard_worker_heartbeat_age_seconds", "Seconds since the active worker's last heartbeat."
        )
        heartbeat.add_metric(
            [], (timezone.now() - workers.active.seen_at).total_seconds() if workers.active else float("inf")
        )
        yield heartbeat


def token_accepted(authorization: str) -> bool:
    """`Authorization: Bearer <METRICS_TOKEN>`; with no token configured, nothing is."""
    expected = settings.METRICS_TOKEN
    if not expected:
        return False
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), expected)
