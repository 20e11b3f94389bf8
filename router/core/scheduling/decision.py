"""`Decision`: what the scheduler tells the proxy about one request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from router.fleet.replicas import Replica


@dataclass(slots=True)
class Decision:
    ranked: list[Replica]  # best first; only routable replicas; the proxy fails over down it
    why: dict[str, Any] = field(default_factory=dict)  # JSON-able explanation for the access log
    matched_blocks: dict[str, int] = field(default_factory=dict)  # replica id -> blocks matched
    matched_tokens: dict[str, int] = field(default_factory=dict)  # replica id -> tokens matched
    exact_replicas: frozenset[str] = frozenset()  # the ones matched by the exact index
