"""The simulator's paged KV cache: vLLM's block hashes, prefix hits, LRU eviction, bounds."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engines.sim.kv_cache import NONE_HASH, Allocation, KVCache, block_hash, event_hash, extend_block_hashes

REFERENCE = Path(__file__).resolve().parents[1] / "reference"


def test_block_hash_is_vllms_sha256_pickle_formula() -> None:
    tokens = list(range(16))
    parent = hashlib.sha256(b"parent").digest()
    expected = hashlib.sha256(pickle.dumps((parent, tuple(tokens), None), protocol=5)).digest()
    assert block_hash(parent, tokens) == expected
    assert NONE_HASH == hashlib.sha256(pickle.dumps("vllm-none-hash", protocol=5)).digest()
    assert block_hash(None, tokens) == hashlib.sha256(pickle.dumps((NONE_HASH, tuple(tokens), None),
                                                                   protocol=5)).digest()


def test_block_hash_equals_a_real_vllm_event() -> None:
    """kv_events.jsonl was captured from real vLLM 0.32: the first block's hash must match."""
    path = REFERENCE / "kv_events.jsonl"
    if not path.exists():
        pytest.skip("reference sample not available")
    event = json.loads(path.read_text().splitlines()[0])["raw"][1][0]
    assert event["parent_block_hash"] is None
    assert event_hash(block_hash(None, event["token_ids"])) == event["block_hashes"][0]


def test_hashes_chain_so_equal_blocks_after_different_prefixes_differ() -> None:
    a, b = [], []
    extend_block_hashes(a, [1] * 4 + [7] * 4, 4)
    extend_block_hashes(b, [2] * 4 + [7] * 4, 4)
    assert a[1] != b[1]
    c = []
    extend_block_hashes(c, [1] * 4 + [7] * 4 + [9] * 3, 4)  # the partial block is not hashed
    assert c == a


