"""``health:`` and ``metrics:``: how often and how patiently the router probes each replica's
/health and reads its /metrics and /v1/models.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.config.values import integer, number
from yamlcheck import Node


@dataclass(frozen=True, slots=True)
class HealthConfig:
    interval: float = 1.0  # seconds between health probes of a replica
    timeout: float = 2.0  # seconds a probe may take
    failure_threshold: int = 3  # consecutive failed probes: SUSPECT -> UNHEALTHY
    success_threshold: int = 2  # consecutive passed probes: UNHEALTHY -> HEALTHY
    # A reload's dropped replicas keep serving until their successors pass a probe, at most
    # this long (router/fleet/handover.py); 0: they leave at once.
    handover_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    scrape_interval: float = 1.0  # replica /metrics polling
    timeout: float = 2.0  # seconds a scrape of a replica's /metrics may take
    models_interval: float = 10.0  # replica /v1/models discovery


_HEALTH_KEYS = ("interval", "timeout", "failure_threshold", "success_threshold", "handover_timeout")


_METRICS_KEYS = ("scrape_interval", "timeout", "models_interval")


def parse_health(node: Node) -> HealthConfig:
    node.mapping(_HEALTH_KEYS)
    d = HealthConfig()
    return HealthConfig(
        interval=number(node, "interval", d.interval),
        timeout=number(node, "timeout", d.timeout),
        failure_threshold=integer(node, "failure_threshold", d.failure_threshold, minimum=1),
        success_threshold=integer(node, "success_threshold", d.success_threshold, minimum=1),
        handover_timeout=number(node, "handover_timeout", d.handover_timeout, exclusive=False),
    )


def parse_metrics(node: Node) -> MetricsConfig:
    node.mapping(_METRICS_KEYS)
    d = MetricsConfig()
    return MetricsConfig(
        scrape_interval=number(node, "scrape_interval", d.scrape_interval),
        timeout=number(node, "timeout", d.timeout),
        models_interval=number(node, "models_interval", d.models_interval),
    )
