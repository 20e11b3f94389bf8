"""Distrust of sick replicas: each fault kind, from outside, with real simulated replicas.

killed and disconnecting replicas are covered in tests/integration/test_router_failover.py;
here: stopped (SIGSTOP), 500-ing and 429-ing while /health passes, slow, flapping, a fleet
where every replica fails, a replica that never sends its first byte, and one that does not
serve the model it is configured for.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from router.fleet.replicas import Health

PROMPT = "You are a helpful assistant. Answer briefly. " * 4


async def upstream_errors(server, http: aiohttp.ClientSession, replica_url: str) -> float:
    async with http.get(server.url + "/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("router_upstream_errors_total{") and f'replica="{replica_url}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_stopped_replica_under_load_fails_over_within_seconds(make_sims, start_router,
                                                                    make_routes, http, until) -> None:
    sims = await make_sims(3, time_scale=1.0)
    server = await start_router(make_routes(
        [s.url for s in sims], policy="round_robin",
        health={"interval": 0.2, "timeout": 0.3, "failure_threshold": 2},
        proxy={"unhealthy_grace": 0.5, "read_timeout": 600, "deadline": 30}))
    victim = next(r for r in server.router.fleet if r.url == sims[0].url)
    results: list[tuple[int, float]] = []
    streams: list[bytes] = []

    async def one(i: int) -> None:
        started = time.monotonic()
        async with http.post(server.url + "/v1/completions", json={
                "model": "sim-a", "prompt": f"{PROMPT} {i}", "max_tokens": 60}) as r:
            await r.read()
            results.append((r.status, time.monotonic() - started))

    async def stream(i: int) -> None:
        async with http.post(server.url + "/v1/completions", json={
                "model": "sim-a", "prompt": f"{PROMPT} s{i}", "max_tokens": 400, "stream": True}) as r:
            streams.append(await r.read())

    load = [asyncio.create_task(one(i)) for i in range(30)]
    load += [asyncio.create_task(stream(i)) for i in range(6)]
    await asyncio.sleep(0.3)
    sims[0].pause()  # SIGSTOP: connections stay open, nothing answers
    try:
        await asyncio.wait_for(asyncio.gather(*load), timeout=20)
        await until(lambda: victim.health is Health.UNHEALTHY, message="stopped replica unhealthy")
    finally:
        sims[0].resume()
    # Nothing waited for read_timeout (600 s): every non-stream request was answered by a
    # healthy replica, and streams that had started on the stopped one ended properly.
    assert [s for s, _ in results] == [200] * 30
    assert max(t for _, t in results) < 15
    for raw in streams:
        assert raw.endswith(b"data: [DONE]\n\n")
    assert all(r.in_flight == 0 for r in server.router.fleet)


async def test_probes_have_their_own_pool(fakes, start_router, make_routes, http, until) -> None:
    fleet = await fakes(2)
    for fake in fleet:
        fake.mode = "hang"
    server = await start_router(make_routes([f.url for f in fleet],
                                            proxy={"max_connections": 4, "read_timeout": 30}))
    hung = [asyncio.create_task(http.post(server.url + "/v1/completions",
                                          json={"model": "sim-a", "prompt": "x"}))
            for _ in range(8)]  # twice the request pool
    await until(lambda: sum(f.in_flight for f in fleet) == 4, message="request pool full")
    probes_before = sum(1 for _ in server.router.fleet)
    await asyncio.sleep(1.0)  # ~10 probe rounds
    assert all(r.health is Health.HEALTHY for r in server.router.fleet)
    async with http.get(server.url + "/metrics") as r:
        text = await r.text()
    assert 'result="fail"' not in text and probes_before == 2
    for task in hung:
        task.cancel()
    await asyncio.gather(*hung, return_exceptions=True)


@pytest.mark.parametrize("proxy, bound", [
    ({"pool_timeout": 0.4}, 0.4),
    ({"deadline": 0.6}, 0.6),  # the default pool_timeout (5 s), cut to what is left of the deadline
])
async def test_a_full_upstream_pool_answers_503_in_time_and_blames_no_replica(
        fakes, start_router, make_routes, http, until, metric, proxy, bound) -> None:
    """Issue 23 #4: with every `proxy.max_connections` slot held by long requests, a new one
    waited past every deadline.  Now it gets a 503 with Retry-After within its bound, and no
    replica pays for the router's own limit: no breaker failure, no suspect, no failover."""
    fleet = await fakes(2)
    for fake in fleet:
        fake.mode = "hang"
    server = await start_router(make_routes([f.url for f in fleet], proxy={
        "max_connections": 2, "read_timeout": 30, "first_byte_timeout": 30, **proxy}))
    hung = [asyncio.create_task(http.post(server.url + "/v1/completions",
                                          json={"model": "sim-a", "prompt": "x"}))
            for _ in range(2)]
    try:
        await until(lambda: sum(f.in_flight for f in fleet) == 2, message="request pool full")
        started = time.monotonic()
        async with http.post(server.url + "/v1/completions", json={"model": "sim-a", "prompt": "hi",
                                                                   "max_tokens": 2},
                             timeout=aiohttp.ClientTimeout(total=5)) as r:
            payload = await r.json()
            elapsed = time.monotonic() - started
            assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert set(payload) == {"error"} and payload["error"]["code"] == 503
        assert payload["error"]["type"] == "ServiceUnavailableError"
        assert bound - 0.05 <= elapsed < bound + 1.0
        assert sum(len(f.seen) for f in fleet) == 2  # not sent anywhere: no failover
        for replica in server.router.fleet:
            assert replica.health is Health.HEALTHY and replica.breaker.failures == 0
            assert replica.in_flight == 1
        async with http.get(server.url + "/metrics") as r:
            text = await r.text()
        assert metric(text, "router_upstream_pool_timeouts_total", model="sim-a") == 1
        assert metric(text, "router_upstream_pool_wait_seconds_count", model="sim-a") == 1
        assert metric(text, "router_requests_total", model="sim-a", replica="none", status="503") == 1
        assert "router_upstream_errors_total{" not in text and "router_retries_total{" not in text
    finally:
        for task in hung:
            task.cancel()
        await asyncio.gather(*hung, return_exceptions=True)


