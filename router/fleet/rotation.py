"""Which replicas may take a request now: routable, and let through by their circuit breaker.

Read by every data plane before it ranks (the front door's handler, a flow's pools, the
Envoy endpoint picker), and by the transport's failover before each attempt.  When every
candidate is out only because half-open replicas have their one trial in flight, a request
waits for a trial's verdict (or an ejection's end) instead of getting a 503.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from router.errors import RouterError
from router.fleet.breaker import BreakerState, CircuitBreakers
from router.fleet.replicas import Replica


class Rotation:
    """The breakers' view of the fleet, and the 503s that say a model has no replica."""

    def __init__(self, breakers: CircuitBreakers, retry_after: int) -> None:
        self.breakers = breakers
        self.retry_after = retry_after  # proxy.retry_after: a reload may change it
        self._verdict: asyncio.Event | None = None  # set at the next trial's end, while awaited
        breakers.on_trial_end = self.trial_ended

    def admissible(self, replica: Replica) -> bool:
        return replica.routable and self.breakers.allows(replica.id, replica.breaker)

    async def admissible_or_wait(self, candidates: Sequence[Replica], left: float) -> list[Replica]:
        """The candidates a request may be sent to now; when there is none only because
        half-open replicas have their one trial in flight, wait for a trial's verdict (or an
        ejection's end) rather than refuse the request, for at most `left` seconds (what is
        left of ``proxy.deadline``).  An empty list: every candidate is ejected."""
        loop = asyncio.get_running_loop()
        until = loop.time() + left
        while True:
            usable = [r for r in candidates if self.admissible(r)]
            if usable:
                return usable
            on_trial = self.breakers.on_trial
            if not any(r.routable and on_trial(r.breaker) for r in candidates):
                return usable
            left = until - loop.time()
            reopen = [self.breakers.retry_in(r.breaker) for r in candidates
                      if r.routable and r.breaker.state is BreakerState.OPEN]
            wait = min([left, *reopen])
            if left <= 0:
                return usable
            if self._verdict is None:
                self._verdict = asyncio.Event()
            try:
                await asyncio.wait_for(self._verdict.wait(), timeout=max(wait, 0.001))
            except TimeoutError:
                pass

    def trial_ended(self) -> None:
        verdict, self._verdict = self._verdict, None
        if verdict is not None:
            verdict.set()

    def ejected_error(self, model: str, replicas: Sequence[Replica]) -> RouterError:
        """503 for a model whose routable replicas are all ejected by their breakers."""
        wait = min((self.breakers.retry_in(r.breaker) for r in replicas), default=0.0)
        seconds = max(1, int(wait + 0.999))
        return RouterError(503, f"Every replica of model `{model}` is out of rotation after "
                                f"failing requests; retry in {seconds}s",
                           headers={"Retry-After": str(seconds)})

    def unavailable(self, model: str, detail: str = "") -> RouterError:
        message = f"No healthy replica is available for model `{model}`"
        return RouterError(503, message + (f": {detail}" if detail else ""),
                           headers={"Retry-After": str(self.retry_after)})
