"""The oracle on tiny sequences checked by hand (block size 4 tokens)."""

from benchmarks.oracle import block_chain, oracle, simulate

A = list(range(1, 11))  # 10 tokens: 2 full blocks + 2 tokens


def test_block_chain_names_prefixes():
    assert len(block_chain(A, 4)) == 2
    assert block_chain(A, 4) == block_chain(A[:8], 4)  # same full blocks, same chain
    assert block_chain([9] + A[1:], 4)[1] != block_chain(A, 4)[1]  # a change in block 0 changes block 1's name


def test_repeat_hits_every_full_block():
    r = simulate([A, A], block_size=4, capacity_blocks=None)
    assert (r.queries, r.hits) == (20, 8)  # second request: 2 blocks of 4 cached
    assert r.hit_rate == 0.4


def test_last_token_is_always_computed():
    p = list(range(8))  # exactly 2 blocks: at most (8 - 1) // 4 = 1 block can hit
    assert simulate([p, p], 4, None).hits == 4


def test_shared_prefix_different_suffix():
    p = list(range(8)) + [100, 101, 102, 103]
    q = list(range(8)) + [200, 201, 202, 203]
    assert simulate([p, q], 4, None).hits == 8


def test_capacity_evicts_least_recently_used():
    a = list(range(1, 9))
    b = list(range(11, 19))
    assert simulate([a, b, a], 4, capacity_blocks=2).hits == 0  # b pushed a out
    assert simulate([a, b, a], 4, capacity_blocks=4).hits == 4  # both fit: a's first block hits (cap 1)


def test_tail_blocks_are_evicted_before_head_blocks():
    a = list(range(1, 13))  # blocks a1 a2 a3
    b = [21, 22, 23, 24]  # block b1 overflows a capacity of 3 by one
    a_next = list(range(1, 9)) + [99, 98, 97, 96]  # shares a1 a2
    r = simulate([a, b, a_next], 4, capacity_blocks=3)
    assert r.hits == 8  # a3 was evicted, the head a1 a2 survived


def test_oracle_reports_bounded_and_unbounded():
    a = list(range(1, 9))
    b = list(range(11, 19))
    out = oracle([a, b, a], block_size=4, capacity_blocks=2)
    assert out["hit_rate"] == 0.0
    assert out["hit_rate_unbounded"] == 4 / 24
    assert out["requests"] == 3
