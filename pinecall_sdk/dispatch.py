"""Handlers: who gets which event, and the one task that calls them in arrival order."""

from __future__ import annotations

import asyncio
import collections
import inspect
from typing import Any, Awaitable, Callable, Union

from ._logging import logger
from .errors import PinecallInvalidArgument
from .events import Event

__all__ = ["Dispatcher", "Handler"]

Handler = Callable[[Event], Union[None, Awaitable[None]]]
Table = dict[str, list[Handler]]


class Dispatcher:
    """The handler tables (the client's, and each agent's) and the dispatch task.

    Events are handed to handlers one at a time, in the order they were put: a slow
    handler delays later handlers, never the socket reader. A handler's exception is
    logged and swallowed; an exception of the dispatching itself is a bug, reported
    to ``on_crash(exc, where)``.
    """

    def __init__(self, on_crash: Callable[[BaseException, str], None]) -> None:
        self._on_crash = on_crash
        self._client: Table = collections.defaultdict(list)
        self._agents: dict[str, Table] = collections.defaultdict(lambda: collections.defaultdict(list))
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    # -- tables ------------------------------------------------------------------------

    def add(self, agent_id: str | None, event: str, handler: Handler | None) -> Any:
        """Add ``handler`` for ``event`` (``"*"``: all) of an agent (None: of the client);
        without a handler, a decorator."""
        if not isinstance(event, str) or not event:
            raise PinecallInvalidArgument("event name must be a non-empty string")
        table = self._client if agent_id is None else self._agents[agent_id]

        def register(fn: Handler) -> Handler:
            if not callable(fn):
                raise PinecallInvalidArgument("handler must be callable")
            table[event].append(fn)
            return fn

        return register if handler is None else register(handler)

    def remove(self, agent_id: str | None, event: str, handler: Handler) -> None:
        table = self._client if agent_id is None else self._agents[agent_id]
        try:
            table[event].remove(handler)
        except ValueError:
            pass

    def handlers_for(self, ev: Event, agent_id: str | None) -> list[Handler]:
        """Per event: the agent's handlers for that name, its ``"*"``, the client's, its ``"*"``."""
        handlers: list[Handler] = []
        if agent_id is not None:
            table = self._agents.get(agent_id, {})
            handlers += table.get(ev.event, [])
            handlers += table.get("*", [])
        if ev.event != "fatal":  # the client's "fatal" handlers get exceptions, never a frame
            handlers += self._client.get(ev.event, [])
        handlers += self._client.get("*", [])
        return handlers

    def fatal_handlers(self) -> list[Callable[[BaseException], Any]]:
        return list(self._client.get("fatal", []))

    # -- the task ----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(
                self._run(self._queue), name="pinecall-dispatch"
            )

    def put(self, ev: Event, agent_id: str | None) -> None:
        if self._queue is not None:
            self._queue.put_nowait((ev, agent_id))

    def idle(self) -> bool:
        """Nothing waits in the queue."""
        return self._queue is None or self._queue.empty()

    async def drain(self, timeout: float | None = None) -> None:
        """Deliver what is queued, then stop (from inside a handler: stop after it)."""
        task = self._task
        if task is None or task.done() or self._queue is None:
            return
        self._queue.put_nowait(None)
        if task is asyncio.current_task():
            return
        await asyncio.wait((task,), timeout=timeout)
        if not task.done():
            task.cancel()

    async def _run(self, queue: asyncio.Queue) -> None:
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                ev, agent_id = item
                for handler in self.handlers_for(ev, agent_id):
                    try:
                        result = handler(ev)
                        if inspect.isawaitable(result):
                            await result
                    except Exception:
                        logger.exception("pinecall_sdk: handler %r for %s raised", handler, ev.event)
        except Exception as exc:  # a bug in dispatching (not in a handler): crash-only
            self._on_crash(exc, "event dispatch")
