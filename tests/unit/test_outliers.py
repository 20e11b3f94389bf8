"""Latency outlier ejection (router/transport/outliers.py) on a fake clock, without servers."""

from __future__ import annotations

import math

import pytest

from router.config import CircuitBreakerConfig
from router.core.requests import RouteRequest
from router.core.scheduling import Decision
from router.fleet.breaker import BreakerState, CircuitBreakers
from router.fleet.replicas import Replica
from router.transport.outliers import MAX_SHAPES, LatencyOutliers, shape_of


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fleet(n: int, model: str = "m") -> list[Replica]:
    return [Replica(url=f"http://127.0.0.1:{9000 + i}", model=model) for i in range(n)]


def detector(replicas: list[Replica], clock: Clock, **cfg: float) -> LatencyOutliers:
    settings = {"latency_factor": 3.0, "latency_min_requests": 5, "ejection_time": 5.0,
                "max_ejection_time": 40.0, **cfg}
    breakers = CircuitBreakers(CircuitBreakerConfig(**settings), clock=clock)  # type: ignore[arg-type]
    ejected: list[str] = []
    outliers = LatencyOutliers(breakers, lambda model: [r for r in replicas if r.model == model],
                               on_eject=lambda rid, reason: ejected.append(f"{rid} {reason}"))
    outliers.ejected = ejected  # type: ignore[attr-defined]
    return outliers


ROUTE = RouteRequest(model="m", path="/v1/completions", body=b"{}", prompt_chars=400)
NO_MATCH = Decision(ranked=[])


def feed(outliers: LatencyOutliers, replicas: list[Replica], seconds: list[float],
         rounds: int, route: RouteRequest = ROUTE) -> None:
    for _ in range(rounds):
        for replica, s in zip(replicas, seconds):
            outliers.observe(replica, route, NO_MATCH, s)


def test_a_replica_far_slower_than_its_peers_is_ejected_and_judged_again_on_new_samples() -> None:
    clock = Clock()
    replicas = fleet(4)
    outliers = detector(replicas, clock)
    feed(outliers, replicas, [2.0, 0.1, 0.12, 0.09], rounds=12)
    slow = replicas[0]
    assert slow.breaker.state is BreakerState.OPEN
    assert outliers.breakers.retry_in(slow.breaker) == pytest.approx(5.0)
    assert outliers.ejected == [f"{slow.id} latency"]  # type: ignore[attr-defined]
    assert all(r.breaker.state is BreakerState.CLOSED for r in replicas[1:])
    assert outliers.slowness(slow.id) is None  # its samples were dropped with the ejection
    # Back (the half-open trial succeeded) and still slow: out again, twice as long.
    clock.now += 5
    breakers = outliers.breakers
    assert breakers.allows(slow.id, slow.breaker)
    breakers.on_success(slow.id, slow.breaker, breakers.on_dispatch(slow.breaker))
    assert slow.breaker.state is BreakerState.CLOSED
    outliers.observe(slow, ROUTE, NO_MATCH, 2.0)  # on probation: its first answer back is slow
    assert slow.breaker.state is BreakerState.OPEN
    assert breakers.retry_in(slow.breaker) == pytest.approx(10.0)
    # Healed: back after the ejection, judged fine, its strikes are forgotten.
    clock.now += 10
    assert breakers.allows(slow.id, slow.breaker)
    breakers.on_success(slow.id, slow.breaker, breakers.on_dispatch(slow.breaker))
    feed(outliers, replicas, [0.1, 0.1, 0.12, 0.09], rounds=12)
    assert slow.breaker.state is BreakerState.CLOSED
    assert 0.5 < outliers.slowness(slow.id) < 1.5  # type: ignore[operator]
    feed(outliers, replicas, [2.0, 0.1, 0.12, 0.09], rounds=12)
    assert slow.breaker.state is BreakerState.OPEN
    assert breakers.retry_in(slow.breaker) == pytest.approx(5.0)  # a first strike again


