"""One keep-alive HTTP/1.1 connection to a replica and the answer it carries: the request
head written with the body, the answer parsed by httptools (llhttp) into a small body buffer
that the relay drains, and the transport-level failures typed for failover.

The pool that lends these connections out is router/transport/upstream.py; a connection
hands itself back (or drops out) through the `ConnectionOwner` protocol, so this module does
not import the pool.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable
from typing import Protocol, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from router.fleet.endpoint import Endpoint

HIGH_WATER = 64 * 1024  # unread answer bytes at which the socket stops being read


class ConnectionOwner(Protocol):
    """The pool a connection belongs to (router/transport/upstream.py: `UpstreamPool`)."""

    def give_back(self, connection: Connection) -> None: ...
    def drop(self, connection: Connection) -> None: ...
    def lost(self, connection: Connection) -> None: ...


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


class Stale(Exception):
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

    def __init__(self, connection: Connection) -> None:
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

    def __init__(self, connection: Connection, status: int, headers: list[tuple[str, str]],
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
            connection.pool.give_back(connection)
        else:
            connection.pool.drop(connection)

    def close(self) -> None:
        """Drop the connection (an unfinished answer: the replica sees the client leave)."""
        if self._done:
            return
        self._done = True
        self._connection.pool.drop(self._connection)


class Connection(asyncio.Protocol):
    """One keep-alive connection to a replica; feeds httptools and the current answer."""

    def __init__(self, pool: ConnectionOwner, key: tuple[str, str, int]) -> None:
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
            self.pool.drop(self)  # bytes nobody asked for (an idle connection): not trusted
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
        self.pool.lost(self)
        response = self.response
        if self._head is not None:
            error: Exception = Stale() if self.reused and not self.got_bytes else UpstreamDisconnected(
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
            self.pool.drop(self)
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
        self.pool.drop(self)
