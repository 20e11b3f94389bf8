"""The faults experiment: one replica made sick under steady load, and what clients saw.

Steady Poisson load of short streams; after a quiet baseline one replica is made sick for
`fault_s` (SIGKILLed, SIGSTOPped, answering 500 or 429, 10x slower, or flapping), then
healed.  Per fault: requests lost, TTFT before and during, the time to reroute as a client
sees it, and the sick replica's share of attempts (the router's counters, sampled every
0.1 s).  Injecting a fault, running the load around it and summarizing it are one story,
told here.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from benchmarks.chaos_metrics import attempts, error_counts, ms
from benchmarks.chaos_rig import GROUPS, MODEL, start_rig, stop_rig
from benchmarks.chaos_settings import Settings
from benchmarks.loadgen import make_client, send
from benchmarks.procs import Processes
from benchmarks.stats import percentile
from engines.sim.process import SimProcess


async def inject(kind: str, sim: SimProcess, http: aiohttp.ClientSession,
                 stop: asyncio.Event) -> Callable[[], Awaitable[None]]:
    """Make `sim` sick in the way `kind` says; returns the coroutine function that heals it."""
    async def nothing() -> None:
        return None

    if kind == "kill":
        await sim.kill()
        return nothing
    if kind == "stop":
        sim.pause()

        async def cont() -> None:
            sim.resume()
        return cont
    if kind in ("status_500", "status_429", "slow"):
        faults: dict[str, Any] = {"slow_factor": 10.0} if kind == "slow" else {
            "fail_rate": 1.0, "fail_status": int(kind[-3:]),
            "fail_retry_after": 5 if kind == "status_429" else None}
        await sim.set_faults(http, **faults)

        async def clear() -> None:
            await sim.set_faults(http, fail_rate=0.0, slow_factor=1.0, fail_retry_after=None)
        return clear
    if kind == "flap":
        async def flap() -> None:
            while not stop.is_set():
                sim.pause()
                await asyncio.sleep(1.0)
                sim.resume()
                await asyncio.sleep(1.0)
        task = asyncio.create_task(flap())

        async def settle() -> None:
            stop.set()
            await task
            sim.resume()
        return settle
    raise ValueError(kind)


async def fault_run(settings: Settings, procs: Processes, kind: str) -> dict[str, Any]:
    rig = await start_rig(settings, procs, f"fault-{kind}")
    sick = rig.sims[0]
    sick_id = sick.url  # the replica label of the router's metrics
    rng = random.Random(7)
    records: list[dict[str, Any]] = []
    samples: list[tuple[float, dict[str, float]]] = []
    stop_sampling = asyncio.Event()
    total_s = settings.baseline_s + settings.fault_s + settings.recovery_s
    try:
        async with make_client() as http:
            t0 = time.monotonic()

            async def sample() -> None:
                while not stop_sampling.is_set():
                    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                        async with http.get(rig.url + "/metrics",
                                            timeout=aiohttp.ClientTimeout(total=2)) as r:
                            samples.append((time.monotonic() - t0, attempts(await r.text())))
                    await asyncio.sleep(0.1)

            async def one(i: int) -> None:
                started = time.monotonic() - t0
                body = {"model": MODEL, "prompt": f"{rng.choice(GROUPS)} Question {i}: why?",
                        "max_tokens": settings.max_tokens, "stream": True}
                record, _, _ = await send(http, rig.url + "/v1/completions", body, {}, 120.0)
                record["t"] = started
                records.append(record)

            sampler = asyncio.create_task(sample())
            tasks: list[asyncio.Task] = []
            heal: Callable[[], Awaitable[None]] | None = None
            stop_flap = asyncio.Event()
            injected = healed = None
            i = 0
            next_at = 0.0
            while (now := time.monotonic() - t0) < total_s:
                if injected is None and now >= settings.baseline_s:
                    heal = await inject(kind, sick, http, stop_flap)
                    injected = time.monotonic() - t0
                if healed is None and heal is not None and now >= settings.baseline_s + settings.fault_s:
                    await heal()
                    healed = time.monotonic() - t0
                if now >= next_at:
                    tasks.append(asyncio.create_task(one(i)))
                    i += 1
                    next_at += rng.expovariate(settings.rate)
                await asyncio.sleep(max(0.0, min(next_at - now, 0.02)))
            if healed is None and heal is not None:
                await heal()
                healed = time.monotonic() - t0
            await asyncio.gather(*tasks)
            stop_sampling.set()
            await sampler
    finally:
        await stop_rig(rig, procs)
    assert injected is not None and healed is not None
    return summarize_fault(kind, records, samples, sick_id, injected, healed, settings)


def summarize_fault(kind: str, records: list[dict[str, Any]], samples: list[tuple[float, dict[str, float]]],
                    sick_id: str, injected: float, healed: float, settings: Settings) -> dict[str, Any]:
    def window(lo: float, hi: float) -> list[dict[str, Any]]:
        return [r for r in records if lo <= r["t"] < hi]

    def ttft(rs: list[dict[str, Any]], q: float) -> float | None:
        return ms(percentile([r["ttft_s"] for r in rs if r["ttft_s"] is not None], q))

    errors = error_counts(records)
    lost = sum(errors.values())
    base, sick = window(0, injected), window(injected, healed)
    # The sick replica's attempts over time (answers it started plus failovers away from it).
    timeline = [(round(t, 2), counts.get(sick_id, 0.0), sum(counts.values())) for t, counts in samples]
    base_p99 = percentile([r["ttft_s"] for r in base if r["ttft_s"] is not None], 99) or 0.0
    slow_s = 3 * base_p99 + 0.05
    suffered = [r["t"] for r in sick if r["status"] != 200 or r["error"]
                or r["ttft_s"] is None or r["ttft_s"] > slow_s]

    def share(lo: float, hi: float) -> float | None:
        points = [(v, tot) for t, v, tot in timeline if lo <= t <= hi]
        if len(points) < 2 or points[-1][1] <= points[0][1]:
            return None
        return round((points[-1][0] - points[0][0]) / (points[-1][1] - points[0][1]), 3)

    return {
        "fault": kind, "requests": len(records), "lost": lost, "errors": errors,
        "injected_s": round(injected, 2), "healed_s": round(healed, 2),
        "ttft_p50_ms_before": ttft(base, 50), "ttft_p99_ms_before": ttft(base, 99),
        "ttft_p50_ms_during": ttft(sick, 50), "ttft_p99_ms_during": ttft(sick, 99),
        "e2e_p99_ms_during": ms(percentile([r["e2e_s"] for r in sick if r["e2e_s"]], 99)),
        "reroute_s": round(max(suffered) - injected, 2) if suffered else 0.0,
        "suffered": len(suffered), "suffered_above_ms": ms(slow_s),
        "sick_share_before": share(0, injected), "sick_share_during": share(injected, healed),
        "timeline": timeline,
        "ttfts": [(round(r["t"], 3), r["ttft_s"], bool(r["error"] or r["status"] != 200))
                  for r in records],
    }