def _alloc(kv: KVCache, tokens: list[int]) -> tuple[Allocation, list[bytes]]:
    hashes: list[bytes] = []
    extend_block_hashes(hashes, tokens, kv.block_size)
    alloc = Allocation()
    hit = kv.find_cached_prefix(hashes, (len(tokens) - 1) // kv.block_size)
    assert kv.allocate(alloc, len(tokens), hit)
    kv.cache_full_blocks(alloc, hashes, tokens, len(tokens))
    return alloc, hashes


def test_a_freed_prompt_is_found_again_until_evicted() -> None:
    kv = KVCache(num_blocks=8, block_size=4)
    prompt = list(range(17))  # 4 full blocks + 1 token
    alloc, hashes = _alloc(kv, prompt)
    assert kv.usage() == 5 / 8
    kv.free(alloc)
    assert kv.usage() == 0.0  # idle: 0 even though blocks stay cached
    assert len(kv.find_cached_prefix(hashes, 4)) == 4
    # Another prompt needs 7 of the 8 blocks: the LRU front (never-used blocks, then the
    # first prompt's tail blocks) is evicted first, so its head blocks survive longest.
    other, _ = _alloc(kv, [100 + i for i in range(25)])
    assert kv.num_free_blocks == 1
    assert len(kv.find_cached_prefix(hashes, 4)) == 1
    kv.free(other)


def test_hit_blocks_are_shared_and_referenced() -> None:
    kv = KVCache(num_blocks=10, block_size=4)
    prompt = list(range(12))
    a, hashes = _alloc(kv, prompt)
    b = Allocation()
    hit = kv.find_cached_prefix(hashes, (len(prompt) - 1) // 4)
    assert len(hit) == 2  # at most num_tokens - 1 tokens can hit: the last block is recomputed
    assert kv.allocate(b, len(prompt), hit)
    assert b.block_ids[:2] == a.block_ids[:2]
    assert kv.usage() == 4 / 10
    kv.free(a)
    assert kv.usage() == 3 / 10
    kv.free(b)
    assert kv.usage() == 0.0


def test_allocation_fails_whole_when_blocks_run_out() -> None:
    kv = KVCache(num_blocks=4, block_size=4)
    a = Allocation()
    assert kv.allocate(a, 12)
    b = Allocation()
    assert not kv.allocate(b, 8)
    assert b.block_ids == [] and kv.num_free_blocks == 1


def test_events_store_remove_and_clear() -> None:
    kv = KVCache(num_blocks=3, block_size=2, emit_events=True)
    a, hashes = _alloc(kv, [1, 2, 3, 4, 5])
    (stored,) = kv.drain_events()
    assert stored["type"] == "BlockStored" and stored["parent_block_hash"] is None
    assert stored["block_hashes"] == [event_hash(h) for h in hashes]
    assert stored["token_ids"] == [1, 2, 3, 4] and stored["block_size"] == 2
    kv.free(a)
    b, _ = _alloc(kv, [9, 9, 9, 9, 9, 9])
    events = kv.drain_events()
    assert [e["type"] for e in events] == ["BlockRemoved", "BlockRemoved", "BlockStored"]
    assert {h for e in events[:2] for h in e["block_hashes"]} == {event_hash(h) for h in hashes}
    assert not kv.reset()  # blocks held: refused, like vLLM
    kv.free(b)
    assert kv.reset() and kv.drain_events()[-1] == {"type": "AllBlocksCleared"}
    assert kv.num_cached_hashes == 0


def test_a_recomputed_block_is_stored_again_like_vllm() -> None:
    """A prompt of exactly 2 blocks hits 1 (the last token is always computed) and stores its
    last block again under the same hash; evicting either copy reports BlockRemoved."""
    kv = KVCache(num_blocks=4, block_size=2, emit_events=True)
    a, hashes = _alloc(kv, [1, 2, 3, 4])
    b, _ = _alloc(kv, [1, 2, 3, 4])
    first, second = kv.drain_events()
    assert second["block_hashes"] == [event_hash(hashes[1])]
    assert second["parent_block_hash"] == event_hash(hashes[0]) and second["token_ids"] == [3, 4]
    assert kv.num_cached_hashes == 2 and kv.num_cached_blocks == 3
    kv.free(a)
    kv.free(b)
    c, _ = _alloc(kv, [9] * 8)
    removed = [e for e in kv.drain_events() if e["type"] == "BlockRemoved"]
    assert sorted(h for e in removed for h in e["block_hashes"]) == sorted(
        [event_hash(hashes[0]), event_hash(hashes[1]), event_hash(hashes[1])])
    assert kv.num_cached_blocks == 4  # c's own blocks


def test_stored_event_chains_to_the_previous_block() -> None:
    kv = KVCache(num_blocks=8, block_size=2, emit_events=True)
    tokens = [1, 2, 3, 4, 5, 6, 7]
    hashes: list[bytes] = []
    extend_block_hashes(hashes, tokens, 2)
    alloc = Allocation()
    assert kv.allocate(alloc, 7)
    kv.cache_full_blocks(alloc, hashes, tokens, 4)
    kv.cache_full_blocks(alloc, hashes, tokens, 7)
    first, second = kv.drain_events()
    assert second["parent_block_hash"] == first["block_hashes"][-1]
    assert second["token_ids"] == [5, 6]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 40)), max_size=60))
def test_bounded_under_any_traffic(ops: list[tuple[int, int]]) -> None:
    """Whatever comes and goes, blocks are conserved and the index never outgrows the pool."""
    kv = KVCache(num_blocks=16, block_size=4, emit_events=True)
    live: list[Allocation] = []
    for seed, length in ops:
        if seed == 0 and live:
            kv.free(live.pop(0))
            continue
        tokens = [seed * 1000 + i for i in range(length)]
        hashes: list[bytes] = []
        extend_block_hashes(hashes, tokens, 4)
        alloc = Allocation()
        hit = kv.find_cached_prefix(hashes, (length - 1) // 4)
        if kv.allocate(alloc, length, hit):
            kv.cache_full_blocks(alloc, hashes, tokens, length)
            live.append(alloc)
        held = {b for a in live for b in a.block_ids}
        assert kv.num_free_blocks + len(held) == 16
        assert kv.num_cached_hashes <= kv.num_cached_blocks <= 16
        kv.drain_events()
    for alloc in live:
        kv.free(alloc)
    assert kv.num_free_blocks == 16 and kv.usage() == 0.0
