"""Markdown tables and PNG plots from a scenario's raw JSON (OUTPUT/runs/*.json + meta.json).

`python -m benchmarks report OUTPUT` rebuilds them at any time.  Repeats of the same
target and load point are combined by taking the median of every figure.  Ratios compare
each of our policies with the best peer for that figure (lowest latency, highest hit rate
or throughput) and with our round robin; for latencies a ratio below 1 is better, for hit
rates and throughput above 1.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from benchmarks.scenario import TARGET_KINDS
from benchmarks.stats import median

Row = dict[str, Any]

def dig(value: Any, *keys: str) -> Any:
    """value[k1][k2]...; None where a level is missing, None or not a dict."""
    for key in keys:
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return value


# (column header, getter over an aggregated row, format, higher is better)
def _g(*keys: str) -> Callable[[Row], Any]:
    return lambda row: dig(row, *keys)


def _ms(v: Any) -> str:
    return "–" if v is None else f"{v * 1000:.0f}" if v >= 0.1 else f"{v * 1000:.1f}"


def _pct(v: Any) -> str:
    return "–" if v is None else f"{v * 100:.1f}%"


def _num(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:,.1f}" if abs(v) < 1000 else f"{v:,.0f}"


def _int(v: Any) -> str:
    return "–" if v is None else f"{int(v)}"


def _frac_of_oracle(row: Row) -> float | None:
    hit, orc = _g("replicas", "hit_rate")(row), _g("oracle", "hit_rate")(row)
    return hit / orc if hit is not None and orc else None


COLUMNS: list[tuple[str, Callable[[Row], Any], Callable[[Any], str], bool]] = [
    ("TTFT mean ms", _g("summary", "ttft_s", "mean"), _ms, False),
    ("TTFT p50 ms", _g("summary", "ttft_s", "p50"), _ms, False),
    ("TTFT p90 ms", _g("summary", "ttft_s", "p90"), _ms, False),
    ("TTFT p99 ms", _g("summary", "ttft_s", "p99"), _ms, False),
    ("ITL p50 ms", _g("summary", "itl_s", "p50"), _ms, False),
    ("ITL p99 ms", _g("summary", "itl_s", "p99"), _ms, False),
    ("e2e p50 ms", _g("summary", "e2e_s", "p50"), _ms, False),
    ("e2e p99 ms", _g("summary", "e2e_s", "p99"), _ms, False),
    ("out tok/s", _g("summary", "output_throughput"), _num, True),
    ("goodput req/s", _g("summary", "goodput"), _num, True),
    ("errors", _g("summary", "errors"), _int, False),
    ("hit rate", _g("replicas", "hit_rate"), _pct, True),
    ("of oracle", _frac_of_oracle, _pct, True),
    ("busiest req share", _g("replicas", "busiest_request_share"), _pct, False),
    ("busiest prefill share", _g("replicas", "busiest_prefill_share"), _pct, False),
    ("pred. within block", _g("prediction", "within_block_share"), _pct, True),
    ("adapter loads /1k req", _g("replicas", "lora_loads_per_1k"), _num, False),
    ("router CPU s", _g("router_resources", "cpu_s"), _num, False),
    ("router peak RSS MB", _g("router_resources", "peak_rss_mb"), _num, False),
]

SPREAD_COLUMNS = ["TTFT p50 ms", "TTFT p99 ms", "hit rate"]
RATIO_COLUMNS = ["TTFT p50 ms", "TTFT p99 ms", "out tok/s", "goodput req/s", "hit rate", "busiest prefill share"]


def load_runs(out: Path) -> list[Row]:
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


def _best(rows: dict[str, Row], names: list[str], getter, higher: bool) -> float | None:
    values = [getter(rows[n]) for n in names if getter(rows[n]) is not None]
    if not values:
        return None
    return max(values) if higher else min(values)


def _load_points(qps: Iterable[float | None]) -> list[float | None]:
    """The distinct load points, lowest QPS first and the closed loop (None) last."""
    return sorted(set(qps), key=lambda q: (q is None, q or 0))


def routing_tables(agg: dict[tuple[str, float | None], Row]) -> str:
    lines: list[str] = []
    points = _load_points(q for _, q in agg)
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
                     f"{_pct(median(r['oracle']['hit_rate'] for r in rows.values()))}; with unbounded "
                     f"capacity: {_pct(median(r['oracle']['hit_rate_unbounded'] for r in rows.values()))}.")
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


# -- plots ----------------------------------------------------------------------------------

def pyplot():
    """matplotlib's pyplot (headless), or None when the bench extra is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _color(name: str, i: int) -> str:
    palette = {"ours": ["#1f77b4", "#2ca02c", "#17becf", "#9467bd", "#08306b", "#6baed6", "#74c476"],
               "vllm-router": ["#d62728", "#ff7f0e", "#e377c2", "#f4a582", "#b2182b"],
               "sglang-router": ["#8c564b", "#bcbd22", "#c49c94"],
               "smg": ["#17becf", "#9edae5", "#393b79"],
               "direct": ["#7f7f7f"]}
    options = palette.get(name.split(":")[0], ["#000000"])
    return options[i % len(options)]


