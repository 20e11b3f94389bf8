"""Bounded resources: every wait has a timeout and every buffer a budget, tried from outside."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import resource
import shutil
import socket
import subprocess
import time
import zlib

import aiohttp
import orjson
import pytest


def _head(path: str = "/v1/completions", length: int | None = None, extra: str = "") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: router", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


async def test_slowloris_connections_are_closed_and_others_are_served(
        fakes, start_router, make_routes, http, raw_http) -> None:
    (fake,) = await fakes(1)
    server = await start_router(make_routes([fake.url], server={"header_timeout": 0.5}))
    head = _head(length=2)
    pieces = [head[i:i + 1] for i in range(len(head))]  # one byte every 0.1 s: ~9 s in all

    async def slow() -> tuple[int | None, float]:
        started = time.monotonic()
        status, _, _ = await raw_http(server.url, pieces, gap=0.1, timeout=3)
        return status, time.monotonic() - started

    async def silent() -> int | None:
        status, _, body = await raw_http(server.url, b"", timeout=3)
        assert b"did not arrive within 0.5s" in body
        return status

    attackers = [asyncio.create_task(slow()) for _ in range(30)]
    quiet = [asyncio.create_task(silent()) for _ in range(10)]
    await asyncio.sleep(0.2)
    for _ in range(10):  # normal clients are served meanwhile
        async with http.post(server.url + "/v1/completions", json={"model": "sim-a", "prompt": "x"}) as r:
            assert r.status == 200
    results = await asyncio.gather(*attackers)
    assert await asyncio.gather(*quiet) == [408] * 10
    # Each attacker is cut off after the header deadline (its writes then fail or it reads
    # the 408), far sooner than the 9 s its head would take.
    assert max(t for _, t in results) < 6
    assert server.router.connection_limits is not None
    assert server.router.connection_limits.head_timeouts >= 30
    # A kept-alive connection that goes idle between requests is not a slow head.
    async with http.post(server.url + "/v1/completions", json={"model": "sim-a", "prompt": "x"}) as r:
        assert r.status == 200
    await asyncio.sleep(0.8)
    async with http.post(server.url + "/v1/completions", json={"model": "sim-a", "prompt": "x"}) as r:
        assert r.status == 200


async def test_a_body_that_never_finishes_is_a_408(fakes, start_router, make_routes, raw_http) -> None:
    (fake,) = await fakes(1)
    server = await start_router(make_routes([fake.url], server={"body_timeout": 0.5}))
    started = time.monotonic()
    status, headers, body = await raw_http(server.url, _head(length=100) + b'{"model"', timeout=5)
    assert status == 408 and headers["connection"] == "close"
    assert orjson.loads(body)["error"]["code"] == 408
    assert time.monotonic() - started < 3
    assert not fake.seen


async def test_connection_cap_answers_503_then_recovers(fakes, start_router, make_routes,
                                                        raw_http, http, metric) -> None:
    (fake,) = await fakes(1)
    server = await start_router(make_routes([fake.url], server={"max_connections": 5,
                                                                "header_timeout": 30}))
    host, port = server.url.removeprefix("http://").split(":")
    held = [await asyncio.open_connection(host, int(port)) for _ in range(5)]
    await asyncio.sleep(0.1)
    status, headers, body = await raw_http(server.url, b"", timeout=2)
    assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
    assert "connection limit (5)" in orjson.loads(body)["error"]["message"]
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.1)
    async with http.post(server.url + "/v1/completions", json={"model": "sim-a", "prompt": "x"}) as r:
        assert r.status == 200
    async with http.get(server.url + "/metrics") as r:
        text = await r.text()
    assert metric(text, "router_client_connections_refused_total") == 1
    assert metric(text, "router_client_connections") is not None


async def test_the_body_budget_refuses_with_503_instead_of_growing(fakes, start_router,
                                                                   make_routes, http, metric) -> None:
    (fake,) = await fakes(1)
    mib = 1024 * 1024
    server = await start_router(make_routes([fake.url], server={
        "max_body_bytes": mib, "max_inflight_body_bytes": 2 * mib, "body_timeout": 10}))
    host, port = server.url.removeprefix("http://").split(":")
    trickling = []
    opening = b'{"model": "sim-a", "prompt": "'
    for _ in range(2):  # two clients announce 1 MiB each and send it slowly
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(_head(length=mib) + opening)
        await writer.drain()
        trickling.append((reader, writer))
    await asyncio.sleep(0.2)
    async with http.post(server.url + "/v1/completions", json={"model": "sim-a", "prompt": "x"}) as r:
        assert r.status == 503 and r.headers["Retry-After"]
        assert "too many request bodies" in (await r.json())["error"]["message"]
    async with http.get(server.url + "/metrics") as r:
        text = await r.text()
    assert metric(text, "router_request_body_bytes_held") == 2 * mib
    assert metric(text, "router_rejections_total", reason="body_budget") == 1
    for _reader, writer in trickling:  # they finish and are served
        writer.write(b"x" * (mib - len(opening) - 2) + b'"}')
        await writer.drain()
    for reader, writer in trickling:
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        writer.close()
    async with http.post(server.url + "/v1/completions", json={"model": "sim-a", "prompt": "x"}) as r:
        assert r.status == 200
    assert server.router.api is not None and server.router.api.bodies.used == 0


async def test_one_huge_prompt_cannot_flush_the_prefix_index(fakes, start_router, make_routes,
                                                             http) -> None:
    (fake,) = await fakes(1)
    server = await start_router(make_routes([fake.url], policy="cache_aware",
                                            prefix={"capacity_blocks": 10_000,
                                                    "max_blocks_per_request": 256}))
    prompt = "the quick brown fox " * 100_000  # 2 MB: 31k blocks of 64 bytes
    async with http.post(server.url + "/v1/completions", json={"model": "sim-a", "prompt": prompt}) as r:
        assert r.status == 200
    stats = server.router.index.stats()
    assert 0 < stats["nodes"] <= 256


async def test_a_refused_request_leaves_nothing_in_the_index(fakes, start_router, make_routes,
                                                             http) -> None:
    (fake,) = await fakes(1)
    fake.status = 400
    server = await start_router(make_routes([fake.url], policy="cache_aware"))
    async with http.post(server.url + "/v1/completions",
                         json={"model": "sim-a", "prompt": "abc " * 5000}) as r:
        assert r.status == 400
    assert server.router.index.stats()["nodes"] == 0
    fake.status = 200
    async with http.post(server.url + "/v1/completions",
                         json={"model": "sim-a", "prompt": "abc " * 5000}) as r:
        assert r.status == 200
    assert server.router.index.stats()["nodes"] > 0


async def test_a_large_answer_is_relayed_as_it_arrives(fakes, start_router, make_routes) -> None:
    (fake,) = await fakes(1)
    fake.mode = "big"
    fake.big_size = 8 * 1024 * 1024
    server = await start_router(make_routes([fake.url], proxy={"buffer_bytes": 1024 * 1024}))
    async with aiohttp.ClientSession() as client:
        async with client.post(server.url + "/v1/completions",
                               json={"model": "sim-a", "prompt": "x"}) as r:
            assert r.status == 200 and r.content_length == fake.big_size
            got = 0
            while got < 2 * 1024 * 1024:  # the first half, while the replica holds the rest
                got += len(await asyncio.wait_for(r.content.readany(), 5))
            assert not fake.release.is_set()
            fake.release.set()
            body = await r.read()
    assert got + len(body) == fake.big_size


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
async def test_listen_backlog_is_configurable(fakes, start_router, make_routes) -> None:
    (fake,) = await fakes(1)
    server = await start_router(make_routes([fake.url], server={"backlog": 77}))
    port = server.url.rsplit(":", 1)[1]
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[2] == "77"  # Send-Q of a listening socket is its backlog


def test_fd_limit_is_raised_at_start() -> None:
    from router.frontdoor.connections import raise_fd_limit

    soft = raise_fd_limit()
    now_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == now_soft and (now_soft == hard or now_soft == 1 << 20)


async def test_request_body_encodings(fakes, start_router, make_routes, http, raw_http) -> None:
    (fake,) = await fakes(1)
    server = await start_router(make_routes([fake.url], server={"max_body_bytes": 1024 * 1024}))
    body = b'{"model": "sim-a", "prompt": "hello"}'
    for encoding, data in (("gzip", gzip.compress(body)), ("x-gzip", gzip.compress(body)),
                           ("deflate", zlib.compress(body)), ("identity", body)):
        async with http.post(server.url + "/v1/completions", data=data, headers={
                "Content-Type": "application/json", "Content-Encoding": encoding}) as r:
            assert r.status == 200, encoding
        path, headers, forwarded = fake.seen[-1]
        assert forwarded == body and "Content-Encoding" not in headers  # decoded, consistently
    bad_requests = [
        ("gzip", b"\x1f\x8bnot gzip at all", 400, "not valid compressed data"),
        ("gzip", gzip.compress(body)[:-10], 400, "truncated"),
        ("br", b"whatever", 415, "Unsupported Content-Encoding"),
        ("gzip", gzip.compress(b'{"prompt": "' + b"0" * (8 * 1024 * 1024) + b'"}'), 413, "too large"),
    ]
    for encoding, data, status, fragment in bad_requests:
        async with http.post(server.url + "/v1/completions", data=data, headers={
                "Content-Type": "application/json", "Content-Encoding": encoding}) as r:
            payload = await r.json()
            assert r.status == status and fragment in payload["error"]["message"], (encoding, payload)
    # A bad body does not cost the client its kept-alive connection.
    pair = (b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
            b"Content-Encoding: gzip\r\nContent-Length: 5\r\n\r\nxxxxx"
            b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    status, _, rest = await raw_http(server.url, pair)
    assert status == 400 and b"HTTP/1.1 200" in rest


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_connection_flood_over_the_cap_is_refused_and_frees_its_descriptors(
        fakes, start_router, make_routes, http, metric) -> None:
    """50 plain TCP connections against a cap of 10 (as found from outside, on uvloop):
    each one over the cap reads a 503 and is closed by the router at once, so its file
    descriptor is gone as soon as the client lets go (not ~80 s later)."""
    assert "uvloop" in type(asyncio.get_running_loop()).__module__  # the production loop
    (fake,) = await fakes(1)
    server = await start_router(make_routes([fake.url], server={"max_connections": 10,
                                                                "header_timeout": 30}))
    host, port = server.url.removeprefix("http://").split(":")
    before = _open_fds()
    socks = []
    for _ in range(50):
        sock = socket.create_connection((host, int(port)))
        sock.setblocking(False)
        socks.append(sock)
    await asyncio.sleep(0.5)
    loop = asyncio.get_running_loop()
    answers = []
    for sock in socks[10:]:
        data = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(2):
                while chunk := await loop.sock_recv(sock, 4096):
                    data += chunk
        answers.append(data)
    assert all(a.startswith(b"HTTP/1.1 503 ") for a in answers), answers[:3]
    for sock in socks:
        sock.close()
    # Every descriptor the flood cost the router (and this test) is back within a second.
    await asyncio.sleep(1.0)
    assert _open_fds() <= before + 2
    async with http.get(server.url + "/metrics") as r:
        text = await r.text()
    assert metric(text, "router_client_connections_refused_total") == 40
    assert metric(text, "router_client_connections") == 1  # this scrape's own connection
    async with http.post(server.url + "/v1/completions", json={"model": "sim-a", "prompt": "x"}) as r:
        assert r.status == 200


async def test_an_in_flight_body_is_held_once_not_twice(fakes, start_router, make_routes, http,
                                                       until) -> None:
    """While a request waits on its replica, the router holds its body's bytes and not also
    its parsed prompt (the 32 MiB bodies found from outside cost 3.7x their size in RSS).
    Measured with tracemalloc, which counts the Python allocations of this process: the
    router's, and the fake replica's (which keeps no body here)."""
    import tracemalloc

    (fake,) = await fakes(1)
    fake.mode, fake.keep_bodies = "hold", False
    mib = 1024 * 1024
    server = await start_router(make_routes([fake.url], server={"max_body_bytes": 16 * mib}))
    payload = b'{"model": "sim-a", "max_tokens": 1, "prompt": "' + b"x" * (8 * mib) + b'"}'
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        request = asyncio.create_task(http.post(server.url + "/v1/completions", data=payload,
                                                headers={"Content-Type": "application/json"}))
        await until(lambda: fake.in_flight == 1, 10, message="the request held upstream")
        held = tracemalloc.get_traced_memory()[0] - baseline
        fake.release.set()
        async with await request as r:
            assert r.status == 200
    finally:
        tracemalloc.stop()
    # The payload above is the test's own (not counted: allocated before the baseline).
    assert held < 1.5 * len(payload), f"{held / len(payload):.2f}x the body held while in flight"
