"""A deterministic stream of routing situations, and the decisions a policy made on it.

Used by tests/unit/test_preset_equivalence.py: the fixture ``decision_trace.json`` holds the
rankings the *old* monolithic policies (router/policies/, before the scheduling pipeline,
commit 2153b69) made on this stream; the test replays the same stream through the presets
of router/core/scheduling/ and asserts every ranking is the same.  The cache_aware and
session cases were re-recorded once since, on purpose, when prefill rates came to be
learned per capacity class (producers.LearnedRates): their rankings are the pipeline's
from then on; the other presets' are still the old policies'.

The stream exercises what the policies look at: six replicas of mixed tensor-parallel
sizes and weights, two models, in-flight and scraped loads that move every step, replicas
turning SUSPECT and back, a replica missing from the candidates now and then (ejected by
its breaker), conversations that return with a longer history over three shared system
prompts, new one-off prompts, session keys on most requests, streamed and non-streamed
requests, the prefix index recording each winner (small per-replica KV capacities so the
eviction term matters) and forgetting some records (failed requests), and the time to
first byte of each answer fed back to the policy (so learned rates move).

Regenerate the fixture only on purpose (it pins behaviour):
    .venv/bin/python -m tests.unit.decision_trace > tests/unit/decision_trace.json
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from router.core.requests import RouteRequest
from router.fleet.engine_load import EngineLoad
from router.fleet.replicas import Health, Replica
from router.prefix.hashing import prefix_hashes
from router.prefix.index import PrefixIndex
from yamlcheck import Node

MODELS = ("model-a", "model-b")
STEPS = 400
SEED = 20261202
TPS = (1, 1, 2, 4, 1, 2)
WEIGHTS = (1.0, 1.0, 1.0, 0.5, 2.0, 1.0)
KV_TOKENS = (6_000, 4_000, 12_000, 20_000, 5_000, 9_000)
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()

# (label, policy name, routing.params): every preset, some with non-default parameters
CASES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("cache_aware", "cache_aware", {}),
    ("cache_aware_tuned", "cache_aware",
     {"running_weight": 0.5, "eviction_weight": 1.0, "load_factor": 1.5, "load_headroom": 1,
      "typical_tokens": 300, "min_learn_tokens": 64, "ewma_alpha": 0.5}),
    ("prefix_affinity", "prefix_affinity", {}),
    ("session", "session", {}),
    ("session_tuned", "session", {"virtual_nodes": 40, "load_factor": 1.1, "load_headroom": 0}),
    ("least_load", "least_load", {}),
    ("least_load_plain", "least_load", {"use_scraped": False, "use_weight": False}),
    ("round_robin", "round_robin", {}),
    ("power_of_two", "power_of_two", {"seed": 7}),
    ("random", "random", {"seed": 7}),
)


@dataclass
class Step:
    """One decision: the request, the candidates as the proxy would pass them."""

    request: RouteRequest
    candidates: list[Replica]


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def fleet() -> list[Replica]:
    return [Replica(url=f"http://10.0.0.{i + 1}:8000", model=MODELS[0], tensor_parallel_size=TPS[i],
                    weight=WEIGHTS[i], health=Health.HEALTHY) for i in range(len(TPS))]


def run(rank: Callable[[RouteRequest, list[Replica], PrefixIndex], Any],
        observe: Callable[..., None]) -> Iterator[tuple[Step, list[str]]]:
    """Drive one policy through the stream; yields each step and the ranked replica ids.

    `rank(request, candidates, index)` returns a Decision; `observe` is the policy's
    feedback method.  What happens next (the index records the winner, load moves, the
    answer's time to first byte) depends on the winner, so the stream is only the same
    for two policies as long as their decisions are.
    """
    rng = random.Random(SEED)
    replicas = fleet()
    index = PrefixIndex(tokens_per_block=16)
    for replica, tokens in zip(replicas, KV_TOKENS):
        index.set_replica_capacity_tokens(replica.id, tokens)
    systems = [_text(rng, 120 + 40 * i) for i in range(3)]
    conversations: list[tuple[str, str, str]] = []  # (session id, model, history so far)
    for c in range(14):
        conversations.append((f"conv-{c}", MODELS[c % 4 == 3], systems[c % 3] + " " + _text(rng, 30)))
    for _ in range(STEPS):
        for r in replicas:  # loads and health move
            r.in_flight = max(0, r.in_flight + rng.choice((-2, -1, -1, 0, 0, 1, 1, 2)))
            if rng.random() < 0.5:
                r.load = EngineLoad(running=float(rng.randint(0, 6)), waiting=float(rng.choice((0, 0, 0, 1, 3))),
                                    kv_cache_usage=rng.random(), scraped_at=1.0)
            if r.health is Health.HEALTHY and rng.random() < 0.04:
                r.health = Health.SUSPECT
            elif r.health is Health.SUSPECT and rng.random() < 0.3:
                r.health = Health.HEALTHY
        candidates = [r for r in replicas if rng.random() > 0.06] or replicas[:1]
        if rng.random() < 0.2:  # a one-off prompt, sometimes over a shared system prompt
            session, model = None, MODELS[rng.random() < 0.3]
            text = (rng.choice(systems) + " " if rng.random() < 0.5 else "") + _text(rng, rng.randint(5, 400))
        else:
            c = rng.randrange(len(conversations))
            session, model, history = conversations[c]
            text = history + " " + _text(rng, rng.randint(5, 60))
            conversations[c] = (session, model, text + " " + _text(rng, rng.randint(5, 40)))
            if len(text) > 12_000:  # the conversation ends; a new one starts
                conversations[c] = (session + "+", model, rng.choice(systems) + " " + _text(rng, 20))
            if rng.random() < 0.3:
                session = None
        hashes = prefix_hashes(model, text=text)
        request = RouteRequest(model=model, path="/v1/chat/completions", body=b"", stream=rng.random() < 0.8,
                               routing_text=text, block_hashes=hashes, prompt_chars=len(text),
                               session_key=session)
        decision = rank(request, list(candidates), index)
        ranked = [r.id for r in decision.ranked]
        yield Step(request, candidates), ranked
        winner = next(r for r in replicas if r.id == ranked[0])
        recording = index.record(hashes, winner.id)
        winner.in_flight += 1
        matched = decision.matched_blocks.get(winner.id, 0)
        uncached = max(0, request.estimated_prompt_tokens - matched * 16)
        ttfb = 0.004 + uncached / (15_000.0 * winner.tensor_parallel_size) + 0.002 * winner.in_flight
        if rng.random() < 0.05:
            index.forget(recording)  # the attempt failed before the replica started it
        else:
            observe(winner, request, time_to_first_byte_s=ttfb, matched_blocks=matched)


def record(build: Callable[[str, Node], Any]) -> dict[str, Any]:
    """Rankings of every case, as strings of replica positions ("031245")."""
    ids = [r.id for r in fleet()]
    out: dict[str, Any] = {"seed": SEED, "steps": STEPS, "cases": {}}
    for label, name, params in CASES:
        policy = build(name, Node(dict(params), "routing.params"))
        rankings = ["".join(str(ids.index(rid)) for rid in ranked)
                    for _, ranked in run(policy.rank, policy.observe)]
        out["cases"][label] = {"policy": name, "params": params, "rankings": rankings}
    return out


if __name__ == "__main__":
    from router.core.scheduling import build_profile

    json.dump(record(build_profile), sys.stdout, indent=1)
    sys.stdout.write("\n")
