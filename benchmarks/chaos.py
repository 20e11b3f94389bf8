"""`python -m benchmarks chaos`: the router under faults and hostile load, with figures.

Four experiments here (and five more in benchmarks/chaos_fleet.py: reloads, a slow
replica and hedging, a connection flood, the upstream pool, memory per body), each on a
fresh fleet of simulated replicas behind our router (a real
`python -m router` process with the production defaults for health, breakers, timeouts
and admission; only the access log is off):

* **faults**: steady Poisson load of short streams; after a quiet baseline one replica is
  made sick for a while: SIGKILLed (stays dead), SIGSTOPped (then SIGCONT), answering 500
  to everything, answering 429 with `Retry-After`, 10x slower, or flapping (1 s stopped,
  1 s running).  Per fault: requests lost (any answer that is not a complete 200), TTFT
  p50/p99 before and during the fault, the time to reroute as a client sees it (from the
  fault to the start of the last request that still suffered from it: failed, or a TTFT
  above 3x the baseline p99 plus 50 ms; 0 when none did), and the sick replica's share of
  attempts before and during the fault (the router's `router_policy_decisions` plus
  `router_failovers` counters, sampled every 0.1 s).
* **streams**: N concurrent streams opened at once: errors, the router's peak RSS and
  open file descriptors.
* **slowloris**: M connections that send a request head one byte every 2 s while normal
  requests run: how many the router still holds over time, and the normal requests'
  latency before and during.
* **prompts**: P unique prompts through the prefix index: the router's RSS every few
  thousand requests (it must plateau at the index bound, not grow).

Results: OUTPUT/results.json, OUTPUT/results.md and one PNG per experiment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.loadgen import make_client, send
from benchmarks.procs import Proc, Processes
from benchmarks.stats import percentile
from benchmarks.targets import versions
from engines.sim.process import SimProcess, free_port

MODEL = "chaos-model"
FAULTS = ("kill", "stop", "status_500", "status_429", "slow", "flap")
GROUPS = [f"You are assistant number {g}. " + "Follow the house rules carefully. " * 12
          for g in range(32)]


@dataclass
class Settings:
    output: Path
    replicas: int = 4
    time_scale: float = 5.0  # the simulator's schedule runs this much faster than real time
    rate: float = 20.0  # requests/s during the fault experiment
    max_tokens: int = 24
    baseline_s: float = 6.0
    fault_s: float = 12.0
    recovery_s: float = 6.0
    streams: int = 5000
    stream_tokens: int = 32
    slowloris: int = 1000
    slowloris_s: float = 30.0
    prompts: int = 100_000
    prompt_concurrency: int = 32
    reload_rate: float = 100.0  # requests/s while reloads swap the backends (chaos_fleet.py)
    reload_s: float = 20.0
    slow_s: float = 20.0  # seconds of load per case of the slow-replica experiment
    slow_policies: tuple[str, ...] = ("round_robin", "cache_aware")
    flood_connections: int = 1000
    flood_cap: int = 100  # server.max_connections during the flood
    pool_size: int = 20  # proxy.max_connections during the pool experiment
    body_mib: int = 32
    body_count: int = 8
    experiments: tuple[str, ...] = ("faults", "streams", "slowloris", "prompts",
                                    "reload", "slow", "flood", "pool", "bodies")
    faults: tuple[str, ...] = FAULTS
    command: str = ""


# -- the fleet and the router ---------------------------------------------------------------

@dataclass
class Rig:
    sims: list[SimProcess]
    router: Proc
    url: str

    @property
    def pid(self) -> int:
        return self.router.pid


async def start_rig(settings: Settings, procs: Processes, name: str, *,
                    sim_args: list[str] | None = None, time_scale: float | None = None,
                    router_extra: dict[str, Any] | None = None) -> Rig:
    sims = [SimProcess(model=MODEL, time_scale=time_scale or settings.time_scale,
                       args=list(sim_args or []), startup_timeout=60) for _ in range(settings.replicas)]
    await asyncio.gather(*(s.start() for s in sims))
    port = free_port()
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "access_log": False, "log_level": "warning"},
        "models": [{"name": MODEL, "backends": [s.url for s in sims]}],
        "routing": {"policy": "cache_aware"},
    }
    for key, value in (router_extra or {}).items():
        config[key] = {**config.get(key, {}), **value}
    path = settings.output / "configs" / f"routes-{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    router = procs.start(f"router-{name}", [sys.executable, "-m", "router", "--config", str(path)],
                         log_path=settings.output / "logs" / f"router-{name}.log")
    rig = Rig(sims, router, f"http://127.0.0.1:{port}")
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 60
        while True:
            if not router.alive():
                raise RuntimeError(f"router exited:\n{router.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with http.post(rig.url + "/v1/completions", json={
                        "model": MODEL, "prompt": "ping", "max_tokens": 1},
                        timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"router not routing:\n{router.log_tail()}")
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.5)  # every replica probed healthy at least twice
    return rig


async def stop_rig(rig: Rig, procs: Processes) -> None:
    procs.stop(rig.router)
    for sim in rig.sims:
        sim.resume()
    await asyncio.gather(*(s.stop() for s in rig.sims), return_exceptions=True)
    for sim in rig.sims:
        sim._cleanup_log()


def router_usage(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open file descriptors) of the router process."""
    try:
        p = psutil.Process(pid)
        return p.memory_info().rss / 2 ** 20, p.num_fds()
    except psutil.Error:
        return 0.0, 0


