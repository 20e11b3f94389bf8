"""The presets: every policy name of routes.yaml as a scheduling profile.

``routing.policy`` names a preset (default ``cache_aware``); ``routing.params`` tunes it;
``routing.terms`` (cache_aware and session only) replaces its cost terms and weights:

    routing:
      policy: cache_aware
      terms: {queue: 1.0, prefill: 1.0, eviction: 2.0, kv_pressure: 0.5}

Terms not listed are off; a weight of 0 turns a listed one off; at least one must weigh
more than 0.  Each preset reproduces the decisions of the policy of the same name before
the pipeline (tests/unit/test_preset_equivalence.py replays a recorded decision trace):

    preset           producers              order after the health group
    cache_aware      prefix, rates, recent, bounded-load guard, cost (queue + prefill +
                     adapters               2 x eviction + lora); ties: load per capacity,
                                            longest match, rotation
    prefix_affinity  prefix                 longest match, load per capacity, rotation
    session          prefix                 guard (healthy only), ring order from the
                                            session key; cache_aware without a key
    least_load       -                      requests per weight, rotation
    round_robin      -                      per-model turn
    power_of_two     -                      two random choices, load per capacity
    random           -                      shuffle

cache_aware's ``bounded_load: false`` leaves its guard out (the recent share stays in the
queue term): the guard bounds requests in flight, most of them decoding, and near
saturation that held long prompts off the fastest replicas (benchmarks/scenarios/
trace_conversation_busy.yaml); on multi_turn it keeps sessions from crowding one cache.
"""

from __future__ import annotations

import math

from router.config.loader import Config
from router.config.routing import PRESET_NAMES, RoutingConfig
from router.core.scheduling import guard, order, ring
from router.core.scheduling.order import OrderKey
from router.core.scheduling.producers import (
    RATES_PARAMS,
    AdapterResidency,
    PrefixMatch,
    Producer,
    build_rates,
    build_recent,
)
from router.core.scheduling.profile import Cost, Profile
from router.core.scheduling.terms import TERM_NAMES, build_term, term_module
from yamlcheck import Node

DEFAULT_EVICTION_WEIGHT = 2.0  # future recompute of an evicted block, in prefills of that block
# lora costs nothing for requests without an adapter (the term returns None).
DEFAULT_TERMS: dict[str, float] = {"queue": 1.0, "prefill": 1.0, "eviction": DEFAULT_EVICTION_WEIGHT,
                                   "lora": 1.0}
COST_PRESETS = ("cache_aware", "session")  # the presets that sum cost terms

_TERM_PARAMS: tuple[str, ...] = tuple(p for name in TERM_NAMES for p in term_module(name).PARAMS)
CACHE_AWARE_PARAMS: tuple[str, ...] = guard.PARAMS + RATES_PARAMS + _TERM_PARAMS + ("eviction_weight", "bounded_load")
PARAMS: dict[str, tuple[str, ...]] = {  # one entry per name of PRESET_NAMES (config)
    "cache_aware": CACHE_AWARE_PARAMS,
    "prefix_affinity": (),
    "session": ring.PARAMS + tuple(p for p in CACHE_AWARE_PARAMS if p != "bounded_load"),
    "least_load": ("use_scraped", "use_weight"),
    "round_robin": (),
    "power_of_two": ("seed",),
    "random": ("seed",),
}


def term_weights(params: Node, terms: Node | None) -> dict[str, float]:
    """The cost terms and weights: routing.terms if given, else the defaults (and the
    legacy ``routing.params.eviction_weight``)."""
    if terms is None or terms.value is None:
        weights = dict(DEFAULT_TERMS)
        if params.has("eviction_weight"):
            weights["eviction"] = params.get("eviction_weight").number(minimum=0.0)
        return weights
    if params.has("eviction_weight"):
        params.get("eviction_weight").fail("set the eviction weight in one place: routing.terms.eviction "
                                           "(routing.terms replaces the preset's terms)")
    terms.mapping(TERM_NAMES)
    weights = {}
    for name in terms.value:
        node = terms.get(name)
        weight = node.number(minimum=0.0)
        if not math.isfinite(weight):
            node.fail(f"expected a finite weight >= 0, found {weight}")
        weights[name] = weight
    if not any(w > 0 for w in weights.values()):
        terms.fail("expected at least one cost term with a weight > 0 "
                   f"(terms: {', '.join(TERM_NAMES)})")
    return weights


def _cache_aware(params: Node, terms: Node | None) -> Profile:
    weights = term_weights(params, terms)
    every = {term: build_term(term, params) for term in TERM_NAMES}  # validates every term's params
    built = [(every[term], weight) for term, weight in weights.items() if weight > 0]
    needs = {p for term, _ in built for p in term_module(term.name).NEEDS}
    producers: list[Producer] = [PrefixMatch()]  # longest_match needs it whatever the terms
    if "rates" in needs:
        producers.append(build_rates(params))
    if "recent" in needs:
        producers.append(build_recent(params))
    if "adapters" in needs:
        producers.append(AdapterResidency())
    keys: list[OrderKey] = [guard.build(params)] if params.get("bounded_load", True).boolean() else []
    return Profile("cache_aware", producers=producers,
                   keys=[*keys, Cost(built)],
                   ties=[order.LoadPerCapacity(), order.LongestMatch(), order.Rotation()])


def build_profile(name: str, params: Node, terms: Node | None = None) -> Profile:
    """The preset `name` (one of PRESET_NAMES), tuned by its validated params node."""
    if name not in PRESET_NAMES:
        raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(PRESET_NAMES)}")
    params.mapping(PARAMS[name])
    if terms is not None and terms.value is not None and name not in COST_PRESETS:
        terms.fail(f"policy '{name}' sums no cost terms; routing.terms applies to {' and '.join(COST_PRESETS)}")
    if name == "cache_aware":
        return _cache_aware(params, terms)
    if name == "session":
        fallback = _cache_aware(_without(params, ring.PARAMS), terms)
        return Profile("session", producers=[PrefixMatch()],
                       keys=[guard.build(params, healthy_only=True), ring.build(params)], fallback=fallback)
    if name == "prefix_affinity":
        return Profile(name, producers=[PrefixMatch()],
                       keys=[order.LongestMatch(), order.LoadPerCapacity(), order.Rotation(over_split=True)])
    if name == "least_load":
        return Profile(name, keys=[order.RequestsPerWeight(use_scraped=params.get("use_scraped", True).boolean(),
                                                           use_weight=params.get("use_weight", True).boolean()),
                                   order.Rotation()])
    if name == "round_robin":
        return Profile(name, keys=[order.ModelTurn()])
    seed_node = params.get("seed", None)
    seed = None if seed_node.value is None else seed_node.integer()
    if name == "power_of_two":
        return Profile(name, keys=[order.TwoChoices(seed=seed)])
    return Profile(name, keys=[order.Shuffle(seed=seed)])


def _without(params: Node, keys: tuple[str, ...]) -> Node:
    value = {k: v for k, v in (params.value or {}).items() if k not in keys}
    return Node(value, params.path, params.file)


def profile_of(routing: RoutingConfig) -> Profile:
    """The scheduling profile routes.yaml's ``routing:`` section describes (ConfigError, with
    the key path, on bad params or terms)."""
    return build_profile(routing.policy, routing.params_node(), routing.terms_node())


def validate_policy_params(config: Config) -> None:
    """Build the profile once so bad `routing.params` / `routing.terms` are config errors,
    not a crash later."""
    profile_of(config.routing)

