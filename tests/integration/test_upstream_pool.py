"""The request path's upstream client (router/transport/upstream.py) against real loopback servers
that answer with hand-written HTTP bytes: the framings vLLM and proxies in front of it use
(length, chunked, until close, an interim 100), keep-alive reuse, a replica that closes an
idle connection, broken and cut answers, and the bounds (slots, idle connections, unread
body bytes)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest
from conftest import wait_for

from router.transport.upstream import Endpoint, UpstreamPool
from router.transport.upstream_connection import (
    HIGH_WATER,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamPoolTimeout,
    request_head,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A loopback TCP server running `handler` per connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed_by_peer = 0
        self.server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint.parse(self.url)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request: (head, body) by its Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


def keep_alive(answer: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(answer)
            await writer.drain()
    return handler


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


async def post(pool: UpstreamPool, url: str, body: bytes = b"{}") -> tuple[int, bytes]:
    resp = await pool.post(Endpoint.parse(url), "/v1/completions", body, [("Content-Type", "application/json")])
    data = b""
    while chunk := await resp.content.readany():
        data += chunk
    resp.release()
    return resp.status, data


async def test_keep_alive_reuses_one_connection_and_the_request_arrives_whole():
    seen: list[tuple[bytes, bytes]] = []

    async def handler(reader, writer):
        while True:
            seen.append(await read_request(reader))
            writer.write(OK)

    pool = UpstreamPool()
    async with RawServer(handler) as server:
        for _ in range(3):
            assert await post(pool, server.url, b'{"model": "m"}') == (200, b"{}")
        assert server.connections == 1
        assert pool.idle == 1 and pool.in_use == 0
        head, body = seen[0]
        assert head.startswith(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b"\r\nContent-Length: 14\r\n" in head and body == b'{"model": "m"}'
    await pool.close()


@pytest.mark.parametrize("answer, body", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
     b"hello world"),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", b"abc"),
])
async def test_framings_chunked_and_an_interim_answer(answer, body):
    pool = UpstreamPool()
    async with RawServer(keep_alive(answer)) as server:
        assert await post(pool, server.url) == (200, body)
        assert await post(pool, server.url) == (200, body)  # and the connection is reusable
        assert server.connections == 1
    await pool.close()


async def test_a_body_until_close_ends_with_the_connection():
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"part two")
        await writer.drain()

    pool = UpstreamPool()
    async with RawServer(handler) as server:
        assert await post(pool, server.url) == (200, b"part one, part two")
        assert pool.idle == 0 and pool.in_use == 0  # never reused: it ended by closing
    await pool.close()


async def test_a_replica_that_closes_an_idle_connection_costs_the_client_nothing():
    async def handler(reader, writer):  # answers one request per connection, then closes silently
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        await asyncio.sleep(0.05)

    pool = UpstreamPool()
    async with RawServer(handler) as server:
        assert await post(pool, server.url) == (200, b"{}")
        await asyncio.sleep(0.1)  # closed: the pool saw it go
        assert pool.idle == 0
        assert await post(pool, server.url) == (200, b"{}")
        assert server.connections == 2
    await pool.close()


async def test_a_reused_connection_closed_as_the_request_goes_is_retried_once_on_a_new_one():
    closes = asyncio.Event()

    async def handler(reader, writer):
        if server.connections == 1:  # the first connection: answer once, then drop the next request
            await read_request(reader)
            writer.write(OK)
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")
            closes.set()
            return
        await keep_alive(OK)(reader, writer)

    pool = UpstreamPool()
    async with RawServer(handler) as server:
        assert await post(pool, server.url) == (200, b"{}")
        assert await post(pool, server.url) == (200, b"{}")
        assert closes.is_set() and server.connections == 2
    await pool.close()


async def test_broken_and_cut_answers_are_disconnects():
    async def garbage(reader, writer):
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)

    async def cut(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()

    async def silent_close(reader, writer):
        await read_request(reader)

    pool = UpstreamPool()
    async with RawServer(garbage) as server:
        with pytest.raises(UpstreamDisconnected, match="not valid HTTP"):
            await pool.post(server.endpoint, "/v1/completions", b"{}", [])
    async with RawServer(cut) as server:
        resp = await pool.post(server.endpoint, "/v1/completions", b"{}", [])
        assert resp.status == 200 and resp.content_length == 100
        assert await resp.content.readany() == b"0123456789"  # what came is handed over first
        with pytest.raises(UpstreamDisconnected, match="ended early"):
            await resp.content.readany()
        resp.close()
    async with RawServer(silent_close) as server:
        with pytest.raises(UpstreamDisconnected, match="before answering"):
            await pool.post(server.endpoint, "/v1/completions", b"{}", [])
    assert pool.in_use == 0 and pool.idle == 0
    await pool.close()


async def test_nothing_listening_is_a_connect_error(unused_port):
    pool = UpstreamPool()
    with pytest.raises(UpstreamConnectError):
        await pool.post(Endpoint.parse(f"http://127.0.0.1:{unused_port}"), "/v1/completions", b"{}", [])
    assert pool.in_use == 0
    await pool.close()


async def test_closing_an_unfinished_answer_drops_the_connection():
    gone = asyncio.Event()

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"6\r\ndata: \r\n")
        await writer.drain()
        await reader.read()  # EOF: the router let go
        gone.set()

    pool = UpstreamPool()
    async with RawServer(handler) as server:
        resp = await pool.post(server.endpoint, "/v1/chat/completions", b"{}", [])
        assert resp.content_type == "text/event-stream"
        assert await resp.content.readany() == b"data: "
        resp.close()
        await asyncio.wait_for(gone.wait(), 5)  # the replica sees the client leave: it aborts
    assert pool.in_use == 0 and pool.idle == 0
    await pool.close()


async def test_slots_bound_the_connections_in_use():
    release = asyncio.Event()
    most = 0

    async def handler(reader, writer):
        nonlocal most
        while True:
            await read_request(reader)
            most = max(most, pool.in_use)
            await release.wait()
            writer.write(OK)
            await writer.drain()

    pool = UpstreamPool(limit=2)
    async with RawServer(handler) as server:
        tasks = [asyncio.create_task(post(pool, server.url)) for _ in range(5)]
        await wait_for(lambda: server.connections == 2, 5)
        await asyncio.sleep(0.1)
        assert server.connections == 2 and pool.in_use == 2  # three wait for a slot
        release.set()
        assert [r for r in await asyncio.gather(*tasks)] == [(200, b"{}")] * 5
        assert server.connections == 2 and most <= 2 and pool.in_use == 0
    await pool.close()


async def test_a_waiter_cancelled_for_a_slot_takes_none():
    release = asyncio.Event()

    async def handler(reader, writer):
        await read_request(reader)
        await release.wait()
        writer.write(OK)
        await writer.drain()

    pool = UpstreamPool(limit=1)
    async with RawServer(handler) as server:
        first = asyncio.create_task(post(pool, server.url))
        await wait_for(lambda: server.connections == 1, 5)
        waiting = asyncio.create_task(post(pool, server.url))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        release.set()
        assert await first == (200, b"{}")
        assert pool.in_use == 0
    await pool.close()


async def test_a_wait_for_a_slot_ends_within_its_bound():
    """Issue 23 #4: the wait for a slot is bounded; one that ran out takes no slot later, and
    a slot given back goes to the next live waiter, first come first served."""
    pool = UpstreamPool(limit=1)
    assert pool.take_slot_now() and not pool.take_slot_now()
    started = asyncio.get_running_loop().time()
    with pytest.raises(UpstreamPoolTimeout) as info:
        await pool.wait_for_slot(0.2)
    assert 0.19 <= asyncio.get_running_loop().time() - started < 1.0 and info.value.waited == 0.2
    with pytest.raises(UpstreamPoolTimeout):
        await pool.wait_for_slot(0)  # no wait at all
    assert pool.in_use == 1
    expiring = asyncio.create_task(pool.wait_for_slot(0.05))
    cancelled = asyncio.create_task(pool.wait_for_slot(5))
    waiting = asyncio.create_task(pool.wait_for_slot(5))
    await asyncio.sleep(0.1)
    cancelled.cancel()
    with pytest.raises(UpstreamPoolTimeout):
        await expiring
    pool.release_slot()  # the expired and the cancelled waiters are passed over
    assert await waiting > 0.05 and pool.in_use == 1
    pool.release_slot()
    assert pool.in_use == 0 and await pool.wait_for_slot(0) == 0.0
    pool.release_slot()
    await pool.close()


async def test_a_held_slot_given_to_post_is_freed_whatever_happens(unused_port):
    pool = UpstreamPool(limit=1)
    assert pool.take_slot_now()
    with pytest.raises(UpstreamConnectError):
        await pool.post(Endpoint.parse(f"http://127.0.0.1:{unused_port}"), "/v1/completions", b"{}", [],
                        slot_held=True)
    assert pool.in_use == 0
    assert pool.take_slot_now()
    with pytest.raises(ValueError):
        await pool.post(Endpoint.parse(f"http://127.0.0.1:{unused_port}"), "/v1/completions", b"{}",
                        [("X-Bad", "a\r\nb")], slot_held=True)
    assert pool.in_use == 0
    await pool.close()


async def test_idle_connections_are_closed_after_the_idle_timeout():
    pool = UpstreamPool(idle_timeout=0.2)
    async with RawServer(keep_alive(OK)) as server:
        await asyncio.gather(*(post(pool, server.url) for _ in range(20)))
        assert 1 <= pool.idle <= 20
        await wait_for(lambda: pool.idle == 0, 5)  # swept: nothing idle stays open
    await pool.close()


async def test_an_unread_body_stops_the_socket_being_read():
    sent = 0

    async def handler(reader, writer):
        nonlocal sent
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (305 * 65536))
        block = b"x" * 65536
        with contextlib.suppress(ConnectionError):
            for _ in range(305):
                writer.write(block)
                await writer.drain()
                sent += len(block)

    pool = UpstreamPool()
    async with RawServer(handler) as server:
        resp = await pool.post(server.endpoint, "/v1/completions", b"{}", [])
        await asyncio.sleep(0.5)  # nobody reads
        buffered = resp.content._size
        assert buffered <= HIGH_WATER + 256 * 1024  # one read past the mark, at most
        assert sent < 305 * 65536  # the replica is held back by TCP, not buffered by us
        total = len(await resp.content.readany())
        while chunk := await resp.content.readany():
            total += len(chunk)
        assert total == 305 * 65536
        resp.release()
    await pool.close()


def test_a_header_that_would_split_the_request_is_refused():
    endpoint = Endpoint.parse("http://replica:8000/prefix")
    head = request_head(endpoint, "/v1/completions", [("Authorization", "Bearer k")], 2)
    assert head.startswith(b"POST /prefix/v1/completions HTTP/1.1\r\nHost: replica:8000\r\n")
    for bad in ([("X-A", "v\r\nInjected: 1")], [("X-A\r\nB", "v")], [("X-A", "v\rw")], [("X-A", "v\nw")],
                [("X-A", "v\0")], [("X-A", "ok"), ("X-B", "v\r\n")], [("X-A:B", "v")]):
        with pytest.raises(ValueError):
            request_head(endpoint, "/v1/completions", bad, 2)
    with pytest.raises(ValueError):
        request_head(endpoint, "/v1/completions HTTP/1.1\r\nX: y", [], 2)
    assert Endpoint.parse("https://replica").host_header == b"replica"
    assert Endpoint.parse("http://[::1]:8000").host_header == b"[::1]:8000"


async def test_the_untimed_relay_guard_admits_only_what_fits_the_client_write_buffer():
    """proxy._fits_write_buffer: the relay writes an answer that came whole without a timer
    only if it fits the client transport's write buffer (so the write cannot pause on a
    client that does not read); larger ones, or a closing transport, take the timed path."""
    from types import SimpleNamespace

    from router.transport.relay import _fits_write_buffer

    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    request = SimpleNamespace(transport=writer.transport)
    high = writer.transport.get_write_buffer_limits()[1]
    assert _fits_write_buffer(request, 1000)
    assert not _fits_write_buffer(request, high)
    writer.close()
    assert not _fits_write_buffer(request, 10)  # closing
    assert not _fits_write_buffer(SimpleNamespace(transport=None), 10)  # the client is gone
    server.close()
    await server.wait_closed()


async def test_a_relayed_answer_sends_its_head_with_its_first_body_bytes():
    """proxy.RelayedResponse holds its head back until the first body write, so head and first
    chunk leave in one write (aiohttp's own web.Response does the same).  Should an aiohttp
    release drop the class attribute this leans on, the head would go out at prepare()."""
    from aiohttp import web

    from router.transport.relay import RelayedResponse

    written = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        out = RelayedResponse(status=200, headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await asyncio.sleep(0.3)  # prepared, nothing written yet: no byte may have left
        written.set()
        await out.write(b"data: 1\n\n")
        await out.write_eof(b"data: [DONE]\n\n")
        return out

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        first = await asyncio.wait_for(reader.read(65536), 5)
        assert written.is_set()  # nothing came before the first body write
        assert first.startswith(b"HTTP/1.1 200 OK\r\n") and b"data: 1\n\n" in first  # one write
        rest = await asyncio.wait_for(reader.read(), 5)
        assert (first + rest).endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
        writer.close()
    finally:
        await runner.cleanup()


def test_response_headers_lose_hop_by_hop_ones_and_those_their_connection_header_names():
    """proxy.client_response_headers, on the headers as received: hop-by-hop headers, the
    ones the router recomputes, the replica's own that are not the client's business
    (Server, Set-Cookie...) and any header a Connection header names are dropped
    (whatever their case); the rest keep their order and repeats."""
    from router.transport.headers import client_response_headers

    received = [("Content-Type", "text/event-stream"), ("transfer-encoding", "chunked"),
                ("Connection", "keep-alive, X-Hop"), ("x-hop", "dropped"), ("Date", "now"),
                ("Server", "uvicorn"), ("Content-Length", "5"), ("X-Request-Id", "r"),
                ("Set-Cookie", "a=1"), ("connection", "x-other"), ("X-Other", "dropped"),
                ("Set-Cookie", "b=2"), ("X-Kept", "yes"), ("x-powered-by", "vllm"), ("X-Kept", "again")]
    assert client_response_headers(received) == [
        ("Content-Type", "text/event-stream"), ("X-Kept", "yes"), ("X-Kept", "again")]
    assert client_response_headers([("X-Kept", "yes")]) == [("X-Kept", "yes")]
