"""The simulator's scheduler and cost model: continuous batching like vLLM v1."""

from __future__ import annotations

import itertools

from engines.sim.cost_model import CostModel
from engines.sim.kv_cache import KVCache
from engines.sim.scheduler import Scheduler, SimRequest, Status

_ids = itertools.count()


def make(num_blocks: int = 64, block_size: int = 4, seqs: int = 8, budget: int = 64,
         max_len: int = 256) -> Scheduler:
    return Scheduler(KVCache(num_blocks, block_size), max_num_seqs=seqs, max_num_batched_tokens=budget,
                     max_model_len=max_len)


def req(prompt_len: int, max_tokens: int = 4, base: int = 0) -> SimRequest:
    return SimRequest(f"r{next(_ids)}", [base + i for i in range(prompt_len)], max_tokens)


def run_step(s: Scheduler):
    plan = s.schedule()
    return plan, s.complete(plan, lambda r: 7)


def run_to_end(s: Scheduler, limit: int = 1000) -> int:
    steps = 0
    while s.has_work() and steps < limit:
        run_step(s)
        steps += 1
    return steps


def test_chunked_prefill_spreads_a_long_prompt_over_steps() -> None:
    s = make(budget=16)
    r = req(40, max_tokens=2)
    s.add(r)
    sizes = []
    while r.status is not Status.FINISHED:
        plan, _ = run_step(s)
        sizes.append(plan.num_tokens)
    assert sizes == [16, 16, 8, 1]
    assert r.output_ids == [7, 7] and r.finish_reason == "length"


def test_decodes_batch_together_and_share_the_budget() -> None:
    s = make(budget=10)
    a, b = req(6, max_tokens=3), req(6, max_tokens=3)
    s.add(a)
    s.add(b)
    plan, _ = run_step(s)
    assert [(x.request_id, n) for x, n in plan.scheduled] == [(a.request_id, 6), (b.request_id, 4)]
    plan, _ = run_step(s)
    assert [n for _, n in plan.scheduled] == [1, 2]
    plan, _ = run_step(s)
    assert [n for _, n in plan.scheduled] == [1, 1]


def test_max_num_seqs_keeps_the_rest_waiting() -> None:
    s = make(seqs=2)
    rs = [req(4, base=100 * i) for i in range(3)]
    for r in rs:
        s.add(r)
    run_step(s)
    assert [r.status for r in rs] == [Status.RUNNING, Status.RUNNING, Status.WAITING]
    run_to_end(s)
    assert all(r.status is Status.FINISHED for r in rs)


def test_repeated_prompt_hits_whole_blocks_but_never_the_last_token() -> None:
    s = make(block_size=4)
    first = req(17)
    s.add(first)
    run_to_end(s)
    assert first.num_cached_tokens == 0
    again = req(17)
    s.add(again)
    plan, _ = run_step(s)
    assert again.num_cached_tokens == 16 and plan.scheduled[0][1] == 1
    exact = req(16)
    s.add(exact)
    run_step(s)
    assert exact.num_cached_tokens == 12  # (16 - 1) // 4 blocks


def test_preemption_when_blocks_run_out_and_everyone_finishes() -> None:
    s = make(num_blocks=6, block_size=4, seqs=4, budget=64, max_len=24)
    rs = [req(8, max_tokens=12, base=1000 * i) for i in range(3)]
    for r in rs:
        s.add(r)
    preempted = 0
    for _ in range(500):
        if not s.has_work():
            break
        plan, _ = run_step(s)
        preempted += len(plan.preempted)
        held = {b for r in s.running for b in r.alloc.block_ids}
        assert len(held) + s.kv.num_free_blocks == 6
    assert preempted > 0
    assert all(r.status is Status.FINISHED and len(r.output_ids) == 12 for r in rs)
    assert sum(r.num_preemptions for r in rs) == preempted
    assert s.kv.usage() == 0.0


def test_remove_frees_at_once() -> None:
    s = make()
    a, b = req(8, max_tokens=50), req(8, max_tokens=50, base=500)
    s.add(a)
    s.add(b)
    run_step(s)
    assert s.kv.usage() > 0
    assert s.remove(a) and a.finish_reason == "abort"
    assert s.running == [b]
    plan = s.schedule()
    assert s.remove(b)
    assert s.complete(plan, lambda r: 7) == []  # a step that ran for removed requests yields nothing
    assert s.kv.usage() == 0.0 and not s.has_work()
    assert not s.remove(a)


def test_cost_model_prefill_grows_with_uncached_tokens_decode_with_batch_and_context() -> None:
    c = CostModel()
    assert c.step_time([(2000, 2000)], []) > 5 * c.step_time([(200, 2000)], [])
    assert c.step_time([], [1000] * 64) > c.step_time([], [1000])
    assert c.step_time([], [8000] * 32) > c.step_time([], [1000] * 32)
    one = c.step_time([(4000, 4000)], [])
    tp2 = CostModel(tp=2).step_time([(4000, 4000)], [])
    tp4 = CostModel(tp=4).step_time([(4000, 4000)], [])
    assert one / 2 < tp2 < one and tp2 / 2 < tp4 < tp2
    # Calibration: Llama-3.1-8B on one H100 (see cost_model.py).
    assert 0.005 < c.step_time([], [1000]) < 0.010
    assert 15_000 < 2000 / c.step_time([(2000, 2000)], []) < 40_000
    assert CostModel(tp=2).num_gpu_blocks(16) > 2 * c.num_gpu_blocks(16)
