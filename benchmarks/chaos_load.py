"""Hostile load on the router's own resources: many streams, slow clients, unique prompts.

* **streams**: N concurrent streams opened at once: errors, the router's peak RSS and open
  file descriptors.
* **slowloris**: M connections that send a request head one byte every 2 s while normal
  requests run: how many the router still holds over time, and the normal requests'
  latency before and during.
* **prompts**: P unique prompts through the prefix index: the router's RSS every few
  thousand requests (it must plateau at the index bound, not grow).

Each runs on a healthy rig (benchmarks/chaos_rig.py); what they share is the question
asked: does the router's memory, file descriptors and latency stay bounded under load
meant to exhaust them.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from benchmarks.chaos_metrics import error_counts, ms, router_usage
from benchmarks.chaos_rig import GROUPS, MODEL, start_rig, stop_rig
from benchmarks.chaos_settings import Settings
from benchmarks.loadgen import make_client, send
from benchmarks.procs import Processes
from benchmarks.stats import percentile

# -- streams: concurrent streams --------------------------------------------------------------

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
            "ttft_p50_ms": ms(percentile([r["ttft_s"] for r in records if r["ttft_s"]], 50)),
            "ttft_p99_ms": ms(percentile([r["ttft_s"] for r in records if r["ttft_s"]], 99)),
            "router_idle_rss_mb": round(idle_rss, 1), "router_peak_rss_mb": round(peak_rss, 1),
            "router_idle_fds": idle_fds, "router_peak_fds": peak_fds, "series": series}


# -- slowloris: slow request heads ------------------------------------------------------------

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
            "normal_p50_ms_before": ms(percentile(before, 50)),
            "normal_p99_ms_before": ms(percentile(before, 99)),
            "normal_p50_ms_during": ms(percentile(during, 50)),
            "normal_p99_ms_during": ms(percentile(during, 99)),
            "series": series, "latencies": latencies}


# -- prompts: unique prompts and the prefix index's bound -------------------------------------

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
