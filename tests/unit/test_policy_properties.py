"""Properties every policy keeps, whatever the fleet looks like (hypothesis)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.core.requests import RouteRequest
from router.core.scheduling import build_profile as build_policy
from router.fleet.engine_load import EngineLoad
from router.fleet.replicas import Health, Replica
from router.prefix.hashing import hash_text
from router.prefix.index import PrefixIndex
from yamlcheck import ConfigError, Node

POLICIES = ["cache_aware", "prefix_affinity", "session", "power_of_two", "random"]
SYSTEM = "You are a careful assistant. Answer briefly and cite sources. " * 8


def capacity(replica: Replica) -> float:
    return max(1, replica.tensor_parallel_size) * (replica.weight if replica.weight > 0 else 1.0)


def make_request(text: str, session: str | None = None, stream: bool = True) -> RouteRequest:
    return RouteRequest(model="m", path="/v1/completions", body=b"", routing_text=text,
                        block_hashes=hash_text(text, "m"), prompt_chars=len(text),
                        session_key=session, stream=stream)


replica_spec = st.tuples(
    st.sampled_from(list(Health)),
    st.integers(0, 20),  # router in-flight
    st.integers(0, 20),  # scraped running + waiting
    st.sampled_from([1, 1, 2, 4]),  # tensor parallel size
    st.integers(0, 12),  # blocks of the request's prefix the index says it was sent
)


def build_fleet(specs, text: str) -> tuple[list[Replica], PrefixIndex]:
    index = PrefixIndex()
    hashes = hash_text(text, "m")
    replicas = []
    for i, (health, in_flight, scraped, tp, matched) in enumerate(specs):
        r = Replica(url=f"http://r{i}", model="m", tensor_parallel_size=tp, health=health,
                    in_flight=in_flight, load=EngineLoad(running=scraped))
        replicas.append(r)
        if matched:
            index.record(hashes[:matched], r.id)
    return replicas, index


@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=80, deadline=None)
@given(specs=st.lists(replica_spec, max_size=9), with_session=st.booleans(), suffix=st.text(max_size=300))
def test_ranks_every_routable_replica_once_healthy_before_suspect(name, specs, with_session, suffix):
    policy = build_policy(name, Node({}, "routing.params"))
    text = SYSTEM + suffix
    replicas, index = build_fleet(specs, text)
    decision = policy.rank(make_request(text, "s-1" if with_session else None), replicas, index)
    ranked = decision.ranked
    routable = [r for r in replicas if r.health in (Health.HEALTHY, Health.SUSPECT)]
    assert sorted(r.id for r in ranked) == sorted(r.id for r in routable)
    assert all(r.health is not Health.UNHEALTHY and r.health is not Health.UNKNOWN for r in ranked)
    healths = [r.health for r in ranked]
    assert healths == sorted(healths, key=lambda h: h is Health.SUSPECT)
    assert decision.why.get("policy") == name


@pytest.mark.parametrize("name", ["cache_aware", "session"])
@settings(max_examples=150, deadline=None)
@given(specs=st.lists(replica_spec, min_size=1, max_size=9), factor=st.sampled_from([1.1, 1.25, 2.0]))
def test_bounded_load_guard_holds_for_the_winner(name, specs, factor):
    policy = build_policy(name, Node({"load_factor": factor}, "routing.params"))
    replicas, index = build_fleet(specs, SYSTEM)
    decision = policy.rank(make_request(SYSTEM, "key"), replicas, index)
    healthy = [r for r in replicas if r.health is Health.HEALTHY]
    if not healthy:
        return
    winner = decision.ranked[0]
    share = (sum(r.queued for r in healthy) + 1) * capacity(winner) / sum(capacity(r) for r in healthy)
    assert winner.queued + 1 <= max(math.ceil(factor * share - 1e-9), math.ceil(share - 1e-9) + 2)


@settings(max_examples=200, deadline=None)
@given(
    specs=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 12)), min_size=2, max_size=8),
    prompt_blocks=st.integers(1, 40),
)
def test_cache_aware_more_matched_and_less_load_never_ranks_worse(specs, prompt_blocks):
    text = (SYSTEM * 4)[: 64 * prompt_blocks]
    replicas, index = build_fleet([(Health.HEALTHY, load, 0, 1, m) for load, m in specs], text)
    decision = build_policy("cache_aware", Node({}, "")).rank(make_request(text), replicas, index)
    position = {r.id: i for i, r in enumerate(decision.ranked)}
    for a, (load_a, m_a) in zip(replicas, specs):
        for b, (load_b, m_b) in zip(replicas, specs):
            m_a_eff, m_b_eff = min(m_a, prompt_blocks), min(m_b, prompt_blocks)
            if a is not b and m_a_eff >= m_b_eff and load_a <= load_b and (m_a_eff, -load_a) != (m_b_eff, -load_b):
                assert position[a.id] < position[b.id], (a.id, b.id, decision.why)


def test_cache_aware_prefers_tp4_for_long_uncached_prompts_and_cache_for_short_ones() -> None:
    tp1 = Replica(url="http://tp1", model="m", tensor_parallel_size=1, health=Health.HEALTHY)
    tp4 = Replica(url="http://tp4", model="m", tensor_parallel_size=4, health=Health.HEALTHY, in_flight=2)
    policy = build_policy("cache_aware", Node({}, ""))
    long_prompt = "novel text " * 3000
    assert policy.rank(make_request(long_prompt), [tp1, tp4], PrefixIndex()).ranked[0] is tp4
    # A mostly cached prompt stays where its prefix is, even on the smaller replica.
    index = PrefixIndex()
    index.record(hash_text(long_prompt, "m"), tp1.id)
    decision = policy.rank(make_request(long_prompt + "one more question"), [tp1, tp4], index)
    assert decision.ranked[0] is tp1
    assert decision.matched_blocks[tp1.id] == len(hash_text(long_prompt, "m"))
    assert decision.why["matched_blocks"] == decision.matched_blocks[tp1.id]
    assert decision.why["runner_up"] == tp4.id and decision.why["cost_s"] < decision.why["runner_up_cost_s"]


def test_cache_aware_learns_prefill_rates_from_observed_ttfb() -> None:
    """Rates are learned per capacity class: here a TP=2 replica observed 4x slower than the
    prior says (so slower than the TP=1 one), which then wins long uncached prompts."""
    a = Replica(url="http://a", model="m", tensor_parallel_size=2, health=Health.HEALTHY)
    b = Replica(url="http://b", model="m", health=Health.HEALTHY)
    policy = build_policy("cache_aware", Node({}, ""))
    rates = policy.producer("rates")
    assert rates.prefill_rate(a) == 40_000 and rates.prefill_rate(b) == 20_000  # the priors
    request = make_request("x" * 40_000)  # 10k tokens, nothing cached
    assert policy.rank(request, [b, a], PrefixIndex()).ranked[0] is a
    for _ in range(30):  # a prefills 10k tokens in 1 s, b in 0.5 s
        policy.observe(a, request, time_to_first_byte_s=1.0, matched_blocks=0)
        policy.observe(b, request, time_to_first_byte_s=0.5, matched_blocks=0)
    assert rates.prefill_rate(a) == pytest.approx(10_000, rel=0.05)
    assert rates.prefill_rate(b) == pytest.approx(20_000, rel=0.05)
    for _ in range(5):
        assert policy.rank(request, [a, b], PrefixIndex()).ranked[0] is b
    # Short prompts teach nothing (their ttfb is overhead).
    slow = rates.prefill_rate(a)
    policy.observe(a, make_request("short"), time_to_first_byte_s=10.0, matched_blocks=0)
    assert rates.prefill_rate(a) == slow
    # Non-streamed answers teach nothing either: their first byte comes after the generation.
    fast = rates.prefill_rate(b)
    for _ in range(30):
        policy.observe(b, make_request("x" * 40_000, stream=False), time_to_first_byte_s=8.0, matched_blocks=0)
    assert rates.prefill_rate(b) == fast


def test_replicas_of_one_capacity_class_share_one_learned_rate() -> None:
    """Equal replicas' answers differ by their queueing: those few percent must not make one
    of them the cheapest place for every cold prompt (the cost would follow the noise, not
    the load), nor charge one's queue at a slower rate.  Both learn one rate, and a cold
    prompt, whose prefill then costs the same on both, goes where the load is lower."""
    a = Replica(url="http://a", model="m", health=Health.HEALTHY)
    b = Replica(url="http://b", model="m", health=Health.HEALTHY, in_flight=1)
    policy = build_policy("cache_aware", Node({}, ""))
    rates = policy.producer("rates")
    request = make_request("x" * 40_000)  # 10k tokens, nothing cached
    for _ in range(30):  # a reads 10% slower than b
        policy.observe(a, request, time_to_first_byte_s=0.55, matched_blocks=0)
        policy.observe(b, request, time_to_first_byte_s=0.5, matched_blocks=0)
    assert rates.prefill_rate(a) == rates.prefill_rate(b)
    assert 18_000 < rates.prefill_rate(a) < 20_000  # learned from both
    assert policy.rank(request, [b, a], PrefixIndex()).ranked[0] is a
    # Another capacity is another class: its prior, until it is observed.
    tp2 = Replica(url="http://tp2", model="m", tensor_parallel_size=2, health=Health.HEALTHY)
    assert rates.prefill_rate(tp2) == 40_000


def test_cache_aware_spreads_a_prefix_shared_by_everyone_prefix_affinity_does_not() -> None:
    """A burst of requests sharing one system prompt: the guard keeps loads bounded."""
    results = {}
    for name in ("cache_aware", "prefix_affinity"):
        policy = build_policy(name, Node({}, ""))
        replicas = [Replica(url=f"http://r{i}", model="m", health=Health.HEALTHY) for i in range(4)]
        index = PrefixIndex()
        for n in range(100):  # nothing finishes during the burst
            request = make_request(SYSTEM + f"user {n}: hello")
            winner = policy.rank(request, replicas, index).ranked[0]
            winner.in_flight += 1
            index.record(request.block_hashes, winner.id)
        results[name] = max(r.in_flight for r in replicas)
    assert results["cache_aware"] <= math.ceil(1.25 * 100 / 4)
    assert results["prefix_affinity"] > 50  # the hot spot the guard exists to prevent


def test_cache_aware_spreads_an_idle_fleet_by_rotation() -> None:
    policy = build_policy("cache_aware", Node({}, ""))
    replicas = [Replica(url=f"http://r{i}", model="m", health=Health.HEALTHY) for i in range(4)]
    winners = {policy.rank(make_request(f"q{i}"), replicas, PrefixIndex()).ranked[0].id for i in range(8)}
    assert len(winners) == 4


def test_suspect_replicas_only_win_when_nothing_healthy_remains() -> None:
    good = Replica(url="http://good", model="m", health=Health.HEALTHY, in_flight=30)
    shaky = Replica(url="http://shaky", model="m", health=Health.SUSPECT)
    index = PrefixIndex()
    index.record(hash_text(SYSTEM, "m"), shaky.id)
    for name in POLICIES:
        policy = build_policy(name, Node({}, ""))
        assert [r.id for r in policy.rank(make_request(SYSTEM, "k"), [shaky, good], index).ranked] == \
            [good.id, shaky.id]
        assert policy.rank(make_request(SYSTEM, "k"), [shaky], index).ranked == [shaky]
        assert policy.rank(make_request(SYSTEM, "k"), [], index).ranked == []


@pytest.mark.parametrize("name", POLICIES)
def test_unknown_parameters_are_config_errors_with_their_path(name) -> None:
    from yamlcheck import ConfigError

    with pytest.raises(ConfigError, match=r"routing\.params\.bogus"):
        build_policy(name, Node({"bogus": 1}, "routing.params"))


def test_parameter_ranges_are_checked() -> None:
    from yamlcheck import ConfigError

    for bad in ({"load_factor": 1.0}, {"ewma_alpha": 0}, {"prefill_tokens_per_s": -1},
                {"min_learn_tokens": 0}, {"typical_tokens": "many"}):
        with pytest.raises(ConfigError):
            build_policy("cache_aware", Node(bad, "routing.params"))
    with pytest.raises(ConfigError):
        build_policy("session", Node({"virtual_nodes": 0}, "routing.params"))
    with pytest.raises(ConfigError):
        build_policy("random", Node({"seed": "x"}, "routing.params"))


def test_cache_aware_sends_new_conversations_where_the_kv_cache_has_room() -> None:
    """A full replica would evict other prefixes: the faster but full TP=2 loses to a TP=1 with room."""
    fast = Replica(url="http://fast", model="m", tensor_parallel_size=2, health=Health.HEALTHY)
    roomy = Replica(url="http://roomy", model="m", health=Health.HEALTHY)
    index = PrefixIndex(tokens_per_block=16)
    index.set_replica_capacity_tokens(fast.id, 16 * 100)
    index.set_replica_capacity_tokens(roomy.id, 16 * 100)
    index.record(tuple(range(1, 101)), fast.id)  # fast's cache is full of another conversation
    assert index.free_blocks([fast.id, roomy.id, "http://unknown"]) == [0, 100, float("inf")]
    policy = build_policy("cache_aware", Node({}, ""))
    decision = policy.rank(make_request("new conversation " * 200), [fast, roomy], index)
    assert decision.ranked[0] is roomy
    # Without the eviction term the faster replica wins.
    greedy = build_policy("cache_aware", Node({"eviction_weight": 0}, ""))
    assert greedy.rank(make_request("new conversation " * 200), [fast, roomy], index).ranked[0] is fast
    decision = policy.rank(make_request("another one " * 200), [fast], index)
    assert decision.why["evicts_tokens"] == 16 * len(hash_text("another one " * 200, "m"))


def test_cache_aware_spreads_sustained_traffic_even_when_nothing_is_in_flight() -> None:
    """Sequential requests sharing a prefix: in-flight is always 0, the recent-share term spreads them."""
    replicas = [Replica(url=f"http://r{i}", model="m", health=Health.HEALTHY) for i in range(4)]
    policy = build_policy("cache_aware", Node({}, ""))
    index = PrefixIndex()
    counts = {r.id: 0 for r in replicas}
    for n in range(400):
        request = make_request(SYSTEM + f"question {n}")
        winner = policy.rank(request, replicas, index).ranked[0]
        index.record(request.block_hashes, winner.id)
        counts[winner.id] += 1
    assert max(counts.values()) <= 1.5 * 100, counts
    # A conversation whose long history is cached stays put while its replica is a little
    # over its share; cold requests leave a replica far over its share.
    history = SYSTEM + "long history " * 400
    index.record(hash_text(history, "m"), replicas[0].id)
    for _ in range(10):
        policy.rank(make_request(SYSTEM + "noise"), [replicas[0]], index)
    decision = policy.rank(make_request(history + " next turn"), replicas, index)
    assert decision.ranked[0] is replicas[0] and decision.why["over_share"] > 0, decision.why
    for _ in range(40):
        policy.rank(make_request(SYSTEM + "noise"), [replicas[0]], index)
    assert policy.rank(make_request(SYSTEM + "cold"), replicas, index).ranked[0] is not replicas[0]


def test_recent_dispatch_counts_decay_and_stay_bounded() -> None:
    from router.core.scheduling.producers import RecentDispatches

    recent = RecentDispatches(window=10, max_tracked=3)
    for _ in range(5000):  # far past the point where the weights are rescaled
        recent.add("a")
    raw, unit = recent.scaled()
    assert raw["a"] / unit == pytest.approx(10, rel=1e-6)  # sum of a geometric series
    for _ in range(10):
        recent.add("b")
    raw, unit = recent.scaled()
    assert raw["a"] / unit == pytest.approx(10 * 0.9 ** 10, rel=1e-6)
    for rid in ("c", "d"):  # a ~3.5, b ~6.5, c 1: d replaces c, the least busy lately
        recent.add(rid)
    raw, _ = recent.scaled()
    assert sorted(raw) == ["a", "b", "d"]


def test_learned_rates_stay_bounded(monkeypatch) -> None:
    from router.core.scheduling import producers

    monkeypatch.setattr(producers, "MAX_CAPACITY_CLASSES", 3)
    policy = producers.LearnedRates(min_learn_tokens=1)
    request = make_request(SYSTEM * 4)
    for i in range(10):  # replicas come and go, each of its own size; each teaches one rate
        replica = Replica(url=f"http://r{i}", model="m", health=Health.HEALTHY, weight=1.0 + i)
        policy.observe(replica, request, time_to_first_byte_s=0.01, matched_blocks=0)
    assert list(policy._class_rates) == [8.0, 9.0, 10.0]  # oldest dropped


def test_round_robin_counters_stay_bounded(monkeypatch) -> None:
    from router.core.scheduling import order

    monkeypatch.setattr(order, "MAX_MODEL_COUNTERS", 3)
    policy = build_policy("round_robin", Node({}, ""))
    turns = policy.keys[0]
    assert isinstance(turns, order.ModelTurn)
    replicas = [Replica(url=f"http://r{i}", model="m", health=Health.HEALTHY) for i in range(2)]
    for i in range(10):  # many distinct model names
        request = RouteRequest(model=f"m{i}", path="/v1/completions", body=b"")
        policy.rank(request, replicas, PrefixIndex())
        assert len(turns._next) <= 3


def test_learned_rates_count_the_prompts_that_were_ahead_as_work_done() -> None:
    """A replica that answered 10k uncached tokens in 2 s behind 30k tokens of the router's
    own prompts prefilled 40k tokens in that time: busy, not slow (the queue term charges
    the prompts ahead separately, so reading it as slow would charge them twice)."""
    busy = Replica(url="http://busy", model="m", health=Health.HEALTHY)
    policy = build_policy("cache_aware", Node({}, ""))
    request = make_request("x" * 40_000)  # 10k tokens, nothing cached
    for _ in range(30):
        policy.observe(busy, request, time_to_first_byte_s=2.0, matched_blocks=0, tokens_ahead=30_000)
    assert policy.producer("rates").prefill_rate(busy) == pytest.approx(20_000, rel=0.05)


def test_cache_aware_without_its_bounded_load_guard() -> None:
    """`bounded_load: false`: no replica is held back, whatever its load; the session preset,
    whose ring walk is the guard, does not take the key."""
    hot = Replica(url="http://hot", model="m", health=Health.HEALTHY, in_flight=40)
    cold = Replica(url="http://cold", model="m", health=Health.HEALTHY)
    index = PrefixIndex()
    text = SYSTEM * 4
    index.record(hash_text(text, "m"), hot.id)
    guarded = build_policy("cache_aware", Node({}, "")).rank(make_request(text + "?"), [hot, cold], index)
    assert guarded.ranked[0] is cold and guarded.why["held_back"] == 1
    free = build_policy("cache_aware", Node({"bounded_load": False}, "")).rank(make_request(text + "?"), [hot, cold],
                                                                              index)
    assert free.ranked[0] is hot and "held_back" not in free.why
    with pytest.raises(ConfigError, match="bounded_load"):
        build_policy("session", Node({"bounded_load": False}, "routing.params"))
