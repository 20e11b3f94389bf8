"""Producers: per-request data computed once for all candidates, before any term runs.

Each producer writes its result into ``Candidates.data`` under its ``name``; terms and
order keys read it from there.  A profile holds one instance of each producer its stages
need, so a learned quantity (a replica's prefill rate) is learned once and read by every
term that divides by it.

* `PrefixMatch` ("prefix"): the longest-prefix match of the request for every candidate,
  in tokens, and the room each replica still has: from the exact index (vLLM's KV events,
  router/prefix/exact.py) for replicas in exact mode when the request has token ids, else
  from the approximate index (``PrefixIndex.match``, one walk for all, and
  ``PrefixIndex.free_blocks`` from the replica's KV size).
* `LearnedRates` ("rates"): each candidate's prefill rate in tokens/s, and the typical
  uncached size of a request, both learned from the answers (``observe``).
* `AdapterResidency` ("adapters"): for a request naming a LoRA adapter, per candidate
  whether the adapter is likely in its GPU slots, must be loaded, or must wait for a batch
  slot too (router/fleet/lora.py's AdapterSlots; read by terms/lora.py).
* `RecentShare` ("recent"): how many requests beyond its bounded share of the recent
  traffic each candidate took (guard.py's allowance applied to decayed dispatch counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat
from operator import truediv
from typing import TYPE_CHECKING, Protocol

from router.core.scheduling import guard
from router.core.scheduling.candidates import capacity_of
from router.core.scheduling.guard import DEFAULT_LOAD_FACTOR, DEFAULT_LOAD_HEADROOM, group_allowances

if TYPE_CHECKING:
    from router.core.requests import RouteRequest
    from router.core.scheduling.candidates import Candidates
    from router.fleet.replicas import Replica
    from yamlcheck import Node

DEFAULT_PREFILL_TOKENS_PER_S = 20_000.0  # prior, per TP=1 weight-1 replica
DEFAULT_EWMA_ALPHA = 0.2  # weight of a new observation in learned rates
DEFAULT_MIN_LEARN_TOKENS = 256  # below this many uncached tokens, ttfb is mostly overhead
DEFAULT_TYPICAL_TOKENS = 512.0  # initial typical uncached prompt tokens per queued request
RATE_CLAMP = 16.0  # a learned rate stays within [prior / 16, prior x 16]
MAX_TRACKED_REPLICAS = 4096  # bound on the recent-dispatch counts (replicas come and go)
MAX_CAPACITY_CLASSES = 256  # bound on the learned-rate table (distinct TP x weight values)
RECENT_WINDOW = 100.0  # decisions over which each replica's share of requests is counted


class Producer(Protocol):
    """Computes ``cands.data[name]`` once per request.  Optional methods, called when
    present: ``observe`` (answer feedback), ``chosen(replica_id)`` (the winner of each
    decision), ``adopt(old)`` (a reload keeps what the same-named old producer learned)."""

    name: str

    def produce(self, request: RouteRequest, cands: Candidates) -> None: ...


@dataclass(slots=True)
class PrefixData:
    """Per row (candidate), what its KV cache holds of the request's prefix, in tokens
    (the unit every term uses) and in blocks of its own index (for the ``why``)."""

    matched: list[int]  # blocks of the request's prefix the replica holds (its index's blocks)
    by_id: dict[str, int]  # the same, by replica id (Decision.matched_blocks)
    matched_tokens: list[int]  # the same in tokens
    tokens_by_id: dict[str, int]  # ... by replica id (Decision.matched_tokens)
    need_tokens: list[int]  # the request's hashed tokens, as that replica's index counts them
    free_tokens: list[float]  # tokens the replica can still store (inf: unknown size)
    blocks: int  # the request's full blocks in the approximate index
    tokens_per_block: int  # the approximate index's
    exact: list[bool] | None = None  # per row: matched by the exact index (None: no row is)


class PrefixMatch:
    """Longest-prefix match and free room for every candidate, from the exact index (KV
    events, exact.py) for the replicas it has in exact mode when the request has token ids,
    from the approximate index (what the router sent where) for the rest."""

    name = "prefix"

    def produce(self, request: RouteRequest, cands: Candidates) -> None:
        index = cands.index
        ids = cands.ids
        by_id = index.match(request.block_hashes, ids)
        tpb = index.tokens_per_block
        matched = list(map(by_id.__getitem__, ids))
        n = len(request.block_hashes)
        exact = cands.exact
        tokens = request.prompt_token_ids
        free = index.free_blocks(ids, tpb)  # in tokens
        if exact is None or tokens is None or not exact.replicas:
            matched_tokens = [m * tpb for m in matched]
            cands.data["prefix"] = PrefixData(
                matched=matched, by_id=by_id, matched_tokens=matched_tokens,
                tokens_by_id=dict(zip(ids, matched_tokens)), need_tokens=[n * tpb] * cands.n,
                free_tokens=free, blocks=n, tokens_per_block=tpb)
            return
        held, sizes, exact_free = exact.rows(request.index_model, tokens, request.cache_salt, ids,
                                             hashes_by_size=request.exact_hashes, lora=request.lora)
        rows = [t is not None for t in held]
        matched_tokens = [m * tpb if t is None else t for t, m in zip(held, matched)]
        exact_blocks = [m if t is None else t // s for t, s, m in zip(held, sizes, matched)]
        whole = len(tokens)
        cands.data["prefix"] = PrefixData(
            matched=exact_blocks, by_id=dict(zip(ids, exact_blocks)), matched_tokens=matched_tokens,
            tokens_by_id=dict(zip(ids, matched_tokens)),
            need_tokens=[whole - whole % s if e else n * tpb for s, e in zip(sizes, rows)],
            free_tokens=[x if e else f for x, e, f in zip(exact_free, rows, free)],
            blocks=n, tokens_per_block=tpb, exact=rows)


class LearnedRates:
    """Prefill tokens/s per candidate, learned from each answer's time to first byte.

    A sample is uncached / ttfb of a streamed answer with at least ``min_learn_tokens``
    uncached prompt tokens, clamped to [prior / 16, prior x 16] (the prior:
    ``prefill_tokens_per_s x capacity_r``, candidates.py).  Queueing inside ttfb makes a busy
    replica read slower than it is, which steers work away from it: the safe direction; but
    the router's own prompts ahead of it (``tokens_ahead``: ``Replica.pending_prefill_tokens``
    at its dispatch) are work the replica did in that time, so they count in the sample, and
    the queue term, which charges them again, does not see a replica that is merely busy as
    slow too.  (They are counted whole although some may be part done at the dispatch: that
    leans the sample high, by at most the prompts ahead over the answer's own.)  A
    non-streamed answer's first byte comes after the whole generation, so it teaches no rate.

    **Learned per capacity class, not per replica.**  Every sample enters an EWMA
    (``ewma_alpha``) of its capacity class's rate: the replicas of equal TP x weight, the
    same hardware as far as the router knows.  Per-replica rates learned from single answers
    follow each replica's load: a replica that is busy reads slow (its queue is in its
    ttfb), gets less work, drains and reads fast again; between equal replicas those few
    percent then decided where every cold prompt went (whose prefill costs the same
    everywhere but for the rate), so one replica drew every new prefix while the cache hits
    of the ones it held waited behind those prefills, and a replica that read slow had its
    queue charged at the slow rate, which pushed its own cache hits away
    (benchmarks/results/issue25_development/rate_classes/: agentic, old and new in one run,
    TTFT p99 1,594 -> 608 ms; shared_prefix at 32 req/s, p99 129 ms before and 100-105 ms
    after, in separate runs; a dead band that still let a replica more than 1.25x off its
    class have its own rate left agentic at 1,472 ms).  A replica that
    really is slower than its class (a throttled GPU) is the latency-outlier detector's to
    eject (router/transport/outliers.py, which compares a replica with peers of its own
    capacity, as this does); a known difference is ``weight``.
    ``typical_tokens``: EWMA of the uncached prompt tokens of every answered request, the
    work a queued request stands for (terms/queue.py).
    """

    name = "rates"

    def __init__(self, *, prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S,
                 ewma_alpha: float = DEFAULT_EWMA_ALPHA, min_learn_tokens: int = DEFAULT_MIN_LEARN_TOKENS,
                 typical_tokens: float = DEFAULT_TYPICAL_TOKENS) -> None:
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.ewma_alpha = ewma_alpha
        self.min_learn_tokens = min_learn_tokens
        self.typical_tokens = typical_tokens
        self._class_rates: dict[float, float] = {}  # capacity -> learned prefill tokens/s
        self._tokens_per_block = 16  # from the index at rank time, for observe()

    def prior_rate(self, replica: Replica) -> float:
        return self.prefill_tokens_per_s * capacity_of(replica)

    def prefill_rate(self, replica: Replica) -> float:
        """Prefill tokens/s of `replica`: its capacity class's learned rate, else the prior."""
        return self._class_rates.get(capacity_of(replica)) or self.prior_rate(replica)

    def produce(self, request: RouteRequest, cands: Candidates) -> None:
        get = self._class_rates.get
        base = self.prefill_tokens_per_s
        self._tokens_per_block = cands.index.tokens_per_block
        cands.data["rates"] = [get(cap) or base * cap for cap in cands.capacity]
        cands.data["typical_tokens"] = self.typical_tokens

    def observe(self, replica: Replica, request: RouteRequest, *, time_to_first_byte_s: float,
                matched_blocks: int, matched_tokens: int | None = None, tokens_ahead: int = 0) -> None:
        prompt = request.estimated_prompt_tokens
        cached = matched_blocks * self._tokens_per_block if matched_tokens is None else matched_tokens
        uncached = prompt - min(prompt, cached)
        alpha = self.ewma_alpha
        self.typical_tokens += alpha * (max(uncached, 1) - self.typical_tokens)
        if not request.stream or uncached < self.min_learn_tokens or time_to_first_byte_s <= 0:
            return
        cap = capacity_of(replica)
        prior = self.prefill_tokens_per_s * cap
        worked = uncached + tokens_ahead  # the prompts ahead of it were prefilled first
        sample = min(max(worked / time_to_first_byte_s, prior / RATE_CLAMP), prior * RATE_CLAMP)
        classes = self._class_rates
        old = classes.get(cap)
        if old is None:
            if len(classes) >= MAX_CAPACITY_CLASSES:
                del classes[next(iter(classes))]
            old = prior
        classes[cap] = old + alpha * (sample - old)

    def adopt(self, old: LearnedRates) -> None:
        """After a reload with new parameters: keep the rates learned about the fleet."""
        self._class_rates = dict(old._class_rates)


