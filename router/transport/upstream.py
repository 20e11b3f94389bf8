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
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from typing import cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from router.fleet.endpoint import Endpoint

HIGH_WATER = 64 * 1024  # unread answer bytes at which the socket stops being read
DEFAULT_IDLE_TIMEOUT_S = 4.0


class UpstreamError(Exception):
    """A request to a replica failed at the transport level."""


class UpstreamConnectError(UpstreamError):
    """No connection could be made (refused, unreachable, name not resolved)."""


class UpstreamDisconnected(UpstreamError):
    """The connection broke before the answer was complete, or the answer was not HTTP."""


class UpstreamPoolTimeout(Exception):
    """No connection slot came free in time: the router's own limit, not a replica failure
    (no failover: the pool is shared)."""

    def __init__(self, limit: int, waited: float) -> None:
        super().__init__(f"all {limit} upstream connections stayed in use for {waited:g}s")
        self.limit = limit
        self.waited = waited


class _Stale(Exception):
    """A reused connection closed before its answer's first byte (internal: retried)."""


def _has_line_break(text: str) -> bool:
    return "\r" in text or "\n" in text or "\0" in text


def request_head(endpoint: Endpoint, path: str, headers: Iterable[tuple[str, str]],
                 body_length: int, method: str = "POST") -> bytes:
    """The request head's bytes (``method`` is the caller's constant: POST, or GET for a
    stored response); refuses (ValueError) a header that would split the request."""
    target = endpoint.path_prefix + path
    lines = [f"{method} {target} HTTP/1.1\r\nHost: ".encode("utf-8", "surrogateescape"), endpoint.host_header,
             b"\r\n"]
    if _has_line_break(target) or " " in target:
        raise ValueError("the request path holds a space or a line break")
    parts = [f"{name}: {value}\r\n" for name, value in headers]
    text = "".join(parts)
    # Line breaks: one scan of the whole text instead of three per header (each line holds
    # exactly one CR and one LF, its end, and no NUL); the culprit is looked for only then.
    if text.count("\r") != len(parts) or text.count("\n") != len(parts) or "\0" in text:
        for name, value in headers:
            if _has_line_break(name) or _has_line_break(value):
                raise ValueError(f"header {name!r} holds a line break")
    for name, _ in headers:
        if ":" in name:
            raise ValueError(f"header {name!r} holds a colon")
    lines.append(text.encode("utf-8", "surrogateescape"))
    lines.append(f"Content-Length: {body_length}\r\n\r\n".encode())
    return b"".join(lines)


