"""``circuit_breaker:``: when a replica leaves rotation for failures or latency, and for how long.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.config.values import integer, number
from yamlcheck import Node


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    failure_threshold: int = 5  # consecutive request-path failures that eject a replica
    ejection_time: float = 5.0  # seconds out for the first ejection; doubles each time
    max_ejection_time: float = 60.0  # most seconds a replica stays ejected before a trial request
    max_retry_after: float = 60.0  # cap on how long an upstream Retry-After keeps it out
    # Latency outliers (router/transport/outliers.py): a replica whose time to first byte runs this many
    # times its peers' median (same model, same request size) is ejected; 0: off.
    latency_factor: float = 2.5
    latency_min_requests: int = 10  # compared samples a replica needs before it is judged
    max_ejection_percent: float = 50.0  # of a model's replicas out at once by latency (at least one)


_BREAKER_KEYS = ("failure_threshold", "ejection_time", "max_ejection_time", "max_retry_after",
                 "latency_factor", "latency_min_requests", "max_ejection_percent")


def parse_circuit_breaker(node: Node) -> CircuitBreakerConfig:
    node.mapping(_BREAKER_KEYS)
    d = CircuitBreakerConfig()
    first = number(node, "ejection_time", d.ejection_time)
    longest_node = node.get("max_ejection_time", d.max_ejection_time)
    longest = longest_node.number(minimum=0.0, exclusive_minimum=True)
    if longest < first:
        longest_node.fail(f"expected a value >= ejection_time ({first:g}), found {longest:g}")
    return CircuitBreakerConfig(
        failure_threshold=integer(node, "failure_threshold", d.failure_threshold, minimum=1),
        ejection_time=first,
        max_ejection_time=longest,
        max_retry_after=number(node, "max_retry_after", d.max_retry_after, exclusive=False),
        latency_factor=latency_factor(node.get("latency_factor", d.latency_factor)),
        latency_min_requests=integer(node, "latency_min_requests", d.latency_min_requests,
                                  minimum=1, maximum=1_000_000),
        max_ejection_percent=number(node, "max_ejection_percent", d.max_ejection_percent,
                                  exclusive=False, maximum=100.0),
    )


def latency_factor(node: Node) -> float:
    factor = node.number(minimum=0.0)
    if 0.0 < factor <= 1.0:
        node.fail(f"expected 0 (off) or a factor above 1, found {factor:g}")
    return factor
