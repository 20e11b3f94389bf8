"""The reliability report: OUTPUT/results.md and one PNG per experiment, from the results.

Every chaos experiment returns a plain dict; this turns whichever of them ran (in this
run or kept from an earlier one) into README-ready Markdown sections and matplotlib
figures.  It reads only those dicts, so it runs nothing and imports no experiment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.report_plots import save_figure


def plot(results: dict[str, Any], out: Path) -> list[str]:
    """One PNG under `out` per faults, streams, slowloris or prompts section; their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if "faults" in results:
        runs = results["faults"]
        fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.2 * len(runs)), sharex=True)
        for ax, run in zip(axes if len(runs) > 1 else [axes], runs):
            ok = [(t, v * 1000) for t, v, bad in run["ttfts"] if v is not None and not bad]
            bad = [t for t, _, b in run["ttfts"] if b]
            ax.scatter([t for t, _ in ok], [v for _, v in ok], s=4, label="TTFT of a request (ms)")
            for t in bad:
                ax.axvline(t, color="red", alpha=0.5, lw=0.8)
            ax.axvspan(run["injected_s"], run["healed_s"], color="orange", alpha=0.15, label="fault")
            ax.set_yscale("log")
            ax.set_ylabel("TTFT ms")
            ax.set_title(f"{run['fault']}: lost {run['lost']}/{run['requests']}, reroute "
                         f"{run['reroute_s']} s, p99 {run['ttft_p99_ms_before']} -> "
                         f"{run['ttft_p99_ms_during']} ms", fontsize=9)
        (axes[-1] if len(runs) > 1 else axes).set_xlabel("seconds since start (red: a lost request)")
        save_figure(plt, fig, out / "faults.png")
        written.append("faults.png")
    if "streams" in results:
        s = results["streams"]
        fig, ax = plt.subplots(figsize=(8, 3.5))
        t = [x[0] for x in s["series"]]
        ax.plot(t, [x[1] for x in s["series"]], label="router RSS (MiB)")
        ax.plot(t, [x[2] for x in s["series"]], label="router open fds")
        ax.plot(t, [x[3] for x in s["series"]], label="streams finished")
        ax.set_xlabel("seconds")
        ax.set_title(f"{s['streams']} concurrent streams: {s['ok']} ok, peak RSS "
                     f"{s['router_peak_rss_mb']} MiB, peak fds {s['router_peak_fds']}", fontsize=9)
        ax.legend(fontsize=8)
        save_figure(plt, fig, out / "streams.png")
        written.append("streams.png")
    if "slowloris" in results:
        s = results["slowloris"]
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
        a1.plot([x[0] for x in s["series"]], [x[1] for x in s["series"]], label="slow connections open")
        a1.plot([x[0] for x in s["series"]], [x[2] for x in s["series"]], label="router fds")
        a1.legend(fontsize=8)
        a1.set_title(f"slowloris: {s['connections']} connections, answers {s['answers']}", fontsize=9)
        a2.scatter([x[0] for x in s["latencies"]], [x[1] * 1000 for x in s["latencies"]], s=5)
        a2.axvline(s["lead_s"], color="orange")
        a2.set_ylabel("normal request ms")
        a2.set_xlabel("seconds (orange: slow connections start)")
        save_figure(plt, fig, out / "slowloris.png")
        written.append("slowloris.png")
    if "prompts" in results:
        s = results["prompts"]
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot([x[0] for x in s["series"]], [x[1] for x in s["series"]], marker=".")
        ax.set_xlabel("unique prompts routed")
        ax.set_ylabel("router RSS (MiB)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{s['prompts']} unique prompts: RSS {s['rss_start_mb']} -> {s['rss_end_mb']} "
                     f"MiB (second half +{s['growth_second_half_mb']} MiB)", fontsize=9)
        save_figure(plt, fig, out / "prompts.png")
        written.append("prompts.png")
    return written


