"""The oracle: the prefix-cache hit rate an ideal router could reach on a request sequence.

Method (the same accounting as vLLM's `prefix_cache_queries_total` / `hits_total`):

- every prompt is tokenized exactly as the replica does it (the simulator's tokenizer and
  chat template, or a real replica's /tokenize), then cut into full blocks of `block_size`
  tokens, each block named by a hash chained over all blocks before it;
- a request's queries are its prompt tokens; its hits are `block_size` x the number of
  leading blocks already cached, capped at (prompt_tokens - 1) // block_size blocks, because
  vLLM always computes at least the last prompt token;
- the ideal router is modelled as ONE cache holding the whole fleet's KV capacity (the sum
  of every replica's num_gpu_blocks), with vLLM's eviction order (least recently used first,
  and within one prompt the tail blocks before the head blocks).  Requests enter in the
  order the load generator sent them, each caching all its full prompt blocks.

Pooling the fleet's blocks is generous to the oracle: a real router that spreads a shared
prefix over R replicas must compute it R times and store R copies.  So the oracle is an
upper bound for any router (up to the small gain a replica gets from also caching the
blocks of generated tokens, which the oracle leaves out), and `hit rate / oracle` says how
much of the reachable reuse a router captured.  `unbounded` is the same with no capacity
limit: the reuse that exists in the workload at all.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OracleResult:
    queries: int  # prompt tokens
    hits: int  # tokens served from cache
    capacity_blocks: int | None

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def block_chain(tokens: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks of `tokens`: equal hashes mean equal prefixes."""
    chain: list[int] = []
    parent = 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[start:start + block_size])))
        chain.append(parent)
    return chain


def simulate(prompts: Iterable[Sequence[int]], block_size: int,
             capacity_blocks: int | None) -> OracleResult:
    """Hit accounting of one LRU block cache of `capacity_blocks` (None: unbounded)."""
    cache: OrderedDict[int, None] = OrderedDict()
    queries = hits = 0
    for tokens in prompts:
        n = len(tokens)
        chain = block_chain(tokens, block_size)
        matched = 0
        for h in chain:
            if h not in cache:
                break
            matched += 1
        matched = min(matched, max(0, (n - 1) // block_size))
        queries += n
        hits += matched * block_size
        for h in reversed(chain):  # head blocks most recent: tails are evicted first
            cache[h] = None
            cache.move_to_end(h)
        if capacity_blocks is not None:
            while len(cache) > capacity_blocks:
                cache.popitem(last=False)
    return OracleResult(queries=queries, hits=hits, capacity_blocks=capacity_blocks)


def oracle(prompts: Sequence[Sequence[int]], block_size: int, capacity_blocks: int) -> dict[str, float]:
    """Both oracles for a run, as JSON-able figures."""
    bounded = simulate(prompts, block_size, capacity_blocks)
    unbounded = simulate(prompts, block_size, None)
    return {
        "hit_rate": bounded.hit_rate,
        "hit_rate_unbounded": unbounded.hit_rate,
        "queries": bounded.queries,
        "hits": bounded.hits,
        "capacity_blocks": capacity_blocks,
        "block_size": block_size,
        "requests": len(prompts),
    }