def build_rates(params: Node) -> LearnedRates:
    return LearnedRates(
        prefill_tokens_per_s=params.get("prefill_tokens_per_s", DEFAULT_PREFILL_TOKENS_PER_S).number(
            minimum=0.0, exclusive_minimum=True),
        ewma_alpha=params.get("ewma_alpha", DEFAULT_EWMA_ALPHA).number(minimum=0.0, maximum=1.0,
                                                                       exclusive_minimum=True),
        min_learn_tokens=params.get("min_learn_tokens", DEFAULT_MIN_LEARN_TOKENS).integer(minimum=1),
        typical_tokens=params.get("typical_tokens", DEFAULT_TYPICAL_TOKENS).number(minimum=0.0,
                                                                                   exclusive_minimum=True),
    )


RATES_PARAMS = ("prefill_tokens_per_s", "ewma_alpha", "min_learn_tokens", "typical_tokens")


class AdapterResidency:
    """Per row: 0 the request's adapter is likely loaded there, 1 it must be loaded into a
    free slot, 2 loaded in place of another adapter, 3 it must also wait for a batch slot
    (terms/lora.py); None for requests without an adapter."""

    name = "adapters"

    def produce(self, request: RouteRequest, cands: Candidates) -> None:
        lora = request.lora
        if lora is None:
            cands.data["adapters"] = None
            return
        states = []
        for replica in cands.replicas:
            slots = replica.lora_slots
            if slots.batch_full_without(lora):
                states.append(3)
            elif slots.holds(lora):
                states.append(0)
            else:
                states.append(2 if slots.full() else 1)
        cands.data["adapters"] = states


