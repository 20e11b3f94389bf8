"""Forwarding: attempts down a ranking, failing over before the answer is committed.

The failover loop lives here; one attempt is router/transport/attempts.py, the relay of its
answer router/transport/relay.py, a hedged first attempt router/transport/hedging.py.

One request's life here:

1. A flow (router/transport/flows.py) had the scheduling profile (router/core/scheduling/) order the
   candidate replicas (best first, healthy before suspect), after the breakers
   (router/fleet/breaker.py) took out ejected ones.  The ranking is computed once; failover
   walks down it without asking again.
2. Per attempt (at most ``proxy.max_attempts``, none started after ``proxy.deadline``,
   none beyond the retry budget; tenacity drives the loop and its full-jitter backoff):
   * a slot of the upstream pool (``proxy.max_connections``): taken at once when one is
     free, else waited for up to ``proxy.pool_timeout``, never past what is left of
     ``proxy.deadline``.  A wait that runs out is a 503 with ``Retry-After``: the pool is
     the router's, shared by every replica, so no replica is blamed (no breaker failure,
     no suspect marking, no failover), and nothing was dispatched;
   * dispatch: ``replica.in_flight += 1`` and ``index.record(block_hashes, replica)``
     (so a burst of same-prefix requests sees each other at once);
   * POST the client's bytes with a per-attempt ``X-Request-Id: <id>-<attempt>``, the
     replica's API key (never the client's credentials), no hop-by-hop headers and none
     that say how the request travelled (``FORWARDING_HEADERS``: X-Forwarded-*, X-Real-IP...;
     the router adds none of its own);
   * wait for the answer (router/transport/waits.py): a stream up to ``first_byte_timeout`` for its
     first byte, a whole answer up to ``read_timeout``; cut to ``unhealthy_grace`` when the
     replica turns UNHEALTHY meanwhile;
   * before the answer is committed to the client, a connect error or timeout, a
     first-byte timeout, a disconnect, a 5xx, a 429 or a 200 ``text/event-stream`` whose
     first line is not SSE (``sse_verdict``: a JSON or HTML body mislabelled) is a
     failover: the index record is
     forgotten, the breaker counts a failure (a ``Retry-After`` ejects the replica for
     that long), connect-level failures mark the replica SUSPECT at once (the monitor
     re-probes it), and the next replica is tried;
   * otherwise the answer is committed: the profile's ``observe`` gets the time to first byte, the
     breaker a success, and a 4xx answer un-records the prefix (the replica cached
     nothing).
3. Relay (router/transport/relay.py): the answer goes to the client verbatim, but for the
   headers router/transport/headers.py drops; a stream cut mid-way ends with an error event.
4. ``finally``: in-flight falls, the upstream response is released - or, if unfinished,
   its connection is closed, which is how vLLM learns to abort the request when the
   client went away (the handler is cancelled on disconnect, see app.py).

Hedging (``proxy.hedge``, off by default) races a second attempt against a slow first one:
router/transport/hedging.py.

Messages sent to clients never name a replica (its URL is topology); the access log does.
"""
from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from aiohttp import web
from multidict import CIMultiDict
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    stop_any,
    wait_random_exponential,
)

from router.config import CircuitBreakerConfig, ProxyConfig
from router.core.scheduling import Decision, Profile
from router.errors import RouterError, error_body
from router.fleet.breaker import CircuitBreakers
from router.fleet.replicas import Health, Replica
from router.fleet.rotation import Rotation
from router.observability.access_log import RequestRecord
from router.observability.loop_lag import LoopLag
from router.observability.telemetry import Telemetry
from router.transport.attempts import Attempts
from router.transport.failures import KIND_TEXT, TIMEOUT_KINDS, NoReplicaLeft, UpstreamFailure
from router.transport.hedging import Hedging
from router.transport.hooks import (
    AdapterFeedback,
    BreakerFeedback,
    Hooks,
    IndexFeedback,
    InFlight,
    PolicyFeedback,
    PredictionAccuracy,
    SuspectMarking,
)
from router.transport.outliers import LatencyFeedback, LatencyOutliers
from router.transport.relay import Relay
from router.transport.retry_budget import RetryBudget, StopWhen
from router.transport.upstream import (
    UpstreamPool,
)
from router.transport.waits import Waits

if TYPE_CHECKING:
    from router.core.requests import RouteRequest
    from router.fleet.monitor import Monitor
    from router.fleet.replicas import Fleet
    from router.prefix.exact import ExactIndex
    from router.prefix.index import PrefixIndex



