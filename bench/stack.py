"""The real stack for one section: a fresh database and Redis db, Daphne, the worker
(`manage.py runworker pinecall`) and the Pinecall simulator in this process."""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import config, db, procs

# The harness's own ORM calls run on one thread, so one connection serves them
# all and can be closed before its database is dropped.
_orm_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-orm")


async def orm(fn, *args, **kwargs):
    """Run a sync ORM function on the harness's ORM thread."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_orm_executor, functools.partial(fn, *args, **kwargs))


def _close_connections() -> None:
    from django.db import connections

    connections.close_all()
    for connection in connections.all():
        if hasattr(connection, "close_pool"):
            connection.close_pool()  # before the harness drops a database


async def close_orm_connections() -> None:
    await orm(_close_connections)


async def wait_until(check, *, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll a sync ORM check (on the ORM thread) until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await orm(check)
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        await asyncio.sleep(interval)


class Stack:
    """`async with Stack(...) as stack:` Daphne on `stack.port`, the worker, `stack.sim`."""

    def __init__(
        self,
        name: str,
        logs: Path,
        *,
        worker: bool = True,
        simulator: bool = True,
        sim_kwargs: dict | None = None,
        env_extra: dict | None = None,
        daphnes: int = 1,
        app: str = "dashboard.asgi:application",
    ) -> None:
        self.name = name
        self.logs = logs
        self.with_worker = worker
        self.with_simulator = simulator or worker
        self.sim_kwargs = {"ai_delay": 3600.0, "status_delay": 0.0, **(sim_kwargs or {})}
        self.env_extra = env_extra or {}
        self.sim = None
        self.app = app  # bench.floor_asgi:application adds the transport floor's tap
        self.daphne_count = daphnes
        self.daphnes: list[procs.Proc] = []  # Daphne processes, each on its own port
        self.ports: list[int] = []
        self.daphne: procs.Proc | None = None  # the first of them
        self.worker: procs.Proc | None = None
        self.port = 0

    async def __aenter__(self) -> "Stack":
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def start(self) -> None:
        await close_orm_connections()
        db.fresh_live_db()
        db.flush_redis()
        pinecall_url = "ws://127.0.0.1:9"  # unused without a worker
        if self.with_simulator:
            from pinecall_sdk.simulator import Simulator

            self.sim = Simulator(host="127.0.0.1", port=0, **self.sim_kwargs)
            await self.sim.start()
            pinecall_url = self.sim.url
        env = config.stack_env(
            database=config.DB_LIVE, pinecall_url=pinecall_url, extra=self.env_extra
        )
        for i in range(self.daphne_count):
            port = procs.free_port()
            suffix = f"-{i + 1}" if i else ""
            self.ports.append(port)
            self.daphnes.append(procs.daphne(
                port, env, self.logs / f"{self.name}-daphne{suffix}.log", app=self.app,
                name=f"daphne{suffix}",
            ))
        self.port, self.daphne = self.ports[0], self.daphnes[0]
        if self.with_worker:
            self.worker = procs.worker(env, self.logs / f"{self.name}-worker.log")
        for port, daphne in zip(self.ports, self.daphnes):
            await procs.wait_http(port, daphne)
        if self.with_worker:
            try:
                await self.sim.wait_for("channel.add", timeout=60)
            except TimeoutError:
                raise RuntimeError(f"the worker did not register:\n{self.worker.tail()}") from None
            await asyncio.sleep(0.5)  # its registration handlers run
            if not self.worker.alive():
                raise RuntimeError(f"the worker exited:\n{self.worker.tail()}")

    async def stop(self) -> None:
        for proc in (self.worker, *self.daphnes):
            if proc is not None:
                await asyncio.to_thread(proc.stop)
        if self.sim is not None:
            try:
                await asyncio.wait_for(self.sim.stop(), 15)
            except Exception:
                pass
        await close_orm_connections()

    def problems(self) -> dict:
        """Errors the stack's processes logged so far (see procs.Proc.log_problems)."""
        out = {}
        for proc in (*self.daphnes, self.worker):
            if proc is not None:
                found = proc.log_problems()
                if found:
                    out[proc.name] = found
        return out

    def check_alive(self) -> None:
        for proc in (*self.daphnes, self.worker):
            if proc is not None and not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")


async def conversation_pk(session_id: str, timeout: float = 30.0) -> int:
    """The pk of the conversation the worker stored for a session."""

    def check():
        from conversations.models import Conversation

        return Conversation.objects.filter(session_id=session_id).values_list("pk", flat=True).first()

    return await wait_until(check, timeout=timeout, interval=0.05, what=f"conversation {session_id}")
