"""Passive outlier ejection: a circuit breaker per replica, fed by the request path.

Health probes see a replica that answers ``/health``; requests see one that answers 500
or 429 to everything while ``/health`` passes, or that accepts connections and never
answers.  So every attempt's outcome feeds the replica's breaker:

    CLOSED    --failure_threshold consecutive failures-->   OPEN (ejected)
    CLOSED    --429/503 with Retry-After: S-->              OPEN for min(S, max_retry_after)
    OPEN      --ejection time passed-->                     HALF_OPEN
    HALF_OPEN --the one trial request succeeds-->           CLOSED
    HALF_OPEN --the trial fails-->                          OPEN, for twice as long

A failure is a connect error or timeout, a first-byte timeout, a disconnect before the
answer, a 5xx or a 429; any other answer (2xx, and 4xx: the replica works, the request
was wrong) is a success and resets the count.  The ejection time starts at
``ejection_time`` and doubles with each ejection that follows a failed trial, up to
``max_ejection_time``; a successful trial resets it.  An open breaker takes the replica
out of every ranking.  A half-open one is back in the rankings where the policy puts it
(so it does get its trial: ranked last, it would never be tried while the others answer),
but takes one request at a time until one succeeds.  (The anchors: Envoy's outlier
detection, and the circuit breakers of vllm-router and SGLang's gateway.)

A replica that answers, but far slower than its peers, is ejected the same way by the
latency outlier detector (router/transport/outliers.py, `CircuitBreakers.eject`): OPEN for a time it
chooses, then the same half-open trial.

While a trial is in flight the replica takes no other request; a request that finds every
candidate in that state (or ejected) waits for a trial's verdict (``on_trial_end``,
`Rotation.admissible_or_wait`, rotation.py) instead of being answered 503: after a fault that hit every
replica, the first requests are the trials, and the ones behind them are not refused.

The state lives on each Replica (``replica.breaker``, bounded by the fleet); the rules are
here, in `CircuitBreakers`.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.config import CircuitBreakerConfig

log = logging.getLogger("router.breaker")


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True)
class Breaker:
    """One replica's breaker state (the rules are CircuitBreakers')."""

    state: BreakerState = BreakerState.CLOSED
    failures: int = 0  # consecutive
    open_until: float = 0.0  # monotonic time
    ejections: int = 0  # in a row, since the last successful trial
    trial_in_flight: bool = False
    last_reason: str | None = None


class CircuitBreakers:
    """The breaker rules of one router, applied to each replica's `Breaker`."""

    def __init__(self, config: CircuitBreakerConfig,
                 on_change: Callable[[str, Breaker, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.on_change = on_change  # (replica id, breaker, reason)
        self.on_trial_end: Callable[[], None] | None = None  # a half-open trial has its verdict
        self._clock = clock

    def allows(self, replica_id: str, breaker: Breaker) -> bool:
        """May a request be sent now?  (Moves OPEN to HALF_OPEN when its time is up.)"""
        if breaker.state is BreakerState.CLOSED:
            return True
        if breaker.state is BreakerState.OPEN:
            if self._clock() < breaker.open_until:
                return False
            self._set(replica_id, breaker, BreakerState.HALF_OPEN, "ejection time over")
        return not breaker.trial_in_flight

    @staticmethod
    def on_trial(breaker: Breaker) -> bool:
        """Is the replica half-open with its one trial request in flight (its verdict due)?"""
        return breaker.state is BreakerState.HALF_OPEN and breaker.trial_in_flight

    def retry_in(self, breaker: Breaker) -> float:
        """Seconds until an open breaker lets a trial through."""
        return max(0.0, breaker.open_until - self._clock())

    def on_dispatch(self, breaker: Breaker) -> bool:
        """An attempt is sent; returns True if it is the half-open trial."""
        if breaker.state is BreakerState.HALF_OPEN and not breaker.trial_in_flight:
            breaker.trial_in_flight = True
            return True
        return False

    def on_success(self, replica_id: str, breaker: Breaker, trial: bool) -> None:
        breaker.failures = 0
        if trial:
            breaker.trial_in_flight = False
        if breaker.state is BreakerState.HALF_OPEN and trial:
            breaker.ejections = 0
            self._set(replica_id, breaker, BreakerState.CLOSED, "trial request succeeded")
        if trial:
            self._trial_ended()

    def on_abandon(self, breaker: Breaker, trial: bool) -> None:
        """The attempt ended without an outcome (the client left, a hedge won): free the
        trial slot."""
        if trial:
            breaker.trial_in_flight = False
            self._trial_ended()

    def eject(self, replica_id: str, breaker: Breaker, seconds: float, reason: str) -> bool:
        """Take a working replica out for `seconds` (a latency outlier), then the usual
        half-open trial; False if it is out already."""
        if breaker.state is BreakerState.OPEN:
            return False
        self._open(replica_id, breaker, seconds, reason)
        return True

    def _trial_ended(self) -> None:
        if self.on_trial_end is not None:
            self.on_trial_end()

    def on_failure(self, replica_id: str, breaker: Breaker, trial: bool, reason: str,
                   retry_after: float | None = None) -> None:
        breaker.failures += 1
        breaker.last_reason = reason
        if trial:
            breaker.trial_in_flight = False
        self._judge_failure(replica_id, breaker, trial, reason, retry_after)
        if trial:
            self._trial_ended()

    def _judge_failure(self, replica_id: str, breaker: Breaker, trial: bool, reason: str,
                       retry_after: float | None) -> None:
        cfg = self.config
        if retry_after is not None and retry_after > 0:
            self._open(replica_id, breaker, min(retry_after, cfg.max_retry_after),
                       f"{reason} with Retry-After {retry_after:g}s")
        elif breaker.state is BreakerState.HALF_OPEN and trial:
            breaker.ejections += 1
            self._open(replica_id, breaker, self._ejection_time(breaker), f"trial failed: {reason}")
        elif breaker.state is BreakerState.CLOSED and breaker.failures >= cfg.failure_threshold:
            self._open(replica_id, breaker, self._ejection_time(breaker),
                       f"{breaker.failures} consecutive failures, last: {reason}")

    def _ejection_time(self, breaker: Breaker) -> float:
        cfg = self.config
        return min(cfg.max_ejection_time, cfg.ejection_time * float(2 ** min(breaker.ejections, 30)))

    def _open(self, replica_id: str, breaker: Breaker, seconds: float, reason: str) -> None:
        breaker.open_until = max(breaker.open_until, self._clock() + seconds)
        if breaker.state is not BreakerState.OPEN:
            self._set(replica_id, breaker, BreakerState.OPEN, f"{reason}; out for {seconds:g}s")

    def _set(self, replica_id: str, breaker: Breaker, state: BreakerState, reason: str) -> None:
        old, breaker.state = breaker.state, state
        if state is BreakerState.CLOSED:
            breaker.failures = 0
        log.info("replica %s circuit breaker: %s -> %s (%s)", replica_id, old.value, state.value,
                 reason)
        if self.on_change is not None:
            self.on_change(replica_id, breaker, reason)