class RecentDispatches:
    """Exponentially decayed count of the requests dispatched to each replica.

    Each dispatch adds 1 and every older one decays by ``1 - 1/window``, so the counts
    sum to about ``window`` in steady state and a replica's count over the sum is its
    share of the recent requests.  O(1) per dispatch: instead of decaying every count,
    each new dispatch weighs ``1/decay`` times the previous one, and reads divide by the
    current weight (everything is rescaled when the weight grows large).
    """

    def __init__(self, window: float = RECENT_WINDOW, max_tracked: int = MAX_TRACKED_REPLICAS) -> None:
        self._decay = 1.0 - 1.0 / window
        self._unit = 1.0
        self._counts: dict[str, float] = {}
        self._max_tracked = max_tracked

    def add(self, replica_id: str) -> None:
        self._unit /= self._decay
        counts = self._counts
        if replica_id not in counts and len(counts) >= self._max_tracked:
            del counts[min(counts, key=counts.__getitem__)]  # the least recently busy
        counts[replica_id] = counts.get(replica_id, 0.0) + self._unit
        if self._unit > 1e100:
            scale = 1.0 / self._unit
            for rid in counts:
                counts[rid] *= scale
            self._unit = 1.0

    def scaled(self) -> tuple[dict[str, float], float]:
        """(raw counts, unit): a replica's count is raw / unit (for hot loops; read-only)."""
        return self._counts, self._unit