def markdown(results: dict[str, Any], figures: list[str]) -> str:
    """results.md: the run's command and machine, a section per experiment, then `figures`."""
    lines = ["# Reliability: the router under faults and hostile load", "",
             f"Command: `{results['command']}`", "",
             *([f"Sections from other runs: {earlier}", ""] if (earlier := sorted(
                 {c for c in results.get("commands", {}).values()} - {results["command"]})) else []),
             f"Machine: {results['machine']}; versions: {results['versions']}", ""]
    if "faults" in results:
        lines += ["## Faults on one of the replicas under steady load", "",
                  "| fault | requests | lost | time to reroute (s) | requests that suffered "
                  "| TTFT p50 before / during (ms) "
                  "| TTFT p99 before / during (ms) | sick replica's share of new requests before / during |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in results["faults"]:
            lines.append(f"| {r['fault']} | {r['requests']} | {r['lost']} | {r['reroute_s']} | "
                         f"{r['suffered']} (TTFT > {r['suffered_above_ms']} ms or failed) | "
                         f"{r['ttft_p50_ms_before']} / {r['ttft_p50_ms_during']} | "
                         f"{r['ttft_p99_ms_before']} / {r['ttft_p99_ms_during']} | "
                         f"{r['sick_share_before']} / {r['sick_share_during']} |")
        lost = {r["fault"]: r["errors"] for r in results["faults"] if r["errors"]}
        if lost:
            lines += ["", "Lost requests, by error:", ""]
            lines += [f"- {k}: {v}" for k, v in lost.items()]
        lines.append("")
    if "streams" in results:
        s = results["streams"]
        lines += ["## Concurrent streams", "",
                  f"{s['streams']} streams opened at once: {s['ok']} complete, errors {s['errors']}; "
                  f"all done in {s['elapsed_s']} s; TTFT p50 {s['ttft_p50_ms']} ms, p99 "
                  f"{s['ttft_p99_ms']} ms; router RSS {s['router_idle_rss_mb']} -> peak "
                  f"{s['router_peak_rss_mb']} MiB, fds {s['router_idle_fds']} -> peak "
                  f"{s['router_peak_fds']}.", ""]
    if "slowloris" in results:
        s = results["slowloris"]
        lines += ["## Slowloris", "",
                  f"{s['connections']} connections sending a request head one byte per 2 s "
                  f"(opened {s['opened']}, refused at connect {s['refused_at_connect']}): answers "
                  f"{s['answers']}; held at peak {s['held_peak']}, at the end {s['held_at_end']}. "
                  f"Normal requests meanwhile: p50 {s['normal_p50_ms_before']} -> "
                  f"{s['normal_p50_ms_during']} ms, p99 {s['normal_p99_ms_before']} -> "
                  f"{s['normal_p99_ms_during']} ms, {s['normal_failed']} failed.", ""]
    if "prompts" in results:
        s = results["prompts"]
        lines += ["## Unique prompts and the prefix index", "",
                  f"{s['prompts']} unique prompts ({s['failed']} failed): router RSS "
                  f"{s['rss_start_mb']} MiB at start, {s['rss_at_half_mb']} at half way, "
                  f"{s['rss_end_mb']} at the end (peak {s['rss_peak_mb']}); growth over the second "
                  f"half {s['growth_second_half_mb']} MiB; the prefix index at the end: {s['prefix_index']}.", ""]
    lines += _fleet_sections(results)
    lines += [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _fleet_sections(results: dict[str, Any]) -> list[str]:
    """The sections of the reload, slow, flood, pool and bodies experiments that ran."""
    lines: list[str] = []
    if "reload" in results:
        r = results["reload"]
        lines += ["## Reloads that swap the backends under load", "",
                  f"{r['requests']} requests at {r['rate']} requests/s for {r['seconds']} s while "
                  f"`POST /admin/reload` swapped the file's two backends for two others every second "
                  f"({r['reloads_ok']}/{r['reloads']} reloads answered 200): **{r['failed']} failed** "
                  f"{r['errors'] or ''}; latency p50 {r['latency_p50_ms']} ms, p99 {r['latency_p99_ms']} ms.", ""]
    if "slow" in results:
        lines += ["## One replica of four 20x slower", "",
                  "| policy | case | requests | failed | TTFT p50 (ms) | TTFT p99 (ms) | hedges | extra load "
                  "| latency ejections |", "|---|---|---|---|---|---|---|---|---|"]
        for r in results["slow"]:
            lines.append(f"| {r['policy']} | {r['case']} | {r['requests']} | {r['failed']} | {r['ttft_p50_ms']} "
                         f"| {r['ttft_p99_ms']} | {r['hedges']:g} | {r['extra_load']} | {r['latency_ejections']:g} |")
        lines.append("")
    if "flood" in results:
        f = results["flood"]
        lines += ["## A connection flood over the cap (uvloop, the production loop)", "",
                  f"{f['connections']} plain TCP connections at once against `server.max_connections: "
                  f"{f['cap']}`: answers {f['answers']} (all read within {f['all_read_within_s']} s); "
                  f"router fds {f['router_fds_idle']} idle, {f['router_fds_peak']} at peak, "
                  f"{f['router_fds_1s_after_close']} one second after the clients closed; `/health` "
                  f"meanwhile: {f['health_during']}.", ""]
    if "pool" in results:
        p = results["pool"]
        lines += ["## Waiting for an upstream connection", "",
                  f"`proxy.max_connections: {p['pool']}` and {p['long_streams']} long streams at once "
                  f"(statuses {p['long_statuses']}: those beyond the pool waited `pool_timeout` for a "
                  f"slot); {p['short_requests']} short requests then: statuses "
                  f"{p['short_statuses']}, Retry-After {p['short_retry_after']}, longest wait "
                  f"{p['short_wait_max_s']} s (`proxy.pool_timeout: {p['pool_timeout_s']}`), counted "
                  f"{p['pool_timeouts_counted']:g} in `router_upstream_pool_timeouts_total`.", ""]
    if "bodies" in results:
        b = results["bodies"]
        lines += ["## Memory per in-flight request body", "",
                  f"{b['bodies']} concurrent {b['body_mib']} MiB bodies (statuses {sorted(set(b['statuses']))}): "
                  f"router RSS {b['router_idle_rss_mb']} MiB idle, {b['router_rss_while_held_mb']} while "
                  f"all were held upstream, peak {b['router_peak_rss_mb']}: **{b['peak_per_body_mib']} MiB "
                  f"of RSS per MiB of body at peak**, {b['held_per_body_mib']} while held.", ""]
    return lines
