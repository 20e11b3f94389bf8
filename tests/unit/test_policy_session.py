"""`session`: consistent hashing with bounded loads on the session key."""

from __future__ import annotations

from router.core.requests import RouteRequest
from router.core.scheduling import Profile
from router.core.scheduling import build_profile as build_policy
from router.core.scheduling.ring import RingOrder
from router.fleet.replicas import Health, Replica
from router.prefix.index import PrefixIndex
from yamlcheck import Node


def fleet(n: int, **kw) -> list[Replica]:
    return [Replica(url=f"http://r{i}", model="m", health=Health.HEALTHY, **kw) for i in range(n)]


def request(key: str | None, text: str = "hello " * 40) -> RouteRequest:
    from router.prefix.hashing import hash_text

    return RouteRequest(model="m", path="/v1/chat/completions", body=b"", routing_text=text,
                        block_hashes=hash_text(text, "m"), prompt_chars=len(text), session_key=key)


def owners(policy: Profile, keys: list[str], replicas: list[Replica]) -> dict[str, str]:
    return {k: policy.rank(request(k), replicas, PrefixIndex()).ranked[0].id for k in keys}


KEYS = [f"user-{i}" for i in range(4000)]


def test_the_same_key_always_lands_on_the_same_replica() -> None:
    policy = build_policy("session", Node({}, ""))
    replicas = fleet(4)
    first = owners(policy, KEYS[:200], replicas)
    assert first == owners(policy, KEYS[:200], list(reversed(replicas)))
    assert len(set(first.values())) == 4


def test_keys_spread_evenly() -> None:
    counts: dict[str, int] = {}
    for owner in owners(build_policy("session", Node({}, "")), KEYS, fleet(4)).values():
        counts[owner] = counts.get(owner, 0) + 1
    assert max(counts.values()) / min(counts.values()) < 1.35


def test_a_joining_replica_takes_about_its_share_and_only_that() -> None:
    policy = build_policy("session", Node({}, ""))
    replicas = fleet(5)
    before = owners(policy, KEYS, replicas[:4])
    after = owners(policy, KEYS, replicas)
    moved = [k for k in KEYS if before[k] != after[k]]
    assert 0.12 < len(moved) / len(KEYS) < 0.28  # about 1/5
    assert all(after[k] == replicas[4].id for k in moved)  # only to the newcomer


def test_a_leaving_replica_moves_only_its_own_keys() -> None:
    policy = build_policy("session", Node({}, ""))
    replicas = fleet(4)
    before = owners(policy, KEYS, replicas)
    after = owners(policy, KEYS, replicas[1:])
    for k in KEYS:
        if before[k] != replicas[0].id:
            assert after[k] == before[k]


def test_tensor_parallel_replicas_own_a_larger_share() -> None:
    replicas = fleet(2)
    replicas[1].tensor_parallel_size = 4
    counts = list(owners(build_policy("session", Node({}, "")), KEYS, replicas).values())
    share = counts.count(replicas[1].id) / len(counts)
    assert 0.7 < share < 0.9


def test_an_overloaded_owner_spills_to_the_next_replica_on_the_ring() -> None:
    policy = build_policy("session", Node({}, ""))
    replicas = fleet(4)
    owner = policy.rank(request("sticky"), replicas, PrefixIndex()).ranked[0]
    owner.in_flight = 10  # far above 1.25 x the mean
    decision = policy.rank(request("sticky"), replicas, PrefixIndex())
    assert decision.ranked[0] is not owner
    assert decision.ranked[-1] is owner  # held back, still ranked for failover
    assert decision.why["held_back"] == 1


def test_without_a_key_it_falls_back_to_cache_aware() -> None:
    policy = build_policy("session", Node({"load_factor": 1.5}, ""))
    index = PrefixIndex()
    replicas = fleet(3)
    req = request(None)
    index.record(req.block_hashes, replicas[2].id)
    decision = policy.rank(req, replicas, index)
    assert decision.ranked[0] is replicas[2]
    assert decision.why["policy"] == "session" and decision.why["fallback"] == "cache_aware"
    assert policy.fallback is not None and policy.fallback.keys[0].load_factor == 1.5  # the guard


def test_rings_are_cached_and_bounded() -> None:
    policy = build_policy("session", Node({}, ""))
    replicas = fleet(40)
    for i in range(60):  # many different replica subsets
        policy.rank(request("k"), replicas[: 1 + i % 40], PrefixIndex())
    ring = policy.keys[1]
    assert isinstance(ring, RingOrder) and len(ring._rings) <= 32