def attempts(text: str) -> dict[str, float]:
    """Attempts each replica has had, by its label, from a router's /metrics page: the
    answers it started (`router_policy_decisions`) plus the requests that left it for
    another replica (`router_failovers`)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("router_policy_decisions_total", "router_failovers_total"):
                replica = sample.labels["replica"]
                out[replica] = out.get(replica, 0.0) + sample.value
    return out


def error_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    """Requests that did not end in a complete 200, by their error (first 240 characters)."""
    counts: dict[str, int] = {}
    for r in records:
        if r["status"] != 200 or r["error"]:
            key = (r["error"] or f"http {r['status']}")[:240]
            counts[key] = counts.get(key, 0) + 1
    return counts


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


# -- experiment 1: faults -------------------------------------------------------------------

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
        return _ms(percentile([r["ttft_s"] for r in rs if r["ttft_s"] is not None], q))

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
        "e2e_p99_ms_during": _ms(percentile([r["e2e_s"] for r in sick if r["e2e_s"]], 99)),
        "reroute_s": round(max(suffered) - injected, 2) if suffered else 0.0,
        "suffered": len(suffered), "suffered_above_ms": _ms(slow_s),
        "sick_share_before": share(0, injected), "sick_share_during": share(injected, healed),
        "timeline": timeline,
        "ttfts": [(round(r["t"], 3), r["ttft_s"], bool(r["error"] or r["status"] != 200))
                  for r in records],
    }


# -- experiment 2: concurrent streams -------------------------------------------------------

async def streams_run(settings: Settings, procs: Processes,
                      router_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    rig = await start_rig(settings, procs, "streams", time_scale=1.0,
                          sim_args=["--max-num-seqs", str(settings.streams)],
                          router_extra=router_extra)
    peak_rss, peak_fds = router_usage(rig.pid)
    idle_rss, idle_fds = peak_rss, peak_fds
    series: list[tuple[float, float, int, int]] = []
    done = 0
    try:
        async with make_client() as http:
            t0 = time.monotonic()
            stop = asyncio.Event()

            async def watch() -> None:
                nonlocal peak_rss, peak_fds
                while not stop.is_set():
                    rss, fds = router_usage(rig.pid)
                    peak_rss, peak_fds = max(peak_rss, rss), max(peak_fds, fds)
                    series.append((round(time.monotonic() - t0, 2), round(rss, 1), fds, done))
                    await asyncio.sleep(0.25)

            async def one(i: int) -> dict[str, Any]:
                nonlocal done
                body = {"model": MODEL, "prompt": f"{GROUPS[i % len(GROUPS)]} Stream {i}",
                        "max_tokens": settings.stream_tokens, "stream": True}
                record, _, _ = await send(http, rig.url + "/v1/completions", body, {}, 300.0)
                done += 1
                return record

            watcher = asyncio.create_task(watch())
            records = await asyncio.gather(*(one(i) for i in range(settings.streams)))
            elapsed = time.monotonic() - t0
            stop.set()
            await watcher
    finally:
        await stop_rig(rig, procs)
    errors = error_counts(records)
    return {"streams": settings.streams, "ok": settings.streams - sum(errors.values()),
            "errors": errors, "elapsed_s": round(elapsed, 1),
            "ttft_p50_ms": _ms(percentile([r["ttft_s"] for r in records if r["ttft_s"]], 50)),
            "ttft_p99_ms": _ms(percentile([r["ttft_s"] for r in records if r["ttft_s"]], 99)),
            "router_idle_rss_mb": round(idle_rss, 1), "router_peak_rss_mb": round(peak_rss, 1),
            "router_idle_fds": idle_fds, "router_peak_fds": peak_fds, "series": series}


# -- experiment 3: slowloris ------------------------------------------------------------------

async def slowloris_run(settings: Settings, procs: Processes) -> dict[str, Any]:
    rig = await start_rig(settings, procs, "slowloris", time_scale=50.0)
    host, port = rig.url.removeprefix("http://").split(":")
    held = 0
    opened = 0
    refused = 0
    answers: dict[str, int] = {}
    latencies: list[tuple[float, float, int]] = []
    series: list[tuple[float, int, int]] = []
    lead_s = 8.0  # normal traffic alone first
    try:
        async with make_client() as http:
            t0 = time.monotonic()
            stop = asyncio.Event()

            async def loris() -> None:
                nonlocal held, opened, refused
                try:
                    reader, writer = await asyncio.open_connection(host, int(port))
                except OSError:
                    refused += 1
                    return
                opened += 1
                held += 1
                head = b"POST /v1/completions HTTP/1.1\r\nHost: router\r\nX-Slow: " + b"a" * 400
                try:
                    for byte in head:
                        if stop.is_set():
                            break
                        writer.write(bytes([byte]))
                        await writer.drain()
                        try:
                            data = await asyncio.wait_for(reader.read(200), 2.0)
                        except TimeoutError:
                            continue
                        status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "closed"
                        answers[status] = answers.get(status, 0) + 1
                        break
                except OSError:
                    answers["reset"] = answers.get("reset", 0) + 1
                finally:
                    held -= 1
                    writer.close()

            async def normal() -> None:
                i = 0
                while not stop.is_set():
                    t = time.monotonic() - t0
                    record, _, _ = await send(http, rig.url + "/v1/completions", {
                        "model": MODEL, "prompt": f"hello {i}", "max_tokens": 4}, {}, 30.0)
                    latencies.append((round(t, 2), record["e2e_s"] or 0.0,
                                      0 if record["status"] == 200 and not record["error"] else 1))
                    i += 1
                    await asyncio.sleep(0.1)

            async def watch() -> None:
                while not stop.is_set():
                    _, fds = router_usage(rig.pid)
                    series.append((round(time.monotonic() - t0, 2), held, fds))
                    await asyncio.sleep(0.5)

            tasks = [asyncio.create_task(normal()), asyncio.create_task(watch())]
            await asyncio.sleep(lead_s)
            lorises = [asyncio.create_task(loris()) for _ in range(settings.slowloris)]
            await asyncio.sleep(settings.slowloris_s)
            stop.set()
            await asyncio.gather(*tasks, *lorises)
    finally:
        await stop_rig(rig, procs)
    before = [took for t, took, _ in latencies if t < lead_s]
    during = [took for t, took, _ in latencies if t >= lead_s]
    return {"connections": settings.slowloris, "opened": opened, "refused_at_connect": refused,
            "answers": answers, "lead_s": lead_s,
            "held_peak": max((h for _, h, _ in series), default=0),
            "held_at_end": series[-1][1] if series else None,
            "normal_failed": sum(f for _, _, f in latencies),
            "normal_p50_ms_before": _ms(percentile(before, 50)),
            "normal_p99_ms_before": _ms(percentile(before, 99)),
            "normal_p50_ms_during": _ms(percentile(during, 50)),
            "normal_p99_ms_during": _ms(percentile(during, 99)),
            "series": series, "latencies": latencies}


# -- experiment 4: unique prompts and the prefix index's bound -------------------------------

async def prompts_run(settings: Settings, procs: Processes) -> dict[str, Any]:
    rig = await start_rig(settings, procs, "prompts", time_scale=10_000.0,
                          sim_args=["--default-output-len", "1"])
    rng = random.Random(11)
    series: list[tuple[int, float, float]] = []
    failed = 0
    sent = 0
    step = max(1, settings.prompts // 50)
    try:
        async with make_client(settings.prompt_concurrency) as http:
            t0 = time.monotonic()

            async def worker() -> None:
                nonlocal sent, failed
                while sent < settings.prompts:
                    sent += 1
                    n = sent
                    prompt = f"{n:08d} {rng.getrandbits(64):016x} " + "unique words here " * 40
                    record, _, _ = await send(http, rig.url + "/v1/completions", {
                        "model": MODEL, "prompt": prompt, "max_tokens": 1}, {}, 60.0)
                    if record["status"] != 200 or record["error"]:
                        failed += 1
                    if n % step == 0:
                        rss, _ = router_usage(rig.pid)
                        series.append((n, round(rss, 1), round(time.monotonic() - t0, 1)))

            rss0, _ = router_usage(rig.pid)
            series.append((0, round(rss0, 1), 0.0))
            await asyncio.gather(*(worker() for _ in range(settings.prompt_concurrency)))
            async with http.get(rig.url + "/admin/replicas") as r:  # loopback: no key needed
                index = (await r.json()).get("prefix_index")
    finally:
        await stop_rig(rig, procs)
    rss = [s[1] for s in series]
    half = rss[len(rss) // 2:]
    return {"prompts": settings.prompts, "failed": failed, "rss_start_mb": rss[0],
            "rss_at_half_mb": half[0], "rss_end_mb": rss[-1], "rss_peak_mb": max(rss),
            "growth_second_half_mb": round(rss[-1] - half[0], 1), "prefix_index": index,
            "series": series}


# -- figures and the report ------------------------------------------------------------------

def plot(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if "faults" in results:
        runs = results["faults"]
        fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.2 * len(runs)), sharex=True)
        for ax, run in zip(axes if len(runs) > 1 else [axes], runs):
            ok = [(t, v * 1000) for t, v, bad in run["ttfts"] if v is not None and not bad]
            bad = [t for t, _, b in run["ttfts"] if b]
            ax.scatter([t for t, _ in ok], [v for _, v in ok], s=4, label="TTFT of a request (ms)")
            for t in bad:
                ax.axvline(t, color="red", alpha=0.5, lw=0.8)
            ax.axvspan(run["injected_s"], run["healed_s"], color="orange", alpha=0.15, label="fault")
            ax.set_yscale("log")
            ax.set_ylabel("TTFT ms")
            ax.set_title(f"{run['fault']}: lost {run['lost']}/{run['requests']}, reroute "
                         f"{run['reroute_s']} s, p99 {run['ttft_p99_ms_before']} -> "
                         f"{run['ttft_p99_ms_during']} ms", fontsize=9)
        (axes[-1] if len(runs) > 1 else axes).set_xlabel("seconds since start (red: a lost request)")
        fig.tight_layout()
        fig.savefig(out / "faults.png", dpi=110)
        plt.close(fig)
        written.append("faults.png")
    if "streams" in results:
        s = results["streams"]
        fig, ax = plt.subplots(figsize=(8, 3.5))
        t = [x[0] for x in s["series"]]
        ax.plot(t, [x[1] for x in s["series"]], label="router RSS (MiB)")
        ax.plot(t, [x[2] for x in s["series"]], label="router open fds")
        ax.plot(t, [x[3] for x in s["series"]], label="streams finished")
        ax.set_xlabel("seconds")
        ax.set_title(f"{s['streams']} concurrent streams: {s['ok']} ok, peak RSS "
                     f"{s['router_peak_rss_mb']} MiB, peak fds {s['router_peak_fds']}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "streams.png", dpi=110)
        plt.close(fig)
        written.append("streams.png")
    if "slowloris" in results:
        s = results["slowloris"]
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
        a1.plot([x[0] for x in s["series"]], [x[1] for x in s["series"]], label="slow connections open")
        a1.plot([x[0] for x in s["series"]], [x[2] for x in s["series"]], label="router fds")
        a1.legend(fontsize=8)
        a1.set_title(f"slowloris: {s['connections']} connections, answers {s['answers']}", fontsize=9)
        a2.scatter([x[0] for x in s["latencies"]], [x[1] * 1000 for x in s["latencies"]], s=5)
        a2.axvline(s["lead_s"], color="orange")
        a2.set_ylabel("normal request ms")
        a2.set_xlabel("seconds (orange: slow connections start)")
        fig.tight_layout()
        fig.savefig(out / "slowloris.png", dpi=110)
        plt.close(fig)
        written.append("slowloris.png")
    if "prompts" in results:
        s = results["prompts"]
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot([x[0] for x in s["series"]], [x[1] for x in s["series"]], marker=".")
        ax.set_xlabel("unique prompts routed")
        ax.set_ylabel("router RSS (MiB)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{s['prompts']} unique prompts: RSS {s['rss_start_mb']} -> {s['rss_end_mb']} "
                     f"MiB (second half +{s['growth_second_half_mb']} MiB)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "prompts.png", dpi=110)
        plt.close(fig)
        written.append("prompts.png")
    return written


def markdown(results: dict[str, Any], figures: list[str]) -> str:
    lines = ["# Reliability: the router under faults and hostile load", "",
             f"Command: `{results['command']}`", "",
             *([f"Sections from other runs: {earlier}", ""] if (earlier := sorted(
                 {c for c in results.get("commands", {}).values()} - {results["command"]})) else []),
             f"Machine: {results['machine']}; versions: {results['versions']}", ""]
    if "faults" in results:
        lines += ["## Faults on one of the replicas under steady load", "",
                  "| fault | requests | lost | time to reroute (s) | requests that suffered "
                  "| TTFT p50 before / during (ms) "
                  "| TTFT p99 before / during (ms) | sick replica's share of new requests before / during |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in results["faults"]:
            lines.append(f"| {r['fault']} | {r['requests']} | {r['lost']} | {r['reroute_s']} | "
                         f"{r['suffered']} (TTFT > {r['suffered_above_ms']} ms or failed) | "
                         f"{r['ttft_p50_ms_before']} / {r['ttft_p50_ms_during']} | "
                         f"{r['ttft_p99_ms_before']} / {r['ttft_p99_ms_during']} | "
                         f"{r['sick_share_before']} / {r['sick_share_during']} |")
        lost = {r["fault"]: r["errors"] for r in results["faults"] if r["errors"]}
        if lost:
            lines += ["", "Lost requests, by error:", ""]
            lines += [f"- {k}: {v}" for k, v in lost.items()]
        lines.append("")
    if "streams" in results:
        s = results["streams"]
        lines += ["## Concurrent streams", "",
                  f"{s['streams']} streams opened at once: {s['ok']} complete, errors {s['errors']}; "
                  f"all done in {s['elapsed_s']} s; TTFT p50 {s['ttft_p50_ms']} ms, p99 "
                  f"{s['ttft_p99_ms']} ms; router RSS {s['router_idle_rss_mb']} -> peak "
                  f"{s['router_peak_rss_mb']} MiB, fds {s['router_idle_fds']} -> peak "
                  f"{s['router_peak_fds']}.", ""]
    if "slowloris" in results:
        s = results["slowloris"]
        lines += ["## Slowloris", "",
                  f"{s['connections']} connections sending a request head one byte per 2 s "
                  f"(opened {s['opened']}, refused at connect {s['refused_at_connect']}): answers "
                  f"{s['answers']}; held at peak {s['held_peak']}, at the end {s['held_at_end']}. "
                  f"Normal requests meanwhile: p50 {s['normal_p50_ms_before']} -> "
                  f"{s['normal_p50_ms_during']} ms, p99 {s['normal_p99_ms_before']} -> "
                  f"{s['normal_p99_ms_during']} ms, {s['normal_failed']} failed.", ""]
    if "prompts" in results:
        s = results["prompts"]
        lines += ["## Unique prompts and the prefix index", "",
                  f"{s['prompts']} unique prompts ({s['failed']} failed): router RSS "
                  f"{s['rss_start_mb']} MiB at start, {s['rss_at_half_mb']} at half way, "
                  f"{s['rss_end_mb']} at the end (peak {s['rss_peak_mb']}); growth over the second "
                  f"half {s['growth_second_half_mb']} MiB; the prefix index at the end: {s['prefix_index']}.", ""]
    from benchmarks import chaos_fleet

    lines += chaos_fleet.markdown(results)
    lines += [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


async def run_chaos(settings: Settings, procs: Processes) -> Path:
    out = settings.output
    out.mkdir(parents=True, exist_ok=True)
    # A run of some experiments updates their sections of the results already there (each
    # section says which command produced it); the others stay as they were measured.
    earlier: dict[str, Any] = {}
    if (out / "results.json").exists():
        earlier = json.loads((out / "results.json").read_text())
    known = set(Settings.experiments)
    results: dict[str, Any] = {k: v for k, v in earlier.items() if k in known and k not in settings.experiments}
    commands = {k: earlier.get("commands", {}).get(k, earlier.get("command", "")) for k in results}
    commands.update({e: settings.command for e in settings.experiments})
    results.update({"command": settings.command, "commands": commands, "versions": versions(),
                    "machine": f"{psutil.cpu_count()} CPUs, "
                               f"{round(psutil.virtual_memory().total / 2**30)} GiB",
                    "settings": {k: v for k, v in asdict(settings).items() if k not in ("output", "command")}})
    if "faults" in settings.experiments:
        results["faults"] = []
        for kind in settings.faults:
            print(f"chaos: fault {kind}", file=sys.stderr)
            results["faults"].append(await fault_run(settings, procs, kind))
    if "streams" in settings.experiments:
        print(f"chaos: {settings.streams} streams", file=sys.stderr)
        results["streams"] = await streams_run(settings, procs)
    if "slowloris" in settings.experiments:
        print(f"chaos: slowloris x{settings.slowloris}", file=sys.stderr)
        results["slowloris"] = await slowloris_run(settings, procs)
    if "prompts" in settings.experiments:
        print(f"chaos: {settings.prompts} unique prompts", file=sys.stderr)
        results["prompts"] = await prompts_run(settings, procs)
    from benchmarks import chaos_fleet

    for name, run in chaos_fleet.EXPERIMENTS.items():
        if name in settings.experiments:
            print(f"chaos: {name}", file=sys.stderr)
            results[name] = await run(settings, procs)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    figures = plot(results, out)
    (out / "results.md").write_text(markdown(results, figures))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Settings(output=Path("benchmarks/results/reliability"))
    parser.add_argument("--output", default=str(d.output))
    parser.add_argument("--experiments", default=",".join(d.experiments),
                        help="comma-separated subset of " + ",".join(d.experiments))
    parser.add_argument("--faults", default=",".join(d.faults),
                        help="comma-separated subset of " + ",".join(d.faults))
    for name in ("replicas", "streams", "slowloris", "prompts"):
        parser.add_argument("--" + name, type=int, default=getattr(d, name))
    for name in ("rate", "fault_s"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))


def settings_from(args: argparse.Namespace, command: str) -> Settings:
    experiments = tuple(e.strip() for e in args.experiments.split(",") if e.strip())
    faults = tuple(f.strip() for f in args.faults.split(",") if f.strip())
    for what, chosen, known in (("experiments", experiments, Settings.experiments),
                                ("faults", faults, FAULTS)):
        unknown = set(chosen) - set(known)
        if unknown:
            raise SystemExit(f"error: unknown {what} {sorted(unknown)}; known: {', '.join(known)}")
    return Settings(output=Path(args.output), replicas=args.replicas, streams=args.streams,
                    slowloris=args.slowloris, prompts=args.prompts, rate=args.rate,
                    fault_s=args.fault_s, experiments=experiments, faults=faults, command=command)
