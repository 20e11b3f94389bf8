"""The figures of a routing report: which columns its tables have, how each reads an
aggregated row and how it prints.

One list, COLUMNS, says per figure its header, where it lives in a run's JSON, its format
and whether higher is better; the tables, the ratios, the spread of repeats and the plots
all read it, so a new figure is one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Row = dict[str, Any]


def dig(value: Any, *keys: str) -> Any:
    """value[k1][k2]...; None where a level is missing, None or not a dict."""
    for key in keys:
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return value


def getter(*keys: str) -> Callable[[Row], Any]:
    """A function that digs `keys` out of a row."""
    return lambda row: dig(row, *keys)


def as_ms(v: Any) -> str:
    return "–" if v is None else f"{v * 1000:.0f}" if v >= 0.1 else f"{v * 1000:.1f}"


def as_pct(v: Any) -> str:
    return "–" if v is None else f"{v * 100:.1f}%"


def as_num(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:,.1f}" if abs(v) < 1000 else f"{v:,.0f}"


def as_int(v: Any) -> str:
    return "–" if v is None else f"{int(v)}"


def frac_of_oracle(row: Row) -> float | None:
    hit, orc = getter("replicas", "hit_rate")(row), getter("oracle", "hit_rate")(row)
    return hit / orc if hit is not None and orc else None


# (column header, getter over an aggregated row, format, higher is better)
COLUMNS: list[tuple[str, Callable[[Row], Any], Callable[[Any], str], bool]] = [
    ("TTFT mean ms", getter("summary", "ttft_s", "mean"), as_ms, False),
    ("TTFT p50 ms", getter("summary", "ttft_s", "p50"), as_ms, False),
    ("TTFT p90 ms", getter("summary", "ttft_s", "p90"), as_ms, False),
    ("TTFT p99 ms", getter("summary", "ttft_s", "p99"), as_ms, False),
    ("ITL p50 ms", getter("summary", "itl_s", "p50"), as_ms, False),
    ("ITL p99 ms", getter("summary", "itl_s", "p99"), as_ms, False),
    ("e2e p50 ms", getter("summary", "e2e_s", "p50"), as_ms, False),
    ("e2e p99 ms", getter("summary", "e2e_s", "p99"), as_ms, False),
    ("out tok/s", getter("summary", "output_throughput"), as_num, True),
    ("goodput req/s", getter("summary", "goodput"), as_num, True),
    ("errors", getter("summary", "errors"), as_int, False),
    ("hit rate", getter("replicas", "hit_rate"), as_pct, True),
    ("of oracle", frac_of_oracle, as_pct, True),
    ("busiest req share", getter("replicas", "busiest_request_share"), as_pct, False),
    ("busiest prefill share", getter("replicas", "busiest_prefill_share"), as_pct, False),
    ("pred. within block", getter("prediction", "within_block_share"), as_pct, True),
    ("adapter loads /1k req", getter("replicas", "lora_loads_per_1k"), as_num, False),
    ("router CPU s", getter("router_resources", "cpu_s"), as_num, False),
    ("router peak RSS MB", getter("router_resources", "peak_rss_mb"), as_num, False),
]

SPREAD_COLUMNS = ["TTFT p50 ms", "TTFT p99 ms", "hit rate"]
RATIO_COLUMNS = ["TTFT p50 ms", "TTFT p99 ms", "out tok/s", "goodput req/s", "hit rate", "busiest prefill share"]
