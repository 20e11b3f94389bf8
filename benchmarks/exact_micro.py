"""Micro-benchmark of an exact-mode routing decision (KV-event index), tokenization apart.

    python -m benchmarks.exact_micro [--quick] [--tokenizer .engines/models/tiny-llama]

An exact-mode decision is: the approximate chain of the routing text (still computed: the
replicas not in exact mode use it) + our token-chain hashes of the prompt's token ids + the
exact index's match (held and pending blocks) for every replica + the cache_aware ranking.
Tokenizing the request (the model's tokenizer.json and chat template, tokenization/) is
measured on its own, because the router does it once per request before the decision and,
above 4,096 characters, in a worker thread.  The index holds what real events would have
put there: a shared system prompt stored on every replica, 97% of this conversation on one
replica, and unrelated prompts (fed as BlockStored events with random vLLM hashes).

Medians (p90) of the deciding thread's CPU time (time.thread_time_ns).  Writes
benchmarks/results/exact_micro.json and .md with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from benchmarks.routing_micro import MODEL, machine, make_fleet, text_of
from router.core.requests import RouteRequest
from router.core.scheduling import build_profile
from router.prefix.events import BlockStored
from router.prefix.exact import ExactIndex
from router.prefix.hashing import prefix_hashes
from router.prefix.index import PrefixIndex
from tokenization import ModelTokenizer
from yamlcheck import Node

BLOCK = 16
PROMPT_CHARS = (1_000, 32_000)
REPLICA_COUNTS = (4, 64)


def store(index: ExactIndex, replica_id: str, tokens: list[int], rng: random.Random) -> None:
    n = len(tokens) // BLOCK
    if n:
        index.apply(replica_id, [BlockStored(block_hashes=tuple(rng.getrandbits(64) for _ in range(n)),
                                             parent_block_hash=None, token_ids=tokens[:n * BLOCK],
                                             block_size=BLOCK, medium="GPU")])


def run_case(tokenizer: ModelTokenizer, chars: int, n_replicas: int, repeats: int, seed: int = 1) -> dict:
    rng = random.Random(seed)
    replicas = make_fleet(n_replicas, rng)
    exact = ExactIndex()
    for r in replicas:
        exact.attach(r.id, MODEL)
        exact.reset(r.id, empty=True)
        exact.set_capacity(r.id, 100_000, BLOCK)
    approximate = PrefixIndex()
    system = text_of(rng, min(2_000, chars // 2))
    body = {"messages": [{"role": "system", "content": system},
                         {"role": "user", "content": text_of(rng, chars - len(system))}]}
    tokens = tokenizer.tokens("/v1/chat/completions", body)
    assert tokens is not None
    system_tokens = tokenizer.tokens("/v1/chat/completions", {"messages": body["messages"][:1],
                                                               "add_generation_prompt": False}) or ()
    for r in replicas:
        store(exact, r.id, list(system_tokens), rng)
    store(exact, replicas[n_replicas // 2].id, list(tokens[: int(len(tokens) * 0.97)]), rng)
    for _ in range(200):  # unrelated prompts
        store(exact, rng.choice(replicas).id, [rng.randrange(4096) for _ in range(512)], rng)
    text = system + body["messages"][1]["content"]
    policy = build_profile("cache_aware", Node({}, "routing.params"))
    cpu = time.thread_time_ns
    tokenize_ns, decision_ns = [], []
    for _ in range(repeats):
        t0 = cpu()
        ids = tokenizer.tokens("/v1/chat/completions", body)
        t1 = cpu()
        hashes = prefix_hashes(MODEL, text=text)
        request = RouteRequest(model=MODEL, path="/v1/chat/completions", body=b"", routing_text=text,
                               block_hashes=hashes, prompt_chars=len(text), prompt_token_ids=ids)
        decision = policy.rank(request, replicas, approximate, exact)
        t2 = cpu()
        tokenize_ns.append(t1 - t0)
        decision_ns.append(t2 - t1)
    assert decision.exact_replicas and len(decision.ranked) == n_replicas
    med = lambda xs: round(statistics.median(xs) / 1000, 1)  # noqa: E731
    p90 = lambda xs: round(sorted(xs)[int(0.9 * (len(xs) - 1))] / 1000, 1)  # noqa: E731
    return {"prompt_chars": len(text), "tokens": len(tokens), "replicas": n_replicas,
            "matched_tokens": decision.matched_tokens[decision.ranked[0].id],
            "decision_us_median": med(decision_ns), "decision_us_p90": p90(decision_ns),
            "tokenize_us_median": med(tokenize_ns), "tokenize_us_p90": p90(tokenize_ns), "repeats": repeats}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Exact-mode routing decision micro-benchmark", "",
             f"Command: `{result['command']}`  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['implementation']} {m['python']}  ",
             f"Date: {result['date']}  ",
             f"Tokenizer: {result['tokenizer']} (byte-level BPE, vocabulary 4,096)", "",
             "Decision = approximate text chain + our token-chain hashes + exact match (held and pending) for "
             "every replica + cache_aware ranking; tokenization (chat template + BPE) measured apart. "
             f"Medians (p90) over {result['repeats']} repeats, microseconds of CPU time.", "",
             "| prompt chars | tokens | replicas | decision us (p90) | tokenize us (p90) | matched tokens |",
             "|---:|---:|---:|---:|---:|---:|"]
    for row in result["cases"]:
        lines.append(f"| {row['prompt_chars']:,} | {row['tokens']:,} | {row['replicas']} | "
                     f"{row['decision_us_median']} ({row['decision_us_p90']}) | "
                     f"{row['tokenize_us_median']} ({row['tokenize_us_p90']}) | {row['matched_tokens']:,} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.exact_micro")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--tokenizer", default=".engines/models/tiny-llama")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    tokenizer = ModelTokenizer(args.tokenizer)
    repeats = 20 if args.quick else 300
    cases = [run_case(tokenizer, chars, n, repeats) for chars in PROMPT_CHARS for n in REPLICA_COUNTS]
    result = {"command": "python -m benchmarks.exact_micro" + (" --quick" if args.quick else ""),
              "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "tokenizer": args.tokenizer, "repeats": repeats, "cases": cases}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "exact_micro.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "exact_micro.md").write_text(markdown(result))
    sys.stdout.write(markdown(result))


if __name__ == "__main__":
    main()
