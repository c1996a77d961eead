"""What a :class:`~pinecall_sdk.Pinecall` and its agents share, behind the facade.

:class:`Runtime` wires the protocol core, the connection and the dispatcher
together, and owns what only asyncio can hold: the futures of the calls waiting
for a confirmation or a registration. It carries out the core's effects in order,
and runs the two ways a client ends: ``close()`` and crash-only ``fail()``.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
from typing import Any, Iterable

from ._logging import logger
from .connection import Connection, State
from .dispatch import Dispatcher
from .errors import PinecallError, PinecallTimeout
from .events import DisconnectedEvent, ErrorEvent, Event
from .protocol import (
    AgentDown,
    AgentState,
    Command,
    Confirm,
    Deliver,
    Effect,
    HangUp,
    Later,
    Phase,
    Policy,
    ProtocolCore,
    Registered,
    Reject,
    copy_error,
)

__all__ = ["Runtime"]


def _mark_retrieved(fut: asyncio.Future) -> None:
    # Keep asyncio quiet about exceptions nobody awaited (e.g. a caller gone).
    if not fut.cancelled():
        fut.exception()


class Runtime:
    """The core, the connection, the dispatcher, and the calls waiting on them.

    ``settings`` is the client (its public options, read at use time).
    """

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.core = ProtocolCore(policy=lambda: Policy.of(settings))
        self.conn = Connection(settings, self.core, owner=self)
        self.dispatch = Dispatcher(on_crash=self.fail)
        self.failure: BaseException | None = None
        self._calls: dict[Command, asyncio.Future] = {}
        self._waiters: dict[str, list[asyncio.Future]] = collections.defaultdict(list)
        self._failed = asyncio.Event()
        self._failure_task: asyncio.Task | None = None
        self._connect_lock: asyncio.Lock | None = None

    # -- effects -----------------------------------------------------------------------

    def apply(self, effects: Iterable[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Deliver):
                self.dispatch.put(effect.event, effect.agent_id)
            elif isinstance(effect, (Confirm, Reject)):
                fut = self._calls.pop(effect.command, None)
                if fut is not None and not fut.done():
                    if isinstance(effect, Confirm):
                        fut.set_result(effect.event)
                    else:
                        fut.set_exception(effect.error)
            elif isinstance(effect, Registered):
                self._resolve_waiters(effect.agent_id, None)
            elif isinstance(effect, AgentDown):
                self._resolve_waiters(effect.agent_id, effect.error)
            elif isinstance(effect, Later):
                self.conn.schedule(effect.delay, effect.timer)
            elif isinstance(effect, HangUp):
                self.conn.hang_up(effect.error)
            else:  # pragma: no cover - a new effect without its line here
                raise TypeError(f"unknown effect {effect!r}")
        self.conn.refresh()
        self.conn.wake()

    def _resolve_waiters(self, agent_id: str, err: PinecallError | None) -> None:
        for fut in self._waiters.pop(agent_id, []):
            if fut.done():
                continue
            if err is None:
                fut.set_result(None)
            else:
                fut.set_exception(copy_error(err))

    # -- what the agents use -----------------------------------------------------------

    def add_agent(self, agent_id: str, config: dict[str, Any]) -> AgentState:
        self.apply(self.core.add_agent(agent_id, config))
        return self.core.agents[agent_id]

    def set_whatsapp(self, agent_id: str, whatsapp: dict[str, Any]) -> None:
        self.core.set_whatsapp(agent_id, whatsapp)
        self.conn.wake()

    def set_phone(self, agent_id: str, ref: str, options: dict[str, Any]) -> None:
        self.core.set_phone(agent_id, ref, options)
        self.conn.wake()

    def reregister(self, agent_id: str) -> None:
        self.apply(self.core.reregister(agent_id))

    def raise_if_unusable(self) -> None:
        err = self.conn.unusable_error()
        if err is not None:
            raise copy_error(err)

    async def command(
        self,
        agent_id: str,
        frame: dict[str, Any],
        *,
        session_id: str | None,
        contact: str | None,
        timeout: float | None,
        request_id: str | None = None,
        call_id: str | None = None,
        message_id: str | None = None,
    ) -> Event:
        """Queue a command, wait for its confirmation (``timeout``: None, the client's)."""
        self.raise_if_unusable()
        cmd = self.core.submit(
            agent_id, frame, session_id=session_id, contact=contact, request_id=request_id,
            call_id=call_id, message_id=message_id,
        )
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_mark_retrieved)
        self._calls[cmd] = fut
        self.conn.wake()
        limit = self.settings.command_timeout if timeout is None else timeout
        try:
            await asyncio.wait((fut,), timeout=limit)
        except asyncio.CancelledError:
            self._withdraw(cmd)
            raise
        if not fut.done():
            was_sent = cmd.sent
            self._withdraw(cmd)
            state = (
                "sent, but the server did not confirm it"
                if was_sent
                else "never sent (agent not registered yet); it has been withdrawn"
            )
            raise PinecallTimeout(f"{cmd.describe()}: no answer within {limit} s ({state})")
        return fut.result()

    def _withdraw(self, cmd: Command) -> None:
        fut = self._calls.pop(cmd, None)
        if fut is not None and not fut.done():
            fut.cancel()
        self.core.withdraw(cmd)

    async def wait_registered(self, agent_id: str, timeout: float | None) -> None:
        state = self.core.agents[agent_id]
        if state.phase is Phase.REGISTERED:
            return
        err = self.conn.unusable_error() or state.failure
        if err is not None:
            raise copy_error(err)
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_mark_retrieved)
        waiters = self._waiters[agent_id]
        waiters.append(fut)
        try:
            await asyncio.wait((fut,), timeout=timeout)
        finally:
            if fut in waiters:
                waiters.remove(fut)
        if not fut.done():
            fut.cancel()
            raise PinecallTimeout(f"agent {agent_id!r} not registered within {timeout} s")
        fut.result()

    # -- the client's life -------------------------------------------------------------

    async def connect(self) -> None:
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            conn = self.conn
            if conn.state is State.CLOSED:
                raise PinecallError("the client is closed", code="CLOSED")
            if conn.state is State.FAILED:
                # Crash-only: a failed client is not restarted in place; the process is.
                raise copy_error(conn.error) from self.failure
            if conn.running:
                if not conn.connected:
                    await conn.wait_up()
                return
            if not self.settings.api_key:
                logger.warning("no Pinecall API key (argument or PINECALL_API_KEY); sending an empty one")
            self.core.reset()  # a fresh start after a stop for good (displaced, rejected key)
            self.dispatch.start()
            await conn.start()

    async def close(self) -> None:
        """No reconnect; pending commands fail with ``CLOSED``; queued events are delivered."""
        if self.conn.state is State.CLOSED:
            return
        await self.conn.close()
        self.apply(self.core.stop_all(PinecallError("the client was closed", code="CLOSED"), report=False))
        # Let the dispatcher deliver what is queued (e.g. "disconnected"), then stop it.
        await self.dispatch.drain(timeout=self.settings.close_timeout)
        failing = self._failure_task
        if failing is not None and not failing.done() and failing is not asyncio.current_task():
            await asyncio.wait((failing,), timeout=self.settings.close_timeout)  # its "fatal" handlers
        logger.info("pinecall client closed")

    async def wait_failed(self) -> BaseException:
        await self._failed.wait()
        assert self.failure is not None
        return self.failure

    def fail(self, exc: BaseException, where: str) -> None:
        """Crash-only: an unexpected exception escaped one of the client's loops.

        Stop for good at once (pending commands fail now); closing the socket and
        telling the application happen in a task of their own, as the caller may be
        the very loop (reader, dispatcher) that has to be stopped.
        """
        if self.conn.state is State.CLOSED or self.failure is not None:
            logger.error("pinecall_sdk: %s failed after the client stopped", where, exc_info=exc)
            return
        logger.critical(
            "pinecall_sdk: %s failed; the client stops for good and will not reconnect", where,
            exc_info=exc,
        )
        self.failure = exc
        err = PinecallError(
            f"the client failed ({where}: {type(exc).__name__}: {exc}); restart the process",
            code="INTERNAL",
        )
        self.conn.mark_failed(err)
        self.apply(self.core.stop_all(err, report=False))
        self._failure_task = asyncio.get_running_loop().create_task(
            self._shut_down_after_failure(exc, err), name="pinecall-failure"
        )

    async def _shut_down_after_failure(self, exc: BaseException, err: PinecallError) -> None:
        close = await self.conn.abort()  # no more reading, no reconnect; the socket closed
        if close is not None:
            self.dispatch.put(DisconnectedEvent(code=close.code, reason=close.reason, reconnect=False), None)
        self.dispatch.put(ErrorEvent(event="error", code=err.code, message=err.message, fatal=True), None)
        # Hand what was received to the handlers before saying "fatal": the application
        # may exit the process as soon as it hears it.
        await self.dispatch.drain()
        self._failed.set()
        for handler in self.dispatch.fatal_handlers():
            try:
                result = handler(exc)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("pinecall_sdk: fatal handler %r raised", handler)
