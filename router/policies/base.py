"""The policy contract.

A policy turns (request, candidate replicas, prefix index) into a ranked list, best first,
so the proxy can fail over down the list without asking again.  Policies are pure
functions of their inputs plus their own small state; they do no I/O and never await.
Every decision carries `why`: a small JSON-able dict (matched blocks, load, cost of the
winner and runner-up...) that goes into the access log and metrics.

Feedback: the proxy calls `observe()` after the first byte of a response arrived, so
policies that learn (e.g. a replica's prefill rate) can learn; policies that do not
learn inherit the no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from router.fleet import Replica
    from router.prefix.index import PrefixIndex
    from router.requests import RouteRequest


@dataclass(slots=True)
class Decision:
    ranked: list[Replica]  # best first; only routable replicas
    why: dict[str, Any] = field(default_factory=dict)  # JSON-able explanation for logs
    matched_blocks: dict[str, int] = field(default_factory=dict)  # replica id -> blocks matched


@runtime_checkable
class Policy(Protocol):
    name: str

    def rank(
        self,
        request: RouteRequest,
        replicas: Sequence[Replica],
        index: PrefixIndex,
    ) -> Decision:
        """Rank `replicas` (all routable, all serving request.model) best first."""
        ...

    def observe(
        self,
        replica: Replica,
        request: RouteRequest,
        *,
        time_to_first_byte_s: float,
        matched_blocks: int,
    ) -> None:
        """Feedback after the first response byte from `replica` (may be a no-op)."""
        ...


class StatelessPolicy:
    """Convenience base: a policy that learns nothing from feedback."""

    name: str = "stateless"

    def observe(
        self,
        replica: Replica,
        request: RouteRequest,
        *,
        time_to_first_byte_s: float,
        matched_blocks: int,
    ) -> None:
        return None
