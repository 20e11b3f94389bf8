"""A paged KV cache with prefix caching, shaped like vLLM v1's block pool.

* A fixed number of blocks of ``block_size`` tokens.  Nothing here grows with traffic: the
  hash index holds at most one entry per block and the free queue at most every block.
* Every full block gets a chained hash (``block_hash``, vLLM's default ``sha256`` scheme, so
  hashes in KV events equal real vLLM's for the same token ids).
* A freed block keeps its hash and stays findable until it is reused: free blocks form an LRU
  queue (identical blocks computed twice are both kept, as in vLLM); allocation takes the
  front and evicts that block's hash (a ``BlockRemoved`` event).
  A request frees its blocks tail first, so a prompt's last blocks are evicted before its
  first ones, as in vLLM.
* Usage (``kv_cache_usage_perc``) is blocks referenced by live requests over all blocks:
  0 when idle, cached or not, like real vLLM.  (The engine builds this pool with
  ``num_gpu_blocks - 1`` blocks: vLLM reserves one as its null block.)

The cache records KV events (as plain dicts in vLLM's wire shape) in ``pending_events``;
the engine drains them once per step into one batch.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

NONE_HASH: bytes = hashlib.sha256(pickle.dumps("vllm-none-hash", protocol=5)).digest()


def block_hash(parent: bytes | None, tokens: Sequence[int], extra: tuple[Any, ...] | None = None) -> bytes:
    """vLLM's ``sha256`` block hash: sha256(pickle((parent, tuple(tokens), extra_keys))); the
    extra keys are None or vLLM's tagged keys (`BlockKeys.hash_extra`)."""
    return hashlib.sha256(
        pickle.dumps((NONE_HASH if parent is None else parent, tuple(tokens), extra), protocol=5)
    ).digest()


def event_hash(h: bytes) -> int:
    """The integer vLLM puts in KV events: the digest's last 8 bytes, big-endian."""
    return int.from_bytes(h[-8:], "big")


@dataclass(frozen=True, slots=True)
class BlockKeys:
    """What besides its tokens enters a request's block hashes, as in vLLM 0.32's
    ``generate_block_hash_extra_keys``: its LoRA adapter (every block) and its cache_salt
    (the first block)."""

    cache_salt: str | None = None
    lora_name: str | None = None
    lora_id: int | None = None
    lora_path: str | None = None

    def hash_extra(self, index: int) -> tuple[Any, ...] | None:
        """The tagged keys hashed with block `index`: ("lora", name, path), ("cache_salt", s)."""
        keys: list[Any] = []
        if self.lora_name is not None:
            keys.append(("lora", self.lora_name, self.lora_path))
        if index == 0 and self.cache_salt:
            keys.append(("cache_salt", self.cache_salt))
        return tuple(keys) or None

    def event_extra(self, index: int) -> list[Any] | None:
        """The same keys as KV events publish them: untagged (`to_event_extra_keys`)."""
        keys = self.hash_extra(index)
        return None if keys is None else [key[1] for key in keys]


NO_KEYS = BlockKeys()


def extend_block_hashes(hashes: list[bytes], token_ids: Sequence[int], block_size: int,
                        keys: BlockKeys = NO_KEYS) -> None:
    """Append the hashes of every full block of ``token_ids`` not yet in ``hashes``."""
    n_full = len(token_ids) // block_size
    parent = hashes[-1] if hashes else None
    for i in range(len(hashes), n_full):
        parent = block_hash(parent, token_ids[i * block_size:(i + 1) * block_size], keys.hash_extra(i))
        hashes.append(parent)


@dataclass(slots=True)
class Block:
    id: int
    ref_cnt: int = 0
    hash: bytes | None = None


@dataclass(slots=True)
class Allocation:
    """The blocks one request holds, and how many of them are committed to the hash index."""

    block_ids: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0


