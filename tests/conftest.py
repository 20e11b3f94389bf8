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
import socket
import time
from typing import Any, Awaitable, Callable, Sequence

import aiohttp
import pytest

from engines.sim.process import SimProcess
from router.app import Router, Server, serve
from router.config import Config, parse_config
from router.fleet import Health

MODEL = "sim-a"
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
