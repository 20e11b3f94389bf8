"""What the chaos experiments read off the router and their own requests.

The router's process (RSS and open file descriptors), its Prometheus `/metrics` page (a
counter's sum, each replica's attempts) and the requests that did not end in a complete
200: every experiment measures these the same way, so they are measured here once.
"""

from __future__ import annotations

from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families


def router_usage(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open file descriptors) of the router process."""
    try:
        p = psutil.Process(pid)
        return p.memory_info().rss / 2 ** 20, p.num_fds()
    except psutil.Error:
        return 0.0, 0


def attempts(text: str) -> dict[str, float]:
    """Attempts each replica has had, by its label, from a router's /metrics page: the
    answers it started (`router_policy_decisions`) plus the requests that left it for
    another replica (`router_failovers`)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("router_policy_decisions_total", "router_failovers_total"):
                replica = sample.labels["replica"]
                out[replica] = out.get(replica, 0.0) + sample.value
    return out


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` (with these labels) on a /metrics page."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def error_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    """Requests that did not end in a complete 200, by their error (first 240 characters)."""
    counts: dict[str, int] = {}
    for r in records:
        if r["status"] != 200 or r["error"]:
            key = (r["error"] or f"http {r['status']}")[:240]
            counts[key] = counts.get(key, 0) + 1
    return counts


def ms(value: float | None) -> float | None:
    """Seconds as milliseconds rounded to 0.1 (None stays None), as the results show them."""
    return None if value is None else round(value * 1000, 1)
