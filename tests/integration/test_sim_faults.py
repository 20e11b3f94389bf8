"""Fault injection, by flag and at run time through POST /admin/faults."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from engines.sim.process import SimProcess

MODEL = "sim-f"
ARGS = ["--num-gpu-blocks", "600"]


def body(stream: bool = False, max_tokens: int = 5) -> dict:
    return {"model": MODEL, "prompt": "fault injection test prompt", "max_tokens": max_tokens, "stream": stream}


@pytest.fixture
async def sim():
    async with SimProcess(MODEL, time_scale=20, args=ARGS) as proc:
        yield proc


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def test_fail_rate_answers_500_in_vllms_error_shape(sim, http):
    state = await sim.set_faults(http, fail_rate=1.0)
    assert state["fail_rate"] == 1.0
    async with http.post(sim.url + "/v1/completions", json=body()) as r:
        assert r.status == 500
        err = (await r.json())["error"]
        assert err["code"] == 500 and err["type"] == "InternalServerError"
    await sim.set_faults(http, fail_rate=0.5, seed=7)
    statuses = []
    for _ in range(40):
        async with http.post(sim.url + "/v1/completions", json=body(max_tokens=1)) as r:
            statuses.append(r.status)
    assert 5 < statuses.count(500) < 35 and statuses.count(200) + statuses.count(500) == 40
    await sim.set_faults(http, clear=True)
    async with http.post(sim.url + "/v1/completions", json=body()) as r:
        assert r.status == 200


async def test_bad_fault_bodies_are_400(sim, http):
    for bad in ({"fail_rate": 2}, {"nonsense": 1}, {"slow_factor": 0}):
        async with http.post(sim.url + "/admin/faults", json=bad) as r:
            assert r.status == 400, bad


async def test_hang_accepts_and_never_answers(sim, http):
    await sim.set_faults(http, hang_rate=1.0)
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(sim.url + "/v1/completions", json=body(),
                             timeout=aiohttp.ClientTimeout(total=0.5)) as r:
            await r.read()
    for _ in range(100):  # the hung handler is released once the client has left
        async with http.get(sim.url + "/load") as r:
            if (await r.json())["server_load"] == 0:
                break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the hung request was never released")
    await sim.set_faults(http, hang_rate=0)
    async with http.post(sim.url + "/v1/completions", json=body()) as r:
        assert r.status == 200


async def test_slow_factor_stretches_every_step(sim, http):
    """Judged on the simulator's own clock (vllm:e2e_request_latency_seconds, simulated
    seconds, exact at any time scale), not on wall time, which a loaded machine stretches."""

    async def simulated_e2e() -> float:
        before = (await sim.metrics(http))["vllm:e2e_request_latency_seconds_sum"]
        async with http.post(sim.url + "/v1/completions", json=body(max_tokens=100)) as r:
            assert r.status == 200
        return (await sim.metrics(http))["vllm:e2e_request_latency_seconds_sum"] - before

    base = await simulated_e2e()
    await sim.set_faults(http, slow_factor=5)
    slow = await simulated_e2e()
    assert base > 0
    assert slow == pytest.approx(5 * base, rel=0.05)


async def test_cut_stream_mid_way(sim, http):
    await sim.set_faults(http, cut_after_chunks=2)
    async with http.post(sim.url + "/v1/completions", json=body(stream=True, max_tokens=10)) as r:
        assert r.status == 200
        chunks = []
        with pytest.raises(aiohttp.ClientPayloadError):
            async for line in r.content:
                if line.strip():
                    chunks.append(line)
    assert len(chunks) == 2 and all(b"[DONE]" not in c for c in chunks)
    with pytest.raises(aiohttp.ClientError):
        async with http.post(sim.url + "/v1/completions", json=body()) as r:
            await r.read()
    await sim.set_faults(http, cut_after_chunks=None)
    async with http.post(sim.url + "/v1/completions", json=body(stream=True)) as r:
        assert (await r.read()).endswith(b"data: [DONE]\n\n")


async def test_unhealthy_for_a_while(sim, http):
    await sim.set_faults(http, unhealthy_for=0.3)
    async with http.get(sim.url + "/health") as r:
        assert r.status == 503
    await asyncio.sleep(0.35)
    async with http.get(sim.url + "/health") as r:
        assert r.status == 200


async def test_exit_after_n_requests_like_a_crash(http):
    async with SimProcess(MODEL, time_scale=20, args=ARGS + ["--exit-after", "2"]) as sim:
        for _ in range(2):
            async with http.post(sim.url + "/v1/completions", json=body()) as r:
                assert r.status == 200
        assert await sim.wait_exit(5) == 1
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(sim.url + "/health"):
                pass


async def test_start_delay_refuses_connections_until_up(http):
    sim = SimProcess(MODEL, args=ARGS + ["--start-delay", "0.6"], wait_healthy=False)
    async with sim:
        t0 = time.monotonic()
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(sim.url + "/health"):
                pass
        await sim.wait_until_healthy(10)
        assert time.monotonic() - t0 > 0.3


async def test_faults_by_flag(http):
    async with SimProcess(MODEL, args=ARGS + ["--fail-rate", "1", "--unhealthy-for", "30"],
                          wait_healthy=False) as sim:
        deadline = time.monotonic() + 10
        while True:
            try:
                async with http.get(sim.url + "/health") as r:
                    assert r.status == 503
                    break
            except aiohttp.ClientConnectionError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        async with http.post(sim.url + "/v1/completions", json=body()) as r:
            assert r.status == 500
        async with http.get(sim.url + "/admin/faults") as r:
            state = await r.json()
        assert state["fail_rate"] == 1.0 and state["unhealthy_for"] > 20
