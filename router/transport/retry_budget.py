"""The retry budget: retries may add only a bounded share of load to a failing fleet.

Without one, a fleet where every replica fails gets ``max_attempts`` times its traffic.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tenacity import RetryCallState
from tenacity.stop import stop_base


class RetryBudget:
    """Retries allowed: `ratio` of the requests plus `min_per_s` a second (a token bucket).

    Every request deposits `ratio` tokens and time deposits `min_per_s` a second; a retry
    takes one.  The bucket holds at most ``10 x min_per_s + 100 x ratio`` tokens, so after a
    quiet spell a fleet-wide failure can retry a short burst, then retries add at most
    `ratio` of the traffic on top of the first attempts (instead of multiplying it by
    ``max_attempts``).  Finagle's and Envoy's retry budgets work this way.
    """

    def __init__(self, ratio: float, min_per_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.capacity = max(1.0, 10.0 * min_per_s + 100.0 * ratio)
        self._clock = clock
        self.tokens = self.capacity
        self._stamp = clock()
        self.denied = 0

    def _refill(self) -> None:
        now = self._clock()
        if now > self._stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self._stamp) * self.min_per_s)
            self._stamp = now

    def on_request(self) -> None:
        self._refill()
        self.tokens = min(self.capacity, self.tokens + self.ratio)

    def try_spend(self) -> bool:
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.denied += 1
        return False


class StopWhen(stop_base):
    """A tenacity stop condition from a plain predicate (the retry budget's: the proxy's
    failover loop stops when a retry finds no token)."""

    def __init__(self, predicate: Callable[[RetryCallState], bool]) -> None:
        self.predicate = predicate

    def __call__(self, retry_state: RetryCallState) -> bool:
        return bool(self.predicate(retry_state))
