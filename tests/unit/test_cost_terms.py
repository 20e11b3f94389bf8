"""Properties of each cost term, of their weighted sum, and of the term registry.

Each term is checked on hypothesis-generated fleets through the real producers (the index,
learned rates, recent shares), in the unit every term promises: seconds of expected time to
first token, one finite value >= 0 per candidate, or None for "0 everywhere".
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.core.requests import RouteRequest
from router.core.scheduling import TERM_NAMES, build_profile
from router.core.scheduling.candidates import Candidates, gather
from router.core.scheduling.producers import LearnedRates, PrefixMatch, RecentShare
from router.core.scheduling.terms import build_term, term_module
from router.fleet.engine_load import EngineLoad
from router.fleet.replicas import Health, Replica
from router.prefix.hashing import hash_text
from router.prefix.index import PrefixIndex
from yamlcheck import Node

TEXT = "The quick brown fox jumps over the lazy dog, again and again. " * 40  # 39 blocks
HASHES = hash_text(TEXT, "m")

replica_spec = st.tuples(
    st.integers(0, 12),  # router in-flight
    st.integers(0, 6),  # scraped running
    st.integers(0, 4),  # scraped waiting
    st.sampled_from([1, 2, 4]),  # tensor parallel size
    st.integers(0, len(HASHES)),  # blocks of the prompt the index holds for it
    st.one_of(st.none(), st.integers(0, 80)),  # KV capacity in blocks (None: unknown)
    st.floats(0.0, 1.0),  # scraped kv_cache_usage
)


def table(specs: list[tuple], text: str = TEXT, pending: tuple[int, ...] = ()) -> tuple[RouteRequest, Candidates]:
    """A request and its candidates with every producer run, from replica specs (and the
    prompt tokens the router has pending on each, if given)."""
    index = PrefixIndex(tokens_per_block=16)
    replicas = []
    for i, (in_flight, running, waiting, tp, matched, kv_blocks, usage) in enumerate(specs):
        r = Replica(url=f"http://r{i}", model="m", tensor_parallel_size=tp, health=Health.HEALTHY,
                    in_flight=in_flight, load=EngineLoad(running=running, waiting=waiting, kv_cache_usage=usage,
                                                         scraped_at=1.0))
        if i < len(pending):
            r.pending_prefill_tokens = pending[i]
        replicas.append(r)
        if matched:
            index.record(HASHES[:matched], r.id)
        if kv_blocks is not None:
            index.set_replica_capacity_tokens(r.id, kv_blocks * 16)
    request = RouteRequest(model="m", path="/v1/completions", body=b"", routing_text=text,
                           block_hashes=hash_text(text, "m"), prompt_chars=len(text), stream=True)
    cands = gather(replicas, index)
    for producer in (PrefixMatch(), LearnedRates(), RecentShare()):
        producer.produce(request, cands)
    return request, cands


def costs_of(name: str, request: RouteRequest, cands: Candidates, **params: object) -> list[float]:
    out = build_term(name, Node(dict(params), "routing.params")).costs(request, cands)
    return [0.0] * cands.n if out is None else out


@pytest.mark.parametrize("name", TERM_NAMES)
@settings(max_examples=60, deadline=None)
@given(specs=st.lists(replica_spec, min_size=1, max_size=8))
def test_every_term_gives_one_finite_nonnegative_cost_per_candidate(name: str, specs: list[tuple]) -> None:
    request, cands = table(specs)
    costs = costs_of(name, request, cands)
    assert len(costs) == cands.n
    assert all(math.isfinite(c) and c >= 0.0 for c in costs), costs


@settings(max_examples=100, deadline=None)
@given(specs=st.lists(replica_spec, min_size=1, max_size=8))
def test_prefill_is_the_uncached_tokens_over_the_rate(specs: list[tuple]) -> None:
    request, cands = table(specs)
    prompt = request.estimated_prompt_tokens
    for cost, m, rate in zip(costs_of("prefill", request, cands), cands.data["prefix"].matched, cands.data["rates"]):
        assert cost == pytest.approx(max(0, prompt - 16 * m) / rate)


@settings(max_examples=100, deadline=None)
@given(spec=replica_spec, more=st.integers(1, len(HASHES)))
def test_prefill_never_grows_with_the_match_and_is_zero_when_all_is_cached(spec: tuple, more: int) -> None:
    fewer = spec[:4] + (max(0, spec[4] - more),) + spec[5:]
    request, cands = table([spec, fewer])
    cost, cost_fewer = costs_of("prefill", request, cands)
    assert cost <= cost_fewer
    held = spec[:4] + (len(HASHES), None) + spec[6:]  # every block held (no KV bound to drop them)
    request, cands = table([held], text=TEXT[:16 * 64])  # a 16-block prompt
    assert costs_of("prefill", request, cands) == [0.0]


def test_prefill_prefers_the_faster_replica_for_an_uncached_prompt() -> None:
    request, cands = table([(0, 0, 0, 1, 0, None, 0.0), (0, 0, 0, 4, 0, None, 0.0)])
    tp1, tp4 = costs_of("prefill", request, cands)
    assert tp4 == pytest.approx(tp1 / 4)


@settings(max_examples=100, deadline=None)
@given(spec=replica_spec, extra=st.integers(1, 5), running_weight=st.floats(0.0, 1.0))
def test_queue_grows_with_waiting_requests_and_running_ones_count_by_their_weight(
        spec: tuple, extra: int, running_weight: float) -> None:
    busier = spec[:2] + (spec[2] + extra,) + spec[3:]
    request, cands = table([spec, busier])
    cost, cost_busier = costs_of("queue", request, cands, running_weight=running_weight)
    assert cost <= cost_busier
    if running_weight <= 0.99:  # near 1 a new waiting request may be one the router counted running
        assert cost < cost_busier
    idle = (0, 0, 0) + spec[3:]
    request, cands = table([idle])
    assert costs_of("queue", request, cands, running_weight=running_weight) == [0.0]
    running = (0, 4, 0) + spec[3:]  # four running, none waiting
    request, cands = table([running])
    typical, rate = cands.data["typical_tokens"], cands.data["rates"][0]
    assert costs_of("queue", request, cands, running_weight=running_weight)[0] == pytest.approx(
        4 * running_weight * typical / rate)


@settings(max_examples=100, deadline=None)
@given(spec=replica_spec, pending=st.integers(1, 200_000))
def test_queue_counts_the_prompt_tokens_pending_there_or_the_waiting_queue_whichever_is_more(
        spec: tuple, pending: int) -> None:
    """Three 12k-token prompts ahead are a longer wait than ten short ones: the router's
    own pending prefill is counted in tokens, and the scraped waiting queue (other
    clients) in typical prompts; the larger of the two."""
    request, cands = table([spec, spec], pending=(0, pending))
    base, loaded = costs_of("queue", request, cands)
    typical, rate = cands.data["typical_tokens"], cands.data["rates"][1]
    waiting_tokens = spec[2] * typical
    assert loaded >= base
    assert loaded - base == pytest.approx(max(0.0, pending - waiting_tokens) / rate)


@settings(max_examples=100, deadline=None)
@given(spec=replica_spec, room=st.integers(0, 80))
def test_eviction_counts_the_blocks_that_do_not_fit(spec: tuple, room: int) -> None:
    request, cands = table([spec[:5] + (room,) + spec[6:]])
    prefix = cands.data["prefix"]
    new_blocks = prefix.blocks - prefix.matched[0]
    evicted = max(0, new_blocks - prefix.free_tokens[0] / 16)
    assert costs_of("eviction", request, cands)[0] == pytest.approx(evicted * 16 / cands.data["rates"][0])
    request, cands = table([spec[:5] + (None,) + spec[6:]])  # unknown KV size: nothing known to evict
    assert build_term("eviction", Node({}, "")).costs(request, cands) is None


@settings(max_examples=100, deadline=None)
@given(spec=replica_spec, low=st.floats(0.0, 1.0), high=st.floats(0.0, 1.0), onset=st.floats(0.0, 0.95))
def test_kv_pressure_starts_at_the_onset_and_grows_with_usage(spec: tuple, low: float, high: float,
                                                              onset: float) -> None:
    low, high = min(low, high), max(low, high)
    request, cands = table([spec[:6] + (low,), spec[:6] + (high,)])
    cost_low, cost_high = costs_of("kv_pressure", request, cands, kv_pressure_onset=onset)
    assert cost_low <= cost_high
    if high <= onset:
        assert cost_high == 0.0
    request, cands = table([spec[:6] + (1.0,)])
    full = costs_of("kv_pressure", request, cands, kv_pressure_onset=onset)[0]
    assert full == pytest.approx(cands.data["typical_tokens"] / cands.data["rates"][0])


def test_kv_pressure_ignores_a_replica_never_scraped() -> None:
    request, cands = table([(0, 0, 0, 1, 0, None, 0.99)])
    cands.replicas[0].load = EngineLoad(kv_cache_usage=0.99)  # scraped_at 0: never scraped
    assert costs_of("kv_pressure", request, cands) == [0.0]


@settings(max_examples=60, deadline=None)
@given(specs=st.lists(replica_spec, min_size=2, max_size=8),
       weights=st.fixed_dictionaries({name: st.sampled_from([0.0, 0.5, 1.0, 3.0]) for name in TERM_NAMES}))
def test_the_cost_is_the_weighted_sum_of_the_terms_and_why_names_each(specs: list[tuple],
                                                                      weights: dict[str, float]) -> None:
    if not any(weights.values()):
        weights["prefill"] = 1.0
    request, cands = table(specs)
    each = {name: costs_of(name, request, cands) for name in TERM_NAMES}
    profile = build_profile("cache_aware", Node({}, "routing.params"), Node(dict(weights), "routing.terms"))
    decision = profile.rank(request, cands.replicas, cands.index)
    winner, runner_up = (cands.ids.index(r.id) for r in decision.ranked[:2])
    why = decision.why
    expected = sum(weights[name] * each[name][winner] for name in TERM_NAMES)
    assert why["cost_s"] == pytest.approx(expected, abs=2e-6)
    assert why["runner_up_cost_s"] == pytest.approx(
        sum(weights[name] * each[name][runner_up] for name in TERM_NAMES), abs=2e-6)
    assert set(why["terms"]) == {name for name, w in weights.items() if w > 0}  # weight 0: off
    for name, (at_winner, at_runner_up) in why["terms"].items():
        assert at_winner == pytest.approx(weights[name] * each[name][winner], abs=2e-6)
        assert at_runner_up == pytest.approx(weights[name] * each[name][runner_up], abs=2e-6)


@settings(max_examples=40, deadline=None)
@given(specs=st.lists(replica_spec, min_size=1, max_size=8))
def test_a_ranking_without_its_explanation_is_the_same_ranking(specs: list[tuple]) -> None:
    """server.access_log: false ranks with explain=False: the order keys' why is left out
    (nobody reads it), nothing else changes."""
    request, cands = table(specs)
    profile = build_profile("cache_aware", Node({}, "routing.params"))  # the preset's terms
    full = profile.rank(request, cands.replicas, cands.index)
    request, cands = table(specs)  # fresh producers' inputs, same table
    profile = build_profile("cache_aware", Node({}, "routing.params"))  # the preset's terms
    short = profile.rank(request, cands.replicas, cands.index, explain=False)
    assert [r.id for r in short.ranked] == [r.id for r in full.ranked]
    assert short.matched_blocks == full.matched_blocks and short.matched_tokens == full.matched_tokens
    assert "terms" in full.why and "cost_s" in full.why
    assert "terms" not in short.why and "cost_s" not in short.why
    assert {k: v for k, v in full.why.items() if k in short.why} == short.why


def test_the_registry_lists_every_term_file_with_its_contract() -> None:
    assert set(TERM_NAMES) >= {"queue", "prefill", "eviction", "kv_pressure", "lora"}
    for name in TERM_NAMES:
        module = term_module(name)
        assert module.NAME == name
        assert isinstance(module.PARAMS, tuple) and isinstance(module.NEEDS, tuple)
        assert set(module.NEEDS) <= {"prefix", "rates", "recent", "adapters"}
    with pytest.raises(ValueError, match="unknown cost term"):
        term_module("prefil")
