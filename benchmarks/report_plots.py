"""The PNG plots of a routing report (TTFT per target and load, hit rate as a share of the
oracle), and the colours and headless pyplot every benchmark figure shares.

matplotlib is optional (the bench extra): `pyplot()` says None without it, and a report
is then written without plots.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.report_columns import Row, as_pct, frac_of_oracle, getter
from benchmarks.report_runs import load_points, target_order
from benchmarks.stats import median


def pyplot():
    """matplotlib's pyplot (headless), or None when the bench extra is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(plt: Any, fig: Any, path: Path) -> None:
    """Lay out, write (110 dpi) and close `fig`: how every benchmark figure is saved."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
                ys = [(getter("summary", "ttft_s", pct)(agg[(n, q)]) or 0) * 1000 for q in xs]
                ax.plot(xs, ys, marker="o", label=n, color=colors[n],
                        linestyle="-" if n.startswith("ours") else "--")
            ax.set_xlabel("offered load (QPS)")
        else:
            key_q = qps_points[0] if qps_points else None
            ys = [(getter("summary", "ttft_s", pct)(agg.get((n, key_q), {})) or 0) * 1000 for n in names]
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
    save_figure(plt, fig, path)
    return True


def plot_hit_rate(agg: dict[tuple[str, float | None], Row], path: Path, title: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    qps_points = load_points(q for _, q in agg)
    qps = qps_points[-1] if qps_points[-1] is not None or len(qps_points) == 1 else qps_points[-2]
    rows = {t: r for (t, q), r in agg.items() if q == qps}
    colors = target_colors(target_order(list(rows)))
    names = [n for n in target_order(list(rows)) if n != "direct"]
    fracs = [frac_of_oracle(rows[n]) or 0 for n in names]
    hits = [getter("replicas", "hit_rate")(rows[n]) or 0 for n in names]
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
    ax.set_title(f"{title}: hit rate as a fraction of the oracle ({as_pct(orc)}), {load}")
    ax.grid(axis="y", alpha=0.3)
    save_figure(plt, fig, path)
    return True
