"""Micro-benchmark of one routing decision and of the prefix index's memory.

    python -m benchmarks.routing_micro [--quick] [--out benchmarks/results]

Decision = chained block hashes of the routing text (router.prefix.hashing) + longest
prefix match for every replica (router.prefix.index) + ranking (the scheduling profile of
router/core/scheduling/, the default cache_aware unless --policies says otherwise), the work the router does per request
before forwarding it.  Measured against prompt length (up to 32k characters) and replica
count (up to 64), median (and p90) over repeats, on an index that holds a realistic
state: a shared system prompt held by every replica, this conversation's earlier turns
held by one replica (so the match walks the whole prompt, the worst case for the walk),
and a background of unrelated prompts.  Then decision time against the number of stored
blocks (the walk must not depend on it) and index memory against the number of stored
prompts (tracemalloc-measured bytes and the index's own estimate; the global capacity
must hold it flat).

Writes benchmarks/results/routing_micro.json and .md (with the exact command and the
machine: lscpu model name, cores, Python version).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

from router.core.requests import RouteRequest
from router.core.scheduling import build_profile
from router.fleet.engine_load import EngineLoad
from router.fleet.replicas import Health, Replica
from router.prefix.hashing import prefix_hashes
from router.prefix.index import DEFAULT_CAPACITY_BLOCKS, PrefixIndex
from yamlcheck import Node

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
TARGET_US = 100.0  # per decision at 64 replicas and 32k characters
PROMPT_CHARS = (1_000, 4_000, 8_000, 16_000, 32_000)
REPLICA_COUNTS = (4, 16, 64)
GROWTH_REPLICAS = (64, 128, 256)  # the growth curve, on an index of GROWTH_BLOCKS stored blocks
GROWTH_BLOCKS = 1_000_000
GROWTH_CAPACITY = 1 << 20  # an index configured to hold them (the default holds ~559k)
WORDS = ("the of and to in is that for it as with was on be by at this from or have an "
         "are not which one you all were her when there can more if will about up out "
         "would so what their other into time has them some could these two may first").split()


def machine() -> dict[str, object]:
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": sys.version.split()[0],
            "implementation": platform.python_implementation(), "platform": platform.platform()}


def text_of(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:chars]


def make_fleet(n: int, rng: random.Random) -> list[Replica]:
    return [Replica(url=f"http://10.0.{i // 250}.{i % 250}:8000", model=MODEL,
                    tensor_parallel_size=rng.choice((1, 1, 2, 4)), health=Health.HEALTHY,
                    in_flight=rng.randint(0, 8), load=EngineLoad(running=rng.randint(0, 8),
                                                                  waiting=rng.randint(0, 2)))
            for i in range(n)]


def populate(index: PrefixIndex, replicas: list[Replica], rng: random.Random, background_blocks: int) -> None:
    """Unrelated prompts (~2k characters each) spread over the fleet."""
    stored = 0
    while stored < background_blocks:
        hashes = prefix_hashes(MODEL, text=f"{rng.random()} " + text_of(rng, 2_000))
        index.record(hashes, rng.choice(replicas).id)
        stored += len(hashes)


def time_decisions(policy_name: str, chars: int, n_replicas: int, repeats: int,
                   background_blocks: int, seed: int = 1,
                   capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS) -> dict[str, float]:
    rng = random.Random(seed)
    replicas = make_fleet(n_replicas, rng)
    index = PrefixIndex(capacity_blocks)
    populate(index, replicas, rng, background_blocks)
    system = text_of(rng, 2_000)
    conversation = system + text_of(rng, chars - len(system)) if chars > len(system) else system[:chars]
    for r in replicas:  # the shared system prompt everywhere
        index.record(prefix_hashes(MODEL, text=system), r.id)
    previous_turn = conversation[: int(len(conversation) * 0.97)]
    index.record(prefix_hashes(MODEL, text=previous_turn), replicas[n_replicas // 2].id)
    policy = build_profile(policy_name, Node({}, "routing.params"))
    ids = [r.id for r in replicas]

    hash_ns: list[int] = []
    match_ns: list[int] = []
    decision_ns: list[int] = []
    wall_ns: list[int] = []
    cpu = time.thread_time_ns  # CPU time of this thread: other processes' load does not count
    wall = time.perf_counter_ns
    for _ in range(repeats):
        w0 = wall()
        t0 = cpu()
        hashes = prefix_hashes(MODEL, text=conversation)
        t1 = cpu()
        request = RouteRequest(model=MODEL, path="/v1/chat/completions", body=b"",
                               routing_text=conversation, block_hashes=hashes,
                               prompt_chars=len(conversation))
        t2 = cpu()
        decision = policy.rank(request, replicas, index)
        t3 = cpu()
        w1 = wall()
        index.match(hashes, ids)
        t4 = cpu()
        hash_ns.append(t1 - t0)
        decision_ns.append((t1 - t0) + (t3 - t2))
        match_ns.append(t4 - t3)
        wall_ns.append(w1 - w0)
    assert decision.ranked and len(decision.ranked) == n_replicas
    med = lambda xs: statistics.median(xs) / 1000  # noqa: E731  (microseconds)
    p90 = lambda xs: sorted(xs)[int(0.9 * (len(xs) - 1))] / 1000  # noqa: E731
    return {
        "policy": policy_name, "prompt_chars": chars, "replicas": n_replicas,
        "blocks": len(hashes), "matched_blocks": max(index.match(hashes, ids).values()),
        "stored_blocks": index.records, "index_estimate_mib": round(index.memory_bytes() / 2**20, 1),
        "decision_us_median": round(med(decision_ns), 1), "decision_us_p90": round(p90(decision_ns), 1),
        "wall_us_median": round(med(wall_ns), 1),
        "hash_us_median": round(med(hash_ns), 1), "match_us_median": round(med(match_ns), 1),
        "rank_us_median": round(med(decision_ns) - med(hash_ns), 1),
        "repeats": repeats,
    }


def index_memory(n_prompts: int, capacity: int, seed: int = 2) -> dict[str, float]:
    """tracemalloc-measured bytes of an index after storing n distinct ~2k-char prompts."""
    rng = random.Random(seed)
    replicas = [f"http://r{i}" for i in range(16)]
    prompts = [prefix_hashes(MODEL, text=f"{i} " + text_of(rng, 2_000)) for i in range(min(n_prompts, 2_000))]
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        index = PrefixIndex(capacity)
        for i in range(n_prompts):
            # distinct prompts: a fresh first block makes every chain new
            hashes = prompts[i % len(prompts)]
            salt = rng.getrandbits(64)
            index.record(tuple((h ^ salt) for h in hashes), rng.choice(replicas))
        used, peak = (m - base for m in tracemalloc.get_traced_memory())
    finally:
        tracemalloc.stop()
    return {"prompts": n_prompts, "blocks_sent": n_prompts * len(prompts[0]), "capacity_blocks": capacity,
            "stored_blocks": index.records, "nodes": len(index),
            "tracemalloc_mib": round(used / 2**20, 2), "tracemalloc_peak_mib": round(peak / 2**20, 2),
            "estimate_mib": round(index.memory_bytes() / 2**20, 2),
            "bytes_per_block": round(used / max(1, index.records), 1)}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Routing decision micro-benchmark",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['implementation']} {m['python']} ({m['platform']})  ",
        f"Date: {result['date']}",
        "",
        "Decision = chained xxh3 block hashes of the routing text + longest-prefix match for every",
        "replica + ranking by the policy.  The index holds a shared system prompt on every replica,",
        "97% of this conversation on one replica (the match walks nearly the whole prompt) and "
        f"{result['background_blocks']:,} blocks of unrelated prompts.  Medians (p90) over "
        f"{result['repeats']} repeats, microseconds of CPU time of the deciding thread "
        "(time.thread_time_ns: what the router's event loop spends); wall-clock medians beside "
        f"them include preemption by other processes (load average at the start: {result['loadavg']}).",
        "",
        f"Target: <= {TARGET_US:.0f} us per decision at 64 replicas and 32k characters.",
        "",
        "| policy | prompt chars | blocks | replicas | decision us (p90) | wall us | hash us | match us "
        "| rank us (incl. match) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["decisions"]:
        lines.append(
            f"| {row['policy']} | {row['prompt_chars']:,} | {row['blocks']} | {row['replicas']} | "
            f"{row['decision_us_median']} ({row['decision_us_p90']}) | {row['wall_us_median']} | "
            f"{row['hash_us_median']} | "
            f"{row['match_us_median']} | {row['rank_us_median']} |")
    lines += ["", "## Decision time against the number of stored blocks (cache_aware, 64 replicas, 32k characters)",
              "", "| stored blocks | decision us (p90) | match us |", "|---:|---:|---:|"]
    for row in result["vs_stored"]:
        lines.append(f"| {row['stored_blocks']:,} | {row['decision_us_median']} ({row['decision_us_p90']}) | "
                     f"{row['match_us_median']} |")
    lines += ["", f"## Growth: replicas up to {GROWTH_REPLICAS[-1]} on an index of {result['growth_blocks']:,} blocks "
              "(cache_aware, 32k characters)", "",
              f"The index is configured for {GROWTH_CAPACITY:,} blocks (the default budget holds "
              f"{DEFAULT_CAPACITY_BLOCKS:,}); its memory is the index's own estimate, which the tracemalloc "
              "table below checks.", "",
              "| replicas | stored blocks | decision us (p90) | hash us | match us | rank us (incl. match) "
              "| index estimate MiB |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["growth"]:
        lines.append(f"| {row['replicas']} | {row['stored_blocks']:,} | {row['decision_us_median']} "
                     f"({row['decision_us_p90']}) | {row['hash_us_median']} | {row['match_us_median']} | "
                     f"{row['rank_us_median']} | {row['index_estimate_mib']} |")
    lines += ["", "## Index memory against stored prompts (~2k characters = 31 blocks each, 16 replicas)", "",
              "| prompts sent | blocks sent | capacity | stored blocks | tracemalloc MiB (peak) | "
              "estimate MiB | bytes/block |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["memory"]:
        lines.append(f"| {row['prompts']:,} | {row['blocks_sent']:,} | {row['capacity_blocks']:,} | "
                     f"{row['stored_blocks']:,} | {row['tracemalloc_mib']} ({row['tracemalloc_peak_mib']}) | "
                     f"{row['estimate_mib']} | {row['bytes_per_block']} |")
    target = result["target"]
    lines += ["", f"At 64 replicas x 32k characters (cache_aware): median {target['decision_us_median']} us "
              f"CPU, {target['wall_us_median']} us wall (hashing {target['hash_us_median']} us of it) -> target "
              f"{'met' if target['decision_us_median'] <= TARGET_US else 'NOT met'} on this machine.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.routing_micro", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes (a smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per cell (default 300, quick 30)")
    parser.add_argument("--policies", default="cache_aware,prefix_affinity,session,power_of_two,random",
                        help="policies timed at the largest size (cache_aware is timed everywhere)")
    parser.add_argument("--out", default="benchmarks/results", help="directory for routing_micro.json/.md")
    args = parser.parse_args(argv)
    repeats = args.repeats or (30 if args.quick else 300)
    background = 20_000 if args.quick else 200_000
    result: dict = {
        "command": "python -m benchmarks.routing_micro"
                   + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "machine": machine(), "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "repeats": repeats,
        "background_blocks": background, "target_us": TARGET_US, "decisions": [], "vs_stored": [], "growth": [],
        "memory": [],
    }
    for chars in PROMPT_CHARS:
        for n in REPLICA_COUNTS:
            row = time_decisions("cache_aware", chars, n, repeats, background)
            result["decisions"].append(row)
            print(json.dumps(row), flush=True)
    for name in args.policies.split(","):
        if name and name != "cache_aware":
            row = time_decisions(name, PROMPT_CHARS[-1], REPLICA_COUNTS[-1], repeats, background)
            result["decisions"].append(row)
            print(json.dumps(row), flush=True)
    result["target"] = next(r for r in result["decisions"] if r["policy"] == "cache_aware"
                            and r["prompt_chars"] == PROMPT_CHARS[-1] and r["replicas"] == REPLICA_COUNTS[-1])
    for stored in ((0, 20_000) if args.quick else (0, 20_000, 200_000, DEFAULT_CAPACITY_BLOCKS)):
        row = time_decisions("cache_aware", PROMPT_CHARS[-1], REPLICA_COUNTS[-1], repeats, stored)
        result["vs_stored"].append(row)
        print(json.dumps(row), flush=True)
    growth_blocks = result["growth_blocks"] = 50_000 if args.quick else GROWTH_BLOCKS
    for n in GROWTH_REPLICAS:
        row = time_decisions("cache_aware", PROMPT_CHARS[-1], n, repeats, growth_blocks,
                             capacity_blocks=GROWTH_CAPACITY)
        result["growth"].append(row)
        print(json.dumps(row), flush=True)
    sizes = (1_000, 10_000) if args.quick else (1_000, 10_000, 30_000, 100_000)
    cells = [(n, DEFAULT_CAPACITY_BLOCKS) for n in sizes]
    if not args.quick:  # the growth curve's index: 1M blocks held under a budget that allows them
        cells.append((40_000, GROWTH_CAPACITY))
    for n_prompts, capacity in cells:
        row = index_memory(n_prompts, capacity)
        result["memory"].append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing_micro.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "routing_micro.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