async def test_replicas_that_do_not_serve_the_model_get_none_of_it(fakes, start_router, make_routes,
                                                                   http, until, metric, caplog) -> None:
    """Issue 23 #7c: a replica configured under sim-a whose /v1/models lists only
    other-model gets no sim-a request, and does not make other-model listed or routable
    (it did: other-model was in /v1/models and answered 200).  It is kept out with one
    warning, shown in /admin/replicas and a metric, and comes back once it serves sim-a."""
    right = (await fakes(1))[0]
    wrong = (await fakes(1, models=("other-model",)))[0]
    server = await start_router(make_routes([right.url, wrong.url], policy="round_robin",
                                            metrics={"models_interval": 0.1}))
    router = server.router
    wrong_replica = next(r for r in router.fleet if r.url == wrong.url)
    await until(lambda: bool(wrong_replica.model_mismatch), message="the mismatch seen")
    for _ in range(20):
        async with http.post(server.url + "/v1/completions",
                             json={"model": "sim-a", "prompt": "x"}) as r:
            assert r.status == 200
    assert not wrong.seen and len(right.seen) == 20
    async with http.get(server.url + "/v1/models") as r:
        listed = [m["id"] for m in (await r.json())["data"]]
    assert "other-model" not in listed and "sim-a" in listed
    async with http.post(server.url + "/v1/completions",
                         json={"model": "other-model", "prompt": "x"}) as r:
        assert r.status == 404
    assert not wrong.seen
    async with http.get(server.url + "/admin/replicas") as r:
        shown = {rep["url"]: rep for rep in (await r.json())["replicas"]}
    assert shown[wrong.url]["model_mismatch"] == ["other-model"] and shown[right.url]["model_mismatch"] is None
    async with http.get(server.url + "/metrics") as r:
        page = await r.text()
    assert metric(page, "router_replica_model_mismatch", replica=wrong.url) == 1
    assert metric(page, "router_replica_model_mismatch", replica=right.url) == 0
    async with http.get(server.url + "/ready") as r:  # (loopback: the counts are shown)
        assert (await r.json())["models"]["sim-a"] == {"healthy": 1, "total": 2}
    await asyncio.sleep(0.3)  # a few more polls: still one warning
    warnings = [rec for rec in caplog.records if "lists only" in rec.getMessage()]
    assert len(warnings) == 1 and "other-model" in warnings[0].getMessage()
    # Fixed (the engine now serves sim-a): it gets traffic again.
    wrong.models = ("sim-a",)
    await until(lambda: wrong_replica.routable, message="the replica serves its model again")
    for _ in range(4):
        async with http.post(server.url + "/v1/completions",
                             json={"model": "sim-a", "prompt": "x"}) as r:
            assert r.status == 200
    assert len(wrong.seen) == 2


