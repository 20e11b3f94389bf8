"""Circuit breakers, the retry budget, rate limits and the admission queue, on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from router.config import AdmissionConfig, CircuitBreakerConfig, ClientKeyConfig, RateLimitConfig
from router.core.admission import Admission, QueueRejection, RateLimiter, RateLimitExceeded
from router.core.clients import Client
from router.fleet.breaker import Breaker, BreakerState, CircuitBreakers
from router.fleet.replicas import Replica
from router.transport.retry_budget import RetryBudget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_recovers_through_one_trial() -> None:
    clock = Clock()
    changes: list[str] = []
    rules = CircuitBreakers(CircuitBreakerConfig(failure_threshold=3, ejection_time=5,
                                                 max_ejection_time=20),
                            on_change=lambda rid, b, why: changes.append(b.state.value), clock=clock)
    b = Breaker()
    for _ in range(2):
        rules.on_failure("r", b, rules.on_dispatch(b), "status_5xx")
    rules.on_success("r", b, False)  # a success resets the count
    for _ in range(3):
        assert rules.allows("r", b)
        rules.on_failure("r", b, rules.on_dispatch(b), "status_5xx")
    assert b.state is BreakerState.OPEN and not rules.allows("r", b)
    assert rules.retry_in(b) == pytest.approx(5)
    clock.now += 5
    assert rules.allows("r", b) and b.state is BreakerState.HALF_OPEN
    trial = rules.on_dispatch(b)
    assert trial and not rules.allows("r", b)  # one trial at a time
    rules.on_failure("r", b, trial, "connect")  # trial failed: out twice as long
    assert b.state is BreakerState.OPEN and rules.retry_in(b) == pytest.approx(10)
    clock.now += 10
    assert rules.allows("r", b)
    trial = rules.on_dispatch(b)
    rules.on_success("r", b, trial)
    assert b.state is BreakerState.CLOSED and b.ejections == 0
    assert changes == ["open", "half_open", "open", "half_open", "closed"]


def test_ejection_time_doubles_up_to_its_cap_and_retry_after_is_respected() -> None:
    clock = Clock()
    rules = CircuitBreakers(CircuitBreakerConfig(failure_threshold=1, ejection_time=5,
                                                 max_ejection_time=12, max_retry_after=30),
                            clock=clock)
    b = Breaker()
    rules.on_failure("r", b, False, "connect")
    waits = []
    for _ in range(3):
        waits.append(rules.retry_in(b))
        clock.now += rules.retry_in(b)
        assert rules.allows("r", b)
        rules.on_failure("r", b, rules.on_dispatch(b), "connect")
    assert waits == [pytest.approx(5), pytest.approx(10), pytest.approx(12)]
    fresh = Breaker()
    rules.on_failure("r", fresh, False, "status_429", retry_after=7)  # at once, for that long
    assert fresh.state is BreakerState.OPEN and rules.retry_in(fresh) == pytest.approx(7)
    capped = Breaker()
    rules.on_failure("r", capped, False, "status_429", retry_after=3600)
    assert rules.retry_in(capped) == pytest.approx(30)


def test_an_abandoned_trial_frees_the_slot() -> None:
    clock = Clock()
    rules = CircuitBreakers(CircuitBreakerConfig(failure_threshold=1), clock=clock)
    b = Breaker()
    rules.on_failure("r", b, False, "connect")
    clock.now += 60
    assert rules.allows("r", b)
    trial = rules.on_dispatch(b)
    rules.on_abandon(b, trial)
    assert rules.allows("r", b)


def test_retry_budget_bounds_retries_to_a_share_of_requests() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_s=1.0, clock=clock)
    spent = 0
    for _ in range(1000):  # a fleet-wide failure: every request wants two retries
        budget.on_request()
        for _ in range(2):
            spent += budget.try_spend()
        clock.now += 0.01  # 100 requests/s for 10 s
    # The initial bucket (30) + 20% of 1000 requests + 1/s for 10 s.
    assert spent <= 30 + 200 + 10 + 1
    assert spent >= 200
    assert budget.denied == 2000 - spent


def test_token_buckets_per_client_and_their_bound() -> None:
    clock = Clock()
    limiter = RateLimiter(RateLimitConfig(requests_per_s=2, burst=2, tokens_per_min=600),
                          max_clients=3, clock=clock)
    a = Client("anonymous", "10.0.0.1", "10.0.0.1")
    limiter.check(a, 10)
    limiter.check(a, 10)
    with pytest.raises(RateLimitExceeded) as info:
        limiter.check(a, 10)
    assert info.value.kind == "requests" and info.value.error.status == 429
    assert info.value.error.headers["Retry-After"] == "1"
    clock.now += 0.5
    limiter.check(a, 10)  # one request refilled
    clock.now += 10
    limiter.check(a, 700)  # more than a minute's tokens: passes on a full bucket, empties it
    with pytest.raises(RateLimitExceeded) as info:
        limiter.check(a, 10)
    assert info.value.kind == "tokens" and int(info.value.error.headers["Retry-After"]) == 1
    for i in range(10):
        limiter.check(Client("anonymous", f"10.0.1.{i}", None), 1)
    assert len(limiter) == 3  # least recently seen clients are forgotten
    keyed = Client("k", "k", None, ClientKeyConfig(name="k", key="x" * 8,
                                                  rate_limit=RateLimitConfig(requests_per_s=100)))
    for _ in range(50):
        limiter.check(keyed, 1)  # its own limit, not the default


def replica(waiting: float = 0.0, kv: float = 0.0, intake: float | None = None) -> Replica:
    r = Replica(url="http://127.0.0.1:1", model="m")
    r.load.waiting = waiting
    r.load.kv_cache_usage = kv
    r.load.intake_rate = intake
    return r


async def test_a_long_queue_the_engine_drains_quickly_is_not_saturation() -> None:
    adm = Admission(AdmissionConfig(max_waiting_per_replica=4, max_queue_time=1.0, queue_size=10, max_wait=5))
    assert adm.saturated(replica(10))  # its first report: the count alone
    assert adm.saturated(replica(10, intake=0.0))  # it took nothing since the last scrape
    assert adm.saturated(replica(10, intake=5.0))  # 10 waiting at 5 a second: 2 s
    assert not adm.saturated(replica(10, intake=50.0))  # 0.2 s: the next steps' batch
    assert adm.saturated(replica(10, kv=0.99, intake=50.0))  # a full cache is saturation still
    assert Admission(AdmissionConfig(max_waiting_per_replica=4, max_queue_time=0)).saturated(
        replica(10, intake=50.0))  # 0: the count alone
    assert await adm.admit("m", [replica(10, intake=50.0)], client("a"), 0) == 0.0  # no wait
    # Requests that queued while it was stuck all go once it is seen draining.
    stuck = [replica(10)]
    assert not adm.passes("m", stuck)
    tasks = [asyncio.create_task(adm.admit("m", stuck, client("a"), 0)) for _ in range(6)]
    await asyncio.sleep(0.01)
    assert adm.queued("m") == 6
    # a queue of its model holds the next request back, even where a replica has room
    assert not adm.passes("m", [replica(0)]) and adm.passes("other", [replica(0)])
    adm.on_load("m", [replica(10, intake=2.0)])  # still slow: none
    await asyncio.sleep(0.01)
    assert adm.queued("m") == 6
    adm.on_load("m", [replica(10, intake=100.0)])
    await asyncio.gather(*tasks)
    assert adm.waiting == 0


def client(name: str) -> Client:
    return Client(name, name, None)


async def test_queue_waits_only_for_a_saturated_fleet_and_releases_in_priority_then_turns() -> None:
    adm = Admission(AdmissionConfig(max_waiting_per_replica=4, max_kv_usage=0.9, queue_size=10,
                                    max_wait=5))
    idle = [replica(0), replica(10)]
    assert await adm.admit("m", idle, client("a"), 0) == 0.0  # one has room: no wait
    full = [replica(10), replica(0, kv=0.95)]
    order: list[str] = []

    async def one(name: str, priority: int) -> None:
        await adm.admit("m", full, client(name), priority)
        order.append(f"{name}{priority}")

    tasks = []
    for name, priority in [("a", 0), ("a", 0), ("a", 0), ("b", 0), ("vip", 5)]:
        tasks.append(asyncio.create_task(one(name, priority)))
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    assert adm.queued("m") == 5 and not order
    for _ in range(5):
        adm.on_request_end("m")  # each ending request hands its slot on
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    assert order == ["vip5", "a0", "b0", "a0", "a0"]
    assert adm.waiting == 0


async def test_queue_bounds_and_timeouts_answer_429() -> None:
    adm = Admission(AdmissionConfig(max_waiting_per_replica=1, queue_size=2, max_wait=0.05))
    full = [replica(5)]
    waiters = [asyncio.create_task(adm.admit("m", full, client("a"), 0)) for _ in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(QueueRejection) as info:
        await adm.admit("m", full, client("b"), 0)
    assert info.value.reason == "queue_full" and info.value.error.status == 429
    for task in waiters:
        with pytest.raises(QueueRejection) as info:
            await task
        assert info.value.reason == "wait_timeout"
    assert adm.waiting == 0 and adm.queued("m") == 0


async def test_a_fresh_report_admits_as_many_as_it_has_room_for() -> None:
    adm = Admission(AdmissionConfig(max_waiting_per_replica=3, queue_size=100, max_wait=5))
    r = replica(10)
    tasks = [asyncio.create_task(adm.admit("m", [r], client(f"c{i}"), 0)) for i in range(6)]
    await asyncio.sleep(0.01)
    r.load.waiting = 1  # room for 2 more
    adm.on_load("m", [r])
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in tasks) == 2 and adm.queued("m") == 4
    r.load.waiting = 0
    adm.on_load("m", [r])
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in tasks) == 5
    adm.on_request_end("m")
    await asyncio.gather(*tasks)


async def test_a_client_that_leaves_the_queue_leaves_no_trace() -> None:
    adm = Admission(AdmissionConfig(max_waiting_per_replica=1, queue_size=10, max_wait=5))
    task = asyncio.create_task(adm.admit("m", [replica(5)], client("a"), 0))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert adm.waiting == 0 and adm.queued("m") == 0
