"""Request lifecycle hooks: what happens around one upstream attempt, apart from transport.

The proxy (router/transport/proxy.py) only moves bytes: it connects, fails over before the first
byte, relays verbatim and cancels.  Everything else an attempt means to the router is a
listener of four moments, in this order for one attempt:

    on_dispatch(attempt)                    the attempt is about to be sent
    on_first_byte(attempt, status)          the replica answered (any status < 500, not 429):
                                            the answer is committed to the client
    on_failure(attempt, failure)            it failed before committing (failover may follow)
    on_complete(attempt, outcome)           always, last: "success", "failure" or "abandoned"
                                            (the client left, the drain cut it, a bug, or
                                            another attempt of the request won a hedge race:
                                            then ``attempt.superseded``)

The listeners, each owning one concern, in the order they are called:

* `InFlight`       the replica's in-flight count (and its gauge) and prompt tokens to prefill;
* `BreakerFeedback` the circuit breaker's trial slot, successes and failures (breaker.py);
* `IndexFeedback`  the prefix-index record made at dispatch, forgotten when the replica
                   refused the request (4xx), the attempt failed or it lost a hedge race;
                   the same for the exact index's pending blocks (predict-on-route), which
                   expire after the end;
* `AdapterFeedback` an attempt for a LoRA adapter puts it in the replica's likely GPU
                   slots (router/fleet/lora.py), as vLLM will when it schedules the request,
                   and counts it in flight there until it completes (batch slots);
* `SuspectMarking` a connection-level failure makes the monitor probe the replica now;
* `PolicyFeedback` time to first byte and decision metrics, and `policy.observe`;
* `PredictionAccuracy` the predicted cached tokens against the answer's ``cached_tokens``;
* `AdmissionRelease` an admitted request's first byte hands its admission slot on (added
                   by the Router: the admission queue belongs to the API);
* `outliers.LatencyFeedback` each attempt's time to first byte, for the latency outlier
                   ejection (router/transport/outliers.py).

A hook keeps what it needs between moments in `attempt.state[<its name>]`.  A second
request flow (prefill on one replica, then decode on another) reuses the same hooks
around each of its hops.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from router.prefix.exact import EXACT

if TYPE_CHECKING:
    from router.core.requests import RouteRequest
    from router.core.scheduling import Decision, Profile
    from router.fleet.breaker import CircuitBreakers
    from router.fleet.monitor import Monitor
    from router.fleet.replicas import Replica
    from router.observability.access_log import RequestRecord
    from router.observability.telemetry import Telemetry
    from router.prefix.exact import ExactIndex
    from router.prefix.index import PrefixIndex
    from router.transport.failures import UpstreamFailure

log = logging.getLogger("router.hooks")

SUCCESS, FAILURE, ABANDONED = "success", "failure", "abandoned"


@dataclass(eq=False, slots=True)
class Attempt:
    """One upstream attempt of one request."""

    route: RouteRequest
    replica: Replica
    decision: Decision
    record: RequestRecord
    number: int  # 1 for the first attempt of the request
    state: dict[str, Any] = field(default_factory=dict)  # per-hook state, by hook name
    superseded: bool = False  # cancelled because another attempt of the request answered first


class AttemptHook(Protocol):
    def on_dispatch(self, attempt: Attempt) -> None: ...

    def on_first_byte(self, attempt: Attempt, status: int) -> None: ...

    def on_failure(self, attempt: Attempt, failure: UpstreamFailure) -> None: ...

    def on_complete(self, attempt: Attempt, outcome: str) -> None: ...


class Hook:
    """A hook that ignores the moments it does not override."""

    def on_dispatch(self, attempt: Attempt) -> None:
        return None

    def on_first_byte(self, attempt: Attempt, status: int) -> None:
        return None

    def on_failure(self, attempt: Attempt, failure: UpstreamFailure) -> None:
        return None

    def on_complete(self, attempt: Attempt, outcome: str) -> None:
        return None


class Hooks:
    """The hooks of one router, called in order.

    Each moment calls only the hooks that act on it (a hook inheriting `Hook`'s no-op for
    a moment is left out of that moment's list): most hooks care about two of the four,
    and every request goes through all four."""

    def __init__(self, hooks: Sequence[AttemptHook]) -> None:
        self._dispatch: list[Callable[[Attempt], None]] = []
        self._first_byte: list[Callable[[Attempt, int], None]] = []
        self._failure: list[Callable[[Attempt, UpstreamFailure], None]] = []
        self._complete: list[tuple[str, Callable[[Attempt, str], None]]] = []
        for hook in hooks:
            self.add(hook)

    def add(self, hook: AttemptHook) -> None:
        """Append `hook` (it runs after those added before it)."""

        def acts_on(moment: str) -> bool:
            return getattr(type(hook), moment, None) is not getattr(Hook, moment)

        if acts_on("on_dispatch"):
            self._dispatch.append(hook.on_dispatch)
        if acts_on("on_first_byte"):
            self._first_byte.append(hook.on_first_byte)
        if acts_on("on_failure"):
            self._failure.append(hook.on_failure)
        if acts_on("on_complete"):
            self._complete.append((type(hook).__name__, hook.on_complete))

    def dispatch(self, attempt: Attempt) -> None:
        for call in self._dispatch:
            call(attempt)

    def first_byte(self, attempt: Attempt, status: int) -> None:
        for call in self._first_byte:
            call(attempt, status)

    def failure(self, attempt: Attempt, failure: UpstreamFailure) -> None:
        for call in self._failure:
            call(attempt, failure)

    def complete(self, attempt: Attempt, outcome: str) -> None:
        for name, call in self._complete:
            try:
                call(attempt, outcome)
            except Exception:  # noqa: BLE001 - the rest must still run (in-flight counts)
                log.exception("hook %s failed on completion", name)


def uncached_tokens(replica: Replica, route: RouteRequest, decision: Decision) -> int:
    """The prompt tokens `replica` must compute: the prompt less what the ranking matched."""
    return max(0, route.estimated_prompt_tokens - decision.matched_tokens.get(replica.id, 0))


class InFlight(Hook):
    """What a replica has in flight from the router: the request count (its gauge reads it
    at scrape time, router/observability/telemetry.py) and the prompt tokens still to prefill, those of
    the attempts sent and not yet answered (``Replica.pending_prefill_tokens``).  The
    tokens are the wait a new request faces there: vLLM prefills the prompts ahead of it
    first, a token budget per step, so three 12k-token prompts ahead cost more than ten
    short ones (the queue term, scheduling/terms/queue.py).

    Counted only where the first byte marks the prefill's end: a stream's first chunk, or
    a whole answer of at most one token (the prefill hop of a disaggregated request).  Any
    other whole answer's first byte comes after its generation, and its prompt would count
    as waiting all that time; the decode hop of a disaggregated request computes no prompt
    tokens.  ``attempt.state["prefill_ahead"]``, the replica's pending tokens before this
    attempt, is read by PolicyFeedback and outliers.LatencyFeedback (work done before
    its first byte).

    A request sent before the replica's last scrape and answered since corrects that
    scrape's waiting count (``EngineLoad.request_left``): the next turn of a conversation
    is not held off its replica by its own previous turn."""

    def on_dispatch(self, attempt: Attempt) -> None:
        replica = attempt.replica
        replica.in_flight += 1
        attempt.state["dispatched_at"] = time.monotonic()
        route = attempt.route
        if route.method == "POST" and not route.prefilled_elsewhere and (
                route.stream or (route.max_tokens is not None and route.max_tokens <= 1)):
            tokens = uncached_tokens(replica, route, attempt.decision)
            attempt.state["prefill_ahead"] = replica.pending_prefill_tokens  # the rates learn from it
            attempt.state["prefill_tokens"] = tokens
            replica.pending_prefill_tokens += tokens

    @staticmethod
    def _prefilled(attempt: Attempt) -> None:
        tokens = attempt.state.pop("prefill_tokens", 0)
        if tokens:
            replica = attempt.replica
            left = replica.pending_prefill_tokens - tokens
            replica.pending_prefill_tokens = left if left > 0 else 0

    def on_first_byte(self, attempt: Attempt, status: int) -> None:
        self._prefilled(attempt)
        sent = attempt.state.get("dispatched_at")
        load = attempt.replica.load
        if status == 200 and sent is not None and sent < load.scraped_at:
            load.request_left()  # the scrape counted it in flight; it has left the queue

    def on_complete(self, attempt: Attempt, outcome: str) -> None:
        attempt.replica.in_flight -= 1
        self._prefilled(attempt)


class AdapterFeedback(Hook):
    def on_dispatch(self, attempt: Attempt) -> None:
        lora = attempt.route.lora
        if lora is not None:
            attempt.replica.lora_slots.dispatched(lora)

    def on_complete(self, attempt: Attempt, outcome: str) -> None:
        lora = attempt.route.lora
        if lora is not None:
            attempt.replica.lora_slots.finished(lora)


class BreakerFeedback(Hook):
    def __init__(self, breakers: CircuitBreakers) -> None:
        self.breakers = breakers

    def on_dispatch(self, attempt: Attempt) -> None:
        attempt.state["breaker_trial"] = self.breakers.on_dispatch(attempt.replica.breaker)

    def on_first_byte(self, attempt: Attempt, status: int) -> None:
        replica = attempt.replica
        self.breakers.on_success(replica.id, replica.breaker, attempt.state["breaker_trial"])

    def on_failure(self, attempt: Attempt, failure: UpstreamFailure) -> None:
        replica = attempt.replica
        self.breakers.on_failure(replica.id, replica.breaker, attempt.state["breaker_trial"],
                                 failure.kind, failure.retry_after)

    def on_complete(self, attempt: Attempt, outcome: str) -> None:
        if outcome == ABANDONED:
            self.breakers.on_abandon(attempt.replica.breaker, attempt.state["breaker_trial"])


class IndexFeedback(Hook):
    """The approximate index records what was sent where; the exact index counts the
    request's blocks as pending on the chosen replica (predict-on-route, exact.py) until its
    events confirm them."""

    def __init__(self, index: PrefixIndex, exact: ExactIndex | None = None) -> None:
        self.index = index
        self.exact = exact

    def on_dispatch(self, attempt: Attempt) -> None:
        route = attempt.route
        if route.block_hashes:
            attempt.state["recording"] = self.index.record(route.block_hashes, attempt.replica.id)
        exact = self.exact
        if exact is not None and route.exact_hashes:
            rid = attempt.replica.id
            hashes = route.exact_hashes.get(exact.block_size_of(rid))
            if hashes and exact.mode(rid) == EXACT:
                attempt.state["pending"] = exact.predict(rid, hashes)

    def _forget(self, attempt: Attempt) -> None:
        recording = attempt.state.pop("recording", None)
        if recording is not None:
            self.index.forget(recording)
        pending = attempt.state.pop("pending", None)
        if pending is not None and self.exact is not None:
            self.exact.retract(pending)

    def on_complete(self, attempt: Attempt, outcome: str) -> None:
        if attempt.superseded:
            self._forget(attempt)  # cancelled in its prefill: the other replica holds the prefix
            return
        pending = attempt.state.pop("pending", None)
        if pending is not None and self.exact is not None:
            self.exact.settle(pending)

    def on_first_byte(self, attempt: Attempt, status: int) -> None:
        if 400 <= status < 500:
            self._forget(attempt)  # the replica refused it: it cached nothing

    def on_failure(self, attempt: Attempt, failure: UpstreamFailure) -> None:
        self._forget(attempt)


class PredictionAccuracy(Hook):
    """Compares, for every answer that reports ``cached_tokens``, what the router predicted
    cached on the replica that answered with what the replica says it had."""

    def __init__(self, telemetry: Telemetry, exact: ExactIndex | None = None) -> None:
        self.telemetry = telemetry
        self.exact = exact

    def on_dispatch(self, attempt: Attempt) -> None:
        attempt.record.cached_tokens = None  # a failed-over attempt's answer does not count

    def on_complete(self, attempt: Attempt, outcome: str) -> None:
        record = attempt.record
        actual = record.cached_tokens
        if outcome != SUCCESS or actual is None:
            return
        rid = attempt.replica.id
        decision = attempt.decision
        predicted = decision.matched_tokens.get(rid)
        if predicted is None:
            return
        record.predicted_tokens = predicted
        exact = rid in decision.exact_replicas
        block = (self.exact.block_size_of(rid) if exact and self.exact is not None
                 else attempt.replica.load.block_size or 16)
        index = "exact" if exact else "approximate"
        error = predicted - actual
        model = attempt.route.model
        self.telemetry.child(self.telemetry.prediction_error, model, index).observe(error)
        outcome_label = "within_block" if abs(error) <= block else "over" if error > 0 else "under"
        self.telemetry.child(self.telemetry.predictions, model, index, outcome_label).inc()


# Failure kinds that say the replica itself may be gone: the monitor probes it at once.
CONNECTION_KINDS = frozenset({"connect", "connect_timeout", "disconnect", "first_byte_timeout"})


class SuspectMarking(Hook):
    def __init__(self, monitor: Monitor | None) -> None:
        self.monitor = monitor

    def on_failure(self, attempt: Attempt, failure: UpstreamFailure) -> None:
        if failure.kind in CONNECTION_KINDS and self.monitor is not None:
            self.monitor.mark_suspect(attempt.replica)


class AdmissionRelease(Hook):
    """An admitted request's first byte hands its admission slot on: the engine has taken
    it off its own waiting queue, so one more may join that queue.  Releasing only at the
    end instead ties the router's queue to how long answers take, and under a burst of long
    streams it released far fewer requests than the engine could take (13-18 s TTFT p99 with
    1,000 streams, benchmarks/results/overhead)."""

    def __init__(self, release: Callable[[str], None]) -> None:
        self.release = release

    def on_first_byte(self, attempt: Attempt, status: int) -> None:
        record = attempt.record
        if record.admitted and not record.slot_released and record.model is not None:
            record.slot_released = True
            self.release(record.model)


class PolicyFeedback(Hook):
    def __init__(self, policy: Callable[[], Profile], telemetry: Telemetry) -> None:
        self.policy = policy  # a getter: a reload may swap the policy
        self.telemetry = telemetry

    def _count_prefix(self, attempt: Attempt, matched: int | None) -> None:
        """The dashboard's hit rates: the prompt, its match on the chosen replica and the
        longest match anywhere in the fleet (``router_prefix_tokens_total``)."""
        prompt = attempt.route.estimated_prompt_tokens
        if prompt <= 0:
            return
        found = attempt.decision.matched_tokens
        best = max(found.values()) if found else 0
        t, model = self.telemetry, attempt.route.model
        t.child(t.prefix_tokens, model, "prompt").inc(prompt)
        t.child(t.prefix_tokens, model, "matched").inc(min(prompt, matched or 0))
        t.child(t.prefix_tokens, model, "best").inc(min(prompt, best))

    def on_first_byte(self, attempt: Attempt, status: int) -> None:
        route, replica, record = attempt.route, attempt.replica, attempt.record
        if route.method != "POST":
            return  # a stored response fetched: no decision was made, no prefill timed
        policy = self.policy()
        ttfb = record.ttfb or 0.0
        self.telemetry.child(self.telemetry.ttfb, route.model, replica.id).observe(ttfb)
        matched = attempt.decision.matched_blocks.get(replica.id, 0)
        matched_tokens = attempt.decision.matched_tokens.get(replica.id)
        self.telemetry.child(self.telemetry.decisions, policy.name, route.model, replica.id).inc()
        self.telemetry.child(self.telemetry.matched_blocks, policy.name).observe(matched)
        if status >= 300:
            return  # an error answer's timing teaches nothing about prefill
        self._count_prefix(attempt, matched_tokens)
        try:
            policy.observe(replica, route, time_to_first_byte_s=ttfb, matched_blocks=matched,
                           matched_tokens=matched_tokens, tokens_ahead=attempt.state.get("prefill_ahead", 0))
        except Exception:  # noqa: BLE001 - feedback is best effort
            log.exception("policy %s observe() failed", policy.name)
