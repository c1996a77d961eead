"""A TCP proxy that a test (or a benchmark) can cut and restore, to fake a network outage.

    proxy = TcpProxy("127.0.0.1", 5432).start()   # listens on 127.0.0.1:proxy.port
    ...                                            # point a process at proxy.port
    proxy.cut()       # every open connection is reset (RST), new ones are reset at once
    proxy.restore()   # new connections are forwarded again
    proxy.stop()

It runs its own asyncio event loop on its own thread, so it keeps forwarding while
the caller's thread or event loop is busy. The public methods are thread-safe and
return once the change has taken effect (after `cut()` returns, every connection
that was open is gone); none of them sleeps. Call them from any thread except the
proxy's own.

A cut looks like a database host that went away: both ends of every forwarded
connection get a TCP reset (SO_LINGER 0, then close), and while cut the proxy keeps
its listening socket (so the port stays its own) but resets each new connection as
soon as it is accepted, so clients see "connection reset" / "server closed the
connection unexpectedly" at once instead of hanging.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from concurrent.futures import TimeoutError as FutureTimeout

__all__ = ["TcpProxy"]

_CHUNK = 256 * 1024
_LINGER_0 = struct.pack("ii", 1, 0)


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close the connection with a TCP RST rather than a FIN (nothing flushed)."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
        except OSError:
            pass
    writer.transport.abort()


class _Pair:
    """One client connection and its upstream connection."""

    __slots__ = ("client", "upstream", "task")

    def __init__(self, client: asyncio.StreamWriter, task: asyncio.Task) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.task = task

    def reset(self) -> None:
        _reset(self.client)
        _reset(self.upstream)


class TcpProxy:
    """Forward 127.0.0.1:<port> to ``target_host:target_port``, until cut."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.target_host = target_host
        self.target_port = int(target_port)
        self.host = host
        self._requested_port = port
        self.connect_timeout = connect_timeout
        self.port = 0
        #: Connections accepted and forwarded, reset by a cut, refused while cut.
        self.forwarded = 0
        self.reset_by_cut = 0
        self.refused = 0
        self._cut = False
        self._pairs: set[_Pair] = set()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None

    # ------------------------------------------------------------------ public API

    def start(self) -> "TcpProxy":
        with self._lock:
            if self._thread is not None:
                return self
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=self._loop.run_forever, name=f"tcp-proxy->{self.target_port}", daemon=True
            )
            self._thread.start()
            try:
                self._call(self._start_server())
            except BaseException:
                self._shutdown_loop()
                raise
        return self

    def cut(self) -> int:
        """Reset every open connection and refuse new ones until `restore()`.

        Returns how many connections were reset.
        """
        return self._call(self._do_cut())

    def restore(self) -> None:
        """Forward new connections again (the ones reset by the cut stay gone)."""
        self._call(self._do_restore())

    def stop(self) -> None:
        """Stop listening, reset what is open, end the thread. Safe to call twice."""
        with self._lock:
            if self._thread is None:
                return
            try:
                self._call(self._do_stop())
            finally:
                self._shutdown_loop()

    @property
    def is_cut(self) -> bool:
        return self._cut

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def __enter__(self) -> "TcpProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "cut" if self._cut else "forwarding"
        return (
            f"<TcpProxy {self.host}:{self.port} -> {self.target_host}:{self.target_port} "
            f"{state}, {len(self._pairs)} open>"
        )

    # ------------------------------------------------------------------ plumbing

    def _call(self, coro, timeout: float = 30.0):
        loop = self._loop
        if loop is None or self._thread is None:
            coro.close()
            raise RuntimeError("the proxy is not running (call start() first)")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("TcpProxy methods cannot be called from the proxy's own thread")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise TimeoutError(f"{self!r}: operation did not finish within {timeout} s") from None

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(10)
        if loop is not None and not loop.is_running():
            loop.close()
        self._loop = self._thread = None

    # ------------------------------------------------------------------ on the proxy's loop

    async def _start_server(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self._requested_port, reuse_address=True, backlog=512
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _do_cut(self) -> int:
        self._cut = True
        pairs = list(self._pairs)
        for pair in pairs:
            pair.reset()
        self.reset_by_cut += len(pairs)
        # Returns once the handlers have seen their sockets die.
        tasks = [p.task for p in pairs if p.task is not asyncio.current_task()]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        return len(pairs)

    async def _do_restore(self) -> None:
        self._cut = False

    async def _do_stop(self) -> None:
        self._cut = True
        if self._server is not None:
            self._server.close()
        await self._do_cut()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 5)
            except TimeoutError:
                pass
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            self.refused += 1
            _reset(writer)
            return
        task = asyncio.current_task()
        assert task is not None
        pair = _Pair(writer, task)
        self._pairs.add(pair)
        try:
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(self.target_host, self.target_port),
                    self.connect_timeout,
                )
            except (OSError, TimeoutError):
                _reset(writer)  # the target is down: so is the proxy, to this client
                return
            pair.upstream = up_writer
            if self._cut:  # cut while we were connecting
                pair.reset()
                return
            self.forwarded += 1
            results = await asyncio.gather(
                self._pump(reader, up_writer), self._pump(up_reader, writer),
                return_exceptions=True,
            )
            if any(r is not True for r in results):
                pair.reset()  # one side was reset (or failed): reset the other too
            else:
                for w in (writer, up_writer):
                    w.close()
        finally:
            self._pairs.discard(pair)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Copy until EOF (then half-close the other side): True; a reset raises."""
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()
        return True