class KVCache:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 emit_events: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.emit_events = emit_events
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        # hash -> the blocks holding it.  Like vLLM's BlockHashToBlockMap, identical blocks are not
        # de-duplicated (block tables stay append-only); at most one entry per block in total.
        self._by_hash: dict[bytes, dict[int, None]] = {}
        self.pending_events: list[dict] = []

    # -- accounting -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_hashes(self) -> int:
        return len(self._by_hash)

    @property
    def num_cached_blocks(self) -> int:
        return sum(len(ids) for ids in self._by_hash.values())

    def usage(self) -> float:
        return (self.num_blocks - len(self._free)) / self.num_blocks

    # -- prefix lookup ----------------------------------------------------------------------
    def find_cached_prefix(self, hashes: Sequence[bytes], max_blocks: int) -> list[int]:
        """Block ids of the longest cached prefix of ``hashes`` (at most ``max_blocks``)."""
        if not self.enable_prefix_caching:
            return []
        found = []
        for h in hashes[:max_blocks]:
            ids = self._by_hash.get(h)
            if not ids:
                break
            found.append(next(iter(ids)))
        return found

    # -- allocation -------------------------------------------------------------------------
    def can_allocate(self, alloc: Allocation, num_tokens: int, hit_blocks: Sequence[int] = ()) -> bool:
        need = self._blocks_needed(alloc, num_tokens, len(hit_blocks))
        reclaimable = sum(1 for b in hit_blocks if self.blocks[b].ref_cnt == 0)
        return need <= len(self._free) - reclaimable

    def allocate(self, alloc: Allocation, num_tokens: int, hit_blocks: Sequence[int] = ()) -> bool:
        """Give ``alloc`` enough blocks for ``num_tokens`` tokens, first taking the cached
        ``hit_blocks`` (only for an empty allocation).  False, changing nothing, when the
        free blocks do not suffice."""
        if not self.can_allocate(alloc, num_tokens, hit_blocks):
            return False
        for bid in hit_blocks:
            self._touch(bid)
            alloc.block_ids.append(bid)
        alloc.num_cached_blocks += len(hit_blocks)
        for _ in range(self._blocks_needed(alloc, num_tokens, 0)):
            alloc.block_ids.append(self._take_free())
        return True

    def _blocks_needed(self, alloc: Allocation, num_tokens: int, extra_held: int) -> int:
        total = -(-num_tokens // self.block_size)
        return max(0, total - len(alloc.block_ids) - extra_held)

    def _touch(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_cnt == 0:
            del self._free[bid]
        block.ref_cnt += 1

    def _take_free(self) -> int:
        bid, _ = self._free.popitem(last=False)
        block = self.blocks[bid]
        if block.hash is not None:
            self._evict(block)
        block.ref_cnt = 1
        return bid

    def _evict(self, block: Block) -> None:
        """Drop a reused block's hash; vLLM reports BlockRemoved for it even when an identical
        block elsewhere still holds the same hash."""
        h = block.hash
        block.hash = None
        ids = self._by_hash.get(h)
        if ids is not None and block.id in ids:
            del ids[block.id]
            if not ids:
                del self._by_hash[h]
            if self.emit_events:
                self.pending_events.append({"type": "BlockRemoved", "block_hashes": [event_hash(h)],
                                            "medium": "GPU", "group_idx": 0})

    def free(self, alloc: Allocation) -> None:
        """Release a request's blocks, tail first, keeping their hashes findable."""
        for bid in reversed(alloc.block_ids):
            block = self.blocks[bid]
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[bid] = None
        alloc.block_ids.clear()
        alloc.num_cached_blocks = 0

    # -- committing computed blocks ---------------------------------------------------------
    def cache_full_blocks(self, alloc: Allocation, hashes: Sequence[bytes],
                          token_ids: Sequence[int], num_computed: int, keys: BlockKeys = NO_KEYS) -> None:
        """Register every block of ``alloc`` that ``num_computed`` tokens have filled."""
        if not self.enable_prefix_caching:
            return
        n_full = min(num_computed // self.block_size, len(alloc.block_ids), len(hashes))
        start = alloc.num_cached_blocks
        if n_full <= start:
            return
        bs = self.block_size
        for i in range(start, n_full):
            block = self.blocks[alloc.block_ids[i]]
            block.hash = hashes[i]
            self._by_hash.setdefault(hashes[i], {})[block.id] = None
        alloc.num_cached_blocks = n_full
        if self.emit_events:
            # One BlockStored per call, as vLLM's BlockPool.cache_full_blocks: a recomputed block
            # whose hash is already cached elsewhere is stored (and reported) again.
            self.pending_events.append({
                "type": "BlockStored",
                "block_hashes": [event_hash(h) for h in hashes[start:n_full]],
                "parent_block_hash": event_hash(hashes[start - 1]) if start else None,
                "token_ids": list(token_ids[start * bs:n_full * bs]),
                "block_size": bs,
                "lora_id": keys.lora_id,
                "medium": "GPU",
                "lora_name": keys.lora_name,
                "extra_keys": [keys.event_extra(i) for i in range(start, n_full)],
                "group_idx": 0,
                "kv_cache_spec_kind": "full_attention",
            })

    def reset(self) -> bool:
        """Drop every cached hash (vLLM's reset_prefix_cache).  Only when no block is held."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            block.hash = None
        self._by_hash.clear()
        if self.emit_events:
            self.pending_events.append({"type": "AllBlocksCleared"})
        return True

    def drain_events(self) -> list[dict]:
        events, self.pending_events = self.pending_events, []
        return events
