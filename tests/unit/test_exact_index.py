"""The exact prefix index and its event decoder, fed with events in vLLM's wire shapes.

vLLM's own block hashes are made up here (random integers): the index must match requests by
its own hash of token ids whatever vLLM's hash function or seed is (vLLM issue #51875)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.prefix.events import (
    AllBlocksCleared,
    BadPayload,
    BlockRemoved,
    BlockStored,
    Unknown,
    decode_batch,
)
from router.prefix.exact import APPROXIMATE, EXACT, ExactIndex

REFERENCE = Path(__file__).resolve().parents[1] / "reference" / "kv_events.jsonl"
MODEL = "m"
BS = 4


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def stored(tokens: list[int], hashes: list[int], parent: int | None = None, *, salt: str | None = None,
           bs: int = BS, **extra: object) -> BlockStored:
    keys: list[object] = [None] * len(hashes)
    if salt is not None and parent is None:
        keys[0] = [salt]
    return BlockStored(block_hashes=tuple(hashes), parent_block_hash=parent, token_ids=tokens,
                       block_size=bs, extra_keys=keys, medium="GPU", **extra)  # type: ignore[arg-type]


def fresh(clock: Clock | None = None, **kw: object) -> ExactIndex:
    index = ExactIndex(clock=clock or Clock(), **kw)  # type: ignore[arg-type]
    for rid in ("a", "b"):
        index.attach(rid, MODEL)
        index.reset(rid, empty=True)
        index.set_capacity(rid, None, BS)  # the block size its /metrics report
    return index


# -- decoding ---------------------------------------------------------------------------
def test_decodes_the_reference_message_and_the_older_array_form():
    raw = json.loads(REFERENCE.read_text().splitlines()[0])["raw"]
    batch = decode_batch(msgpack.packb(raw))
    (event,) = batch.events
    assert isinstance(event, BlockStored)
    assert event.block_size == 32 and len(event.token_ids) == 32 and event.parent_block_hash is None
    assert event.block_hashes == (16081087451076090350,) and event.medium == "GPU"
    legacy = [1.0, [["BlockStored", [7, 8], None, list(range(8)), 4, None, "GPU"],
                    ["BlockRemoved", [7], "GPU"], ["AllBlocksCleared"], ["SomethingNew", 1]], 0]
    kinds = [type(e) for e in decode_batch(msgpack.packb(legacy)).events]
    assert kinds == [BlockStored, BlockRemoved, AllBlocksCleared, Unknown]


def test_unknown_fields_and_kinds_are_ignored_and_garbage_is_refused():
    raw = [2.0, [{"type": "BlockRemoved", "block_hashes": [1], "brand_new_field": {"x": 1}},
                 {"type": "KVCacheTierMoved", "what": 1}], 0, "extra batch field"]
    events = decode_batch(msgpack.packb(raw)).events
    assert isinstance(events[0], BlockRemoved) and events[0].block_hashes == (1,)
    assert events[1] == Unknown("KVCacheTierMoved")
    for payload in (b"\xc1", msgpack.packb({"no": "batch"}), msgpack.packb(5)):
        with pytest.raises(BadPayload):
            decode_batch(payload)


# -- matching -----------------------------------------------------------------------------
def test_matches_by_token_ids_not_by_vllm_hashes():
    index = fresh()
    tokens = list(range(100, 112))  # three blocks of 4
    index.apply("a", [stored(tokens[:8], [555, 777])])
    index.apply("a", [stored(tokens[8:], [999], parent=777)])  # a continuation, by vLLM's parent hash
    got = index.match(MODEL, tokens + [1], None, ["a", "b"])
    assert got == {"a": 12, "b": 0}
    assert index.match(MODEL, tokens[:6] + [0, 0, 0], None, ["a"]) == {"a": 4}
    # vLLM never counts the prompt's last token as cached: at most (len - 1) // bs blocks.
    assert index.match(MODEL, tokens, None, ["a"]) == {"a": 8}


def test_salt_and_model_separate_chains():
    index = fresh()
    tokens = list(range(8))
    index.apply("a", [stored(tokens, [1, 2], salt="tenant-1")])
    assert index.match(MODEL, tokens + [9], "tenant-1", ["a"]) == {"a": 8}
    assert index.match(MODEL, tokens + [9], None, ["a"]) == {"a": 0}
    assert index.match(MODEL, tokens + [9], "tenant-2", ["a"]) == {"a": 0}
    assert index.match("other-model", tokens + [9], "tenant-1", ["a"]) == {"a": 0}


def test_removed_blocks_and_unknown_parents():
    index = fresh()
    tokens = list(range(12))
    index.apply("a", [stored(tokens, [1, 2, 3])])
    index.apply("a", [BlockRemoved((3,), "GPU")])
    assert index.match(MODEL, tokens + [0], None, ["a"]) == {"a": 8}
    index.apply("a", [stored(list(range(50, 54)), [42], parent=123456)])  # parent never seen
    assert index.replica_stats("a")["skipped_blocks"] == 1
    index.apply("a", [BlockRemoved((1, 2), "CPU")])  # another tier: not this cache
    assert index.match(MODEL, tokens + [0], None, ["a"]) == {"a": 8}
    index.apply("a", [AllBlocksCleared()])
    assert index.match(MODEL, tokens + [0], None, ["a"]) == {"a": 0}
    assert index.mode("a") == EXACT  # cleared: known to be empty


def test_multimodal_extra_keys_are_not_indexed():
    index = fresh()
    event = BlockStored(block_hashes=(1, 2), parent_block_hash=None, token_ids=list(range(8)), block_size=BS,
                        extra_keys=[None, ["mm-hash-abc"]], medium="GPU")
    index.apply("a", [event])
    assert index.match(MODEL, list(range(9)), None, ["a"]) == {"a": 4}


def test_lost_events_mean_approximate_until_relearned():
    clock = Clock()
    index = fresh(clock, relearn_s=5.0)
    index.apply("a", [stored(list(range(8)), [1, 2])])
    index.reset("a", empty=False)
    assert index.mode("a") == APPROXIMATE
    assert index.match(MODEL, list(range(9)), None, ["a", "b"]) == {"a": None, "b": 0}
    index.apply("a", [stored(list(range(8)), [1, 2])])
    clock.now += 5.0
    assert index.mode("a") == EXACT
    assert index.match(MODEL, list(range(9)), None, ["a"]) == {"a": 8}


def test_rows_give_the_scheduler_each_replicas_match_block_size_and_room():
    """`rows` (the scheduler's columns, in candidate order): matched tokens only for replicas in
    exact mode (None for one relearning, one never attached), each replica's block size (1 if
    unknown) and its free tokens (capacity minus the blocks its events stored; inf if unknown)."""
    clock = Clock()
    index = fresh(clock, relearn_s=5.0)
    index.attach("c", MODEL)  # relearning after lost events, 2-token blocks, 10 of them
    index.set_capacity("c", 10, 2)
    index.reset("c", empty=False)
    index.attach("d", MODEL)  # known empty, another block size: matched in its own group
    index.reset("d", empty=True)
    index.set_capacity("d", 6, 8)
    index.set_capacity("a", 20, BS)
    tokens = list(range(100, 116))
    index.apply("a", [stored(tokens, [1, 2, 3, 4])])
    index.apply("d", [stored(tokens[:8], [7], bs=8)])
    hashes: dict[int, tuple[int, ...]] = {}
    order = ["d", "unknown", "b", "c", "a"]
    held, sizes, free = index.rows(MODEL, tokens + [0], None, order, hashes_by_size=hashes)
    assert held == [8, None, 0, None, 16]
    assert sizes == [8, 1, BS, 2, BS]
    assert free == [(6 - 1) * 8, float("inf"), float("inf"), 10 * 2, (20 - 4) * BS]
    assert all(isinstance(f, float) for f in free)
    assert hashes == {BS: index.request_hashes(MODEL, tokens + [0], BS, None),
                      8: index.request_hashes(MODEL, tokens + [0], 8, None)}  # for predict
    assert index.match(MODEL, tokens + [0], None, order) == dict(zip(order, held))
    # vLLM never counts the prompt's last token as cached: at most (16 - 1) // 4 = 3 blocks.
    assert index.rows(MODEL, tokens, None, ["a"])[0] == [12]
    index.predict("b", hashes[BS])  # pending counts as held, under the same cap
    assert index.rows(MODEL, tokens + [0], None, ["b"])[0] == [16]
    assert index.rows(MODEL, tokens, None, ["b"])[0] == [12]


def test_pending_blocks_count_until_settled_and_expired():
    clock = Clock()
    index = fresh(clock, confirm_s=2.0)
    tokens = list(range(16))
    hashes: dict[int, tuple[int, ...]] = {}
    assert index.match(MODEL, tokens + [0], None, ["a", "b"], hashes_by_size=hashes) == {"a": 0, "b": 0}
    pending = index.predict("b", hashes[BS])
    assert index.match(MODEL, tokens + [0], None, ["a", "b"]) == {"a": 0, "b": 16}
    index.settle(pending)
    clock.now += 1.9
    assert index.match(MODEL, tokens + [0], None, ["b"]) == {"b": 16}
    clock.now += 0.2
    assert index.match(MODEL, tokens + [0], None, ["b"]) == {"b": 0}
    failed = index.predict("a", hashes[BS])
    index.retract(failed)
    assert index.match(MODEL, tokens + [0], None, ["a"]) == {"a": 0}
    assert index.pending.records == 0


def test_a_finished_request_is_pending_no_longer():
    """By a request's end its replica has published its prompt's blocks: pending now would
    only hide an eviction (the default confirm_s is 0)."""
    index = fresh(Clock())
    tokens = list(range(16))
    hashes: dict[int, tuple[int, ...]] = {}
    index.match(MODEL, tokens + [0], None, ["a"], hashes_by_size=hashes)
    index.settle(index.predict("a", hashes[BS]))
    assert index.match(MODEL, tokens + [0], None, ["a"]) == {"a": 0}
    assert index.pending.records == 0


def test_a_conversations_first_prompt_does_not_stay_pending_under_its_later_turns():
    """The second turn re-records the first turn's blocks; when both have ended and their
    confirmation window passed, none may stay pending (they did, for good: an agent's first
    prompt kept claiming its replica long after the replica evicted it)."""
    clock = Clock()
    index = fresh(clock, confirm_s=2.0)
    first, second = list(range(16)), list(range(32))
    one = index.predict("a", index.request_hashes(MODEL, first, BS, None))
    two = index.predict("a", index.request_hashes(MODEL, second, BS, None))
    index.settle(one)
    index.settle(two)
    clock.now += 3.0
    assert index.match(MODEL, second + [0], None, ["a"]) == {"a": 0}
    assert index.pending.records == 0


def test_an_evicted_block_is_not_claimed_by_a_prediction():
    clock = Clock()
    index = fresh(clock, confirm_s=60.0)
    tokens = list(range(16))
    running = index.predict("a", index.request_hashes(MODEL, tokens, BS, None))
    index.apply("a", [stored(tokens, [1, 2, 3, 4])])
    index.settle(running)  # 4 of 4 blocks confirmed: not kept for the 60 s
    index.apply("a", [BlockRemoved(block_hashes=(4, 3), medium="GPU")])
    assert index.match(MODEL, tokens + [0], None, ["a"]) == {"a": 8}
    waiting = index.predict("a", index.request_hashes(MODEL, tokens, BS, None))
    index.settle(waiting)  # 2 of 4 shown stored: kept, as its events may lag ...
    assert index.match(MODEL, tokens + [0], None, ["a"]) == {"a": 16}
    index.apply("a", [BlockRemoved(block_hashes=(2,), medium="GPU")])  # ... until denied
    assert index.match(MODEL, tokens + [0], None, ["a"]) == {"a": 4}


# -- bounds ---------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=1, max_value=64), st.integers(min_value=8, max_value=400))
def test_a_flood_of_events_stays_within_the_bounds(num_gpu_blocks, global_cap):
    rng = random.Random(num_gpu_blocks * 1000 + global_cap)
    index = ExactIndex(global_cap, clock=Clock())
    for rid in ("a", "b", "c"):
        index.attach(rid, MODEL)
        index.reset(rid, empty=True)
        index.set_capacity(rid, num_gpu_blocks, BS)
    for _ in range(300):
        rid = rng.choice("abc")
        n = rng.randint(1, 6)
        tokens = [rng.randrange(1000) for _ in range(n * BS)]
        index.apply(rid, [stored(tokens, [rng.getrandbits(64) for _ in range(n)])])
        if rng.random() < 0.2:
            index.predict(rid, index.request_hashes(MODEL, tokens, BS, None))
        for r in "abc":
            assert index.blocks.replica_blocks(r) <= num_gpu_blocks
            assert len(index.replicas[r].vllm_to_ours) <= 2 * num_gpu_blocks
        assert index.blocks.records <= global_cap


# -- advertised event sources (GET /kv_event_sources) ---------------------------------------
def test_advertised_sources_are_reached_at_the_replica_host():
    from router.fleet.event_sources import EventSource, parse_sources, reachable

    assert reachable("tcp://*:5557", "http://10.0.0.7:8000") == "tcp://10.0.0.7:5557"
    assert reachable("tcp://0.0.0.0:5557", "http://[fd00::7]:8000") == "tcp://[fd00::7]:5557"
    assert reachable("tcp://10.0.0.9:5557", "http://10.0.0.7:8000") == "tcp://10.0.0.9:5557"
    answer = [{"data_parallel_rank": 1, "endpoint": "tcp://*:5567", "replay_endpoint": None, "topic": "kv"},
              {"data_parallel_rank": 0, "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558",
               "topic": "kv"}]
    assert parse_sources(answer, "http://h:8000") == EventSource("tcp://h:5557", "tcp://h:5558", "kv")
    for nothing in ([], {"endpoint": 5}, "x", [{"endpoint": "ipc:///tmp/kv"}], None):
        assert parse_sources(nothing, "http://h:8000") is None


def test_settled_pending_records_are_bounded():
    clock = Clock()
    index = fresh(clock, confirm_s=60.0, max_pending=5)
    for i in range(50):
        tokens = [i] * (2 * BS)
        recording = index.predict("a", index.request_hashes(MODEL, tokens, BS, None))
        index.settle(recording)
        assert len(index.pending._expiring) <= 5
    assert index.pending.records <= 5 * 2  # the oldest were forgotten early, not kept


def test_the_replica_tokenizer_cache_is_bounded():
    from array import array

    from router.transport.replica_tokens import ReplicaTokenizer

    cache = ReplicaTokenizer(None, max_entries=4, max_tokens=100)  # type: ignore[arg-type]
    for i in range(40):
        cache._remember(i.to_bytes(16, "big"), array("I", range(i % 60)))
        stats = cache.stats()
        assert stats["entries"] <= 4 and stats["tokens"] <= 100
    cache._remember(b"huge".ljust(16), array("I", range(101)))  # over the whole budget: not kept
    assert cache.stats()["tokens"] <= 100
