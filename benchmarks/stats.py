"""Percentiles and the per-run summary of the load generator's records."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation (numpy's default); None if empty."""
    if not values:
        return None
    data = sorted(values)
    if len(data) == 1:
        return float(data[0])
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return float(data[lo])
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def distribution(values: Iterable[float]) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p99, max of `values`."""
    data = sorted(float(v) for v in values)
    return {
        "count": len(data),
        "mean": sum(data) / len(data) if data else None,
        "p50": percentile(data, 50),
        "p90": percentile(data, 90),
        "p99": percentile(data, 99),
        "max": data[-1] if data else None,
    }


def median(values: Iterable[float | None]) -> float | None:
    data = [v for v in values if v is not None]
    return percentile(data, 50)


def summarize(records: Sequence[dict[str, Any]], itls: Sequence[float], duration_s: float,
              slo_ttft_s: float) -> dict[str, Any]:
    """The latency and throughput figures of one run.

    `records` are the load generator's per-request dicts (ttft_s, e2e_s, output_tokens,
    prompt_tokens, cached_tokens, error); `itls` every inter-token gap of every request.
    Goodput counts requests that succeeded with a time to first token within the SLO.
    """
    ok = [r for r in records if not r.get("error")]
    errors = len(records) - len(ok)
    output_tokens = sum(r.get("output_tokens") or 0 for r in ok)
    prompt_tokens = sum(r.get("prompt_tokens") or 0 for r in ok)
    cached_tokens = sum(r.get("cached_tokens") or 0 for r in ok)
    within_slo = sum(1 for r in ok if r.get("ttft_s") is not None and r["ttft_s"] <= slo_ttft_s)
    duration_s = max(duration_s, 1e-9)
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": errors,
        "error_rate": errors / len(records) if records else 0.0,
        "error_kinds": _count(r["error"] for r in records if r.get("error")),
        "duration_s": duration_s,
        "request_rate": len(ok) / duration_s,
        "ttft_s": distribution(r["ttft_s"] for r in ok if r.get("ttft_s") is not None),
        "itl_s": distribution(itls),
        "e2e_s": distribution(r["e2e_s"] for r in ok if r.get("e2e_s") is not None),
        "output_tokens": output_tokens,
        "output_throughput": output_tokens / duration_s,
        "prompt_tokens": prompt_tokens,
        "usage_cached_tokens": cached_tokens,
        "usage_hit_rate": cached_tokens / prompt_tokens if prompt_tokens else None,
        # multi-turn and agentic: how much of a follow-up turn's prompt (turn >= 1) was cached,
        # i.e. whether the session came back to a replica that still held its history
        "followup_usage_hit_rate": _ratio(ok, lambda r: r.get("turn", 0) >= 1),
        "first_turn_usage_hit_rate": _ratio(ok, lambda r: r.get("turn", 0) == 0),
        "slo_ttft_s": slo_ttft_s,
        "goodput": within_slo / duration_s,
        "goodput_fraction": within_slo / len(records) if records else 0.0,
    }


def _ratio(records: Sequence[dict[str, Any]], keep) -> float | None:
    chosen = [r for r in records if keep(r) and r.get("prompt_tokens")]
    prompt = sum(r["prompt_tokens"] for r in chosen)
    return sum(r.get("cached_tokens") or 0 for r in chosen) / prompt if prompt else None


def _count(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        key = item.split(":", 1)[0][:60]
        out[key] = out.get(key, 0) + 1
    return out
