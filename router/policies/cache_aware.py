"""`cache_aware` (the default): lowest estimated time to first token, within bounded load.

One cost, no threshold chain.  For each replica r, with T the request's prompt tokens
(``RouteRequest.estimated_prompt_tokens``), n its blocks and m_r the blocks of its prefix
the index says r was sent (``PrefixIndex.match``):

    uncached_r = T - min(T, m_r x tokens_per_block)
    queue_s_r  = (waiting_r + running_weight x running_r + over_share_r) x typical_tokens / rate_r
    evict_s_r  = max(0, n - m_r - free_r) x tokens_per_block x eviction_weight / rate_r
    cost_r     = queue_s_r + uncached_r / rate_r + evict_s_r            (seconds)

* The queue: of the requests ahead (``Replica.queued``: router in-flight, or the scraped
  running + waiting if larger), ``waiting_r`` are the ones the replica itself last
  reported waiting (``vllm:num_requests_waiting``) and ``running_r`` the rest.  A waiting
  request must be prefilled before this one: it costs a typical request's prefill,
  ``typical_tokens`` = EWMA of the uncached prompt tokens of the requests this policy saw
  answered.  Any other request ahead is running, or about to run: it spends most of its
  life decoding, and continuous batching prefills the new request beside it, so it only
  slows the shared steps, counted as ``running_weight`` of a waiting one.  (Counting every
  in-flight request as a full prefill moves a conversation off its cached history as
  soon as another replica has one request less in flight.)  A replica that saturates
  (KV cache full, max_num_seqs reached) reports a waiting queue and is then avoided.
* ``over_share_r``: requests beyond r's bounded share of the recent traffic (the last
  ~``RECENT_WINDOW`` decisions, decayed; the same bound as the guard below, applied to
  those counts) count as waiting in its queue: under sustained skew they will be.  At low
  load the in-flight counts are too small to tell a replica that takes two thirds of all
  new conversations from one that takes its share; this term does, softly: a returning
  conversation whose history is cached there outweighs a small excess and stays, new
  and cold requests go elsewhere.
* ``evict_s_r``: the index knows how many blocks r can hold (``free_r`` =
  ``PrefixIndex.free_blocks``, from its KV capacity).  Storing the request's new blocks on
  a full replica evicts as many blocks of other prefixes, which will likely be asked for
  again and recomputed: ``eviction_weight`` prefills of each.  So new conversations go
  where the KV cache has room, rather than all to the fastest replica whose cache is
  already full of other conversations.  (benchmarks/scenarios/multi_turn.yaml, one run
  each on the loaded 2-core dev machine, fair share of the busiest replica 50%: without
  both terms hit rate 42%, busiest share 69%; eviction term alone 58%, 65%; both terms
  68%, 62%.  A hard guard on the recent share instead of the soft term reached 70%, 59%
  there, but moved conversations off their history in tests/integration/
  test_prefix_routing.py: hit rate 0.54-0.72 there instead of 0.69-0.76.)
* ``rate_r`` (prefill tokens/s) starts at ``prefill_tokens_per_s x tensor_parallel_size x
  weight`` and is learned online: ``observe()`` gets the time to first byte of every
  answered request, and when at least ``min_learn_tokens`` were uncached, the sample
  uncached / ttfb enters an EWMA (``ewma_alpha``) of that replica's rate.  Queueing inside
  ttfb makes a busy replica read slower than it is, which steers work away from it: the
  safe direction.  So for a long uncached prompt a TP=4 replica is rightly preferred to
  an idle TP=1 one, while a short or mostly cached prompt goes where its prefix is.
  Dividing by the rate makes every term relative to the replica's capacity.
* **Bounded-load guard** (router/policies/load.py): replicas whose in-flight load would
  exceed ``load_factor`` x their fair share (and ``load_headroom`` requests above it) rank
  after all that would not, so a burst of requests sharing a prefix (a common system
  prompt) cannot pile onto the replica that first cached it.  The guard reorders, never
  drops: all given replicas are ranked (the proxy fails over down the list), healthy
  ones before SUSPECT ones.
* Ties (an idle fleet, a prompt no one has seen) go to the lesser load per capacity, then
  the longer match, then by rotation, so equal replicas share traffic.

``Decision.why``: matched blocks, load, queue estimate, blocks it would evict and cost of
the winner, cost and match of the runner-up, and how many replicas the guard held back.
``Decision.matched_blocks``: the index's match for every given replica (the proxy passes
the winner's to ``observe``).

Parameters (``routing.params``):
    load_factor (number > 1, default 1.25): the bounded-load factor c.
    load_headroom (number >= 0, default 2): requests above its fair share a replica may
        always carry (router/policies/load.py).
    prefill_tokens_per_s (number > 0, default 20000): prior prefill rate of one TP=1,
        weight-1 replica (the simulator's 8B-on-H100 model does about 26k).
    ewma_alpha (0 < a <= 1, default 0.2): weight of a new sample in the learned rates.
    min_learn_tokens (integer >= 1, default 256): smaller uncached prompts teach no rate
        (their ttfb is overhead, not prefill).
    typical_tokens (number > 0, default 512): initial typical uncached tokens per request.
    running_weight (0 <= w <= 1, default 0): a running request's weight in the queue
        relative to a waiting one.  0 since benchmarks/scenarios/multi_turn.yaml, same run,
        same seed, 3 repeats each on the 2-core dev machine: 0.1 gave hit rate 65.5%, TTFT
        p50 37 ms; 0 gave 72.3%, 18.5 ms (agentic: no difference beyond noise; no_reuse,
        one repeat: p50 42 -> 35 ms, p99 74 -> 99 ms).  Running requests still count in the
        bounded-load guard.
    eviction_weight (number >= 0, default 2): future prefills an evicted block costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from router.fleet import Health
from router.policies.base import Decision
from router.policies.load import (
    DEFAULT_LOAD_FACTOR,
    DEFAULT_LOAD_HEADROOM,
    RecentDispatches,
    allowance_by_capacity,
    capacity,
)

if TYPE_CHECKING:
    from router.fleet import Replica
    from router.prefix.index import PrefixIndex
    from router.requests import RouteRequest
    from yamlcheck import Node

DEFAULT_PREFILL_TOKENS_PER_S = 20_000.0  # prior, per TP=1 weight-1 replica
DEFAULT_EWMA_ALPHA = 0.2  # weight of a new observation in learned rates
DEFAULT_MIN_LEARN_TOKENS = 256  # below this many uncached tokens, ttfb is mostly overhead
DEFAULT_TYPICAL_TOKENS = 512.0  # initial typical uncached prompt tokens per queued request
DEFAULT_RUNNING_WEIGHT = 0.0  # a running (decoding) request vs a waiting one, in the queue
DEFAULT_EVICTION_WEIGHT = 2.0  # future recompute of an evicted block, in prefills of that block
RATE_CLAMP = 16.0  # a learned rate stays within [prior / 16, prior x 16]
MAX_TRACKED_REPLICAS = 4096  # bound on the learned-rate table (replicas come and go)
RECENT_WINDOW = 100.0  # decisions over which each replica's share of requests is counted

PARAMS = ("load_factor", "load_headroom", "prefill_tokens_per_s", "ewma_alpha", "min_learn_tokens", "typical_tokens",
          "running_weight", "eviction_weight")


class CacheAware:
    name = "cache_aware"

    def __init__(
        self,
        *,
        load_factor: float = DEFAULT_LOAD_FACTOR,
        load_headroom: float = DEFAULT_LOAD_HEADROOM,
        prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S,
        ewma_alpha: float = DEFAULT_EWMA_ALPHA,
        min_learn_tokens: int = DEFAULT_MIN_LEARN_TOKENS,
        typical_tokens: float = DEFAULT_TYPICAL_TOKENS,
        running_weight: float = DEFAULT_RUNNING_WEIGHT,
        eviction_weight: float = DEFAULT_EVICTION_WEIGHT,
    ) -> None:
        self.load_factor = load_factor
        self.load_headroom = load_headroom
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.ewma_alpha = ewma_alpha
        self.min_learn_tokens = min_learn_tokens
        self.typical_tokens = typical_tokens
        self.running_weight = running_weight
        self.eviction_weight = eviction_weight
        self._rates: dict[str, float] = {}  # replica id -> learned prefill tokens/s
        self._tokens_per_block = 16  # from the index at rank time, for observe()
        self._turn = 0
        self._recent = RecentDispatches(RECENT_WINDOW)

    # -- the cost model ---------------------------------------------------------------
    def prior_rate(self, replica: Replica) -> float:
        return self.prefill_tokens_per_s * capacity(replica)

    def prefill_rate(self, replica: Replica) -> float:
        """Prefill tokens/s of `replica`: learned if observed, else the prior."""
        rate = self._rates.get(replica.id)
        return rate if rate is not None else self.prior_rate(replica)

    def rank(
        self,
        request: RouteRequest,
        replicas: Sequence[Replica],
        index: PrefixIndex,
    ) -> Decision:
        # Pass 1, one row per routable replica: load (Replica.queued), capacity
        # (load.capacity), its scraped waiting queue, its count of recent dispatches; and
        # per health group the totals the bounded-load allowances need.  Inlined rather
        # than calling those helpers: at 64 replicas per-replica calls would cost more
        # than the rest of the decision (benchmarks/routing_micro.py).
        healthy_state, suspect_state = Health.HEALTHY, Health.SUSPECT
        recent_counts, recent_unit = self._recent.scaled()
        recent_get = recent_counts.get
        rows = []
        totals = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]  # per group: load, recent, capacity
        for r in replicas:
            health = r.health
            if health is healthy_state:
                group = 0
            elif health is suspect_state:
                group = 1
            else:
                continue
            engine = r.load
            queued = float(r.in_flight)
            scraped = engine.running + engine.waiting
            if scraped > queued:
                queued = scraped
            weight = r.weight
            cap = (r.tensor_parallel_size if r.tensor_parallel_size > 1 else 1) * (weight if weight > 0 else 1.0)
            recent = recent_get(r.url, 0.0) / recent_unit
            t = totals[group]
            t[0] += queued
            t[1] += recent
            t[2] += cap
            rows.append((r, r.url, group, queued, cap, engine.waiting, recent))
        n = len(rows)
        if not n:
            return Decision(ranked=[], why={"policy": self.name})
        ids = [row[1] for row in rows]
        hashes = request.block_hashes
        matched = index.match(hashes, ids)
        free = index.free_blocks(ids)
        tpb = self._tokens_per_block = index.tokens_per_block
        factor, headroom = self.load_factor, self.load_headroom
        group_caps = [[row[4] for row in rows if row[2] == g] for g in (0, 1)]
        load_allow = [allowance_by_capacity(t[0], t[2], c, factor, headroom) for t, c in zip(totals, group_caps)]
        share_allow = [allowance_by_capacity(t[1], t[2], c, factor, headroom) for t, c in zip(totals, group_caps)]

        # Pass 2: cost (tokens of work ahead of the first token / prefill rate) and sort key.
        prompt = request.estimated_prompt_tokens
        n_blocks = len(hashes)
        typical = self.typical_tokens
        running_weight = self.running_weight
        evict_tokens = tpb * self.eviction_weight
        rates = self._rates
        base = self.prefill_tokens_per_s
        self._turn = (self._turn + 1) & 0x3FFFFFFF
        start = self._turn % n
        keys = []
        for i, (_, rid, group, queued, cap, waiting, recent) in enumerate(rows):
            rate = rates.get(rid) or base * cap
            m = matched[rid]
            over_share = recent + 1.0 - share_allow[group][cap]
            ahead = waiting + running_weight * (queued - waiting) + (over_share if over_share > 0.0 else 0.0)
            work = ahead * typical
            uncached = prompt - m * tpb
            if uncached > 0:
                work += uncached
            evicted = n_blocks - m - free[i]
            if evicted > 0:
                work += evicted * evict_tokens
            # suspect after healthy; within each, within the guard first; then cost, load
            # per capacity, longer match, rotation (ties of an idle fleet spread)
            held_back = queued + 1.0 > load_allow[group][cap]
            keys.append((group, held_back, work / rate, queued / cap, -m, (i - start) % n, i, ahead / rate))
        keys.sort()
        ranked = [rows[k[6]][0] for k in keys]
        win = keys[0]
        w = win[6]
        self._recent.add(ids[w])
        why: dict[str, object] = {
            "policy": self.name,
            "matched_blocks": -win[4],
            "load": rows[w][3],
            "queue_s": round(win[7] * typical, 6),
            "over_share": round(max(0.0, rows[w][6] + 1.0 - share_allow[rows[w][2]][rows[w][4]]), 3),
            "evicts_blocks": max(0, int(n_blocks + win[4] - free[w])) if free[w] != float("inf") else 0,
            "cost_s": round(win[2], 6),
            "held_back": len([1 for k in keys if k[1] and not k[0]]),
        }
        if n > 1:
            run = keys[1]
            why["runner_up"] = ids[run[6]]
            why["runner_up_matched_blocks"] = -run[4]
            why["runner_up_cost_s"] = round(run[2], 6)
        return Decision(ranked=ranked, why=why, matched_blocks=matched)

    # -- learning ---------------------------------------------------------------------
    def adopt(self, old: CacheAware) -> None:
        """After a reload with new parameters: keep what `old` learned about the replicas."""
        self._rates = dict(old._rates)
        self._recent = old._recent

    def forget_replica(self, replica_id: str) -> None:
        """The replica left the fleet: its learned prefill rate goes too."""
        self._rates.pop(replica_id, None)

    def observe(
        self,
        replica: Replica,
        request: RouteRequest,
        *,
        time_to_first_byte_s: float,
        matched_blocks: int,
    ) -> None:
        prompt = request.estimated_prompt_tokens
        uncached = prompt - min(prompt, matched_blocks * self._tokens_per_block)
        alpha = self.ewma_alpha
        self.typical_tokens += alpha * (max(uncached, 1) - self.typical_tokens)
        # A non-streamed answer's first byte comes after the whole generation, so its
        # timing says nothing about prefill: only streamed requests teach a rate.
        if not request.stream or uncached < self.min_learn_tokens or time_to_first_byte_s <= 0:
            return
        prior = self.prior_rate(replica)
        sample = min(max(uncached / time_to_first_byte_s, prior / RATE_CLAMP), prior * RATE_CLAMP)
        rates = self._rates
        old = rates.get(replica.id)
        if old is None:
            if len(rates) >= MAX_TRACKED_REPLICAS:
                del rates[next(iter(rates))]
            old = prior
        rates[replica.id] = old + alpha * (sample - old)


def build(params: Node) -> CacheAware:
    params.mapping(PARAMS)
    return CacheAware(
        load_factor=params.get("load_factor", DEFAULT_LOAD_FACTOR).number(minimum=1.0, exclusive_minimum=True),
        load_headroom=params.get("load_headroom", DEFAULT_LOAD_HEADROOM).number(minimum=0.0),
        prefill_tokens_per_s=params.get("prefill_tokens_per_s", DEFAULT_PREFILL_TOKENS_PER_S).number(
            minimum=0.0, exclusive_minimum=True),
        ewma_alpha=params.get("ewma_alpha", DEFAULT_EWMA_ALPHA).number(
            minimum=0.0, maximum=1.0, exclusive_minimum=True),
        min_learn_tokens=params.get("min_learn_tokens", DEFAULT_MIN_LEARN_TOKENS).integer(minimum=1),
        typical_tokens=params.get("typical_tokens", DEFAULT_TYPICAL_TOKENS).number(
            minimum=0.0, exclusive_minimum=True),
        running_weight=params.get("running_weight", DEFAULT_RUNNING_WEIGHT).number(minimum=0.0, maximum=1.0),
        eviction_weight=params.get("eviction_weight", DEFAULT_EVICTION_WEIGHT).number(minimum=0.0),
    )
