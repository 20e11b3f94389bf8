"""More chaos experiments (`python -m benchmarks chaos --experiments ...`): the fleet changing
under load, a replica that is alive but slow, and the router's own limits.

* **reload**: open-loop load (``--reload-rate`` requests/s) while a ``POST /admin/reload``
  every second swaps the config file's backends between two sets of replicas: requests
  that did not end in a complete 200 (the goal: none; a reload is make-before-break).
* **slow**: one replica of four made 20x slower (the simulator's ``slow_factor``), under
  steady load, for each policy in ``slow_policies``: TTFT p50/p99 of a healthy fleet, of the
  slow fleet with neither latency ejection nor hedging (the defect as found), with latency
  ejection alone (the default) and with hedging on too, and the extra attempts hedging
  sent (``router_hedges_total`` over requests).
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

Every experiment runs a real ``python -m router`` process (uvloop, the production path)
with simulated replicas (or, for bodies, a sink replica in this process).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import yaml
from aiohttp import web

from benchmarks.loadgen import make_client, send
from benchmarks.stats import percentile
from engines.sim.process import SimProcess, free_port

if TYPE_CHECKING:
    from benchmarks.chaos import Settings
    from benchmarks.procs import Processes

MODEL = "chaos-model"
SLOW_FACTOR = 20.0
POOL_TIMEOUT_S = 2.0


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def _usage(pid: int) -> tuple[float, int]:
    from benchmarks.chaos import router_usage

    return router_usage(pid)


async def _router(settings: Settings, procs: Processes, name: str, config: dict[str, Any]) -> tuple[Any, str]:
    """A router process on `config` (written under the output's configs/), once it routes."""
    port = free_port()
    config = {**config, "server": {"host": "127.0.0.1", "port": port, "access_log": False,
                                   "log_level": "warning", **config.get("server", {})}}
    path = settings.output / "configs" / f"routes-{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    router = procs.start(f"router-{name}", [sys.executable, "-m", "router", "--config", str(path)],
                         log_path=settings.output / "logs" / f"router-{name}.log")
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 60
        while True:
            if not router.alive():
                raise RuntimeError(f"router exited:\n{router.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with http.get(url + "/ready", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"router not ready:\n{router.log_tail()}")
            await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # every replica probed healthy at least twice
    return router, url


async def _sims(n: int, time_scale: float, args: list[str] | None = None) -> list[SimProcess]:
    sims = [SimProcess(model=MODEL, time_scale=time_scale, args=list(args or []), startup_timeout=60)
            for _ in range(n)]
    await asyncio.gather(*(s.start() for s in sims))
    return sims


async def _stop(procs: Processes, router: Any, sims: list[SimProcess]) -> None:
    procs.stop(router)
    for sim in sims:
        sim.resume()
    await asyncio.gather(*(s.stop() for s in sims), return_exceptions=True)
    for sim in sims:
        sim._cleanup_log()


def _metric_sum(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def _failures(records: list[dict[str, Any]]) -> dict[str, int]:
    from benchmarks.chaos import error_counts

    return error_counts(records)


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
    sims = await _sims(4, settings.time_scale)
    sets = ([s.url for s in sims[:2]], [s.url for s in sims[2:]])
    base: dict[str, Any] = {"models": [{"name": MODEL, "backends": sets[0]}],
                            "routing": {"policy": "cache_aware"}}
    router, url = await _router(settings, procs, "reload", base)
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
        await _stop(procs, router, sims)
    errors = _failures(records)
    ttfts = [r["ttft_s"] for r in records if r["ttft_s"]]
    return {"rate": settings.reload_rate, "seconds": settings.reload_s, "requests": len(records),
            "failed": sum(errors.values()), "errors": errors, "reloads": len(reloads),
            "reloads_ok": sum(1 for s in reloads if s == 200),
            "latency_p50_ms": _ms(percentile(ttfts, 50)), "latency_p99_ms": _ms(percentile(ttfts, 99))}


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
    sims = await _sims(4, 1.0)  # real time (H100-calibrated): TTFTs of tens of ms, as in production
    config: dict[str, Any] = {"models": [{"name": MODEL, "backends": [s.url for s in sims]}],
                              "routing": {"policy": policy}, **extra}
    name = f"slow-{policy}-{SLOW_CASES.index(next(c for c in SLOW_CASES if c[0] == case))}"
    router, url = await _router(settings, procs, name, config)
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
        await _stop(procs, router, sims)
    ttfts = [r["ttft_s"] for r in records if r["ttft_s"]]
    hedges = _metric_sum(text, "router_hedges_total")
    return {"policy": policy, "case": case, "requests": len(records),
            "failed": sum(_failures(records).values()),
            "ttft_p50_ms": _ms(percentile(ttfts, 50)), "ttft_p99_ms": _ms(percentile(ttfts, 99)),
            "hedges": hedges, "extra_load": round(hedges / max(1, len(records)), 3),
            "latency_ejections": _metric_sum(text, "router_outlier_ejections_total")}


# -- flood: connections over the cap ----------------------------------------------------------

async def flood_run(settings: Settings, procs: Processes) -> dict[str, Any]:
    sims = await _sims(2, 50.0)
    config: dict[str, Any] = {"models": [{"name": MODEL, "backends": [s.url for s in sims]}],
                              "server": {"max_connections": settings.flood_cap, "header_timeout": 30}}
    router, url = await _router(settings, procs, "flood", config)
    idle_rss, idle_fds = _usage(router.pid)
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
        _, peak_fds = _usage(router.pid)

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
        after_rss, after_fds = _usage(router.pid)
    finally:
        for sock in socks:
            sock.close()
        await _stop(procs, router, sims)
    return {"connections": settings.flood_connections, "cap": settings.flood_cap, "answers": answers,
            "all_read_within_s": round(answered_s, 2), "router_fds_idle": idle_fds,
            "router_fds_peak": peak_fds, "router_fds_1s_after_close": after_fds,
            "health_during": health, "router_rss_mb": round(after_rss, 1)}


# -- pool: waiting for an upstream connection -------------------------------------------------

async def pool_run(settings: Settings, procs: Processes) -> dict[str, Any]:
    sims = await _sims(2, 1.0, ["--max-num-seqs", "256"])
    config: dict[str, Any] = {"models": [{"name": MODEL, "backends": [s.url for s in sims]}],
                              "proxy": {"max_connections": settings.pool_size, "pool_timeout": POOL_TIMEOUT_S}}
    router, url = await _router(settings, procs, "pool", config)
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
        await _stop(procs, router, sims)
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
            "pool_timeouts_counted": _metric_sum(text, "router_upstream_pool_timeouts_total")}


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
    router, url = await _router(settings, procs, "bodies", config)
    prompt = "x" * (size - 100)
    payload = b'{"model": "' + MODEL.encode() + b'", "max_tokens": 1, "prompt": "' + prompt.encode() + b'"}'
    del prompt
    idle_rss, _ = _usage(router.pid)
    peak = idle_rss
    statuses: list[int] = []
    try:
        stop = asyncio.Event()

        async def watch() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _usage(router.pid)[0])
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
            held_rss = _usage(router.pid)[0]
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


