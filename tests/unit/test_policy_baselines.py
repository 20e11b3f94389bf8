"""Baselines: prefix_affinity, power_of_two, random."""

from __future__ import annotations

from collections import Counter

from router.core.requests import RouteRequest
from router.core.scheduling import build_profile as build_policy
from router.fleet.replicas import Health, Replica
from router.prefix.hashing import hash_text
from router.prefix.index import PrefixIndex
from yamlcheck import Node


def fleet(n: int) -> list[Replica]:
    return [Replica(url=f"http://r{i}", model="m", health=Health.HEALTHY) for i in range(n)]


def request(text: str = "question " * 30) -> RouteRequest:
    return RouteRequest(model="m", path="/v1/completions", body=b"", routing_text=text,
                        block_hashes=hash_text(text, "m"), prompt_chars=len(text))


def test_prefix_affinity_longest_match_wins_ties_to_least_load() -> None:
    replicas = fleet(3)
    index = PrefixIndex()
    req = request()
    index.record(req.block_hashes[:2], replicas[0].id)
    index.record(req.block_hashes, replicas[1].id)
    replicas[1].in_flight = 50  # load does not beat a longer match
    policy = build_policy("prefix_affinity", Node({}, ""))
    decision = policy.rank(req, replicas, index)
    assert [r.id for r in decision.ranked] == [replicas[1].id, replicas[0].id, replicas[2].id]
    assert decision.matched_blocks[replicas[1].id] == len(req.block_hashes)
    index.record(req.block_hashes, replicas[2].id)  # now a tie: the less loaded wins
    assert policy.rank(req, replicas, index).ranked[0] is replicas[2]


def test_power_of_two_picks_the_less_loaded_of_its_pair() -> None:
    replicas = fleet(6)
    for i, r in enumerate(replicas):
        r.in_flight = i
    policy = build_policy("power_of_two", Node({"seed": 1}, ""))
    wins = Counter()
    for _ in range(600):
        ranked = policy.rank(request(), replicas, PrefixIndex()).ranked
        assert ranked[0].in_flight <= ranked[1].in_flight
        assert ranked[2:] == sorted(ranked[2:], key=lambda r: r.in_flight)
        wins[ranked[0].id] += 1
    # The most loaded replica never wins; the least loaded wins most (5/15 of pairs).
    assert wins[replicas[5].id] == 0
    assert wins.most_common(1)[0][0] == replicas[0].id


def test_random_is_seedable_and_roughly_uniform() -> None:
    replicas = fleet(4)
    order = lambda seed: [  # noqa: E731
        [r.id for r in p.rank(request(), replicas, PrefixIndex()).ranked]
        for p in [build_policy("random", Node({"seed": seed}, ""))] for _ in range(20)
    ]
    assert order(7) == order(7)
    assert order(7) != order(8)
    policy = build_policy("random", Node({}, ""))
    firsts = Counter(policy.rank(request(), replicas, PrefixIndex()).ranked[0].id for _ in range(4000))
    assert min(firsts.values()) > 800


def test_round_robin_rotates_healthy_first_then_suspect() -> None:
    replicas = fleet(4)
    replicas[1].health = Health.SUSPECT
    replicas[3].health = Health.UNHEALTHY  # never ranked
    policy = build_policy("round_robin", Node({}, ""))
    ids = [[r.id[-2:] for r in policy.rank(request(), replicas, PrefixIndex()).ranked] for _ in range(4)]
    assert ids == [["r0", "r2", "r1"], ["r2", "r0", "r1"], ["r2", "r0", "r1"], ["r0", "r2", "r1"]]
