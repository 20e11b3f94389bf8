"""The Markdown tables of a routing report: every figure per target and load point, our
policies' ratios to the best peer and to our round robin, and the spread of repeats.
"""

from __future__ import annotations

from benchmarks.report_columns import COLUMNS, RATIO_COLUMNS, SPREAD_COLUMNS, Row, as_pct
from benchmarks.report_runs import load_points, target_order
from benchmarks.stats import median


def _best(rows: dict[str, Row], names: list[str], getter, higher: bool) -> float | None:
    values = [getter(rows[n]) for n in names if getter(rows[n]) is not None]
    if not values:
        return None
    return max(values) if higher else min(values)


def routing_tables(agg: dict[tuple[str, float | None], Row]) -> str:
    lines: list[str] = []
    points = load_points(q for _, q in agg)
    for qps in points:
        rows = {t: r for (t, q), r in agg.items() if q == qps}
        names = target_order(list(rows))
        if len(points) > 1 or qps is not None:
            lines.append(f"#### {'closed loop' if qps is None else f'{qps:g} QPS (Poisson)'}\n")
        header = ["target"] + [c[0] for c in COLUMNS]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for name in names:
            cells = [f"`{name}`"] + [fmt(get(rows[name])) for _, get, fmt, _ in COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
        orc = next(iter(rows.values()))["oracle"]
        lines.append("")
        lines.append(f"Oracle hit rate (one cache of the fleet's {orc['capacity_blocks']:.0f} blocks x "
                     f"{orc['block_size']:.0f} tokens): "
                     f"{as_pct(median(r['oracle']['hit_rate'] for r in rows.values()))}; with unbounded "
                     f"capacity: {as_pct(median(r['oracle']['hit_rate_unbounded'] for r in rows.values()))}.")
        lines.append("")
        lines.append(ratio_table(rows, names))
        if any(r.get("repeats", 1) > 1 for r in rows.values()):
            lines += ["", spread_table(rows, names)]
        lines.append("")
    return "\n".join(lines)


def spread_table(rows: dict[str, Row], names: list[str]) -> str:
    """Every repeat's value of the figures that vary most, so a median is not read as certain."""
    fmts = {title: fmt for title, _get, fmt, _h in COLUMNS}
    lines = ["Every repeat, lowest to highest:", "",
             "| target | " + " | ".join(SPREAD_COLUMNS) + " |", "|---|" + "---|" * len(SPREAD_COLUMNS)]
    for name in names:
        spread = rows[name].get("spread") or {}
        cells = [", ".join(fmts[t](v) for v in spread.get(t, [])) or "–" for t in SPREAD_COLUMNS]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_table(rows: dict[str, Row], names: list[str]) -> str:
    ours = [n for n in names if n.startswith("ours:")]
    peers = [n for n in names if n.split(":")[0] in ("vllm-router", "smg", "sglang-router")]
    cols = [c for c in COLUMNS if c[0] in RATIO_COLUMNS]
    header = ["ours vs"] + [f"{c[0]}" for c in cols]
    lines = ["Ratios (ours / reference; latency and busiest share: < 1 is better; others: > 1 is better):", "",
             "| " + " | ".join(["policy"] + header) + " |", "|" + "---|" * (len(header) + 1)]
    rr = rows.get("ours:round_robin")
    for name in ours:
        for ref_name, ref in (("best peer", peers), ("round robin", ["ours:round_robin"] if rr else [])):
            if not ref or ref == [name]:
                continue
            cells = []
            for _title, get, _fmt, higher in cols:
                mine, best = get(rows[name]), _best(rows, ref, get, higher)
                cells.append("–" if mine is None or not best else f"{mine / best:.2f}")
            lines.append("| " + " | ".join([f"`{name}`", ref_name] + cells) + " |")
    return "\n".join(lines)
