"""RequestIds: 128 random bits per id, from a bounded pool of CSPRNG bytes."""

from __future__ import annotations

import re

from router.core.request_ids import ID_BYTES, POOL_IDS, RequestIds


def test_ids_are_128_bit_hex_unique_across_refills_and_the_pool_stays_bounded() -> None:
    ids = RequestIds()
    seen = set()
    for _ in range(POOL_IDS * 5 + 7):  # several refills
        rid = ids.new()
        assert re.fullmatch(r"[0-9a-f]{32}", rid)
        seen.add(rid)
        assert len(ids._pool) == ID_BYTES * POOL_IDS  # one pool, never growing
    assert len(seen) == POOL_IDS * 5 + 7


def test_two_generators_do_not_share_ids() -> None:
    a, b = RequestIds(), RequestIds()
    assert not {a.new() for _ in range(1000)} & {b.new() for _ in range(1000)}