class RecentShare:
    """Requests beyond each candidate's bounded share of the recent traffic (>= 0; None when
    no candidate is beyond it, the common case).

    At low load the in-flight counts are too small to tell a replica that takes two thirds
    of all new conversations from one that takes its share; this column does: the queue
    term counts the excess as waiting requests (under sustained skew they will be).  The
    winner of each decision is counted (``chosen``).
    """

    name = "recent"

    def __init__(self, *, load_factor: float = DEFAULT_LOAD_FACTOR,
                 load_headroom: float = DEFAULT_LOAD_HEADROOM) -> None:
        self.load_factor = load_factor
        self.load_headroom = load_headroom
        self.dispatches = RecentDispatches()

    def produce(self, request: RouteRequest, cands: Candidates) -> None:
        counts, unit = self.dispatches.scaled()
        get = counts.get
        recent = list(map(truediv, map(get, cands.ids, repeat(0.0)), repeat(unit)))
        healthy, suspect = group_allowances(recent, cands, self.load_factor, self.load_headroom)
        if not suspect:
            if max(recent) + 1.0 <= min(healthy.values()):  # the common case: nobody is over
                cands.data["recent"] = None
                return
            over = [d if (d := x + 1.0 - healthy[c]) > 0.0 else 0.0 for x, c in zip(recent, cands.capacity)]
        else:
            tables = (healthy, suspect)
            over = [d if (d := x + 1.0 - tables[g][c]) > 0.0 else 0.0
                    for x, c, g in zip(recent, cands.capacity, cands.group)]
        cands.data["recent"] = over

    def chosen(self, replica_id: str) -> None:
        self.dispatches.add(replica_id)

    def adopt(self, old: RecentShare) -> None:
        self.dispatches = old.dispatches


def build_recent(params: Node) -> RecentShare:
    bound = guard.build(params)
    return RecentShare(load_factor=bound.load_factor, load_headroom=bound.load_headroom)