class UpstreamBody:
    """The answer's body as it arrives: ``readany`` hands over everything buffered."""

    __slots__ = ("_connection", "_chunks", "_size", "_done", "_error", "_waiter")

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self._chunks: list[bytes] = []
        self._size = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- fed by the connection: httptools' body callbacks append to ``_chunks`` and
    # ``_size`` directly (one per chunk of a chunked answer, a dozen per streamed answer);
    # ``_arrived`` runs once per read of the socket --
    def _arrived(self) -> None:
        if self._chunks:
            if self._size > HIGH_WATER:
                self._connection.pause_reading()
            self._wake()

    def _finish(self) -> None:
        self._done = True
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if not self._done:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- read by the relay --
    def is_eof(self) -> bool:
        """The whole body arrived and was read."""
        return self._done and not self._chunks

    async def readany(self) -> bytes:
        """Every byte buffered now, waiting for some if none; b"" at the end of the body.
        Raises UpstreamDisconnected if the connection broke first (after what came before)."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._size = 0
                self._connection.resume_reading()
                return data
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    async def read(self, limit: int) -> bytes:
        """Up to `limit` bytes of the body (fewer at its end)."""
        parts: list[bytes] = []
        size = 0
        while size < limit:
            chunk = await self.readany()
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
        data = b"".join(parts)
        return data[:limit]


class UpstreamResponse:
    """A replica's answer: status and headers at once, the body as it arrives.

    Give it back with ``release()`` once the body is read (the connection is reused when
    the replica allows) or ``close()`` (the connection is dropped: the replica aborts)."""

    __slots__ = ("status", "raw_headers", "content", "content_type", "content_length", "_connection",
                 "_keep_alive", "_until_close", "_done", "_headers")

    def __init__(self, connection: _Connection, status: int, headers: list[tuple[str, str]],
                 keep_alive: bool) -> None:
        self.status = status
        self.raw_headers = headers  # as received, in order; ``headers`` is the mapping view
        self._headers: CIMultiDictProxy[str] | None = None
        self.content = UpstreamBody(connection)
        kind = length = encoding = None
        for name, value in headers:  # the three the body needs (first of each), in one pass
            lower = name.lower()
            if lower == "content-type":
                kind = value if kind is None else kind
            elif lower == "content-length":
                length = value if length is None else length
            elif lower == "transfer-encoding":
                encoding = value if encoding is None else encoding
        self.content_type = (kind or "").partition(";")[0].strip().lower()
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self._connection = connection
        self._keep_alive = keep_alive
        # Neither a length nor chunked: the body ends when the replica closes the connection.
        self._until_close = length is None and "chunked" not in (encoding or "").lower()
        self._done = False

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """The headers as a case-insensitive mapping (built on first use)."""
        if self._headers is None:
            self._headers = CIMultiDictProxy(CIMultiDict(self.raw_headers))
        return self._headers

    def release(self) -> None:
        """Done with it: reuse the connection if the whole body was read, else drop it."""
        if self._done:
            return
        self._done = True
        connection = self._connection
        if self._keep_alive and self.content.is_eof() and not connection.closed:
            connection.pool._give_back(connection)
        else:
            connection.pool._drop(connection)

    def close(self) -> None:
        """Drop the connection (an unfinished answer: the replica sees the client leave)."""
        if self._done:
            return
        self._done = True
        self._connection.pool._drop(self._connection)


class _Connection(asyncio.Protocol):
    """One keep-alive connection to a replica; feeds httptools and the current answer."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self.pooled = False  # waiting in the pool's idle stacks
        self.idle_since = 0.0
        self.got_bytes = False
        self.paused = False
        self._head: asyncio.Future[UpstreamResponse] | None = None
        self._headers: list[tuple[str, str]] = []
        self.response: UpstreamResponse | None = None

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):  # pragma: no cover - platform specific
                pass

    def data_received(self, data: bytes) -> None:
        if self._head is None and self.response is None:
            self.pool._drop(self)  # bytes nobody asked for (an idle connection): not trusted
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._broken(UpstreamDisconnected(f"the replica's answer is not valid HTTP ({exc})"))
            return
        response = self.response
        if response is not None:
            response.content._arrived()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._lost(self)
        response = self.response
        if self._head is not None:
            error: Exception = _Stale() if self.reused and not self.got_bytes else UpstreamDisconnected(
                "the replica closed the connection before answering")
            self._fail_head(error)
        elif response is not None and not response.content._done:
            if response._until_close:
                response.content._finish()
            else:
                response.content._fail(UpstreamDisconnected("the answer ended early (connection closed)"))

    # -- httptools callbacks --
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        headers, self._headers = self._headers, []
        if status < 200:
            return  # an interim answer (100 Continue): the real one follows
        if self._head is None:  # an answer nobody asked for: the connection is not trusted
            self.response = None
            self.pool._drop(self)
            return
        response = self.response = UpstreamResponse(self, status, headers, self.parser.should_keep_alive())
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(response)

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is not None:  # data_received wakes the reader once the read is parsed
            content = response.content
            content._chunks.append(body)
            content._size += len(body)

    def on_message_complete(self) -> None:
        if self.response is not None:
            self.response.content._finish()

    # -- used by the pool and the body --
    def send(self, head: bytes, body: bytes | bytearray) -> asyncio.Future[UpstreamResponse]:
        assert self.transport is not None
        self.response = None
        self.got_bytes = False
        future = self._head = asyncio.get_running_loop().create_future()
        if body:
            self.transport.writelines((head, body))
        else:
            self.transport.write(head)
        return future

    def pause_reading(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True

    def _fail_head(self, error: Exception) -> None:
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(error)

    def _broken(self, error: UpstreamDisconnected) -> None:
        if self._head is not None:
            self._fail_head(error)
        elif self.response is not None:
            self.response.content._fail(error)
        self.pool._drop(self)


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
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._lent: set[_Connection] = set()
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
        connection: _Connection | None = None
        try:
            connection = self._take_idle(endpoint.key)
            if connection is not None:
                try:
                    return await self._exchange(connection, head, body)
                except _Stale:
                    self._lent.discard(connection)  # its slot comes back to this call
                    connection = None  # closed under us before answering: once more, on a new one
            connection = await self._connect(endpoint, on_connecting, on_connected)
            try:
                return await self._exchange(connection, head, body)
            except _Stale:
                raise UpstreamDisconnected("the replica closed the connection before answering") from None
        except BaseException:
            if connection is None:
                self._free_slot()
            elif connection in self._lent:
                self._drop(connection)  # (one that broke was dropped, its slot freed, already)
            raise

    async def _exchange(self, connection: _Connection, head: bytes, body: bytes | bytearray) -> UpstreamResponse:
        """Lend `connection` out and send; waits for the answer's head."""
        self._lent.add(connection)
        return await connection.send(head, body)

    async def _connect(self, endpoint: Endpoint, on_connecting: Callable[[], None] | None,
                       on_connected: Callable[[], None] | None) -> _Connection:
        loop = asyncio.get_running_loop()
        if on_connecting is not None:
            on_connecting()
        try:
            _, connection = await loop.create_connection(
                lambda: _Connection(self, endpoint.key), endpoint.host, endpoint.port,
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
    def _take_idle(self, key: tuple[str, str, int]) -> _Connection | None:
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

    def _give_back(self, connection: _Connection) -> None:
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

    def _drop(self, connection: _Connection) -> None:
        """Close a connection; frees its slot if it was lent out."""
        connection.close()
        if connection in self._lent:
            self._lent.discard(connection)
            self._free_slot()

    def _lost(self, connection: _Connection) -> None:
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
