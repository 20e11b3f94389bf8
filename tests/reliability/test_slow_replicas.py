"""Replicas that are alive but slow, and the first requests after a fault clears.

A slow replica fails nothing, so neither failover nor the failure breaker leaves it: the
latency outlier ejection (router/transport/outliers.py) takes it out of rotation, and hedging
(router/transport/proxy.py, ``proxy.hedge``) answers a request stuck on it from the next replica.
Real servers on loopback: FakeReplicas (tests/conftest.py) and routers via start_router.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from router.fleet.breaker import BreakerState
from router.transport.hooks import Hook

NO_LATENCY_EJECTION = {"latency_factor": 0}
PROMPT = "You are a helpful assistant. Answer briefly. " * 6  # a few prefix blocks


async def page(server, http: aiohttp.ClientSession) -> str:
    async with http.get(server.url + "/metrics") as r:
        return await r.text()


def replica_of(server, fake):
    return next(r for r in server.router.fleet if r.url == fake.url)


async def ask(server, http: aiohttp.ClientSession, i: int, *, stream: bool = False,
              path: str = "/v1/completions") -> tuple[int, bytes, float, dict[str, str]]:
    started = time.monotonic()
    body = {"model": "sim-a", "prompt": f"{i} {PROMPT}", "stream": stream}
    if path == "/v1/embeddings":
        body = {"model": "sim-a", "input": f"hello {i}"}
    async with http.post(server.url + path, json=body) as r:
        raw = await r.read()
        return r.status, raw, time.monotonic() - started, dict(r.headers)


async def test_a_slow_replica_is_ejected_by_latency_and_comes_back(fakes, start_router, make_routes,
                                                                   http, until, metric) -> None:
    slow, *peers = await fakes(4)
    slow.mode, slow.delay = "slow", 0.25  # answers everything, ~100x later than its peers
    server = await start_router(make_routes(
        [f.url for f in (slow, *peers)], policy="round_robin",
        circuit_breaker={"latency_min_requests": 4, "ejection_time": 1.0, "max_ejection_time": 2.0}))
    replica = replica_of(server, slow)
    for i in range(60):
        status, _, _, _ = await ask(server, http, i)
        assert status == 200
        if replica.breaker.state is BreakerState.OPEN:
            break
    assert replica.breaker.state is BreakerState.OPEN, "the slow replica was never ejected"
    text = await page(server, http)
    assert metric(text, "router_outlier_ejections_total", replica=slow.url, reason="latency") == 1
    assert metric(text, "router_replica_ejections_total", replica=slow.url) == 1
    assert all(replica_of(server, p).breaker.state is BreakerState.CLOSED for p in peers)
    # Out of rotation: the next requests are all answered by its peers, at their speed.
    seen = len(slow.seen)
    results = [await ask(server, http, 100 + i) for i in range(12)]
    assert all(s == 200 and t < 0.2 for s, _, t, _ in results)
    assert len(slow.seen) == seen
    # Healed: after the ejection time its half-open trial readmits it, and it gets its share.
    slow.mode = "json"
    await asyncio.sleep(1.1)
    for i in range(12):
        assert (await ask(server, http, 200 + i))[0] == 200
    assert replica.breaker.state is BreakerState.CLOSED
    assert len(slow.seen) >= seen + 2


async def test_a_stalled_first_attempt_is_hedged_and_cancelled(fakes, start_router, make_routes,
                                                               http, until, metric) -> None:
    stalled, good = await fakes(2)
    stalled.mode = "hang"  # accepts, never answers (until the router goes away)
    good.mode = "sse"
    server = await start_router(make_routes(
        [stalled.url, good.url], policy="round_robin",
        proxy={"first_byte_timeout": 30, "hedge": {"enabled": True, "max_delay": 0.2},
               "max_connections": 4},  # a bounded pool: every leg's slot must come back
        circuit_breaker=NO_LATENCY_EJECTION))
    ends: list[tuple[str, int, str, bool]] = []

    class Ends(Hook):
        def on_complete(self, attempt, outcome) -> None:
            ends.append((attempt.replica.id, attempt.number, outcome, attempt.superseded))

    server.router.proxy.hooks.add(Ends())
    results = [await ask(server, http, i, stream=True) for i in range(4)]
    expected = b"".join(good.sse_events())
    for status, raw, took, headers in results:
        assert status == 200 and took < 2.0
        assert raw == expected  # relayed byte for byte, one answer only
        assert headers["Content-Type"] == "text/event-stream"
    # Half of them started on the stalled replica: each was hedged on the good one (its
    # attempt 2), the stalled attempt cancelled (the fake saw its client go away).
    assert len(stalled.seen) == 2
    assert sorted(rid.rsplit("-", 1)[1] for rid in good.request_ids) == ["1", "1", "2", "2"]
    await until(lambda: stalled.cancelled == 2 and stalled.in_flight == 0,
                message="stalled attempts cancelled upstream")
    assert all(r.in_flight == 0 for r in server.router.fleet)
    await until(lambda: server.router.upstream.in_use == 0, message="every pool slot given back")
    # Its hooks heard the stalled attempt end as abandoned, superseded by the hedge.
    assert sorted(ends) == sorted([(stalled.url, 1, "abandoned", True)] * 2
                                  + [(good.url, 2, "success", False)] * 2
                                  + [(good.url, 1, "success", False)] * 2)
    text = await page(server, http)
    assert metric(text, "router_hedges_total", model="sim-a", outcome="won") == 2
    assert metric(text, "router_hedges_total", model="sim-a", outcome="lost") is None
    # A hedge lost is no failure: the stalled replica's breaker stays closed.
    assert replica_of(server, stalled).breaker.state is BreakerState.CLOSED
    # The prefix record made when the request went to the stalled replica was forgotten with
    # its cancelled attempt: the prefixes are believed held where they were answered only.
    index = server.router.index
    assert index.replica_blocks(stalled.url) == 0 and index.replica_blocks(good.url) > 0


async def test_hedging_spends_the_retry_budget_and_counts(fakes, start_router, make_routes, http,
                                                         metric) -> None:
    slow, good = await fakes(2)
    slow.mode, slow.delay = "slow", 0.5
    # One retry token, never refilled: one hedge, then none.
    server = await start_router(make_routes(
        [slow.url, good.url], policy="round_robin",
        proxy={"retry_budget_ratio": 0, "retry_budget_min_per_s": 0,
               "hedge": {"enabled": True, "max_delay": 0.1}},
        circuit_breaker=NO_LATENCY_EJECTION))
    results = [await ask(server, http, i) for i in range(6)]
    assert [s for s, _, _, _ in results] == [200] * 6
    text = await page(server, http)
    assert metric(text, "router_hedges_total", model="sim-a", outcome="won") == 1
    assert metric(text, "router_hedges_total", model="sim-a", outcome="skipped_budget") == 2
    # The two without a hedge waited for the slow replica's own answer.
    slow_answers = [t for _, raw, t, _ in results if slow.url.encode() in raw]
    assert len(slow_answers) == 2 and min(slow_answers) >= 0.45
    # A lone replica is never hedged (nowhere to go), and costs nothing for it.
    solo = await start_router(make_routes(
        [slow.url], proxy={"hedge": {"enabled": True, "max_delay": 0.1}},
        circuit_breaker=NO_LATENCY_EJECTION))
    status, _, took, _ = await ask(solo, http, 99)
    assert status == 200 and took >= 0.45
    assert metric(await page(solo, http), "router_hedges_total", model="sim-a",
                  outcome="skipped_no_replica") is None


async def test_with_hedging_off_or_a_path_not_listed_nothing_is_hedged(fakes, start_router, make_routes,
                                                                      http, until, metric) -> None:
    stalled, good = await fakes(2)
    stalled.mode = "hang"
    off = await start_router(make_routes(
        [stalled.url, good.url], policy="round_robin", proxy={"first_byte_timeout": 0.5},
        circuit_breaker=NO_LATENCY_EJECTION))
    pending = asyncio.create_task(ask(off, http, 0, stream=True))
    await until(lambda: len(stalled.seen) + len(good.seen) == 1, message="first attempt sent")
    first_on_stalled = len(stalled.seen) == 1
    # The attempt runs in the request's own handler task: no task (nor timer) for a hedge.
    assert not [t for t in asyncio.all_tasks() if "_leg_head" in repr(t.get_coro())]
    status, _, took, _ = await pending
    results = [(status, took)] + [(s, t) for s, _, t, _ in [await ask(off, http, i, stream=True)
                                                          for i in range(1, 4)]]
    # As before: a stalled first attempt waits its first_byte_timeout, then fails over.
    assert all(s == 200 for s, _ in results)
    assert first_on_stalled == (results[0][1] >= 0.45)
    assert sum(1 for _, t in results if t >= 0.45) == len(stalled.seen) >= 1
    text = await page(off, http)
    assert "router_hedges_total{" not in text
    await until(lambda: stalled.in_flight == 0, message="timed-out attempts closed")
    # Hedging on, but for chat completions only: a completion is not hedged.
    listed = await start_router(make_routes(
        [stalled.url, good.url], policy="round_robin",
        proxy={"first_byte_timeout": 0.5,
               "hedge": {"enabled": True, "max_delay": 0.05, "paths": ["/v1/chat/completions"]}},
        circuit_breaker=NO_LATENCY_EJECTION))
    seen = len(stalled.seen)
    slow_ones = [t for _, _, t, _ in [await ask(listed, http, i, stream=True) for i in range(4)]
                 if t >= 0.45]
    assert len(slow_ones) == len(stalled.seen) - seen >= 1
    assert "router_hedges_total{" not in await page(listed, http)


async def test_hedge_losses_are_latency_samples_so_a_stalling_replica_is_ejected(
        fakes, start_router, make_routes, http, metric) -> None:
    stalled, *peers = await fakes(3)
    stalled.mode = "hang"
    server = await start_router(make_routes(
        [f.url for f in (stalled, *peers)], policy="round_robin",
        proxy={"first_byte_timeout": 30, "hedge": {"enabled": True, "max_delay": 0.1}},
        circuit_breaker={"latency_min_requests": 3, "ejection_time": 30}))
    replica = replica_of(server, stalled)
    for i in range(40):
        status, _, took, _ = await ask(server, http, i)
        assert status == 200 and took < 2.0
        if replica.breaker.state is BreakerState.OPEN:
            break
    assert replica.breaker.state is BreakerState.OPEN
    text = await page(server, http)
    assert metric(text, "router_outlier_ejections_total", replica=stalled.url, reason="latency") == 1
    won = metric(text, "router_hedges_total", model="sim-a", outcome="won")
    assert won is not None and won >= 3
    seen = len(stalled.seen)
    for i in range(6):
        assert (await ask(server, http, 100 + i))[0] == 200
    assert len(stalled.seen) == seen  # out of rotation: no more hedges needed


async def test_a_half_open_trial_in_flight_does_not_cost_other_requests_a_503(
        fakes, start_router, make_routes, http) -> None:
    """Regression: after a fault that ejected every replica cleared, the first request to a
    half-open replica took its one trial slot, and a request arriving meanwhile found no
    admissible replica and was answered 503 "out of rotation" although the replicas were
    healthy again.  It now waits for a trial's verdict and is served."""
    a, b = await fakes(2)
    for fake in (a, b):
        fake.status, fake.error_headers = 500, {}  # no Retry-After: out for ejection_time
    server = await start_router(make_routes(
        [a.url, b.url], policy="round_robin",
        circuit_breaker={"failure_threshold": 1, "ejection_time": 0.5, "max_ejection_time": 1.0}))
    status, _, _, _ = await ask(server, http, 0)
    assert status == 500  # both failed it: both ejected
    assert all(r.breaker.state is BreakerState.OPEN for r in server.router.fleet)
    for fake in (a, b):  # the fault clears; answers take a moment
        fake.status, fake.mode, fake.delay = 200, "slow", 0.3
    await asyncio.sleep(0.6)  # the ejection time is over
    results = await asyncio.gather(*(ask(server, http, i) for i in range(1, 7)))
    assert [s for s, _, _, _ in results] == [200] * 6, [(s, raw[:120]) for s, raw, _, _ in results]
    assert all(r.breaker.state is BreakerState.CLOSED for r in server.router.fleet)
    # Still a prompt 503 when every replica is out and no trial is due.
    for fake in (a, b):
        fake.status, fake.mode = 500, "json"
    await asyncio.sleep(0.05)
    for i in range(2):
        await ask(server, http, 10 + i)
    assert all(r.breaker.state is BreakerState.OPEN for r in server.router.fleet)
    status, raw, took, _ = await ask(server, http, 20)
    assert status == 503 and b"out of rotation" in raw and took < 0.2


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def test_a_20x_slow_replica_costs_the_p99_less_than_2x_with_hedging(
        fakes, start_router, make_routes, http, metric) -> None:
    """The issue's yardstick, at a small scale: one replica of four turns 20x slower (its
    time to first byte, long tail included); with hedging on (and the default latency
    ejection), the fleet's p99 stays under twice its healthy value.  Round robin is the worst
    case: a quarter of the first attempts go to the slow replica until it is ejected."""
    fleet = await fakes(4)
    for fake in fleet:
        fake.mode, fake.delay, fake.jitter = "slow", 0.02, 0.02  # mean 40 ms, a long tail
    server = await start_router(make_routes(
        [f.url for f in fleet], policy="round_robin", proxy={"hedge": {"enabled": True}}))

    async def run(n: int, offset: int) -> list[float]:
        times: list[float] = []
        counter = iter(range(n))

        async def worker() -> None:
            for i in counter:
                status, _, took, _ = await ask(server, http, offset + i)
                assert status == 200
                times.append(took)

        await asyncio.gather(*(worker() for _ in range(8)))
        return times

    healthy = p99(await run(300, 0))
    slow = fleet[0]
    slow.delay, slow.jitter = 20 * 0.02, 20 * 0.02
    faulty = p99(await run(300, 1000))
    text = await page(server, http)
    assert metric(text, "router_outlier_ejections_total", replica=slow.url, reason="latency") == 1
    assert (metric(text, "router_hedges_total", model="sim-a", outcome="won") or 0) >= 3
    assert faulty < 2 * healthy, (healthy, faulty)
