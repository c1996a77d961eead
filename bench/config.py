"""Where things are, what the stack is given, and Django for the harness process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PROFILES = RESULTS / "profiles"
LOGS = BENCH / "logs"  # git-ignored (bench/.gitignore)
VENV_BIN = Path(sys.executable).parent

PG_HOST = os.environ.get("BENCH_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("BENCH_PG_PORT", "5432"))
PG_USER = os.environ.get("BENCH_PG_USER", "postgres")
# A fresh copy of DB_TEMPLATE (migrated once per run) for every live section;
# the pages datasets are kept between runs (rebuilt with --fresh or when stale).
DB_TEMPLATE = "bench_tmpl"
DB_LIVE = "bench"
DB_PAGES = "bench_pages"
DB_PAGES_SMALL = "bench_pages_small"

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
REDIS_DB = int(os.environ.get("BENCH_REDIS_DB", "5"))  # flushed: this db only
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"

# The transport floor (bench/floor_asgi.py): a fragment PUBLISHed on FLOOR_PREFIX + <conversation
# pk> is written by each Daphne process to its sockets of that conversation.
FLOOR_PREFIX = "bench-floor:"
FLOOR_APP = "bench.floor_asgi:application"

API_KEY = "bench"
ALLOWED_HOSTS = "127.0.0.1,localhost"
# `--variant NAME`: the stack (and the harness) run bench/variants/NAME.py, a settings
# module that imports dashboard.settings and changes one thing, to measure a proposed fix.
SETTINGS_MODULE = "dashboard.settings"


def database_url(name: str) -> str:
    return f"postgres://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"


def stack_env(*, database: str, pinecall_url: str = "", extra: dict | None = None) -> dict:
    """The environment of Daphne and the worker: production-like settings, local services."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "DATABASE_URL", "REDIS_URL", "PINECALL_", "LOG_LEVEL"))
    }
    env["PYTHONPATH"] = str(ROOT)  # bench.variants.* importable from manage.py and daphne
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
            "DATABASE_URL": database_url(database),
            "REDIS_URL": REDIS_URL,
            "PINECALL_API_KEY": API_KEY,
            "DJANGO_ALLOWED_HOSTS": ALLOWED_HOSTS,
            "PYTHONUNBUFFERED": "1",
        }
    )
    if pinecall_url:
        env["PINECALL_URL"] = pinecall_url
    env.update(extra or {})
    return env


_django_ready = False


def setup_django() -> None:
    """Django in the harness: the same settings as the stack, pointed at the live bench DB."""
    global _django_ready
    if _django_ready:
        return
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS_MODULE
    os.environ["DATABASE_URL"] = database_url(DB_LIVE)
    os.environ["REDIS_URL"] = REDIS_URL
    os.environ["PINECALL_API_KEY"] = API_KEY
    os.environ["DJANGO_ALLOWED_HOSTS"] = ALLOWED_HOSTS
    # The in-process simulator would log every frame at INFO.
    os.environ["LOG_LEVEL"] = "WARNING"
    import django

    django.setup()
    _django_ready = True


def use_database(name: str) -> None:
    """Point the harness's (current thread's) default connection at another bench DB."""
    from django.db import connection

    connection.close()
    if hasattr(connection, "close_pool"):
        connection.close_pool()  # a pool keeps its database: start a new one for this one
    connection.settings_dict["NAME"] = name
