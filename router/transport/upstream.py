"""The request path's HTTP/1.1 client to the replicas: a lean keep-alive connection pool.

Why not aiohttp's ClientSession here (probes, scrapes, adapter loads and /tokenize still use
it): py-spy under the overhead scenario put a quarter of the router's CPU per request inside
``ClientSession._request`` (a request object, cookie jar, tracing, timers, header multidicts
copied twice) and a further share in its StreamReader, for what the proxy needs: one POST of
bytes it already holds, and the answer's body handed over as it arrives.  Here the request head
is one buffer written with the body, and the answer is parsed by httptools (llhttp, Node.js's
parser, in C) straight into a small body buffer the relay drains.

What it promises:

* **Bounded.** At most ``limit`` connections in use at once (0: unlimited), later requests
  wait for a slot, first come first served.  The proxy takes the slot itself before an
  attempt starts (``take_slot_now``, else ``wait_for_slot`` with the request's bound, then
  ``post(slot_held=True)``), so the wait ends in ``UpstreamPoolTimeout``, never in a timeout
  blamed on a replica: the pool is the router's, shared by every replica.  An idle connection is closed
  after ``idle_timeout`` (shorter than uvicorn's 5 s keep-alive, so vLLM rarely closes one
  under us) and each answer's unread body buffers at most ``HIGH_WATER`` bytes before the
  socket stops being read (back-pressure to the replica).
* **Failures typed for failover**: ``UpstreamConnectError`` (nothing listening, DNS),
  ``UpstreamDisconnected`` (the connection broke or the answer is not HTTP); a connect timeout
  is the caller's (router/transport/proxy.py's ConnectWatch gets ``on_connecting``/``on_connected``).
  A *reused* connection that the replica closed before answering a single byte (its
  keep-alive ran out as we wrote) is retried once on a new connection: nothing was processed.
* **Abort on close.** ``close()`` drops the connection, which is how vLLM learns that the
  client went away and aborts the request.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Callable, Iterable

from router.fleet.endpoint import Endpoint
from router.transport.upstream_connection import (
    Connection,
    Stale,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamPoolTimeout,
    UpstreamResponse,
    request_head,
)

DEFAULT_IDLE_TIMEOUT_S = 4.0


def _expire(waiter: asyncio.Future[None], limit: int, timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamPoolTimeout(limit, timeout))


class UpstreamPool:
    """Keep-alive connections to the replicas, reused most-recent first."""

    def __init__(self, limit: int = 0, idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S) -> None:
        self.limit = limit
        self.idle_timeout = idle_timeout
        self.in_use = 0  # connections lent out or being made
        # Idle connections per (scheme, host, port), oldest first; a key leaves with its last.
        self._idle: dict[tuple[str, str, int], list[Connection]] = {}
        self._lent: set[Connection] = set()
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._tls: ssl.SSLContext | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def idle(self) -> int:
        """Idle connections held now."""
        return sum(map(len, self._idle.values()))

    async def post(self, endpoint: Endpoint, path: str, body: bytes | bytearray, headers: Iterable[tuple[str, str]], *,
                   on_connecting: Callable[[], None] | None = None,
                   on_connected: Callable[[], None] | None = None,
                   slot_held: bool = False, method: str = "POST") -> UpstreamResponse:
        """POST `body` to the endpoint's path prefix + `path` (a replica's ``endpoint``);
        returns once the answer's head arrived.  ``slot_held``: the caller took a slot
        (``take_slot_now`` / ``wait_for_slot``) and hands it over, whatever happens next;
        else this call waits for one, unbounded."""
        try:
            if self._closed:
                raise UpstreamConnectError("the router is shutting down")
            head = request_head(endpoint, path, headers, len(body), method)
        except BaseException:
            if slot_held:
                self._free_slot()
            raise
        if not slot_held and not self.take_slot_now():
            await self.wait_for_slot(None)
        # The slot is this call's until a connection is lent out (``_lent``); from then on
        # the connection holds it and gives it back when released, dropped or broken.
        connection: Connection | None = None
        try:
            connection = self._take_idle(endpoint.key)
            if connection is not None:
                try:
                    return await self._exchange(connection, head, body)
                except Stale:
                    self._lent.discard(connection)  # its slot comes back to this call
                    connection = None  # closed under us before answering: once more, on a new one
            connection = await self._connect(endpoint, on_connecting, on_connected)
            try:
                return await self._exchange(connection, head, body)
            except Stale:
                raise UpstreamDisconnected("the replica closed the connection before answering") from None
        except BaseException:
            if connection is None:
                self._free_slot()
            elif connection in self._lent:
                self.drop(connection)  # (one that broke was dropped, its slot freed, already)
            raise

    async def _exchange(self, connection: Connection, head: bytes, body: bytes | bytearray) -> UpstreamResponse:
        """Lend `connection` out and send; waits for the answer's head."""
        self._lent.add(connection)
        return await connection.send(head, body)

    async def _connect(self, endpoint: Endpoint, on_connecting: Callable[[], None] | None,
                       on_connected: Callable[[], None] | None) -> Connection:
        loop = asyncio.get_running_loop()
        if on_connecting is not None:
            on_connecting()
        try:
            _, connection = await loop.create_connection(
                lambda: Connection(self, endpoint.key), endpoint.host, endpoint.port,
                ssl=self._tls_context() if endpoint.tls else None)
        except OSError as exc:
            raise UpstreamConnectError(
                f"cannot connect to {endpoint.host}:{endpoint.port} ({exc.strerror or exc})") from None
        finally:
            if on_connected is not None:
                on_connected()
        return connection

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    # -- slots --
    def take_slot_now(self) -> bool:
        """Take a free slot (True), or False when ``limit`` connections are in use."""
        if not self.limit or self.in_use < self.limit:
            self.in_use += 1
            return True
        return False

    async def wait_for_slot(self, timeout: float | None) -> float:
        """Wait for a slot handed over by a connection that is done (first come, first
        served); returns the seconds waited.  UpstreamPoolTimeout after `timeout` seconds
        (None: no bound).  The slot is the caller's: give it to ``post(slot_held=True)`` or
        back with ``release_slot``."""
        if self.take_slot_now():
            return 0.0
        if timeout is not None and timeout <= 0:
            raise UpstreamPoolTimeout(self.limit, 0.0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        waiter: asyncio.Future[None] = loop.create_future()
        self._slot_waiters.append(waiter)
        timer = None if timeout is None else loop.call_later(timeout, _expire, waiter, self.limit, timeout)
        try:
            await waiter  # the slot is handed over: in_use already counts it
        except UpstreamPoolTimeout:
            raise  # (an expired waiter is skipped by _free_slot: no slot was handed to it)
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._free_slot()  # handed over as we were cancelled: pass it on
            else:
                waiter.cancel()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        return loop.time() - started

    def release_slot(self) -> None:
        """Give back a slot taken for a ``post`` that was never made."""
        self._free_slot()

    def _free_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter: in_use unchanged
                return
        self.in_use -= 1

    # -- connections --
    def _take_idle(self, key: tuple[str, str, int]) -> Connection | None:
        stack = self._idle.get(key)
        now = time.monotonic()
        while stack:
            connection = stack.pop()
            connection.pooled = False
            if connection.closed or now - connection.idle_since > self.idle_timeout:
                connection.close()
                continue
            if not stack:
                del self._idle[key]
            connection.reused = True
            return connection
        self._idle.pop(key, None)
        return None

    def give_back(self, connection: Connection) -> None:
        """An answer was read to its end: the connection waits for the next request."""
        self._lent.discard(connection)
        connection.response = None
        connection.resume_reading()
        if self._closed:
            connection.close()
        else:
            connection.idle_since = time.monotonic()
            connection.pooled = True
            self._idle.setdefault(connection.key, []).append(connection)
            self._schedule_sweep()
        self._free_slot()

    def drop(self, connection: Connection) -> None:
        """Close a connection; frees its slot if it was lent out."""
        connection.close()
        if connection in self._lent:
            self._lent.discard(connection)
            self._free_slot()

    def lost(self, connection: Connection) -> None:
        """The transport closed (either side): an idle connection leaves the pool."""
        if not connection.pooled:
            return  # lent out, or already taken off by the sweep or shutdown
        connection.pooled = False
        stack = self._idle[connection.key]
        stack.remove(connection)
        if not stack:
            del self._idle[connection.key]

    def _schedule_sweep(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self.idle_timeout, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle longer than ``idle_timeout`` (oldest sit at the bottom)."""
        self._sweeper = None
        limit = time.monotonic() - self.idle_timeout
        for key in list(self._idle):
            stack = self._idle[key]
            expired = 0
            while expired < len(stack) and stack[expired].idle_since <= limit:
                expired += 1
            for connection in stack[:expired]:
                connection.pooled = False
                connection.close()
            del stack[:expired]
            if not stack:
                del self._idle[key]
        if self._idle:
            self._schedule_sweep()

    async def close(self) -> None:
        """Close every connection (shutdown: nothing is in flight any more)."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for stack in self._idle.values():
            for connection in stack:
                connection.pooled = False
                connection.close()
        self._idle.clear()
        for connection in list(self._lent):
            connection.close()
        await asyncio.sleep(0)  # let the transports run their close callbacks
