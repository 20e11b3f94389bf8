"""Markdown tables and PNG plots from a scenario's raw JSON (OUTPUT/runs/*.json + meta.json).

`python -m benchmarks report OUTPUT` rebuilds them at any time.  Repeats of the same
target and load point are combined by taking the median of every figure.  Ratios compare
each of our policies with the best peer for that figure (lowest latency, highest hit rate
or throughput) and with our round robin; for latencies a ratio below 1 is better, for hit
rates and throughput above 1.

This module writes the whole report: a scenario's results.md (its tables, plots and how it
was measured) or the index of a results root; the pieces are benchmarks/report_columns.py,
report_runs.py, report_tables.py and report_plots.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from benchmarks.report_columns import Row, as_ms, frac_of_oracle, getter
from benchmarks.report_plots import plot_hit_rate, plot_ttft
from benchmarks.report_runs import aggregate, load_points, load_runs, read_meta, target_order
from benchmarks.report_tables import routing_tables


def write_index(root: Path) -> Path:
    """benchmarks/results/README.md: every routing scenario side by side, one row per target.

    A cell is "TTFT p50 ms / p99 ms, hit rate as % of the oracle" at the scenario's highest
    load point; overhead scenarios are linked."""
    root = Path(root)
    scenarios: dict[str, dict[tuple[str, float | None], Row]] = {}
    links = []
    for folder in sorted(p for p in root.iterdir() if (p / "meta.json").exists()):
        meta = json.loads((folder / "meta.json").read_text())
        first = re.split(r"\.\s", meta.get("description") or "", maxsplit=1)[0].strip()
        links.append(f"- [{folder.name}]({folder.name}/results.md)" + (f": {first}." if first else ""))
        if meta.get("mode") == "overhead":
            continue
        runs = load_runs(folder)
        if runs:
            scenarios[folder.name] = aggregate(runs)
    names: list[str] = []
    for agg in scenarios.values():
        names += [t for t, _ in agg if t not in names]
    names = target_order(names)
    lines = ["# Benchmark results", "",
             "Each cell: TTFT p50 / p99 in ms, then the prefix-cache hit rate as a share of the oracle, "
             "at the scenario's highest load point (see each scenario's results.md for everything).", "",
             "| target | " + " | ".join(scenarios) + " |", "|---|" + "---|" * len(scenarios)]
    for name in names:
        cells = []
        for agg in scenarios.values():
            points = load_points(q for t, q in agg if t == name)
            row = agg.get((name, points[-1])) if points else None
            if row is None:
                cells.append("–")
                continue
            frac = frac_of_oracle(row)
            p50, p99 = getter("summary", "ttft_s", "p50")(row), getter("summary", "ttft_s", "p99")(row)
            cells.append(f"{as_ms(p50)} / {as_ms(p99)}" + (f", {frac * 100:.0f}%" if frac is not None else ""))
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += ["", "Scenarios:", "", *links, ""]
    path = root / "README.md"
    path.write_text("\n".join(lines))
    return path


def write_report(out: Path) -> Path:
    """results.md and plots of a routing scenario's folder (or the index of a results root)."""
    out = Path(out)
    if not (out / "runs").exists() and not (out / "meta.json").exists():
        return write_index(out)
    meta = read_meta(out)
    runs = load_runs(out)
    if not runs:
        raise SystemExit(f"no runs under {out / 'runs'}")
    agg = aggregate(runs)
    name = meta.get("scenario", out.name)
    plotted = plot_ttft(agg, out / "ttft.png", name) & plot_hit_rate(agg, out / "hit_rate.png", name)
    text = [f"# Scenario `{name}`", ""]
    if meta.get("description"):
        text += [meta["description"].strip(), ""]
    text += [routing_tables(agg)]
    if plotted:
        text += ["![TTFT](ttft.png)", "", "![hit rate as a fraction of the oracle](hit_rate.png)", ""]
    else:
        text += ["(No plots: matplotlib is missing; `pip install -e '.[bench]'` and run "
                 "`python -m benchmarks report`.)", ""]
    text += provenance(meta)
    path = out / "results.md"
    path.write_text("\n".join(text))
    return path


def provenance(meta: dict[str, Any]) -> list[str]:
    lines = ["## How this was measured", ""]
    history = meta.get("history") or ([meta] if meta.get("command") else [])
    if len(history) > 1:
        lines.append("Commands, oldest first (a later `--targets` run replaced the runs of the targets it names):")
        lines.append("")
    for entry in history:
        dirty = entry.get("uncommitted") or []
        lines.append(f"{'- ' if len(history) > 1 else 'Command: '}`{entry['command']}` (at commit "
                     f"{entry.get('git_commit', '?')}"
                     + (f" with uncommitted changes to {', '.join(dirty)}" if dirty else "")
                     + f"; finished {entry.get('finished_at', '')})")
    if history:
        lines.append("")
    if meta.get("versions"):
        lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".")
        lines.append("")
    if meta.get("machine"):
        m = meta["machine"]
        lines.append(f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB, "
                     f"{m.get('platform')}, Python {m.get('python')}.")
        lines.append("")
    if meta.get("fleet"):
        fleet = ", ".join(f"TP{r['tp']} ({r['kv_blocks']} blocks x {r['block_size']})" for r in meta["fleet"])
        engine = ("real vLLM (CPU build)" if meta.get("fleet_kind") == "real"
                  else f"simulated, time scale {meta.get('time_scale', 1)}")
        lines.append(f"Fleet: {fleet}; {engine} (latencies are wall-clock as measured).")
        lines.append("")
    variants = (meta.get("scenario_yaml") or {}).get("variants") or {}
    if variants:
        lines.append("Variants (`@NAME` targets): " + "; ".join(
            f"`{name}` = " + (" ".join(map(str, value)) if isinstance(value, list) else f"routing.params {value}")
            for name, value in variants.items()) + ". Targets without one run with their defaults.")
        lines.append("")
    lines.append("Figures are medians over repeats where a scenario repeats. Hit rate: the replicas' own "
                 "`vllm:prefix_cache_hits_total / queries_total` deltas over the run; oracle: see "
                 "benchmarks/oracle.py (one LRU cache of the whole fleet's KV capacity, requests in the order sent).")
    return lines


__all__ = ["load_runs", "provenance", "read_meta", "write_index", "write_report"]
