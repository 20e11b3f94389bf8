"""The bounded prefix index: longest-prefix match per replica, hard bounds, undo."""

from __future__ import annotations

import gc
import random
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from router.prefix.hashing import hash_text
from router.prefix.index import (
    BYTES_PER_NODE,
    BYTES_PER_RECORD,
    DEFAULT_CAPACITY_BLOCKS,
    DEFAULT_MEMORY_BUDGET_BYTES,
    PrefixIndex,
)

A, B, C = "http://a", "http://b", "http://c"


def chain(tag: str, n: int, prefix: tuple[int, ...] = ()) -> tuple[int, ...]:
    """n blocks extending `prefix`, distinct per tag (a stand-in for real chained hashes)."""
    return prefix + tuple(hash((tag, len(prefix) + i, prefix)) & (2**64 - 1) for i in range(n))


def check_consistent(index: PrefixIndex) -> None:
    """Every node is held by someone, records add up, and bitmasks match the replica sets."""
    total = 0
    for rid, held in index._held.items():
        bit = 1 << index._slot[rid]
        total += len(held)
        for h in held:
            assert index._nodes[h] & bit
    assert total == index.records
    for h, mask in index._nodes.items():
        assert mask
        while mask:
            low = mask & -mask
            mask ^= low
            assert h in index._held[index._id_of_slot[low.bit_length() - 1]]


def test_longest_prefix_match_per_replica_in_one_walk() -> None:
    index = PrefixIndex()
    system = chain("system", 4)
    index.record(chain("alice", 6, system), A)
    index.record(chain("bob", 3, system), B)
    index.record(system[:2], C)
    asked = chain("alice", 8, system)  # alice's conversation, one turn later
    assert index.match(asked, [A, B, C, "http://new"]) == {A: 10, B: 4, C: 2, "http://new": 0}
    assert index.match((), [A]) == {A: 0}
    assert index.match(asked, []) == {}


def test_match_with_real_hashes_of_a_growing_conversation() -> None:
    index = PrefixIndex()
    turn1 = "system: be helpful\n" * 10 + "user: hello\n"
    turn2 = turn1 + "assistant: hi there\n" * 5 + "user: and then?\n"
    h1, h2 = hash_text(turn1, "m"), hash_text(turn2, "m")
    index.record(h1, A)
    assert index.match(h2, [A, B]) == {A: len(h1), B: 0}
    assert index.match(hash_text(turn2, "other-model"), [A]) == {A: 0}


def test_global_capacity_holds_under_a_flood_of_distinct_prompts() -> None:
    index = PrefixIndex(capacity_blocks=5_000)
    rng = random.Random(7)
    replicas = [f"http://r{i}" for i in range(8)]
    for n in range(3_000):
        index.record(chain(f"p{n}", rng.randint(1, 40)), rng.choice(replicas))
        assert index.records <= 5_000
    check_consistent(index)
    assert index.evicted_global > 0
    # The most recent prompt survives; the oldest are gone.
    last = chain("last", 30)
    index.record(last, A)
    assert index.match(last, [A]) == {A: 30}


def test_eviction_removes_leaves_first_so_shared_prefixes_survive() -> None:
    index = PrefixIndex(capacity_blocks=40)
    system = chain("system", 10)
    for n in range(50):  # every conversation shares the system prompt
        index.record(chain(f"c{n}", 5, system), A)
        check_consistent(index)
        # The shared prefix was touched by every record: it is never the oldest leaf.
        assert index.match(system, [A]) == {A: 10}
    assert index.records <= 40


def test_memory_stays_under_the_cap_during_a_flood() -> None:
    capacity = 20_000
    index = PrefixIndex(capacity_blocks=capacity)
    rng = random.Random(3)
    replicas = [f"http://r{i}" for i in range(64)]
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(4_000):  # ~120k blocks through a 20k-block index
            hashes = tuple(rng.getrandbits(64) for _ in range(rng.randint(1, 60)))
            index.record(hashes, rng.choice(replicas))
        used, peak = (m - base for m in tracemalloc.get_traced_memory())
    finally:
        tracemalloc.stop()
    assert index.records <= capacity
    budget = capacity * (BYTES_PER_NODE + BYTES_PER_RECORD)
    assert used <= index.memory_bytes() <= budget, (used, index.memory_bytes(), budget)
    assert peak <= budget + 256 * 1024, (peak, budget)  # transient resizes included


