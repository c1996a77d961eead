"""PostgreSQL and Redis administration for the harness: bench databases only."""

from __future__ import annotations

import hashlib
import json

import psycopg

from bench import config, procs


def admin() -> psycopg.Connection:
    return psycopg.connect(
        host=config.PG_HOST, port=config.PG_PORT, user=config.PG_USER, dbname="postgres",
        autocommit=True,
    )


def connect(name: str) -> psycopg.Connection:
    return psycopg.connect(
        host=config.PG_HOST, port=config.PG_PORT, user=config.PG_USER, dbname=name,
        autocommit=True,
    )


def exists(name: str) -> bool:
    with admin() as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is not None


def drop(name: str) -> None:
    assert name.startswith("bench"), name
    with admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def create(name: str, template: str | None = None) -> None:
    assert name.startswith("bench"), name
    drop(name)
    with admin() as conn:
        if template:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        else:
            conn.execute(f'CREATE DATABASE "{name}"')


def migrated_template(log) -> None:
    """A freshly migrated database that every live section copies (CREATE ... TEMPLATE)."""
    create(config.DB_TEMPLATE)
    env = config.stack_env(database=config.DB_TEMPLATE)
    procs.manage(["migrate", "--noinput", "-v0"], env, log)


def fresh_live_db() -> None:
    """The live sections' database: an exact copy of the migrated template."""
    create(config.DB_LIVE, template=config.DB_TEMPLATE)


def schema_fingerprint() -> str:
    """Changes when a migration file changes: a cached dataset is then rebuilt."""
    h = hashlib.sha256()
    for path in sorted((config.ROOT / "conversations" / "migrations").glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def marker(name: str) -> dict | None:
    """The spec a cached dataset was built with, or None."""
    if not exists(name):
        return None
    with connect(name) as conn:
        row = conn.execute(
            "SELECT to_regclass('bench_dataset') IS NOT NULL"
        ).fetchone()
        if not row[0]:
            return None
        row = conn.execute("SELECT spec FROM bench_dataset ORDER BY built_at DESC LIMIT 1").fetchone()
        return json.loads(row[0]) if row else None


def set_marker(name: str, spec: dict) -> None:
    with connect(name) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_dataset (spec text, built_at timestamptz)")
        conn.execute("DELETE FROM bench_dataset")
        conn.execute("INSERT INTO bench_dataset VALUES (%s, now())", [json.dumps(spec, sort_keys=True)])


def server_version() -> str:
    with admin() as conn:
        return conn.execute("SHOW server_version").fetchone()[0]


# ---------------------------------------------------------------- Redis


def redis_client():
    import redis

    return redis.Redis(host=config.REDIS_HOST, port=config.REDIS_PORT, db=config.REDIS_DB)


def flush_redis() -> None:
    """FLUSHDB on the bench's own db number only."""
    client = redis_client()
    try:
        client.flushdb()
    finally:
        client.close()


def redis_version() -> str:
    client = redis_client()
    try:
        return client.info("server").get("redis_version", "?")
    finally:
        client.close()
