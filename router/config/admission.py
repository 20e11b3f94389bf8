"""``admission:``: the bounded queue in front of a saturated fleet and the per-client limits.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.config.auth import RateLimitConfig, _rate_limit
from router.config.values import header_name, integer, number
from yamlcheck import Node


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    enabled: bool = True  # queue requests when every replica is saturated (else forward at once)
    queue_size: int = 1024  # requests waiting at once for a saturated fleet (0: 429 at once)
    max_wait: float = 30.0  # seconds a request may wait; then 429
    max_waiting_per_replica: float = 16  # a replica with this many waiting requests is saturated
    # ... unless it is draining them: at the rate it took requests into its batch since the
    # last scrape, its queue would be empty within this many seconds; 0: the count alone
    max_queue_time: float = 1.0
    max_kv_usage: float = 0.98  # ... or with this much of its KV cache in use
    priority_header: str = "X-Priority"  # may lower a request's priority, never raise it
    rate_limit: RateLimitConfig | None = None  # per client (its key, else its address)
    max_clients: int = 10_000  # bound on per-client state (rate-limit buckets, queues)


_ADMISSION_KEYS = ("enabled", "queue_size", "max_wait", "max_waiting_per_replica", "max_queue_time",
                   "max_kv_usage", "priority_header", "rate_limit", "max_clients")


def parse_admission(node: Node) -> AdmissionConfig:
    node.mapping(_ADMISSION_KEYS)
    d = AdmissionConfig()
    return AdmissionConfig(
        enabled=node.get("enabled", d.enabled).boolean(),
        queue_size=integer(node, "queue_size", d.queue_size, minimum=0, maximum=1_000_000),
        max_wait=number(node, "max_wait", d.max_wait),
        max_waiting_per_replica=number(node, "max_waiting_per_replica", d.max_waiting_per_replica),
        max_queue_time=number(node, "max_queue_time", d.max_queue_time, exclusive=False),
        max_kv_usage=number(node, "max_kv_usage", d.max_kv_usage, maximum=1.0),
        priority_header=header_name(node.get("priority_header", d.priority_header)),
        rate_limit=_rate_limit(node.get("rate_limit")) if node.has("rate_limit") else None,
        max_clients=integer(node, "max_clients", d.max_clients, minimum=1, maximum=10_000_000),
    )
