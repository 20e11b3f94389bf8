"""Latency outliers: a replica that answers, but far slower than its peers, leaves rotation.

The breakers (router/fleet/breaker.py) eject a replica that fails.  A replica that is alive but
slow (a throttled or failing GPU, a noisy neighbour, an engine swapping KV blocks) fails
nothing: it answers every request, twenty times late, and keeps its share of the traffic
(a quarter of a four-replica fleet's requests, which then make the fleet's p99).  Envoy's
outlier detection ejects hosts whose success rate is far below the fleet's; this does the
same with the time to first byte.

What is compared, so that like is compared with like:

* each attempt's own time to first byte: from its dispatch to its answer being committed
  (a stream's first chunk, a whole answer otherwise), heard through the attempt hooks
  (`LatencyFeedback`).  Error answers teach nothing and are skipped.  A first attempt that
  lost a hedge race (router/transport/proxy.py) gives the time it had taken when it was cancelled: a
  lower bound, and the only sample a replica too slow to ever win one gives.
* per request shape: a stream or not, the prompt tokens the replica had to prefill before
  its first byte in bands of 4x (under 256, 1k, 4k, 16k, more): its own uncached ones and
  the router's prompts pending there when it was sent (``Replica.pending_prefill_tokens``;
  vLLM prefills those first), so that a replica busy with a queue of long prompts is
  compared with peers' answers that waited as long, not judged slow for its load
  (benchmarks/scenarios/trace_conversation*.yaml near saturation: healthy replicas were
  ejected at "5.3x their peers", and their load cascaded onto the rest), and for a whole
  answer its ``max_tokens`` in bands of 4x (its first
  byte comes after the generation); times are multiplied by the replica's capacity hint
  (tensor_parallel_size x weight: a replica configured as half the size may be twice as slow)
  for what is expected of a replica (the hedge delay), but a replica is *judged* only
  against peers of its own capacity: a short or cached prompt takes a TP=4 replica about
  as long as a TP=1 one (step overheads, not compute), so x4 made a healthy TP=4 replica
  read "2.7x its peers" and be ejected again and again on a heterogeneous fleet.
* per replica and shape, an EWMA of those times (its typical time, also what a hedge
  expects of it); per replica, its slowness: an EWMA of log(sample / the median of its
  peers' typical times for the sample's shape), so the geometric mean of how many times
  slower than its peers it has been lately, which one long request does not swing.
* only with at least `MIN_PEERS` peers (other replicas of the same model and capacity with
  a typical time for the shape: a fleet with fewer than three replicas of a size never
  ejects those by latency), and only after ``latency_min_requests`` compared samples;
* never an answer the router predicted mostly cached there (its uncached tokens under half
  the prompt): when the replica had evicted the prefix unseen, the answer takes a whole
  prefill, many times a hit's time, and a healthy replica would read as a slow one.

A replica whose slowness passes ``latency_factor`` is ejected through its breaker
(`CircuitBreakers.eject`) for ``ejection_time`` x 2^strikes (at most ``max_ejection_time``),
strikes being its latency ejections since it was last judged fine, unless
``max_ejection_percent`` of the model's replicas (at least one) are out already, as in
Envoy.  Its samples are dropped: back through the half-open trial, it is judged on new ones,
and on probation: if the first of them (its trial's, usually) is again more than
``latency_factor`` times its peers', it is out again at once, for twice as long, rather than
after another ``latency_min_requests`` slow answers.

Bounded: at most `MAX_SHAPES` shapes per replica, `MAX_REPLICAS_PER_MODEL` replicas per
model, and a replica is forgotten when it leaves the fleet (membership.FleetWiring).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from router.core.scheduling.candidates import capacity_of
from router.fleet.breaker import BreakerState
from router.transport.hooks import ABANDONED, Attempt, Hook, uncached_tokens

if TYPE_CHECKING:
    from router.core.requests import RouteRequest
    from router.core.scheduling import Decision
    from router.fleet.breaker import CircuitBreakers
    from router.fleet.replicas import Replica

log = logging.getLogger("router.outliers")

ALPHA = 0.2  # weight of a new sample in the EWMAs
MIN_PEERS = 2  # peers (same capacity) with a typical time for the shape before a replica is compared
MIN_TYPICAL = 3  # samples before a replica's typical time for a shape counts
ABSOLUTE_SLACK_S = 0.02  # a time to first byte within this of the peers' median is never slow
MAX_REPLICAS_PER_MODEL = 4096
_BANDS = 5  # size bands of 4x
MAX_SHAPES = _BANDS * 8  # (prompt band, answer band or stream)
_STREAM = 7  # the answer band of a stream (its first byte does not wait for the generation)
_UNKNOWN_LENGTH = 6  # a whole answer without max_tokens
LATENCY = "latency"  # the reason label of router_outlier_ejections_total


def _band(bits: int, first_bits: int) -> int:
    """By bit length: 0 below 2**first_bits, then one band per 4x, the last open-ended."""
    return min(_BANDS - 1, max(0, (bits - first_bits + 1) // 2))


# The bands by bit length, looked up once per answer rather than computed.
_PROMPT_BANDS = tuple(_band(bits, 8) * 8 for bits in range(65))  # under 256 tokens, 1k, ...
_ANSWER_BANDS = tuple(_band(bits, 6) for bits in range(65))  # max_tokens under 64, 256, ...


def shape_of(route: RouteRequest, uncached_tokens: int) -> int:
    """The request shape whose times are compared with each other (< MAX_SHAPES)."""
    prompt = _PROMPT_BANDS[min(uncached_tokens.bit_length(), 64)]
    if route.stream:
        return prompt + _STREAM
    limit = route.max_tokens
    return prompt + (_UNKNOWN_LENGTH if limit is None else _ANSWER_BANDS[min(limit.bit_length(), 64)])


@dataclass(slots=True)
class _Typical:
    seconds: float  # EWMA, multiplied by the replica's capacity
    count: int = 1


@dataclass(slots=True)
class ReplicaLatency:
    """What one replica's times to first byte have been (see the module docstring)."""

    replica: Replica
    typical: dict[int, _Typical] = field(default_factory=dict)  # by shape
    slowness: float = 0.0  # EWMA of log(sample / peers' median)
    compared: int = 0  # samples in `slowness` since it was last reset
    strikes: int = 0  # latency ejections since it was last judged fine
    capped: bool = False  # judged slow, but max_ejection_percent kept it in (logged once)

    def reset(self) -> None:
        self.typical.clear()
        self.slowness = 0.0
        self.compared = 0


