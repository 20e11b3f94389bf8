"""`router --workers N` (router/workers.py): N router processes behind one listening socket.

Against real simulated replicas and the real command: the workers share the port (both
answer, on one URL); /metrics counts every worker's requests whichever worker answers; a
worker killed with SIGKILL is restarted, and no request is lost that had not started on
it (each request opens its own connection, so a request lost is one the dead worker had
accepted); SIGTERM to the supervisor drains every worker's streams, then exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from conftest import MODEL, metric_value, routes

ROOT = Path(__file__).resolve().parents[2]


class Supervised:
    """`python -m router --workers N` in its own session (cleanup kills the whole group)."""

    def __init__(self, config: dict, tmp_path: Path, workers: int,
                 env: dict[str, str] | None = None) -> None:
        path = tmp_path / "routes.yaml"
        path.write_text(yaml.safe_dump(config))
        self.log_path = tmp_path / "router.log"
        self.url = f"http://127.0.0.1:{config['server']['port']}"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "router", "--config", str(path), "--workers", str(workers)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def workers_seen(self, http: aiohttp.ClientSession, want: int, timeout: float = 30.0) -> dict[int, int]:
        """{worker index: pid} once `want` distinct workers answered /admin/replicas."""
        seen: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        while len(seen) < want:
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, f"saw only workers {seen}:\n{self.log()}"
            try:
                async with http.get(self.url + "/admin/replicas", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        worker = (await r.json())["worker"]
                        seen[worker["index"]] = worker["pid"]
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.05)
        return seen

    async def all_ready(self, http: aiohttp.ClientSession, timeout: float = 30.0) -> None:
        """Until /ready answers 200 ten times in a row (from whichever workers accept)."""
        deadline, streak = time.monotonic() + timeout, 0
        while streak < 10:
            assert time.monotonic() < deadline, f"not ready:\n{self.log()}"
            try:
                async with http.get(self.url + "/ready", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    streak = streak + 1 if r.status == 200 else 0
            except (TimeoutError, aiohttp.ClientError):
                streak = 0
            await asyncio.sleep(0.02)

    async def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"supervisor still running:\n{self.log()}"
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture
def supervised(tmp_path):
    started: list[Supervised] = []

    def factory(config: dict, workers: int = 2, env: dict[str, str] | None = None) -> Supervised:
        proc = Supervised(config, tmp_path, workers, env)
        started.append(proc)
        return proc

    yield factory
    for proc in started:
        proc.kill()


def fresh_session() -> aiohttp.ClientSession:
    """A new connection per request: the kernel hands each to whichever worker accepts."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                 timeout=aiohttp.ClientTimeout(total=30))


async def complete(http: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int = 4) -> int:
    async with http.post(url + "/v1/completions",
                         json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}) as resp:
        await resp.read()
        return resp.status


async def test_workers_share_the_port_and_metrics_sum_over_them(make_sim, unused_port, supervised):
    sim = await make_sim(time_scale=50)
    proc = supervised(routes([sim.url], server={"port": unused_port}))
    async with fresh_session() as http:
        pids = await proc.workers_seen(http, 2)
        await proc.all_ready(http)
        assert len(set(pids.values())) == 2 and proc.proc.pid not in pids.values()
        statuses = await asyncio.gather(*(complete(http, proc.url, f"request {i} " * 8) for i in range(40)))
        assert statuses == [200] * 40
        # Whichever worker answers /metrics, it counts all 40.
        for _ in range(6):
            async with http.get(proc.url + "/metrics") as resp:
                text = await resp.text()
            assert metric_value(text, "router_requests_total", model=MODEL, replica=sim.url,
                                status="200") == 40, text


