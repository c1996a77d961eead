"""Exactly one active worker per agent, chosen by PostgreSQL.

Any number of `runworker pinecall` processes may run, on one machine or many;
the one holding a PostgreSQL advisory lock is active (it holds the Pinecall
connection, sends commands, stores events), the others wait as standbys.

Why an advisory lock on a dedicated connection rather than a lease row: the
lock lives exactly as long as the session that holds it. A process killed
with -9 closes its socket and PostgreSQL frees the lock at once (a lease
would have to expire first); a machine that vanishes is noticed through TCP
keepalives within seconds. The holder checks its connection every second and
gives up the moment it cannot: a worker that lost its database cannot know
whether someone else is active now, so it stops sending at once.

SQLite (the embedded demo) has no such lock and runs one process: that
process is simply the leader.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from django.db import connections

logger = logging.getLogger(__name__)

CHECK_SECONDS = 1.0
CHECK_TIMEOUT_SECONDS = 3.0


def lock_key(agent_id: str) -> int:
    """A stable signed 64-bit key for the agent's lock."""
    digest = hashlib.sha256(f"pinecall-worker:{agent_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Leadership:
    """Acquire, hold and watch the agent's lock; `lost` is set the moment it is gone."""

    def __init__(self, agent_id: str, *, alias: str = "default") -> None:
        self.agent_id = agent_id
        self.key = lock_key(agent_id)
        self.settings_dict = connections[alias].settings_dict
        self.embedded = connections[alias].vendor != "postgresql"
        self.lost = asyncio.Event()
        self._connection = None

    async def try_acquire(self) -> bool:
        """True once this process is the leader. Never raises for an unreachable database."""
        if self.embedded:
            return True
        try:
            if self._connection is None or self._connection.closed:
                self._connection = await self._connect()
            cursor = await asyncio.wait_for(
                self._connection.execute("SELECT pg_try_advisory_lock(%s)", [self.key]),
                CHECK_TIMEOUT_SECONDS,
            )
            (acquired,) = await cursor.fetchone()
        except Exception as error:  # connection refused, reset, timed out: not leader
            logger.debug("leadership: cannot ask PostgreSQL (%s)", error)
            await self.release()
            return False
        return bool(acquired)

    async def hold(self) -> None:
        """Watch the lock's connection; return (with `lost` set) when it is gone."""
        if self.embedded:
            await asyncio.Event().wait()  # a single process: leader until it stops
        try:
            while True:
                await asyncio.sleep(CHECK_SECONDS)
                # A session lock lasts as long as its session: a live connection still holds it.
                await asyncio.wait_for(self._connection.execute("SELECT 1"), CHECK_TIMEOUT_SECONDS)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            logger.error("leadership lost: %s", error)
            self.lost.set()
            await self.release()

    async def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await asyncio.wait_for(connection.close(), CHECK_TIMEOUT_SECONDS)
            except Exception:
                pass

    async def _connect(self):
        import psycopg

        db = self.settings_dict
        return await asyncio.wait_for(
            psycopg.AsyncConnection.connect(
                dbname=db["NAME"],
                user=db.get("USER") or None,
                password=db.get("PASSWORD") or None,
                host=db.get("HOST") or None,
                port=db.get("PORT") or None,
                autocommit=True,
                connect_timeout=3,
                application_name=f"pinecall-worker-lock:{self.agent_id}"[:63],
                # The server notices a vanished holder too, and frees the lock for a standby.
                options="-c tcp_keepalives_idle=2 -c tcp_keepalives_interval=1 "
                "-c tcp_keepalives_count=3 -c tcp_user_timeout=5000",
                # A vanished machine frees the lock within seconds, not hours.
                keepalives=1,
                keepalives_idle=2,
                keepalives_interval=1,
                keepalives_count=3,
                tcp_user_timeout=5000,
            ),
            CHECK_TIMEOUT_SECONDS + 1,
        )
