"""The router's own limits under pressure: a connection flood, a full upstream pool, big bodies.

* **flood**: ``flood_connections`` plain TCP connections opened at once against
  ``server.max_connections: flood_cap``: how many read a 503, how fast, the router's open
  file descriptors at peak and one second after the clients let go, and whether ``/health``
  answered meanwhile.
* **pool**: ``proxy.max_connections: pool_size`` filled by twice as many long streams, then
  short requests: each must end within ``proxy.pool_timeout`` with a 503 and Retry-After
  (never wait past its deadline), and the router counts them.
* **bodies**: ``body_count`` concurrent ``body_mib`` MiB request bodies held by a replica
  that answers only after it read them all: the router's RSS above idle, per MiB of body
  in flight (what ``server.max_inflight_body_bytes`` really costs).

Each checks one configured bound of a real ``python -m router`` process (uvloop, the
production path): simulated replicas, or for bodies the `Sink` replica in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

import aiohttp
from aiohttp import web

from benchmarks.chaos_metrics import metric_sum, router_usage
from benchmarks.chaos_rig import MODEL, start_router, start_sims, stop_fleet
from benchmarks.chaos_settings import Settings
from benchmarks.loadgen import make_client, send
from benchmarks.procs import Processes
from benchmarks.stats import percentile
from engines.sim.process import free_port

POOL_TIMEOUT_S = 2.0


# -- flood: connections over the cap ----------------------------------------------------------

async def flood_run(settings: Settings, procs: Processes) -> dict[str, Any]:
    sims = await start_sims(2, 50.0)
    config: dict[str, Any] = {"models": [{"name": MODEL, "backends": [s.url for s in sims]}],
                              "server": {"max_connections": settings.flood_cap, "header_timeout": 30}}
    router, url = await start_router(settings, procs, "flood", config)
    idle_rss, idle_fds = router_usage(router.pid)
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    answers: dict[str, int] = {}
    health: list[int | None] = []
    try:
        t0 = time.monotonic()
        for _ in range(settings.flood_connections):
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect((host, port))
            socks.append(sock)
        await asyncio.sleep(0.5)
        _, peak_fds = router_usage(router.pid)

        async def read(sock: socket.socket) -> str:
            data = b""
            with contextlib.suppress(TimeoutError, OSError):
                async with asyncio.timeout(3):
                    while chunk := await loop.sock_recv(sock, 4096):
                        data += chunk
            return data[:12].decode(errors="replace") or "held open"

        async def probe() -> None:
            async with aiohttp.ClientSession() as http:
                for _ in range(5):
                    try:
                        async with http.get(url + "/health", timeout=aiohttp.ClientTimeout(total=3)) as r:
                            health.append(r.status)
                    except (aiohttp.ClientError, TimeoutError):
                        health.append(None)
                    await asyncio.sleep(0.2)

        probing = asyncio.create_task(probe())
        results = await asyncio.gather(*(read(s) for s in socks))
        answered_s = time.monotonic() - t0
        await probing
        for r in results:
            answers[r] = answers.get(r, 0) + 1
        for sock in socks:
            sock.close()
        await asyncio.sleep(1.0)
        after_rss, after_fds = router_usage(router.pid)
    finally:
        for sock in socks:
            sock.close()
        await stop_fleet(procs, router, sims)
    return {"connections": settings.flood_connections, "cap": settings.flood_cap, "answers": answers,
            "all_read_within_s": round(answered_s, 2), "router_fds_idle": idle_fds,
            "router_fds_peak": peak_fds, "router_fds_1s_after_close": after_fds,
            "health_during": health, "router_rss_mb": round(after_rss, 1)}


# -- pool: waiting for an upstream connection -------------------------------------------------

async def pool_run(settings: Settings, procs: Processes) -> dict[str, Any]:
    sims = await start_sims(2, 1.0, ["--max-num-seqs", "256"])
    config: dict[str, Any] = {"models": [{"name": MODEL, "backends": [s.url for s in sims]}],
                              "proxy": {"max_connections": settings.pool_size, "pool_timeout": POOL_TIMEOUT_S}}
    router, url = await start_router(settings, procs, "pool", config)
    short: list[tuple[float, int | None, str | None]] = []
    try:
        async with make_client() as http:
            async def long(i: int) -> dict[str, Any]:
                record, _, _ = await send(http, url + "/v1/completions", {
                    "model": MODEL, "prompt": f"long stream {i}", "max_tokens": 1500, "stream": True},
                    {}, 300.0)
                return record

            streams = [asyncio.create_task(long(i)) for i in range(2 * settings.pool_size)]
            await asyncio.sleep(1.0)
            async def brief(i: int) -> None:
                started = time.monotonic()
                try:
                    async with http.post(url + "/v1/completions", json={
                            "model": MODEL, "prompt": f"short {i}", "max_tokens": 2},
                            timeout=aiohttp.ClientTimeout(total=60)) as r:
                        await r.read()
                        short.append((time.monotonic() - started, r.status, r.headers.get("Retry-After")))
                except (aiohttp.ClientError, TimeoutError) as exc:
                    short.append((time.monotonic() - started, None, type(exc).__name__))

            await asyncio.gather(*(brief(i) for i in range(10)))
            long_records = await asyncio.gather(*streams)
            async with http.get(url + "/metrics") as r:
                text = await r.text()
    finally:
        await stop_fleet(procs, router, sims)
    waits = [s[0] for s in short]
    statuses: dict[str, int] = {}
    for _, status, _ in short:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {"pool": settings.pool_size, "pool_timeout_s": POOL_TIMEOUT_S, "long_streams": 2 * settings.pool_size,
            "long_statuses": {str(k): sum(1 for r in long_records if r["status"] == k)
                              for k in sorted({r["status"] for r in long_records}, key=str)},
            "short_requests": len(short), "short_statuses": statuses,
            "short_retry_after": sorted({str(s[2]) for s in short}),
            "short_wait_max_s": round(max(waits), 2) if waits else None,
            "short_wait_p50_s": round(percentile(waits, 50) or 0, 2),
            "pool_timeouts_counted": metric_sum(text, "router_upstream_pool_timeouts_total")}


# -- bodies: memory per in-flight request body ------------------------------------------------

class Sink:
    """A replica that reads each request body whole, then holds its answer until `release`."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.release = asyncio.Event()
        self.received = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> Sink:
        app = web.Application(client_max_size=self.max_body)
        app.router.add_get("/health", lambda r: web.Response(text="ok"))
        app.router.add_get("/v1/models", lambda r: web.json_response(
            {"object": "list", "data": [{"id": MODEL, "object": "model", "max_model_len": 1 << 30}]}))
        app.router.add_get("/metrics", lambda r: web.Response(text=""))
        app.router.add_post("/v1/completions", self._complete)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def _complete(self, request: web.Request) -> web.Response:
        await request.read()
        self.received += 1
        await self.release.wait()
        return web.json_response({"id": "x", "object": "text_completion", "model": MODEL,
                                  "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}]})

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()


async def bodies_run(settings: Settings, procs: Processes) -> dict[str, Any]:
    size = settings.body_mib * 2 ** 20
    sink = await Sink(size + 2 ** 20).start()
    config: dict[str, Any] = {"models": [{"name": MODEL, "backends": [sink.url]}],
                              "server": {"max_body_bytes": size + 2 ** 20,
                                         "max_inflight_body_bytes": settings.body_count * (size + 2 ** 20)}}
    router, url = await start_router(settings, procs, "bodies", config)
    prompt = "x" * (size - 100)
    payload = b'{"model": "' + MODEL.encode() + b'", "max_tokens": 1, "prompt": "' + prompt.encode() + b'"}'
    del prompt
    idle_rss, _ = router_usage(router.pid)
    peak = idle_rss
    statuses: list[int] = []
    try:
        stop = asyncio.Event()

        async def watch() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, router_usage(router.pid)[0])
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        async with make_client() as http:
            async def one() -> None:
                async with http.post(url + "/v1/completions", data=payload,
                                     headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    statuses.append(r.status)

            sending = [asyncio.create_task(one()) for _ in range(settings.body_count)]
            deadline = time.monotonic() + 120
            while sink.received < settings.body_count and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # every body held by the router and the sink at once
            held_rss = router_usage(router.pid)[0]
            sink.release.set()
            await asyncio.gather(*sending)
        stop.set()
        await watcher
    finally:
        procs.stop(router)
        await sink.stop()
    in_flight_mib = settings.body_count * size / 2 ** 20
    return {"bodies": settings.body_count, "body_mib": settings.body_mib, "statuses": statuses,
            "router_idle_rss_mb": round(idle_rss, 1), "router_peak_rss_mb": round(peak, 1),
            "router_rss_while_held_mb": round(held_rss, 1),
            "peak_per_body_mib": round((peak - idle_rss) / in_flight_mib, 2),
            "held_per_body_mib": round((held_rss - idle_rss) / in_flight_mib, 2)}