async def test_a_replica_failing_every_request_is_ejected_and_readmitted(
        make_sims, start_router, make_routes, http, until) -> None:
    sims = await make_sims(3)
    bad = sims[0]
    await bad.set_faults(http, fail_rate=1.0)  # 500 to everything, /health still passes
    server = await start_router(make_routes(
        [s.url for s in sims], policy="round_robin",
        circuit_breaker={"failure_threshold": 3, "ejection_time": 1.0, "max_ejection_time": 2.0}))
    for i in range(60):
        async with http.post(server.url + "/v1/completions",
                             json={"model": "sim-a", "prompt": f"x {i}", "max_tokens": 2}) as r:
            assert r.status == 200
    # The first failures eject it; after that it sees only half-open trials (about one a
    # second), not a third of all first attempts.
    assert 3 <= await upstream_errors(server, http, bad.url) <= 6
    replica = next(r for r in server.router.fleet if r.url == bad.url)
    assert replica.health is Health.HEALTHY  # the probes never saw anything wrong
    async with http.get(server.url + "/admin/replicas") as r:
        view = next(x for x in (await r.json())["replicas"] if x["url"] == bad.url)
    assert view["circuit_breaker"]["state"] in ("open", "half_open")
    await bad.set_faults(http, clear=True)
    await asyncio.sleep(2.1)
    for i in range(12):  # the next trial succeeds and it is back in rotation
        async with http.post(server.url + "/v1/completions",
                             json={"model": "sim-a", "prompt": f"y {i}", "max_tokens": 2}) as r:
            assert r.status == 200
    assert replica.breaker.state.value == "closed"
    async with http.get(server.url + "/metrics") as r:
        text = await r.text()
    assert f'router_replica_ejections_total{{replica="{bad.url}"}}' in text


async def test_retry_after_from_a_429ing_replica_is_respected(make_sims, start_router, make_routes,
                                                              http) -> None:
    limited, good = await make_sims(2)
    await limited.set_faults(http, fail_rate=1.0, fail_status=429, fail_retry_after=2)
    server = await start_router(make_routes([limited.url, good.url], policy="round_robin"))
    started = time.monotonic()
    for i in range(20):
        async with http.post(server.url + "/v1/completions",
                             json={"model": "sim-a", "prompt": f"x {i}", "max_tokens": 2}) as r:
            assert r.status == 200
    assert time.monotonic() - started < 2
    assert await upstream_errors(server, http, limited.url) == 1  # asked to wait, it waits
    await asyncio.sleep(2.1)
    async with http.post(server.url + "/v1/completions",
                         json={"model": "sim-a", "prompt": "z", "max_tokens": 2}) as r:
        assert r.status == 200
    async with http.post(server.url + "/v1/completions",
                         json={"model": "sim-a", "prompt": "z2", "max_tokens": 2}) as r:
        assert r.status == 200
    assert await upstream_errors(server, http, limited.url) == 2  # one trial after the wait