def test_a_replica_within_the_factor_and_a_fleet_too_small_to_compare_stay() -> None:
    clock = Clock()
    replicas = fleet(4)
    outliers = detector(replicas, clock)
    feed(outliers, replicas, [0.25, 0.1, 0.12, 0.09], rounds=50)  # 2.5x < 3x
    assert all(r.breaker.state is BreakerState.CLOSED for r in replicas)
    assert 2.0 < outliers.slowness(replicas[0].id) < 3.0  # type: ignore[operator]
    # Two replicas: each has one peer, not enough to say which one is slow.
    pair = fleet(2, model="p")
    feed(outliers, pair, [5.0, 0.1], rounds=50, route=RouteRequest(model="p", path="/v1/completions",
                                                                     body=b"{}", prompt_chars=400))
    assert all(r.breaker.state is BreakerState.CLOSED for r in pair)
    # Off: latency_factor 0.
    off = detector(replicas, clock, latency_factor=0.0)
    feed(off, replicas, [5.0, 0.1, 0.12, 0.09], rounds=50)
    assert all(r.breaker.state is BreakerState.CLOSED for r in replicas)


def test_one_long_request_does_not_eject_and_shapes_are_compared_apart() -> None:
    clock = Clock()
    replicas = fleet(3)
    outliers = detector(replicas, clock)
    feed(outliers, replicas, [0.1, 0.1, 0.1], rounds=10)
    outliers.observe(replicas[0], ROUTE, NO_MATCH, 5.0)  # one outlier sample: 50x
    feed(outliers, replicas, [0.1, 0.1, 0.1], rounds=1)
    assert replicas[0].breaker.state is BreakerState.CLOSED
    # Long prompts take longer everywhere: replica 0 gets only those, and is not slow for them.
    long_prompt = RouteRequest(model="m", path="/v1/completions", body=b"{}", prompt_chars=40_000)
    assert shape_of(long_prompt, 10_000) != shape_of(ROUTE, 100)
    for _ in range(20):
        outliers.observe(replicas[0], long_prompt, NO_MATCH, 2.0)
        outliers.observe(replicas[1], long_prompt, NO_MATCH, 2.1)
        outliers.observe(replicas[2], long_prompt, NO_MATCH, 1.9)
        feed(outliers, replicas[1:], [0.1, 0.1], rounds=1)
    assert all(r.breaker.state is BreakerState.CLOSED for r in replicas)


def test_request_shapes_are_bounded() -> None:
    shapes = set()
    for stream in (True, False):
        for max_tokens in (None, 1, 63, 64, 255, 256, 10**6):
            for uncached in (0, 255, 256, 1023, 1024, 4096, 16_384, 10**7):
                route = RouteRequest(model="m", path="/v1/completions", body=b"{}", stream=stream,
                                     max_tokens=max_tokens)
                shapes.add(shape_of(route, uncached))
    assert all(0 <= s < MAX_SHAPES for s in shapes)
    assert len({s % 8 for s in shapes if s % 8 == 7}) == 1  # streams: one answer band


def test_max_ejection_percent_keeps_enough_replicas_in() -> None:
    clock = Clock()
    replicas = fleet(4)
    outliers = detector(replicas, clock, max_ejection_percent=25.0)  # one of four
    breakers = outliers.breakers
    breakers.on_failure(replicas[3].id, replicas[3].breaker, False, "connect", retry_after=30)
    assert replicas[3].breaker.state is BreakerState.OPEN  # out already (it failed)
    feed(outliers, [replicas[3]], [0.1], rounds=4)  # out: what it still answers is ignored
    assert outliers.expected(replicas[3], ROUTE, NO_MATCH) is None
    feed(outliers, replicas[:3], [2.0, 0.1, 0.1], rounds=16)
    assert replicas[0].breaker.state is BreakerState.CLOSED  # slow, but kept: the cap
    assert not outliers.ejected  # type: ignore[attr-defined]
    clock.now += 30
    assert breakers.allows(replicas[3].id, replicas[3].breaker)
    breakers.on_success(replicas[3].id, replicas[3].breaker, breakers.on_dispatch(replicas[3].breaker))
    feed(outliers, replicas[:3], [2.0, 0.1, 0.1], rounds=1)
    assert replicas[0].breaker.state is BreakerState.OPEN  # room again: out


def test_expected_time_is_the_lesser_of_its_own_and_its_peers_and_capacity_counts() -> None:
    clock = Clock()
    replicas = fleet(3)
    replicas[2].tensor_parallel_size = 2  # twice the capacity: expected twice as fast
    outliers = detector(replicas, clock, latency_factor=0.0)
    assert outliers.expected(replicas[0], ROUTE, NO_MATCH) is None
    feed(outliers, replicas, [0.5, 0.1, 0.05], rounds=10)
    assert outliers.expected(replicas[0], ROUTE, NO_MATCH) == pytest.approx(0.1)  # its peers'
    assert outliers.expected(replicas[1], ROUTE, NO_MATCH) == pytest.approx(0.1)  # its own
    assert outliers.expected(replicas[2], ROUTE, NO_MATCH) == pytest.approx(0.05)
    stream = RouteRequest(model="m", path="/v1/completions", body=b"{}", prompt_chars=400, stream=True)
    assert outliers.expected(replicas[0], stream, NO_MATCH) is None  # nothing known of that shape
    outliers.forget_replica(replicas[0].id)
    assert len(outliers) == 2 and outliers.slowness(replicas[0].id) is None
    assert math.isfinite(outliers.expected(replicas[0], ROUTE, NO_MATCH) or 0.0)


