"""The simulator's engine loop and clock, in process (no HTTP)."""

from __future__ import annotations

import asyncio
import time

from engines.sim.cost_model import CostModel
from engines.sim.engine import Clock, Engine, EngineConfig
from engines.sim.metrics import SimMetrics
from engines.sim.process import parse_metrics
from engines.sim.scheduler import SimRequest
from engines.sim.tokenizer import Tokenizer


async def test_busy_time_is_model_time_whatever_the_process_costs():
    clock = Clock(scale=1000.0)
    await clock.advance_to(clock.now() + 0.01)  # busy from here
    start = clock.now()
    for _ in range(10):
        time.sleep(0.003)  # 3 s of simulated time spent by "the process" between steps
        await clock.advance_to(clock.now() + 0.01)
    assert abs(clock.now() - (start + 0.1)) < 1e-9
    assert clock.lag > 20
    clock.release()
    await asyncio.sleep(0.01)
    assert clock.now() > start + 0.1 + 5  # idle: wall time x scale again


async def test_clock_never_goes_backwards():
    clock = Clock(scale=100.0)
    seen = [clock.now()]
    for _ in range(20):
        await clock.advance_to(seen[-1] + 0.001)
        seen.append(clock.now())
        time.sleep(0.001)
        seen.append(clock.now())
    assert seen == sorted(seen)


def test_busy_time_is_model_time_when_the_event_loop_wakes_early():
    """uvloop (what the simulator runs on) rounds timers down to whole milliseconds, so at
    --time-scale 20 a 7 ms step's 0.35 ms sleep returns at once.  The step must still take
    its full model time: this once made 100 decode steps read 0.037 s instead of 0.7 s."""
    import uvloop

    async def hundred_steps() -> tuple[float, float]:
        clock = Clock(scale=20.0)
        start = clock.now()
        wall = time.monotonic()
        for _ in range(100):  # as Engine.run does: each step starts at clock.now()
            await clock.advance_to(clock.now() + 0.007)
        return clock.now() - start, time.monotonic() - wall

    simulated, wall = uvloop.run(hundred_steps())
    assert abs(simulated - 0.7) < 0.005  # (the first step starts a few idle microseconds late)
    assert wall >= 0.7 / 20 * 0.9  # the wall pace keeps to the scale (owed sleep is paid later)


def _engine(**cfg) -> Engine:
    config = EngineConfig(model="m", time_scale=100.0, num_gpu_blocks=64, block_size=16, max_model_len=1024, **cfg)
    metrics = SimMetrics("m", block_size=16, num_gpu_blocks=64, enable_prefix_caching=True,
                         gpu_memory_utilization=0.9)
    return Engine(config, CostModel(), Tokenizer(), metrics)


async def test_engine_streams_tokens_and_abort_frees_at_once():
    engine = _engine()
    loop = asyncio.create_task(engine.run())
    try:
        done_req = SimRequest("a", list(range(40)), max_tokens=5)
        chan = engine.submit(done_req)
        got = []
        finished = False
        while not finished:
            tokens, finished = await chan.next()
            got += tokens
        assert got == done_req.output_ids and len(got) == 5 and done_req.finish_reason == "length"

        long_req = SimRequest("b", list(range(100, 140)), max_tokens=900)
        chan = engine.submit(long_req)
        await chan.next()
        assert engine.kv.usage() > 0
        engine.abort(long_req)
        m = parse_metrics(engine.metrics.render().decode())
        assert m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0
        assert m["vllm:generation_tokens_total"] >= 6
        assert not engine.sched.has_work()
    finally:
        loop.cancel()
