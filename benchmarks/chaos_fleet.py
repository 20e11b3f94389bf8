"""The fleet changing under load: backends swapped by reloads, a replica alive but slow.

* **reload**: open-loop load (``--reload-rate`` requests/s) while a ``POST /admin/reload``
  every second swaps the config file's backends between two sets of replicas: requests
  that did not end in a complete 200 (the goal: none; a reload is make-before-break).
* **slow**: one replica of four made 20x slower (the simulator's ``slow_factor``), under
  steady load, for each policy in ``slow_policies``: TTFT p50/p99 of a healthy fleet, of the
  slow fleet with neither latency ejection nor hedging (the defect as found), with latency
  ejection alone (the default) and with hedging on too, and the extra attempts hedging
  sent (``router_hedges_total`` over requests).

Both run a real ``python -m router`` process (uvloop, the production path) with simulated
replicas, under the open-loop Poisson load defined here.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from typing import Any

import aiohttp
import yaml

from benchmarks.chaos_metrics import error_counts, metric_sum, ms
from benchmarks.chaos_rig import MODEL, start_router, start_sims, stop_fleet
from benchmarks.chaos_settings import Settings
from benchmarks.loadgen import make_client, send
from benchmarks.procs import Processes
from benchmarks.stats import percentile

SLOW_FACTOR = 20.0


async def _open_loop(url: str, rate: float, seconds: float, body: Any,
                     rng: random.Random, on_tick: Any = None) -> list[dict[str, Any]]:
    """Poisson arrivals of `body(i)` for `seconds`; `on_tick(elapsed)` runs between them."""
    records: list[dict[str, Any]] = []
    async with make_client() as http:
        t0 = time.monotonic()

        async def one(i: int) -> None:
            record, _, _ = await send(http, url + "/v1/completions", body(i), {}, 120.0)
            record["t"] = time.monotonic() - t0
            records.append(record)

        tasks: list[asyncio.Task[None]] = []
        next_at, i = 0.0, 0
        while (now := time.monotonic() - t0) < seconds:
            if on_tick is not None:
                await on_tick(now, http)
            if now >= next_at:
                tasks.append(asyncio.create_task(one(i)))
                i += 1
                next_at += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, min(next_at - now, 0.01)))
        await asyncio.gather(*tasks)
    return records


# -- reload: backends swapped under load ------------------------------------------------------

async def reload_run(settings: Settings, procs: Processes) -> dict[str, Any]:
    sims = await start_sims(4, settings.time_scale)
    sets = ([s.url for s in sims[:2]], [s.url for s in sims[2:]])
    base: dict[str, Any] = {"models": [{"name": MODEL, "backends": sets[0]}],
                            "routing": {"policy": "cache_aware"}}
    router, url = await start_router(settings, procs, "reload", base)
    path = settings.output / "configs" / "routes-reload.yaml"
    written = yaml.safe_load(path.read_text())
    reloads: list[int] = []
    state = {"next": 1.0, "set": 0}

    async def tick(now: float, http: aiohttp.ClientSession) -> None:
        if now < state["next"]:
            return
        state["next"] += 1.0
        state["set"] ^= 1
        written["models"][0]["backends"] = sets[state["set"]]
        path.write_text(yaml.safe_dump(written, sort_keys=False))
        async with http.post(url + "/admin/reload") as r:
            reloads.append(r.status)

    rng = random.Random(11)
    try:
        records = await _open_loop(
            url, settings.reload_rate, settings.reload_s,
            lambda i: {"model": MODEL, "prompt": f"Reload {i % 40}: tell me more", "max_tokens": 8},
            rng, tick)
    finally:
        await stop_fleet(procs, router, sims)
    errors = error_counts(records)
    ttfts = [r["ttft_s"] for r in records if r["ttft_s"]]
    return {"rate": settings.reload_rate, "seconds": settings.reload_s, "requests": len(records),
            "failed": sum(errors.values()), "errors": errors, "reloads": len(reloads),
            "reloads_ok": sum(1 for s in reloads if s == 200),
            "latency_p50_ms": ms(percentile(ttfts, 50)), "latency_p99_ms": ms(percentile(ttfts, 99))}


# -- slow: one replica 20x slower, with and without hedging -----------------------------------

SLOW_CASES = (
    ("healthy", False, {}),
    ("healthy, hedging on", False, {"proxy": {"hedge": {"enabled": True}}}),  # what hedging costs
    ("slow, no latency ejection, no hedging", True, {"circuit_breaker": {"latency_factor": 0}}),
    ("slow, latency ejection (default)", True, {}),
    ("slow, latency ejection + hedging", True, {"proxy": {"hedge": {"enabled": True}}}),
)


async def slow_run(settings: Settings, procs: Processes) -> list[dict[str, Any]]:
    rows = []
    for policy in settings.slow_policies:
        for case, slow, extra in SLOW_CASES:
            print(f"chaos: slow replica, {policy}, {case}", file=sys.stderr)
            rows.append(await _slow_case(settings, procs, policy, case, slow, extra))
    return rows


async def _slow_case(settings: Settings, procs: Processes, policy: str, case: str, slow: bool,
                     extra: dict[str, Any]) -> dict[str, Any]:
    sims = await start_sims(4, 1.0)  # real time (H100-calibrated): TTFTs of tens of ms, as in production
    config: dict[str, Any] = {"models": [{"name": MODEL, "backends": [s.url for s in sims]}],
                              "routing": {"policy": policy}, **extra}
    name = f"slow-{policy}-{SLOW_CASES.index(next(c for c in SLOW_CASES if c[0] == case))}"
    router, url = await start_router(settings, procs, name, config)
    rng = random.Random(5)
    prompts = [f"Agent {g}: " + "You follow the house rules. " * 10 for g in range(16)]
    try:
        async with make_client() as http:
            if slow:
                await sims[0].set_faults(http, slow_factor=SLOW_FACTOR)
        records = await _open_loop(
            url, settings.rate, settings.slow_s,
            lambda i: {"model": MODEL, "prompt": f"{prompts[i % len(prompts)]} Task {i}",
                       "max_tokens": settings.max_tokens, "stream": True}, rng)
        async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as r:
            text = await r.text()
    finally:
        await stop_fleet(procs, router, sims)
    ttfts = [r["ttft_s"] for r in records if r["ttft_s"]]
    hedges = metric_sum(text, "router_hedges_total")
    return {"policy": policy, "case": case, "requests": len(records),
            "failed": sum(error_counts(records).values()),
            "ttft_p50_ms": ms(percentile(ttfts, 50)), "ttft_p99_ms": ms(percentile(ttfts, 99)),
            "hedges": hedges, "extra_load": round(hedges / max(1, len(records)), 3),
            "latency_ejections": metric_sum(text, "router_outlier_ejections_total")}