EXPERIMENTS = {"reload": reload_run, "slow": slow_run, "flood": flood_run, "pool": pool_run,
               "bodies": bodies_run}


def markdown(results: dict[str, Any]) -> list[str]:
    """The README-ready lines for whichever of these experiments ran."""
    lines: list[str] = []
    if "reload" in results:
        r = results["reload"]
        lines += ["## Reloads that swap the backends under load", "",
                  f"{r['requests']} requests at {r['rate']} requests/s for {r['seconds']} s while "
                  f"`POST /admin/reload` swapped the file's two backends for two others every second "
                  f"({r['reloads_ok']}/{r['reloads']} reloads answered 200): **{r['failed']} failed** "
                  f"{r['errors'] or ''}; latency p50 {r['latency_p50_ms']} ms, p99 {r['latency_p99_ms']} ms.", ""]
    if "slow" in results:
        lines += ["## One replica of four 20x slower", "",
                  "| policy | case | requests | failed | TTFT p50 (ms) | TTFT p99 (ms) | hedges | extra load "
                  "| latency ejections |", "|---|---|---|---|---|---|---|---|---|"]
        for r in results["slow"]:
            lines.append(f"| {r['policy']} | {r['case']} | {r['requests']} | {r['failed']} | {r['ttft_p50_ms']} "
                         f"| {r['ttft_p99_ms']} | {r['hedges']:g} | {r['extra_load']} | {r['latency_ejections']:g} |")
        lines.append("")
    if "flood" in results:
        f = results["flood"]
        lines += ["## A connection flood over the cap (uvloop, the production loop)", "",
                  f"{f['connections']} plain TCP connections at once against `server.max_connections: "
                  f"{f['cap']}`: answers {f['answers']} (all read within {f['all_read_within_s']} s); "
                  f"router fds {f['router_fds_idle']} idle, {f['router_fds_peak']} at peak, "
                  f"{f['router_fds_1s_after_close']} one second after the clients closed; `/health` "
                  f"meanwhile: {f['health_during']}.", ""]
    if "pool" in results:
        p = results["pool"]
        lines += ["## Waiting for an upstream connection", "",
                  f"`proxy.max_connections: {p['pool']}` and {p['long_streams']} long streams at once "
                  f"(statuses {p['long_statuses']}: those beyond the pool waited `pool_timeout` for a "
                  f"slot); {p['short_requests']} short requests then: statuses "
                  f"{p['short_statuses']}, Retry-After {p['short_retry_after']}, longest wait "
                  f"{p['short_wait_max_s']} s (`proxy.pool_timeout: {p['pool_timeout_s']}`), counted "
                  f"{p['pool_timeouts_counted']:g} in `router_upstream_pool_timeouts_total`.", ""]
    if "bodies" in results:
        b = results["bodies"]
        lines += ["## Memory per in-flight request body", "",
                  f"{b['bodies']} concurrent {b['body_mib']} MiB bodies (statuses {sorted(set(b['statuses']))}): "
                  f"router RSS {b['router_idle_rss_mb']} MiB idle, {b['router_rss_while_held_mb']} while "
                  f"all were held upstream, peak {b['router_peak_rss_mb']}: **{b['peak_per_body_mib']} MiB "
                  f"of RSS per MiB of body at peak**, {b['held_per_body_mib']} while held.", ""]
    return lines