async def test_a_killed_worker_is_restarted_and_only_its_own_requests_fail(make_sim, unused_port, supervised):
    # Each request takes ~0.3 s on the replica, so the killed worker holds a few in flight.
    sim = await make_sim(time_scale=1, args=["--max-num-seqs", "256"])
    proc = supervised(routes([sim.url], server={"port": unused_port}))
    outcomes: list[int | str] = []
    # Each failure: (client, turn, seconds from its send to the kill, seconds it took), so a
    # failure shows whether the request was sent before the kill (the dead worker's) or after.
    failures: list[tuple[int, int, float, float]] = []
    killed_at = [0.0]
    stop = asyncio.Event()

    async def client(i: int) -> None:
        async with fresh_session() as http:
            n = 0
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    outcomes.append(await complete(http, proc.url, f"client {i} turn {n} " * 8, max_tokens=40))
                except aiohttp.ClientError as exc:
                    outcomes.append(type(exc).__name__)
                    failures.append((i, n, round(killed_at[0] - sent, 3), round(time.monotonic() - sent, 3)))
                n += 1

    async with fresh_session() as http:
        before = await proc.workers_seen(http, 2)
        await proc.all_ready(http)
        clients = [asyncio.create_task(client(i)) for i in range(8)]
        await asyncio.sleep(1.5)
        killed_at[0] = time.monotonic()
        os.kill(before[0], signal.SIGKILL)
        # The supervisor starts a new worker 0 (another pid) that serves again.
        deadline = time.monotonic() + 30
        while True:
            now = await proc.workers_seen(http, 2)
            if now[0] != before[0]:
                break
            assert time.monotonic() < deadline, proc.log()
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*clients)
    failed = [o for o in outcomes if o != 200]
    # At most what worker 0 had accepted when it died: 8 clients, one request each at a time.
    assert len(failed) <= 8, (failed, failures, proc.log()[-3000:])
    assert len(outcomes) - len(failed) >= 16
    assert "worker 0" in proc.log() and "restarting" in proc.log()


async def test_sigterm_drains_every_worker_then_exits_0(make_sim, unused_port, supervised):
    sim = await make_sim(time_scale=1, args=["--max-num-seqs", "256"])
    proc = supervised(routes([sim.url], server={"port": unused_port, "drain_timeout": 20}))

    async def stream(http: aiohttp.ClientSession, i: int) -> bytes:
        async with http.post(proc.url + "/v1/completions",
                             json={"model": MODEL, "prompt": f"stream {i} " * 8, "max_tokens": 150,
                                   "stream": True}) as resp:
            assert resp.status == 200
            return await resp.read()

    async with fresh_session() as http:
        await proc.workers_seen(http, 2)
        await proc.all_ready(http)
        streams = [asyncio.create_task(stream(http, i)) for i in range(12)]
        await asyncio.sleep(0.5)  # every stream under way (150 tokens take > 1 s)
        proc.proc.send_signal(signal.SIGTERM)
        bodies = await asyncio.gather(*streams)
    assert all(b.rstrip().endswith(b"data: [DONE]") and b'"error"' not in b for b in bodies)
    assert await proc.wait_exit(30) == 0, proc.log()
    async with fresh_session() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await complete(http, proc.url, "after the drain")


async def test_workers_with_a_launch_block_serve_the_launched_fleet(tmp_path, unused_port, supervised):
    """The README's `router --config config/routes.yaml --workers 2` shape: the supervisor
    launches the engines once and every worker routes to them (it used to hang with no
    worker: the launched backends could not be encoded for the workers)."""
    config = {
        "server": {"host": "127.0.0.1", "port": unused_port, "drain_timeout": 2},
        "launch": {"models": [{"name": "sim-l", "kind": "sim", "replicas": 2,
                               "sim": {"time_scale": 50}}], "ready_timeout": 60},
        "models": [{"name": "sim-l", "aliases": ["launched"]}],
        "routing": {"policy": "round_robin"},
        "health": {"interval": 0.1},
    }
    proc = supervised(config, workers=2)
    async with fresh_session() as http:
        await proc.workers_seen(http, 2, timeout=90)
        await proc.all_ready(http, timeout=60)
        urls: set[str] = set()
        for _ in range(8):
            async with http.get(proc.url + "/admin/replicas") as r:
                urls |= {rep["url"] for rep in (await r.json())["replicas"]}
            async with http.post(proc.url + "/v1/completions",
                                 json={"model": "launched", "prompt": "hi", "max_tokens": 2}) as r:
                assert r.status == 200, await r.text()
        assert len(urls) == 2  # both workers see the same two launched replicas
    proc.proc.send_signal(signal.SIGTERM)
    assert await proc.wait_exit(30) == 0, proc.log()


async def test_a_supervisor_whose_workers_cannot_start_exits_non_zero(tmp_path, make_sim, unused_port,
                                                                      supervised):
    """Workers that die at start (here: a sitecustomize that exits in worker processes
    only) make the supervisor say why and exit 1, releasing the port, instead of holding
    it with no worker while clients wait."""
    sim = await make_sim()
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\nif os.environ.get('ROUTER_WORKER_INDEX'):\n"
        "    sys.stderr.write('worker cannot start (test)\\n'); sys.stderr.flush(); os._exit(3)\n")
    config = routes([sim.url], server={"host": "127.0.0.1", "port": unused_port})
    proc = supervised(config, workers=2, env={"PYTHONPATH": f"{site}{os.pathsep}{ROOT}"})
    assert await proc.wait_exit(60) == 1, proc.log()
    log = proc.log()
    assert "every worker died" in log and "exit status 3" in log, log
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", unused_port))
