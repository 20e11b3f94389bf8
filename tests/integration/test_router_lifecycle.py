"""The `router` process: SIGTERM drain, exit status, and the `launch:` block."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Tell me a long story about routers. " * 4


class RouterProcess:
    """`python -m router --config FILE` as a child; stopped by its own pid only."""

    def __init__(self, config: dict, tmp_path: Path, cwd: Path = ROOT) -> None:
        self.config_path = tmp_path / "routes.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp_path / "router.log"
        self.port = config["server"]["port"]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> RouterProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "router", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.cwd,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_ready(self, http: aiohttp.ClientSession, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            try:
                async with http.get(self.url + "/ready", timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == 200:
                        return
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.05)
        raise AssertionError(f"router not ready:\n{self.log()}")

    async def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"router still running:\n{self.log()}"
            await asyncio.sleep(0.02)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def router_process(tmp_path):
    started: list[RouterProcess] = []

    def factory(config: dict, cwd: Path = ROOT) -> RouterProcess:
        proc = RouterProcess(config, tmp_path, cwd).start()
        started.append(proc)
        return proc

    yield factory
    for proc in started:
        proc.kill()


async def refused(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as fresh:
            async with fresh.get(url + "/health", timeout=aiohttp.ClientTimeout(total=0.5)):
                return False
    except (TimeoutError, aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError):
        return True


async def test_sigterm_drains_in_flight_then_exits_0(make_sim, make_routes, unused_port,
                                                     router_process, http) -> None:
    sim = await make_sim(time_scale=1.0)
    config = make_routes([sim.url], server={"port": unused_port, "drain_timeout": 10,
                                            "log_format": "text"})
    router = router_process(config)
    await router.wait_ready(http)

    body = {"model": "sim-a", "prompt": PROMPT, "max_tokens": 150, "stream": True}
    async with aiohttp.ClientSession() as client:
        async with client.post(router.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            first = await r.content.readline()
            assert first.startswith(b"data: ")
            assert router.proc is not None
            router.proc.send_signal(signal.SIGTERM)
            # It stops accepting new connections...
            deadline = time.monotonic() + 2
            while not await refused(router.url):
                assert time.monotonic() < deadline, "router still accepts connections"
                await asyncio.sleep(0.05)
            # ...while the stream in flight runs to its end.
            rest = await r.read()
    assert rest.rstrip().endswith(b"data: [DONE]")
    assert b'"error"' not in rest
    assert await router.wait_exit(10) == 0
    assert "draining 1 in-flight request" in router.log()
    assert "Traceback" not in router.log()


async def test_drain_timeout_cuts_and_still_exits_0(make_sim, make_routes, unused_port,
                                                    router_process, http) -> None:
    sim = await make_sim(time_scale=1.0)
    config = make_routes([sim.url], server={"port": unused_port, "drain_timeout": 0.5})
    router = router_process(config)
    await router.wait_ready(http)
    body = {"model": "sim-a", "prompt": PROMPT, "max_tokens": 5000, "stream": True}
    async with aiohttp.ClientSession() as client:
        async with client.post(router.url + "/v1/completions", json=body) as r:
            await r.content.readline()
            assert router.proc is not None
            started = time.monotonic()
            router.proc.send_signal(signal.SIGTERM)
            raw = await r.read()
    # The cut stream still ends the way a stream that failed does: an error event, [DONE].
    events = [e[len(b"data: "):] for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    assert b"shut down" in events[-2] and b'"error"' in events[-2]
    assert await router.wait_exit(10) == 0
    assert time.monotonic() - started < 5
    # The abandoned request was aborted on the replica too.
    deadline = time.monotonic() + 2
    while (await sim.metrics(http)).get("vllm:num_requests_running", 0) != 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_launch_block_starts_and_stops_its_engines(tmp_path, unused_port, router_process,
                                                         http) -> None:
    config = {
        "server": {"host": "127.0.0.1", "port": unused_port, "drain_timeout": 2},
        "launch": {"models": [{"name": "sim-l", "kind": "sim", "replicas": 2,
                               "sim": {"time_scale": 50}}],
                   "ready_timeout": 60},
        "models": [{"name": "sim-l", "aliases": ["launched"]}],
        "routing": {"policy": "round_robin"},
        "health": {"interval": 0.1},
    }
    router = router_process(config, cwd=tmp_path)
    await router.wait_ready(http, timeout=60)
    async with http.get(router.url + "/admin/replicas") as r:
        replicas = (await r.json())["replicas"]
    urls = [rep["url"] for rep in replicas]
    assert len(urls) == 2 and all(rep["model"] == "sim-l" for rep in replicas)
    for _ in range(4):
        async with http.post(router.url + "/v1/completions",
                             json={"model": "launched", "prompt": "hi", "max_tokens": 2}) as r:
            assert r.status == 200
    assert router.proc is not None
    router.proc.send_signal(signal.SIGTERM)
    assert await router.wait_exit(30) == 0
    for url in urls:  # the launched replicas are gone with the router
        assert await refused(url), url