class LatencyOutliers:
    """The latency outlier detector of one router (one per Proxy)."""

    def __init__(self, breakers: CircuitBreakers,
                 replicas_of: Callable[[str], Sequence[Replica]] | None = None,
                 on_eject: Callable[[str, str], None] | None = None) -> None:
        self.breakers = breakers  # their live config holds the latency settings
        self.replicas_of = replicas_of  # a model's replicas (the fleet's), for the ejection cap
        self.on_eject = on_eject  # (replica id, reason): the metric
        self._models: dict[str, dict[str, ReplicaLatency]] = {}

    def __len__(self) -> int:
        return sum(len(group) for group in self._models.values())

    def observe(self, replica: Replica, route: RouteRequest, decision: Decision,
                seconds: float, *, lost_hedge: bool = False, tokens_ahead: int = 0) -> None:
        """An attempt's time to first byte, or (`lost_hedge`) the lower bound of a first
        attempt that a hedge beat: the hedge delay already judged it slow against what is
        expected of it, so the absolute slack does not apply to it."""
        if replica.breaker.state is BreakerState.OPEN:
            return  # out: what its last requests say is from before, and it is judged afresh
        uncached = uncached_tokens(replica, route, decision)
        if not lost_hedge and 2 * uncached < route.estimated_prompt_tokens:
            # Predicted mostly cached: when the replica had evicted the prefix (which the
            # router learns only later, if at all) the answer takes a whole prefill, many
            # times what a hit takes, and a healthy replica would read as a slow one
            # (benchmarks/scenarios/multi_turn.yaml: ejected at "7x its peers").
            return
        sample = max(seconds, 1e-6) * capacity_of(replica)
        shape = shape_of(route, uncached + tokens_ahead)
        group = self._models.get(replica.model)
        if group is None:
            group = self._models[replica.model] = {}
        entry = group.get(replica.id)
        if entry is None:
            if len(group) >= MAX_REPLICAS_PER_MODEL:
                del group[next(iter(group))]
            entry = group[replica.id] = ReplicaLatency(replica)
        typical = entry.typical.get(shape)
        if typical is None:
            entry.typical[shape] = _Typical(sample)
        else:
            typical.seconds += ALPHA * (sample - typical.seconds)
            typical.count += 1
        cfg = self.breakers.config
        if cfg.latency_factor <= 0:
            return
        reference = self._peers_median(group, entry, shape, MIN_PEERS, capacity=capacity_of(replica))
        if reference is None:
            return
        # Slower by less than ABSOLUTE_SLACK_S is no slowness, whatever the ratio: 7 ms
        # against its peers' 1 ms is noise (a new connection, a busy loop), not a sick replica.
        slower = lost_hedge or sample - reference > ABSOLUTE_SLACK_S
        ratio = math.log(sample / reference) if slower else 0.0
        entry.slowness = ratio if entry.compared == 0 else entry.slowness + ALPHA * (ratio - entry.slowness)
        entry.compared += 1
        limit = math.log(cfg.latency_factor)
        if entry.strikes and entry.compared == 1 and ratio > limit:
            self._eject(group, entry)  # on probation: its first answer back was as slow
            return
        if entry.compared < cfg.latency_min_requests:
            return
        if entry.slowness <= limit:
            entry.strikes = 0
            entry.capped = False
            return
        self._eject(group, entry)

    def expected(self, replica: Replica, route: RouteRequest, decision: Decision,
                 tokens_ahead: int = 0) -> float | None:
        """The time to first byte to expect of `replica` for this request: the lesser of its
        own typical time and its peers' median for the request's shape (so a replica that
        became slow is not expected to be slow); None before either is known."""
        group = self._models.get(replica.model)
        if group is None:
            return None
        shape = shape_of(route, uncached_tokens(replica, route, decision) + tokens_ahead)
        entry = group.get(replica.id)
        best = self._peers_median(group, entry, shape, 1)
        if entry is not None:
            own = entry.typical.get(shape)
            if own is not None and own.count >= MIN_TYPICAL and (best is None or own.seconds < best):
                best = own.seconds
        return None if best is None else best / capacity_of(replica)

    def slowness(self, replica_id: str) -> float | None:
        """How many times its peers' time to first byte a replica has taken lately (None:
        not compared yet)."""
        for group in self._models.values():
            entry = group.get(replica_id)
            if entry is not None and entry.compared:
                return math.exp(entry.slowness)
        return None

    def forget_replica(self, replica_id: str) -> None:
        """The replica left the fleet."""
        for model in list(self._models):
            group = self._models[model]
            group.pop(replica_id, None)
            if not group:
                del self._models[model]

    @staticmethod
    def _peers_median(group: dict[str, ReplicaLatency], entry: ReplicaLatency | None,
                      shape: int, min_peers: int, capacity: float | None = None) -> float | None:
        """The median typical time of `entry`'s peers for `shape` (of those of `capacity`
        only, when given); None with fewer than `min_peers` of them."""
        values = []
        for other in group.values():
            if other is entry or (capacity is not None and capacity_of(other.replica) != capacity):
                continue
            typical = other.typical.get(shape)
            if typical is not None and typical.count >= MIN_TYPICAL:
                values.append(typical.seconds)
        if len(values) < min_peers:
            return None
        values.sort()
        middle = len(values) // 2
        return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2

    def _eject(self, group: dict[str, ReplicaLatency], entry: ReplicaLatency) -> None:
        cfg = self.breakers.config
        replica = entry.replica
        if replica.breaker.state is BreakerState.OPEN:
            return
        replicas = (self.replicas_of(replica.model) if self.replicas_of is not None
                    else [e.replica for e in group.values()])
        out = sum(1 for r in replicas if r is not replica and r.breaker.state is not BreakerState.CLOSED)
        allowed = max(1, int(len(replicas) * cfg.max_ejection_percent / 100.0))
        times = math.exp(entry.slowness)
        if out >= allowed:
            if not entry.capped:
                entry.capped = True
                log.warning("replica %s is %.1fx slower than its peers, but %d of the %d replicas "
                            "of %s are out already (circuit_breaker.max_ejection_percent): kept",
                            replica.id, times, out, len(replicas), replica.model)
            return
        seconds = min(cfg.max_ejection_time, cfg.ejection_time * float(2 ** min(entry.strikes, 30)))
        reason = (f"latency outlier: time to first byte {times:.1f}x its peers' median over "
                  f"{entry.compared} request(s)")
        if not self.breakers.eject(replica.id, replica.breaker, seconds, reason):
            return
        entry.strikes += 1
        entry.capped = False
        entry.reset()
        log.warning("replica %s ejected for %gs: %s", replica.id, seconds, reason)
        if self.on_eject is not None:
            self.on_eject(replica.id, LATENCY)


class LatencyFeedback(Hook):
    """Each attempt's time to first byte, to the latency outlier detector."""

    def __init__(self, outliers: LatencyOutliers, clock: Callable[[], float] = time.monotonic) -> None:
        self.outliers = outliers
        self.clock = clock

    def on_dispatch(self, attempt: Attempt) -> None:
        attempt.state["sent_at"] = self.clock()

    def on_first_byte(self, attempt: Attempt, status: int) -> None:
        if status < 300:  # an error answer's timing says nothing of the replica's speed
            self._observe(attempt)

    def on_complete(self, attempt: Attempt, outcome: str) -> None:
        # The first attempt lost a hedge race despite its head start: it is at least this
        # slow.  (A hedge that lost says nothing: it started later.)
        if outcome == ABANDONED and attempt.superseded and attempt.number == 1:
            self._observe(attempt, lost_hedge=True)

    def _observe(self, attempt: Attempt, *, lost_hedge: bool = False) -> None:
        self.outliers.observe(attempt.replica, attempt.route, attempt.decision,
                              self.clock() - attempt.state["sent_at"], lost_hedge=lost_hedge,
                              tokens_ahead=attempt.state.get("prefill_ahead", 0))