def test_memory_per_record_matches_constants() -> None:
    """Re-measure the per-node/per-record bytes the default capacity is derived from."""
    rng = random.Random(11)
    for n_blocks in (40_000, 60_000):
        index = PrefixIndex(capacity_blocks=10**9)
        for s in range(63):  # make the measured replica's mask a 64-bit integer
            index._slot_of(f"http://pad{s}")
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for _ in range(n_blocks // 40):
                index.record(tuple(rng.getrandbits(64) for _ in range(40)), A)
            one = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        assert one / index.records <= BYTES_PER_NODE + BYTES_PER_RECORD
        assert index.memory_bytes() >= one
    assert DEFAULT_CAPACITY_BLOCKS * (BYTES_PER_NODE + BYTES_PER_RECORD) <= DEFAULT_MEMORY_BUDGET_BYTES


def test_per_replica_capacity_forgets_what_the_replica_must_have_evicted() -> None:
    index = PrefixIndex(tokens_per_block=16)
    index.set_replica_capacity_tokens(A, 16 * 10)  # 10 blocks of KV cache
    first = chain("first", 8)
    second = chain("second", 8)
    index.record(first, A)
    index.record(second, B)
    assert index.match(first, [A]) == {A: 8}
    index.record(second, A)  # 16 blocks sent to a 10-block replica: the oldest 6 go
    assert index.replica_blocks(A) == 10
    assert index.match(first, [A]) == {A: 2}  # leaves first: first's prefix remains
    assert index.match(second, [A, B]) == {A: 8, B: 8}  # B is unaffected
    check_consistent(index)
    index.set_replica_capacity_tokens(A, 16 * 3)  # shrinking applies at once
    assert index.replica_blocks(A) == 3
    assert index.match(second, [A]) == {A: 3}
    index.set_replica_capacity_tokens(A, None)
    index.record(chain("third", 30), A)
    assert index.replica_blocks(A) == 33
    check_consistent(index)


def test_remove_replica_leaves_the_index() -> None:
    index = PrefixIndex()
    shared = chain("shared", 5)
    index.record(shared, A)
    index.record(chain("only-a", 5, shared), A)
    index.record(shared, B)
    index.remove_replica(A)
    assert index.match(chain("only-a", 5, shared), [A, B]) == {A: 0, B: 5}
    assert len(index) == 5 and index.records == 5
    check_consistent(index)
    index.record(shared, C)  # slots are reused
    assert index.match(shared, [A, B, C]) == {A: 0, B: 5, C: 5}
    check_consistent(index)
    index.remove_replica("http://never-seen")


def test_forget_undoes_exactly_one_record() -> None:
    index = PrefixIndex()
    system = chain("system", 4)
    index.record(system, A)
    failed = index.record(chain("req", 4, system), A)
    index.forget(failed)
    assert index.match(chain("req", 4, system), [A]) == {A: 4}  # what A had before stays
    check_consistent(index)


def test_forget_keeps_a_later_record_of_the_same_prefix() -> None:
    index = PrefixIndex()
    path = chain("p", 6)
    failed = index.record(path, A)
    index.record(path, A)  # a concurrent request with the same prompt went through
    index.forget(failed)
    assert index.match(path, [A]) == {A: 6}
    # A diverging later record keeps only the shared part alive.
    index2 = PrefixIndex()
    failed = index2.record(path, A)
    index2.record(path[:3] + chain("q", 2), A)
    index2.forget(failed)
    assert index2.match(path, [A]) == {A: 3}
    check_consistent(index2)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["record", "forget", "cap", "remove"]),
            st.integers(0, 3),  # replica
            st.integers(0, 5),  # prompt family
            st.integers(0, 12),  # length
        ),
        max_size=60,
    )
)
def test_random_operations_keep_the_trie_consistent_and_bounded(ops) -> None:
    index = PrefixIndex(capacity_blocks=30)
    replicas = [A, B, C, "http://d"]
    recordings = []
    for op, r, fam, length in ops:
        rid = replicas[r]
        path = chain(f"f{fam % 3}", 3) + chain(f"g{fam}", length)
        if op == "record":
            recordings.append(index.record(path, rid))
        elif op == "forget" and recordings:
            index.forget(recordings.pop(length % len(recordings)))
        elif op == "cap":
            index.set_replica_capacity_tokens(rid, length * index.tokens_per_block or None)
        elif op == "remove":
            index.remove_replica(rid)
        check_consistent(index)
        assert index.records <= 30
        for rid_ in replicas:
            cap = index.replica_capacity_blocks(rid_)
            if cap is not None:
                assert index.replica_blocks(rid_) <= cap
        # Every replica's blocks are prefix-closed: a match is always a real prefix.
        got = index.match(path, replicas)
        for rid_, k in got.items():
            held = index._held.get(rid_, {})
            assert all(h in held for h in path[:k])
            assert k == len(path) or path[k] not in held  # and the longest such prefix


def test_candidate_mask_cache_stays_bounded() -> None:
    from router.prefix import index as index_module

    index = PrefixIndex()
    hashes = hash_text("shared prefix " * 40, "m")
    for i in range(40):
        index.record(hashes, f"r{i}")
    subsets = [tuple(f"r{j}" for j in range(40) if (k >> (j % 20)) & 1) for k in range(1, 600)]
    for ids in subsets:  # far more distinct candidate sets than the cache keeps
        index.match(hashes, ids)
        assert len(index._wanted_cache) <= index_module._MAX_WANTED_CACHE
    assert index.match(hashes, subsets[0]) == {rid: len(hashes) for rid in subsets[0]}