def target_colors(names: list[str]) -> dict[str, str]:
    """One stable colour per target: blues/greens for ours, reds for vllm-router, browns for sglang."""
    seen: dict[str, int] = defaultdict(int)
    out = {}
    for n in names:
        kind = n.split(":")[0]
        out[n] = _color(n, seen[kind])
        seen[kind] += 1
    return out


def plot_ttft(agg: dict[tuple[str, float | None], Row], path: Path, title: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    names = target_order(list({t for t, _ in agg}))
    qps_points = sorted({q for _, q in agg if q is not None})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = target_colors(names)
    for ax, pct in zip(axes, ("p50", "p99")):
        if len(qps_points) > 1:
            for n in names:
                xs = [q for q in qps_points if (n, q) in agg]
                ys = [(_g("summary", "ttft_s", pct)(agg[(n, q)]) or 0) * 1000 for q in xs]
                ax.plot(xs, ys, marker="o", label=n, color=colors[n],
                        linestyle="-" if n.startswith("ours") else "--")
            ax.set_xlabel("offered load (QPS)")
        else:
            key_q = qps_points[0] if qps_points else None
            ys = [(_g("summary", "ttft_s", pct)(agg.get((n, key_q), {})) or 0) * 1000 for n in names]
            ax.bar(range(len(names)), ys, color=[colors[n] for n in names])
            ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
            positive = [y for y in ys if y > 0]
            if positive and max(positive) > 20 * min(positive):
                ax.set_yscale("log")  # a collapsed target must not flatten everyone else
            for x, y in enumerate(ys):
                ax.annotate(f"{y:.0f}", (x, y), ha="center", va="bottom", fontsize=7)
        ax.set_ylabel(f"TTFT {pct} (ms)")
        ax.set_title(f"TTFT {pct}")
        ax.grid(alpha=0.3)
    if len(qps_points) > 1:
        axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_hit_rate(agg: dict[tuple[str, float | None], Row], path: Path, title: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    qps_points = _load_points(q for _, q in agg)
    qps = qps_points[-1] if qps_points[-1] is not None or len(qps_points) == 1 else qps_points[-2]
    rows = {t: r for (t, q), r in agg.items() if q == qps}
    colors = target_colors(target_order(list(rows)))
    names = [n for n in target_order(list(rows)) if n != "direct"]
    fracs = [_frac_of_oracle(rows[n]) or 0 for n in names]
    hits = [_g("replicas", "hit_rate")(rows[n]) or 0 for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4.5))
    bars = ax.bar(range(len(names)), fracs, color=[colors[n] for n in names])
    for bar, frac, hit in zip(bars, fracs, hits):
        ax.annotate(f"{frac * 100:.0f}%\n(hit {hit * 100:.0f}%)", (bar.get_x() + bar.get_width() / 2, frac),
                    ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    ax.set_ylim(0, 1.2)
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("prefix-cache hit rate / oracle")
    load = "closed loop" if qps is None else f"{qps:g} QPS"
    orc = median(r["oracle"]["hit_rate"] for r in rows.values())
    ax.set_title(f"{title}: hit rate as a fraction of the oracle ({_pct(orc)}), {load}")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- the whole report --------------------------------------------------------------------------

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
            points = _load_points(q for t, q in agg if t == name)
            row = agg.get((name, points[-1])) if points else None
            if row is None:
                cells.append("–")
                continue
            frac = _frac_of_oracle(row)
            cells.append(f"{_ms(_g('summary', 'ttft_s', 'p50')(row))} / {_ms(_g('summary', 'ttft_s', 'p99')(row))}"
                         + (f", {frac * 100:.0f}%" if frac is not None else ""))
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += ["", "Scenarios:", "", *links, ""]
    path = root / "README.md"
    path.write_text("\n".join(lines))
    return path


def read_meta(out: Path) -> dict[str, Any]:
    """A results folder's meta.json ({} if it has none)."""
    path = Path(out) / "meta.json"
    meta: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    return meta


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