async def test_a_failing_fleet_is_not_hammered_with_retries(make_sims, start_router, make_routes,
                                                            http) -> None:
    sims = await make_sims(2)
    for sim in sims:
        await sim.set_faults(http, fail_rate=1.0)
    # Breakers effectively off, to see the retry budget alone.
    server = await start_router(make_routes(
        [s.url for s in sims], proxy={"max_attempts": 3, "retry_budget_ratio": 0.2,
                                      "retry_budget_min_per_s": 1.0},
        circuit_breaker={"failure_threshold": 100000}))
    started = time.monotonic()
    for i in range(100):
        async with http.post(server.url + "/v1/completions",
                             json={"model": "sim-a", "prompt": f"x {i}", "max_tokens": 2}) as r:
            assert r.status == 500
    elapsed = time.monotonic() - started
    attempts = sum([await upstream_errors(server, http, s.url) for s in sims])
    # Without a budget: 300 attempts.  With it: 100 + the initial bucket (30) + 20% of 100
    # + 1 a second.
    assert attempts <= 100 + 30 + 20 + elapsed + 1, attempts
    async with http.get(server.url + "/metrics") as r:
        assert "router_retry_budget_exhausted_total" in await r.text()
    # With the default breakers, the failing fleet is ejected and answered at once.
    default = await start_router(make_routes([s.url for s in sims]))
    statuses = []
    for i in range(30):
        async with http.post(default.url + "/v1/completions",
                             json={"model": "sim-a", "prompt": f"y {i}", "max_tokens": 2}) as r:
            statuses.append(r.status)
            if r.status == 503:
                assert "out of rotation" in (await r.json())["error"]["message"]
                assert "Retry-After" in r.headers
    assert statuses.count(503) >= 20
    assert sum([await upstream_errors(default, http, s.url) for s in sims]) <= 15


async def test_no_first_byte_in_time_fails_over(fakes, start_router, make_routes, http) -> None:
    hung, good = await fakes(2)
    hung.mode = "hang"
    server = await start_router(make_routes([hung.url, good.url], policy="round_robin",
                                            proxy={"first_byte_timeout": 0.3}))
    for _ in range(4):
        started = time.monotonic()
        async with http.post(server.url + "/v1/completions",
                             json={"model": "sim-a", "prompt": "x", "stream": True}) as r:
            assert r.status == 200 and (await r.json())["url"] == good.url
        assert time.monotonic() - started < 2
    async with http.get(server.url + "/metrics") as r:
        assert 'kind="first_byte_timeout"' in await r.text()
    # Alone, it is a 504 that says what happened.
    solo = await start_router(make_routes([hung.url], proxy={"first_byte_timeout": 0.2,
                                                             "max_attempts": 2}))
    async with http.post(solo.url + "/v1/completions",
                         json={"model": "sim-a", "prompt": "x", "stream": True}) as r:
        payload = await r.json()
        assert r.status == 504 and "no first byte in time" in payload["error"]["message"]


async def test_slow_and_flapping_replicas_lose_no_request(make_sims, start_router, make_routes,
                                                          http) -> None:
    slow, flapping, steady = await make_sims(3, time_scale=5.0)
    await slow.set_faults(http, slow_factor=20)
    server = await start_router(make_routes([s.url for s in (slow, flapping, steady)],
                                            policy="cache_aware",
                                            health={"interval": 0.1, "failure_threshold": 2}))
    stop = asyncio.Event()

    async def flap() -> None:
        while not stop.is_set():
            await flapping.set_faults(http, unhealthy_for=0.3)
            await asyncio.sleep(0.6)

    flapper = asyncio.create_task(flap())
    statuses: list[int] = []

    async def one(i: int) -> None:
        async with http.post(server.url + "/v1/completions", json={
                "model": "sim-a", "prompt": f"{PROMPT} {i}", "max_tokens": 20,
                "stream": i % 2 == 0}) as r:
            body = await r.read()
            statuses.append(r.status)
            if i % 2 == 0:
                assert body.endswith(b"data: [DONE]\n\n") and b'"error"' not in body

    try:
        for batch in range(6):
            await asyncio.gather(*(one(batch * 8 + i) for i in range(8)))
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        await flapper
    assert statuses == [200] * 48


