"""Forwarding under failure, against simulated vLLM replicas (real processes on loopback)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest

from router.fleet.replicas import Health

PROMPT = "You are a helpful assistant. Answer briefly. " * 4


def sse_events(raw: bytes) -> list[bytes]:
    """The `data:` payloads of an SSE body, in order."""
    return [event[len(b"data: "):] for event in raw.split(b"\n\n") if event.startswith(b"data: ")]


async def running(sim, http: aiohttp.ClientSession) -> float:
    return (await sim.metrics(http)).get("vllm:num_requests_running", 0.0)


async def successes(sim, http: aiohttp.ClientSession) -> float:
    return (await sim.metrics(http)).get("vllm:request_success_total", 0.0)


async def test_replica_killed_under_load_loses_no_request(make_sims, start_router, make_routes,
                                                          http, until) -> None:
    sims = await make_sims(3, time_scale=1.0)
    server = await start_router(make_routes([s.url for s in sims], policy="round_robin"))
    url = server.url + "/v1/completions"
    statuses: list[int] = []
    gate = asyncio.Semaphore(12)

    async def one(i: int) -> None:
        async with gate:
            body = {"model": "sim-a", "prompt": f"{PROMPT} request {i}", "max_tokens": 40}
            async with http.post(url, json=body) as r:
                payload = await r.json()
                statuses.append(r.status)
                if r.status == 200:
                    assert payload["choices"][0]["text"]

    load = asyncio.gather(*(one(i) for i in range(60)))
    await asyncio.sleep(0.5)  # well inside the load
    await sims[0].kill()
    await load
    # Non-stream requests have sent nothing to the client until the answer is complete,
    # so the ones that were inside the killed replica are retried elsewhere too.
    assert statuses == [200] * 60
    victim = [r for r in server.router.fleet if r.url == sims[0].url][0]
    await until(lambda: victim.health is Health.UNHEALTHY, message="killed replica unhealthy")
    assert all(r.in_flight == 0 for r in server.router.fleet)
    async with http.get(server.url + "/metrics") as r:
        text = await r.text()
    assert f'router_failovers_total{{model="sim-a",replica="{sims[0].url}"}}' in text


async def test_streams_survive_a_kill_or_end_with_an_error_event(make_sims, start_router,
                                                                 make_routes, http, until) -> None:
    sims = await make_sims(2, time_scale=1.0)
    server = await start_router(make_routes([s.url for s in sims], policy="round_robin"))
    outcomes: list[str] = []
    started: list[int] = []

    async def one(i: int, max_tokens: int) -> None:
        body = {"model": "sim-a", "prompt": f"{PROMPT} {i}", "max_tokens": max_tokens,
                "stream": True}
        async with http.post(server.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            raw = await r.content.readline()
            started.append(i)
            raw += await r.read()
        events = sse_events(raw)
        assert events[-1] == b"[DONE]"  # every stream is properly terminated
        errors = [e for e in events[:-1] if b'"error"' in e]
        if errors:
            assert len(errors) == 1 and errors[0] == events[-2]
            assert orjson.loads(errors[0])["error"]["code"] == 502
            outcomes.append("cut")
        else:
            outcomes.append("ok")

    first = asyncio.gather(*(one(i, 150) for i in range(6)))
    await until(lambda: len(started) == 6, timeout=10, message="every stream under way")
    await sims[0].kill()  # three streams are running on it (round robin)
    await first
    assert sorted(outcomes) == ["cut"] * 3 + ["ok"] * 3
    # Streams that start after the kill never see the dead replica's failure.
    outcomes.clear()
    await asyncio.gather(*(one(i, 5) for i in range(6)))
    assert outcomes == ["ok"] * 6


async def test_5xx_replica_is_failed_over(make_sims, start_router, make_routes, http) -> None:
    bad, good = await make_sims(2)
    await bad.set_faults(http, fail_rate=1.0)
    server = await start_router(make_routes([bad.url, good.url], policy="round_robin"))
    for i in range(6):
        body = {"model": "sim-a", "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 3}
        async with http.post(server.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            assert (await r.json())["choices"][0]["message"]["content"]
    assert await successes(good, http) == 6
    assert await successes(bad, http) == 0


async def test_mid_stream_failure_ends_with_error_event_and_done(make_sim, start_router, make_routes,
                                                                  http) -> None:
    sim = await make_sim(args=["--cut-after-chunks", "3"])
    server = await start_router(make_routes([sim.url]))
    body = {"model": "sim-a", "prompt": PROMPT, "max_tokens": 20, "stream": True}
    async with http.post(server.url + "/v1/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = await r.read()
    events = sse_events(raw)
    assert events[-1] == b"[DONE]"
    error = orjson.loads(events[-2])["error"]
    assert error["code"] == 502 and "mid-stream" in error["message"]
    chunks = [orjson.loads(e) for e in events[:-2]]
    assert 1 <= len(chunks) <= 3 and all(c["object"] == "text_completion" for c in chunks)
    # Bytes had reached the client: exactly one attempt, no retry.
    async with http.get(server.url + "/metrics") as r:
        text = await r.text()
    assert 'kind="stream_cut"' in text
    assert 'router_retries_total{model="sim-a"}' not in text


async def test_non_stream_cut_before_answer_fails_over(make_sims, start_router, make_routes,
                                                       http) -> None:
    cutting, good = await make_sims(2)
    await cutting.set_faults(http, cut_after_chunks=0)
    server = await start_router(make_routes([cutting.url, good.url], policy="round_robin"))
    for _ in range(4):
        async with http.post(server.url + "/v1/completions",
                             json={"model": "sim-a", "prompt": PROMPT, "max_tokens": 4}) as r:
            assert r.status == 200
    # With only the cutting replica, the attempts run out: 502 with Retry-After, and a
    # message that says what happened without naming the replica.
    solo = await start_router(make_routes([cutting.url]))
    async with http.post(solo.url + "/v1/completions",
                         json={"model": "sim-a", "prompt": PROMPT, "max_tokens": 4}) as r:
        assert r.status == 502 and "Retry-After" in r.headers
        message = (await r.json())["error"]["message"]
    assert "3 attempt(s)" in message and "lost the connection" in message
    assert cutting.url not in message and "127.0.0.1" not in message


async def test_client_disconnect_aborts_upstream_at_once(make_sim, start_router, make_routes, http,
                                                         until) -> None:
    sim = await make_sim(time_scale=1.0)
    server = await start_router(make_routes([sim.url]))
    replica = next(iter(server.router.fleet))
    url = server.url + "/v1/completions"
    # A stream: read the first bytes, then hang up.
    async with aiohttp.ClientSession() as client:
        resp = await client.post(url, json={"model": "sim-a", "prompt": PROMPT, "max_tokens": 3000,
                                            "stream": True})
        assert resp.status == 200
        await resp.content.readline()
        assert await running(sim, http) == 1
        assert replica.in_flight == 1
        resp.close()
    hung_up = time.monotonic()
    while await running(sim, http) != 0:
        assert time.monotonic() - hung_up < 1.0, "replica still running the abandoned stream"
        await asyncio.sleep(0.02)
    await until(lambda: replica.in_flight == 0 and not server.router.proxy.active, timeout=2)

    # A non-stream request whose client gives up while the replica is generating.
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(url, json={"model": "sim-a", "prompt": PROMPT, "max_tokens": 3000},
                             timeout=aiohttp.ClientTimeout(total=0.4)) as r:
            await r.read()
    hung_up = time.monotonic()
    while await running(sim, http) != 0:
        assert time.monotonic() - hung_up < 1.0, "replica still running the abandoned request"
        await asyncio.sleep(0.02)
    await until(lambda: replica.in_flight == 0 and not server.router.proxy.active, timeout=2)
    async with http.get(server.url + "/metrics") as r:
        text = await r.text()
    assert 'router_client_disconnects_total{model="sim-a"} 2.0' in text
    assert 'status="499"' in text


async def test_late_replica_joins_without_reload(make_sim, start_router, make_routes, http,
                                                 until, unused_port) -> None:
    early = await make_sim()
    late_url = f"http://127.0.0.1:{unused_port}"
    server = await start_router(make_routes([early.url, late_url], policy="round_robin"),
                                wait_healthy=False)
    r_early, r_late = list(server.router.fleet)
    await until(lambda: r_early.health is Health.HEALTHY, message="early replica healthy")
    assert r_late.health in (Health.UNKNOWN, Health.UNHEALTHY)
    for i in range(4):  # only the early replica serves; nothing is lost to the absent one
        async with http.post(server.url + "/v1/completions",
                             json={"model": "sim-a", "prompt": f"{PROMPT}{i}", "max_tokens": 2}) as r:
            assert r.status == 200
    async with http.get(server.url + "/ready") as r:
        assert r.status == 200  # one healthy replica of every model is enough
    late = await make_sim(port=unused_port)
    await until(lambda: r_late.health is Health.HEALTHY, timeout=3, message="late replica joined")
    await until(lambda: bool(r_late.served_models), timeout=3, message="late replica models")
    for i in range(6):
        async with http.post(server.url + "/v1/completions",
                             json={"model": "sim-a", "prompt": f"{PROMPT}{i}", "max_tokens": 2}) as r:
            assert r.status == 200
    assert await successes(late, http) == 3  # round robin: its share, with no reload


async def test_unhealthy_replica_gets_no_traffic(make_sims, start_router, make_routes, http,
                                                 until) -> None:
    a, b = await make_sims(2)
    server = await start_router(make_routes([a.url, b.url]))
    rb = [r for r in server.router.fleet if r.url == b.url][0]
    await b.set_faults(http, unhealthy_for=30)
    await until(lambda: rb.health is Health.UNHEALTHY, message="b unhealthy")
    before = await successes(b, http)
    for i in range(6):
        async with http.post(server.url + "/v1/completions",
                             json={"model": "sim-a", "prompt": f"{PROMPT}{i}", "max_tokens": 2}) as r:
            assert r.status == 200
    assert await successes(b, http) == before
    await b.set_faults(http, unhealthy_for=0)
    await until(lambda: rb.health is Health.HEALTHY, message="b healthy again")


async def test_bookkeeping_is_bounded_after_traffic(make_sims, start_router, make_routes, http,
                                                    until) -> None:
    sims = await make_sims(2)
    server = await start_router(make_routes([s.url for s in sims], policy="least_load",
                                            prefix={"capacity_blocks": 64}))
    router = server.router

    async def one(i: int) -> None:
        prompt = f"distinct prompt {i} " + "lorem ipsum dolor sit amet " * 40
        body = {"model": "sim-a", "prompt": prompt, "max_tokens": 2, "stream": i % 2 == 0}
        if i % 10 == 3:
            body = {"model": "nope", "prompt": prompt}
        async with http.post(server.url + "/v1/completions", json=body) as r:
            await r.read()

    await asyncio.gather(*(one(i) for i in range(120)))
    await until(lambda: not router.proxy.active, timeout=2, message="no active requests")
    assert all(r.in_flight == 0 for r in router.fleet)
    assert router.index.records <= 64
    async with http.get(server.url + "/metrics") as r:
        text = await r.text()
    for sim in sims:
        assert f'router_in_flight_requests{{model="sim-a",replica="{sim.url}"}} 0.0' in text