def test_a_few_milliseconds_over_a_tiny_median_is_no_slowness() -> None:
    """Ratios of tiny times are noise: 7 ms against its peers' 1 ms (a new connection after
    its ejection, a busy event loop) is not slow, not even on probation; 250 ms is."""
    clock = Clock()
    replicas = fleet(4)
    outliers = detector(replicas, clock)
    feed(outliers, replicas, [0.007, 0.001, 0.0012, 0.0009], rounds=30)  # 7x, but 6 ms
    assert all(r.breaker.state is BreakerState.CLOSED for r in replicas)
    assert outliers.slowness(replicas[0].id) == 1.0  # (as a factor: not slower at all)
    feed(outliers, replicas, [0.25, 0.001, 0.0012, 0.0009], rounds=12)
    slow = replicas[0]
    assert slow.breaker.state is BreakerState.OPEN
    # Back on probation: its first answer is 7 ms against 1 ms, which keeps it in.
    clock.now += 5
    breakers = outliers.breakers
    assert breakers.allows(slow.id, slow.breaker)
    breakers.on_success(slow.id, slow.breaker, breakers.on_dispatch(slow.breaker))
    outliers.observe(slow, ROUTE, NO_MATCH, 0.007)
    assert slow.breaker.state is BreakerState.CLOSED


def test_a_replica_is_judged_only_against_peers_of_its_own_capacity() -> None:
    """A cached or short prompt takes a TP=4 replica about as long as a TP=1 one (step
    overheads, not compute): times x capacity made a healthy TP=4 replica read 4x slow."""
    clock = Clock()
    replicas = fleet(4)
    replicas[3].tensor_parallel_size = 4
    outliers = detector(replicas, clock)
    feed(outliers, replicas, [0.1, 0.1, 0.1, 0.1], rounds=20)
    assert all(r.breaker.state is BreakerState.CLOSED for r in replicas)
    assert outliers.slowness(replicas[3].id) is None  # no peer of its size: never compared
    feed(outliers, replicas, [1.0, 0.1, 0.1, 0.1], rounds=20)  # ... while a TP=1 one is
    assert replicas[0].breaker.state is BreakerState.OPEN


def test_an_answer_that_waited_behind_a_queue_is_compared_with_answers_that_waited_as_long() -> None:
    """A replica busy with the router's long prompts answers late for its load, not for
    being sick: the prompt tokens pending ahead of a request count in its shape."""
    clock = Clock()
    replicas = fleet(4)
    outliers = detector(replicas, clock)
    for _ in range(20):
        for replica in replicas[1:]:
            outliers.observe(replica, ROUTE, NO_MATCH, 0.1)
            outliers.observe(replica, ROUTE, NO_MATCH, 1.0, tokens_ahead=20_000)
        outliers.observe(replicas[0], ROUTE, NO_MATCH, 1.0, tokens_ahead=20_000)  # always busy
    assert replicas[0].breaker.state is BreakerState.CLOSED
    assert outliers.slowness(replicas[0].id) == pytest.approx(1.0)


def test_an_answer_predicted_mostly_cached_does_not_judge_the_replica() -> None:
    """The router's prediction of a hit is wrong when the replica evicted the prefix, and the
    answer then takes a whole prefill: no sign of a slow replica."""
    clock = Clock()
    replicas = fleet(4)
    outliers = detector(replicas, clock)
    prompt = RouteRequest(model="m", path="/v1/completions", body=b"{}", prompt_chars=8_000)
    hit = {r.id: prompt.estimated_prompt_tokens - 10 for r in replicas}
    predicted_hit = Decision(ranked=[], matched_tokens=hit)
    for _ in range(20):
        for replica, s in zip(replicas, [1.5, 0.05, 0.05, 0.05]):
            outliers.observe(replica, prompt, predicted_hit, s)
    assert all(r.breaker.state is BreakerState.CLOSED for r in replicas)
    assert outliers.slowness(replicas[0].id) is None