async def test_a_replica_that_never_accepts_the_connection_fails_over_in_connect_timeout(
        fakes, start_router, make_routes, http, metric) -> None:
    """A host that drops SYNs (its accept queue full) costs connect_timeout, then failover."""
    import socket

    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    host, port = blackhole.getsockname()
    fillers = []
    for _ in range(8):  # fill the accept queue; later SYNs are dropped
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect((host, port))
        except BlockingIOError:
            pass
        fillers.append(s)
    (good,) = await fakes(1)
    dead_url = f"http://{host}:{port}"
    try:
        server = await start_router(make_routes(
            [dead_url, good.url], proxy={"connect_timeout": 0.3, "max_attempts": 2},
            health={"interval": 30, "timeout": 30}), wait_healthy=False)
        for replica in server.router.fleet:
            replica.health = Health.HEALTHY  # as if its probe had passed before it wedged
        durations = []
        for i in range(4):
            started = time.monotonic()
            async with http.post(server.url + "/v1/completions",
                                 json={"model": "sim-a", "prompt": f"x {i}"}) as r:
                assert r.status == 200, await r.text()
            durations.append(time.monotonic() - started)
        async with http.get(server.url + "/metrics") as r:
            page = await r.text()
        timeouts = metric(page, "router_upstream_errors_total", replica=dead_url,
                          kind="connect_timeout")
        assert timeouts and timeouts >= 1
        # The ones that tried the dead replica first waited about connect_timeout, no more.
        assert max(durations) < 2.0
        assert max(durations) >= 0.25
        # Alone, the dead replica gets a truthful answer: which wait ran out, and no URL.
        solo = await start_router(make_routes(
            [dead_url], proxy={"connect_timeout": 0.3, "max_attempts": 2},
            health={"interval": 30, "timeout": 30}), wait_healthy=False)
        for replica in solo.router.fleet:
            replica.health = Health.HEALTHY
        async with http.post(solo.url + "/v1/completions",
                             json={"model": "sim-a", "prompt": "x"}) as r:
            assert r.status == 504
            message = (await r.json())["error"]["message"]
        assert "did not accept the connection in time" in message, message
        assert "No healthy replica" not in message and "127.0.0.1" not in message
    finally:
        for s in fillers:
            s.close()
        blackhole.close()


async def test_a_probe_that_cannot_even_be_sent_neither_spins_nor_leaks(caplog) -> None:
    """Regression: a backend URL with credentials plus an api_key made aiohttp raise a
    ValueError in every probe; nobody caught it and the loop retried at 100% CPU, logging
    megabytes a second and ignoring SIGTERM.  (The config refuses such URLs now; the
    monitor must survive any probe error anyway.)"""
    import logging

    from router.config import HealthConfig, MetricsConfig
    from router.fleet.monitor import Monitor
    from router.fleet.replicas import Fleet, Replica

    caplog.set_level(logging.DEBUG)
    with pytest.raises(ValueError, match="credentials"):  # refused wherever a replica is made
        Replica(url="http://user:hunter2secret@127.0.0.1:9", model="sim-a")
    # A key aiohttp refuses to send (a newline): every probe raises ValueError before sending.
    replica = Replica(url="http://127.0.0.1:9", model="sim-a",
                      api_key="backend-key-0123456789\nX-Injected: 1")
    fleet = Fleet([replica])
    async with aiohttp.ClientSession() as session:
        monitor = Monitor(fleet, session, HealthConfig(interval=0.1, timeout=0.5,
                                                       failure_threshold=2),
                          MetricsConfig(scrape_interval=0.1))
        probes = 0
        original = monitor.probe_health

        async def counted(r):
            nonlocal probes
            probes += 1
            return await original(r)

        monitor.probe_health = counted  # type: ignore[method-assign]
        await monitor.start()
        await asyncio.sleep(1.0)
        started = time.monotonic()
        await monitor.stop()
        assert time.monotonic() - started < 1.0, "the monitor stops promptly"
    assert 3 <= probes <= 15, probes  # about one per interval, not a tight loop
    assert replica.health is Health.UNHEALTHY
    text = caplog.text
    assert "hunter2secret" not in text and "backend-key-0123456789" not in text
    assert len(caplog.records) <= 3 * probes + 5
