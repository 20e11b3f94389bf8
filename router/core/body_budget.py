"""`BodyBudget`: the bytes of request bodies held at once, across every request of the
process and both data planes (``server.max_inflight_body_bytes``).

The body is the one thing every request brings that the router must hold in memory; beyond
the budget a request is refused with 503 and ``Retry-After`` instead of the process growing
until the kernel kills it.  The proxy's front door takes a lease as it reads a body
(router/frontdoor/limits.py), the endpoint picker as Envoy streams one to it
(router/picker/extproc.py); each gives its lease back when it lets the body go.
"""

from __future__ import annotations

from router.errors import RouterError


class BodyBudget:
    """Bytes of request bodies held at once, across all requests (one per server)."""

    def __init__(self, limit: int, retry_after: int = 1) -> None:
        self.limit = limit
        self.used = 0
        self.retry_after = retry_after
        self.refused = 0

    def lease(self) -> BodyLease:
        return BodyLease(self)


class BodyLease:
    """One request's share of the budget; `release()` in a finally gives it back."""

    __slots__ = ("budget", "held")

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.held = 0

    def take(self, n: int) -> None:
        budget = self.budget
        if n <= 0:
            return
        if budget.used + n > budget.limit:
            budget.refused += 1
            raise RouterError(503, "The router is holding too many request bodies; retry shortly",
                              headers={"Retry-After": str(budget.retry_after)})
        budget.used += n
        self.held += n

    def release(self) -> None:
        self.budget.used -= self.held
        self.held = 0


def too_large(limit: int) -> RouterError:
    """The 413 of a body over ``server.max_body_bytes`` (both data planes)."""
    return RouterError(413, f"Request body too large: the limit is {limit} bytes")