class Proxy:
    """Forwards RouteRequests to replicas; one per app."""

    def __init__(self, *, upstream: UpstreamPool, feedback_to: Callable[[], Profile], index: PrefixIndex,
                 config: ProxyConfig, telemetry: Telemetry, monitor: Monitor | None = None,
                 request_id_header: str = "X-Request-Id",
                 breaker_config: CircuitBreakerConfig | None = None,
                 loop_lag: LoopLag | None = None, exact: ExactIndex | None = None,
                 fleet: Fleet | None = None) -> None:
        self.config = config
        self.telemetry = telemetry
        # Waits are the router's own (router/transport/waits.py); the connect's is a ConnectWatch.
        self.waits = Waits(config.unhealthy_grace)
        self.breakers = CircuitBreakers(breaker_config or CircuitBreakerConfig(),
                                        on_change=telemetry.set_breaker)
        # Which replicas may take a request now (the breakers' view), and the 503s of a model
        # with none; its methods are this object's too (read per candidate: no extra call).
        self.rotation = Rotation(self.breakers, config.retry_after)
        self.admissible = self.rotation.admissible
        self.unavailable = self.rotation.unavailable
        # Replicas far slower than their peers are ejected through their breakers.
        self.outliers = LatencyOutliers(
            self.breakers, fleet.for_model if fleet is not None else None,
            on_eject=lambda rid, reason: telemetry.outlier_ejections.labels(rid, reason).inc())
        self.retry_budget = RetryBudget(config.retry_budget_ratio, config.retry_budget_min_per_s)
        # What an attempt means beyond transport (router/transport/hooks.py), in this order.
        self.hooks = Hooks([InFlight(), BreakerFeedback(self.breakers), IndexFeedback(index, exact),
                            AdapterFeedback(), SuspectMarking(monitor), PolicyFeedback(feedback_to, telemetry),
                            LatencyFeedback(self.outliers), PredictionAccuracy(telemetry, exact)])
        self._hedge_paths = self._hedge_paths_of(config)
        # One attempt on one replica (attempts.py), its answer's relay (relay.py), and the
        # race of a hedged first attempt (hedging.py).
        self.relay = Relay(config, telemetry, request_id_header)
        self.attempts = Attempts(config=config, upstream=upstream, waits=self.waits, hooks=self.hooks,
                                 relay=self.relay, telemetry=telemetry, loop_lag=loop_lag,
                                 request_id_header=request_id_header)
        self.hedging = Hedging(attempts=self.attempts, outliers=self.outliers, profile=feedback_to,
                               retry_budget=self.retry_budget, target=self._hedge_target)
        # Per-request bookkeeping (drain, introspection): entries removed in `finally`.
        self.active: dict[int, RequestRecord] = {}
        self._ids = itertools.count()
        self._idle = asyncio.Event()
        self._idle.set()

    def apply_config(self, config: ProxyConfig, breakers: CircuitBreakerConfig) -> None:
        """A reload's new timeouts, attempts and breaker settings, for the next attempts."""
        if (config.retry_budget_ratio, config.retry_budget_min_per_s) != (
                self.config.retry_budget_ratio, self.config.retry_budget_min_per_s):
            self.retry_budget = RetryBudget(config.retry_budget_ratio, config.retry_budget_min_per_s)
        self.waits.unhealthy_grace = config.unhealthy_grace
        self.config = self.relay.config = self.attempts.config = config
        self.hedging.retry_budget = self.retry_budget
        self._hedge_paths = self._hedge_paths_of(config)
        self.breakers.config = breakers
        self.rotation.retry_after = config.retry_after

    @staticmethod
    def _hedge_paths_of(config: ProxyConfig) -> frozenset[str]:
        """The paths whose requests may be hedged (none when hedging is off, or when a request
        has no second attempt to spend)."""
        hedge = config.hedge
        return frozenset(hedge.paths) if hedge.enabled and config.max_attempts >= 2 else frozenset()

    def forget_replica(self, replica_id: str) -> None:
        """The replica left the fleet: what the latency detector learned of it goes too."""
        self.outliers.forget_replica(replica_id)

    # -- bookkeeping ------------------------------------------------------------------
    def begin(self, record: RequestRecord) -> int:
        key = next(self._ids)
        self.active[key] = record
        self._idle.clear()
        return key

    def end(self, key: int) -> None:
        self.active.pop(key, None)
        if not self.active:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is active (drain); False if `timeout` ran out first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout)
            return True
        except TimeoutError:
            return not self.active

    async def cut_and_wait(self, timeout: float = 5.0) -> bool:
        """The drain ran out: end every wait now (streams get their error event), then wait."""
        self.waits.cut_all()
        return await self.wait_idle(timeout)

    def on_health(self, replica: Replica, old: Health, new: Health) -> None:
        """Monitor listener: waits on a replica that turned UNHEALTHY are cut short."""
        if new is Health.UNHEALTHY:
            self.waits.cut_replica(replica)

    # -- forwarding -------------------------------------------------------------------
    async def forward(self, request: web.Request | None, route: RouteRequest, decision: Decision,
                      record: RequestRecord, *, relay: bool = True,
                      hedge: bool = True) -> web.StreamResponse:
        """Attempts down `decision.ranked` (not empty; a flow ranked it, router/transport/flows.py).

        ``relay=False`` (a flow's inner hop, e.g. a prefill): the answer must be whole and
        is returned as a ``web.Response`` for the flow to read; nothing reaches the client
        (`request` may then be None: a hop sent for another data plane, the endpoint picker).
        ``hedge=False``: never a hedge (a hop of a disaggregated request); otherwise the
        first attempt is hedged when ``proxy.hedge`` says so (see the module docstring)."""
        if request is None and relay:
            raise ValueError("only an inner hop (relay=False) goes without a client request")
        cfg = self.config
        self.retry_budget.on_request()
        tried: list[Replica] = []
        last: UpstreamFailure | None = None
        stopped: list[str] = []

        def budget_stop(state: RetryCallState) -> bool:
            if self.retry_budget.try_spend():
                return False
            stopped.append("budget")
            self.telemetry.retry_budget_exhausted.labels(route.model).inc()
            return True

        # The first attempt runs without tenacity (most requests need no other, and building
        # the retry machinery costs more CPU than the rest of the attempt's bookkeeping); when
        # it fails, tenacity's first iteration re-raises that failure, so its attempt numbers,
        # waits and stops are what they would have been.
        try:
            replica = self._pick(decision.ranked, tried)
            tried.append(replica)
            record.attempts = 1
            record.replica = replica.id
            # (`request is None` implies `not relay`; it is spelled out for the type checker)
            if (request is None or route.path not in self._hedge_paths or not relay or not hedge
                    or self._hedge_target(decision.ranked, tried) is None):
                return await self.attempts.run(request, route, replica, 1, decision, record, relay)
            return await self.hedging.race(request, route, decision, record, tried)
        except UpstreamFailure as failure:
            last = failure
        except NoReplicaLeft:
            return self._give_up(route, record, last, tried, ["none_left"])
        first_failure: UpstreamFailure | None = last
        hedged = len(tried) - 1  # a hedge was one of the attempts (and numbered 2)
        remaining = max(0.0, cfg.deadline - record.elapsed())  # tenacity's clock starts now
        retrying = AsyncRetrying(
            stop=stop_any(stop_after_attempt(max(1, cfg.max_attempts - hedged)),
                          stop_after_delay(remaining), StopWhen(budget_stop)),
            wait=wait_random_exponential(multiplier=cfg.backoff_initial, max=cfg.backoff_max),
            retry=retry_if_exception_type(UpstreamFailure),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    number = attempt.retry_state.attempt_number
                    if number == 1 and first_failure is not None:
                        replayed, first_failure = first_failure, None
                        raise replayed  # the fast path's attempt, replayed for tenacity
                    number += hedged
                    replica = self._pick(decision.ranked, tried)
                    if number > 1:
                        self.telemetry.retries.labels(route.model).inc()
                        if tried and tried[-1] is not replica:
                            self.telemetry.failovers.labels(route.model, tried[-1].id).inc()
                    tried.append(replica)
                    record.attempts = number
                    record.replica = replica.id
                    try:
                        return await self.attempts.run(request, route, replica, number, decision,
                                                   record, relay)
                    except UpstreamFailure as failure:
                        last = failure
                        raise
        except UpstreamFailure:
            pass  # `last` holds it
        except NoReplicaLeft:
            stopped.append("none_left")
        return self._give_up(route, record, last, tried, stopped)

    def _hedge_target(self, ranked: Sequence[Replica], tried: Sequence[Replica]) -> Replica | None:
        """The best admissible replica not tried yet (a hedge goes nowhere else)."""
        for replica in ranked:
            if replica not in tried and self.admissible(replica):
                return replica
        return None

    def _pick(self, ranked: Sequence[Replica], tried: Sequence[Replica]) -> Replica:
        """The best admissible replica not tried yet; else cycle through the admissible ones."""
        untried = self._hedge_target(ranked, tried)
        if untried is not None:
            return untried
        usable = [r for r in ranked if self.admissible(r)]
        if not usable:
            raise NoReplicaLeft()
        return usable[len(tried) % len(usable)]

    def _give_up(self, route: RouteRequest, record: RequestRecord,
                 last: UpstreamFailure | None, tried: Sequence[Replica],
                 stopped: Sequence[str]) -> web.StreamResponse:
        attempts = len(tried)
        if "budget" in stopped:
            why = "; no retry: the retry budget is spent (most requests are failing)"
        elif "none_left" in stopped:
            why = "; no other replica was left to try"
        elif attempts < self.config.max_attempts and last is not None:
            why = f"; the {self.config.deadline:g}s deadline for new attempts passed"
        else:
            why = ""
        if last is not None and last.status is not None:
            # The replicas answered, with errors: pass the last answer on (vLLM's shape).
            record.error = f"upstream {last.status} after {attempts} attempt(s){why}"
            headers = last.headers or CIMultiDict()
            if last.status in (429, 503) and "Retry-After" not in headers:
                headers["Retry-After"] = str(self.config.retry_after)
            return web.Response(status=last.status, body=last.body or error_body(
                last.status, last.message), headers=headers)
        if last is None:
            record.error = "no routable replica" + why
            raise self.unavailable(route.model)
        record.error = f"{last.kind}: {last.message} after {attempts} attempt(s){why}"
        status = 504 if last.kind in TIMEOUT_KINDS else 502
        raise RouterError(status, f"No replica of model `{route.model}` answered: "
                                  f"{attempts} attempt(s), the last replica "
                                  f"{KIND_TEXT.get(last.kind, last.kind)}{why}",
                          headers={"Retry-After": str(self.config.retry_after)})
