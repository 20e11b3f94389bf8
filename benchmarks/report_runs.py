"""The runs of a results folder, combined: every repeat of a target at a load point becomes
one row of medians, and targets and load points come in one fixed order.

What a routing report shows (benchmarks/report_tables.py, benchmarks/report_plots.py) and
what the overhead report reads (benchmarks/overhead.py) starts from these rows.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks.report_columns import COLUMNS, SPREAD_COLUMNS, Row
from benchmarks.scenario_schema import TARGET_KINDS
from benchmarks.stats import median


def load_runs(out: Path) -> list[Row]:
    """Every run's JSON under OUTPUT/runs/, in file-name order."""
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


def _median_tree(items: list[Any]) -> Any:
    """Element-wise median of equally shaped JSON trees (numbers); other leaves from the first."""
    first = items[0]
    if isinstance(first, dict):
        return {k: _median_tree([i.get(k) for i in items if isinstance(i, dict)]) for k in first
                if k != "records"}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return median(i for i in items if isinstance(i, (int, float)))
    return first


def aggregate(runs: list[Row]) -> dict[tuple[str, float | None], Row]:
    """(target, qps) -> the median over repeats of every figure."""
    groups: dict[tuple[str, float | None], list[Row]] = defaultdict(list)
    for run in runs:
        groups[(run["target"], run.get("qps"))].append(run)
    out = {}
    for key, items in groups.items():
        row = _median_tree(items)
        row["repeats"] = len(items)
        row["spread"] = {title: sorted(v for v in (get(i) for i in items) if v is not None)
                         for title, get, _fmt, _higher in COLUMNS if title in SPREAD_COLUMNS}
        out[key] = row
    return out


_POLICIES = ("round_robin", "least_load", "power_of_two", "random", "prefix_affinity", "session",
             "consistent_hash", "sticky_least_loaded", "cache_aware", "kv_aware")


def target_order(names: list[str]) -> list[str]:
    """One fixed order (so every table and plot lists, and colours, targets alike): ours, then
    vllm-router, sglang-router, direct; within each, baselines before cache-aware policies and
    a policy's defaults before its variants."""
    def key(name: str) -> tuple:
        base, _, variant = name.partition("@")
        kind, _, policy = base.partition(":")
        return (TARGET_KINDS.index(kind) if kind in TARGET_KINDS else 9,
                _POLICIES.index(policy) if policy in _POLICIES else 99, policy, variant)
    return sorted(names, key=key)


def load_points(qps: Iterable[float | None]) -> list[float | None]:
    """The distinct load points, lowest QPS first and the closed loop (None) last."""
    return sorted(set(qps), key=lambda q: (q is None, q or 0))


def read_meta(out: Path) -> dict[str, Any]:
    """A results folder's meta.json ({} if it has none)."""
    path = Path(out) / "meta.json"
    meta: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    return meta
