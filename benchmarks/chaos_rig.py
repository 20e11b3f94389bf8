"""The system under test of every chaos experiment: simulated replicas behind a real router.

Each experiment starts its own fleet of `SimProcess` replicas and a real `python -m router`
process on a config written under OUTPUT/configs/ (logs under OUTPUT/logs/), waits until
the router routes, and stops all of it afterwards whatever happened.  Starting and
stopping that rig is the one thing the experiments share, so it is here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from benchmarks.chaos_settings import Settings
from benchmarks.procs import Proc, Processes
from engines.sim.process import SimProcess, free_port

MODEL = "chaos-model"
GROUPS = [f"You are assistant number {g}. " + "Follow the house rules carefully. " * 12
          for g in range(32)]


@dataclass
class Rig:
    sims: list[SimProcess]
    router: Proc
    url: str

    @property
    def pid(self) -> int:
        return self.router.pid


async def start_sims(n: int, time_scale: float, args: list[str] | None = None) -> list[SimProcess]:
    sims = [SimProcess(model=MODEL, time_scale=time_scale, args=list(args or []), startup_timeout=60)
            for _ in range(n)]
    await asyncio.gather(*(s.start() for s in sims))
    return sims


def launch_router(output: Path, procs: Processes, name: str, config: dict[str, Any]) -> Proc:
    """A router process on `config`, written to OUTPUT/configs/routes-NAME.yaml."""
    path = output / "configs" / f"routes-{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return procs.start(f"router-{name}", [sys.executable, "-m", "router", "--config", str(path)],
                       log_path=output / "logs" / f"router-{name}.log")


async def poll_router(router: Proc, http: aiohttp.ClientSession,
                      probe: Callable[[aiohttp.ClientSession], Awaitable[bool]], failure: str) -> None:
    """Every 0.2 s until `probe` says yes; raises if the router exits or 60 s pass."""
    deadline = time.monotonic() + 60
    while True:
        if not router.alive():
            raise RuntimeError(f"router exited:\n{router.log_tail()}")
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            if await probe(http):
                break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{failure}:\n{router.log_tail()}")
        await asyncio.sleep(0.2)


async def start_rig(settings: Settings, procs: Processes, name: str, *,
                    sim_args: list[str] | None = None, time_scale: float | None = None,
                    router_extra: dict[str, Any] | None = None) -> Rig:
    """`settings.replicas` replicas behind a cache_aware router, once it answers a completion."""
    sims = await start_sims(settings.replicas, time_scale or settings.time_scale, sim_args)
    port = free_port()
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "access_log": False, "log_level": "warning"},
        "models": [{"name": MODEL, "backends": [s.url for s in sims]}],
        "routing": {"policy": "cache_aware"},
    }
    for key, value in (router_extra or {}).items():
        config[key] = {**config.get(key, {}), **value}
    router = launch_router(settings.output, procs, name, config)
    rig = Rig(sims, router, f"http://127.0.0.1:{port}")

    async def routes(http: aiohttp.ClientSession) -> bool:
        async with http.post(rig.url + "/v1/completions", json={
                "model": MODEL, "prompt": "ping", "max_tokens": 1},
                timeout=aiohttp.ClientTimeout(total=5)) as r:
            return r.status == 200

    async with aiohttp.ClientSession() as http:
        await poll_router(router, http, routes, "router not routing")
        await asyncio.sleep(1.5)  # every replica probed healthy at least twice
    return rig


async def start_router(settings: Settings, procs: Processes, name: str,
                       config: dict[str, Any]) -> tuple[Proc, str]:
    """A router process on `config` (its `server` section on a free local port), once it is ready."""
    port = free_port()
    config = {**config, "server": {"host": "127.0.0.1", "port": port, "access_log": False,
                                   "log_level": "warning", **config.get("server", {})}}
    router = launch_router(settings.output, procs, name, config)
    url = f"http://127.0.0.1:{port}"

    async def ready(http: aiohttp.ClientSession) -> bool:
        async with http.get(url + "/ready", timeout=aiohttp.ClientTimeout(total=2)) as r:
            return r.status == 200

    async with aiohttp.ClientSession() as http:
        await poll_router(router, http, ready, "router not ready")
    await asyncio.sleep(1.0)  # every replica probed healthy at least twice
    return router, url


async def stop_fleet(procs: Processes, router: Proc, sims: list[SimProcess]) -> None:
    """Stop the router, then every replica (a paused one is resumed first so it can exit)."""
    procs.stop(router)
    for sim in sims:
        sim.resume()
    await asyncio.gather(*(s.stop() for s in sims), return_exceptions=True)
    for sim in sims:
        sim._cleanup_log()


async def stop_rig(rig: Rig, procs: Processes) -> None:
    await stop_fleet(procs, rig.router, rig.sims)
