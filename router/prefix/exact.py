"""The exact prefix index: which token blocks each replica's KV cache holds, from its own events.

Where the approximate index (index.py) remembers what the router *sent* where, this one
holds what the replicas *say* they stored and evicted (events.py, fed by subscriber.py).

**Our own hash, not vLLM's.**  vLLM's block hash depends on its hash algorithm and, unless
``PYTHONHASHSEED`` is set, on a random per-process seed, so a router that recomputes it
silently matches nothing (vLLM issue #51875).  Events carry every stored block's token ids
and its parent's hash, so each block is keyed here by the router's own chained hash of token
ids (hashing.hash_tokens: xxh3 chained from a seed of model, block size, LoRA adapter and
cache_salt), computed the same way for a request's tokens.  Per replica a bounded map from
vLLM's block hashes to ours serves ``BlockRemoved`` and the parents of later blocks.

* A chain's first block (no parent) starts from the seed; vLLM puts ``cache_salt`` in that
  block's extra keys (after the adapter's name), so the salt found there enters the seed,
  exactly as a request with that ``cache_salt`` seeds its own chain.  Blocks with other
  extra keys (multimodal inputs) cannot be matched by a text request and are not indexed.
* A block whose parent is unknown (stored before the router listened, and not replayed) is
  skipped: the index under-states, it never claims a block the replica may lack.

**Modes**, per replica: ``exact`` while the stream is trusted; ``approximate`` while it is
not known (no events yet), or for ``relearn_s`` after the router lost events it could not
replay (its exact entries were dropped; routing that replica uses the approximate index
until the window has passed and the entries are re-learned from new events).  A replica that
reports ``AllBlocksCleared`` or restarts from sequence 0 is empty and known at once: exact.

**Predict-on-route** (pending.py): the blocks of the requests in flight on each replica,
before its events confirm them, count as held there.

**Bounds**: each replica's entries are capped by its ``num_gpu_blocks`` (it cannot hold
more) and all entries by ``capacity_blocks``; the hash map per replica by twice its cap;
pending entries as pending.py says.
"""

from __future__ import annotations

import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from router.prefix.events import GPU, AllBlocksCleared, BlockRemoved, BlockStored, Event, Unknown
from router.prefix.hashing import chain_seed, chain_tokens
from router.prefix.index import DEFAULT_CAPACITY_BLOCKS, PrefixIndex, Recording
from router.prefix.pending import DEFAULT_CONFIRM_S, DEFAULT_MAX_PENDING, DEFAULT_PENDING_CAPACITY_BLOCKS, PendingBlocks

EXACT, APPROXIMATE = "exact", "approximate"
DEFAULT_RELEARN_S = 10.0
DEFAULT_MAP_CAP = 1_000_000  # vLLM-hash map entries per replica when its size is unknown
_TOKEN_KIND = "tokens-u32"


@dataclass(slots=True)
class ReplicaKV:
    """What the exact index knows about one replica's stream and cache."""

    model: str
    block_size: int | None = None  # from its events
    capacity_blocks: int | None = None  # its num_gpu_blocks
    vllm_to_ours: OrderedDict[Any, int] = field(default_factory=OrderedDict)  # oldest first
    known: bool = False  # an event has been applied since the last reset
    relearn_until: float = 0.0  # monotonic time until which the mode stays approximate
    resets: int = 0
    stored_blocks: int = 0
    removed_blocks: int = 0
    skipped_blocks: int = 0  # unknown parent, unsupported extra keys, bad tokens
    unknown_events: int = 0

    def mode(self, now: float) -> str:
        """Exact only once a request can be matched: the stream is trusted and the block
        size is known (from an event or the replica's /metrics); until then a request
        routed to it counts as approximately predicted."""
        if self.known and self.block_size is not None and now >= self.relearn_until:
            return EXACT
        return APPROXIMATE


class ExactIndex:
    """Per-replica exact block sets keyed by our own token-chain hashes; see the module doc."""

    def __init__(self, capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS, *,
                 max_blocks_per_request: int = 8192, relearn_s: float = DEFAULT_RELEARN_S,
                 confirm_s: float = DEFAULT_CONFIRM_S,
                 max_pending: int = DEFAULT_MAX_PENDING,
                 pending_capacity_blocks: int = DEFAULT_PENDING_CAPACITY_BLOCKS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.blocks = PrefixIndex(capacity_blocks, tokens_per_block=1)
        self.pending = PendingBlocks(pending_capacity_blocks, confirm_s=confirm_s, max_pending=max_pending,
                                     clock=clock)
        self.relearn_s = relearn_s
        self.max_blocks_per_request = max_blocks_per_request  # as for the approximate index
        self.clock = clock
        self.replicas: dict[str, ReplicaKV] = {}

    # -- membership ---------------------------------------------------------------------
    def attach(self, replica_id: str, model: str) -> ReplicaKV:
        state = self.replicas.get(replica_id)
        if state is None or state.model != model:
            self.detach(replica_id)
            state = self.replicas[replica_id] = ReplicaKV(model)
        return state

    def detach(self, replica_id: str) -> None:
        self.replicas.pop(replica_id, None)
        self.blocks.remove_replica(replica_id)
        self.pending.remove_replica(replica_id)

    def set_capacity(self, replica_id: str, num_gpu_blocks: int | None, block_size: int | None = None) -> None:
        """The replica's KV size from its /metrics (cache_config_info); its block size there
        serves until its first event says (so an idle, known-empty replica is exact too)."""
        state = self.replicas.get(replica_id)
        if state is None:
            return
        if state.block_size is None and block_size:
            state.block_size = block_size
        state.capacity_blocks = num_gpu_blocks
        self.blocks.set_replica_capacity_blocks(replica_id, num_gpu_blocks)
        self._trim_map(state)

    def reset(self, replica_id: str, *, empty: bool) -> None:
        """Drop the replica's exact entries.  `empty`: its cache is known to be empty now
        (cleared, restarted): exact at once.  Otherwise events were lost: approximate for
        ``relearn_s``."""
        state = self.replicas.get(replica_id)
        if state is None:
            return
        self.blocks.remove_replica(replica_id)
        self.blocks.set_replica_capacity_blocks(replica_id, state.capacity_blocks)
        state.vllm_to_ours.clear()
        state.resets += 1
        state.known = empty
        state.relearn_until = 0.0 if empty else self.clock() + self.relearn_s

    # -- events ---------------------------------------------------------------------------
    def apply(self, replica_id: str, events: Iterable[Event]) -> None:
        state = self.replicas.get(replica_id)
        if state is None:
            return
        for event in events:
            if isinstance(event, BlockStored):
                if event.medium in (None, GPU) and event.group_idx == 0:
                    self._stored(replica_id, state, event)
            elif isinstance(event, BlockRemoved):
                if event.medium in (None, GPU) and event.group_idx == 0:
                    self._removed(replica_id, state, event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                if event.medium in (None, GPU):
                    self.reset(replica_id, empty=True)
            elif isinstance(event, Unknown):
                state.unknown_events += 1
        state.known = True  # (the mode stays approximate until a relearn window has passed)

    def _stored(self, replica_id: str, state: ReplicaKV, event: BlockStored) -> None:
        size = event.block_size
        hashes = event.block_hashes
        n = len(hashes)
        if size < 1 or len(event.token_ids) != n * size:
            state.skipped_blocks += n
            return
        if state.block_size != size:
            if state.block_size is not None:  # a new block size: nothing old can match
                self.reset(replica_id, empty=False)
            state.block_size = size
        extra = event.extra_keys or ()
        if event.parent_block_hash is None:
            salt, ok = _first_block_salt(extra[0] if extra else None, event.lora_name)
            if not ok:
                state.skipped_blocks += n
                return
            prev = chain_seed(state.model, kind=_TOKEN_KIND, block_size=size, lora=event.lora_name,
                              cache_salt=salt)
        else:
            parent = state.vllm_to_ours.get(event.parent_block_hash)
            if parent is None:
                state.skipped_blocks += n
                return
            prev = parent
        first_plain = 0 if event.parent_block_hash is not None else 1
        usable = n
        for i in range(first_plain, min(n, len(extra))):
            if not _plain_extra(extra[i], event.lora_name):
                usable = i  # multimodal or other keys a text request never has
                break
        if not usable:
            state.skipped_blocks += n
            return
        try:
            packed = array("I", event.token_ids[:usable * size])
        except (OverflowError, TypeError):
            state.skipped_blocks += n
            return
        ours = chain_tokens(packed, size, prev)
        mapping = state.vllm_to_ours
        for vllm_hash, own in zip(hashes, ours):
            mapping[vllm_hash] = own
            mapping.move_to_end(vllm_hash)  # re-stored: the newest entry
        self.blocks.record(ours, replica_id)
        state.stored_blocks += usable
        state.skipped_blocks += n - usable
        self._trim_map(state)

    def _removed(self, replica_id: str, state: ReplicaKV, hashes: Sequence[Any]) -> None:
        mapping = state.vllm_to_ours
        ours = [own for h in hashes if (own := mapping.pop(h, None)) is not None]
        state.removed_blocks += self.blocks.discard(replica_id, ours)
        self.pending.discard(replica_id, ours)  # a prediction the replica has just denied

    def _trim_map(self, state: ReplicaKV) -> None:
        cap = 2 * state.capacity_blocks if state.capacity_blocks else DEFAULT_MAP_CAP
        mapping = state.vllm_to_ours
        while len(mapping) > cap:
            mapping.popitem(last=False)

    # -- queries --------------------------------------------------------------------------
    def mode(self, replica_id: str) -> str:
        state = self.replicas.get(replica_id)
        return state.mode(self.clock()) if state is not None else APPROXIMATE

    def request_hashes(self, model: str, tokens: Sequence[int], block_size: int,
                       cache_salt: str | None, lora: str | None = None) -> tuple[int, ...]:
        """Our chained hashes of a request's full blocks, as the events' blocks get them."""
        usable = min(len(tokens) - len(tokens) % block_size, self.max_blocks_per_request * block_size)
        if isinstance(tokens, array) and tokens.typecode == "I":
            packed = tokens[:usable]  # a copy in C: the tokenizer packed them already
        else:
            try:
                packed = array("I", tokens[:usable])
            except (OverflowError, TypeError):
                return ()
        seed = chain_seed(model, kind=_TOKEN_KIND, block_size=block_size, lora=lora, cache_salt=cache_salt)
        return chain_tokens(packed, block_size, seed)

    def match(self, model: str, tokens: Sequence[int], cache_salt: str | None,
              replica_ids: Sequence[str], lora: str | None = None,
              hashes_by_size: dict[int, tuple[int, ...]] | None = None) -> dict[str, int | None]:
        """Per replica, the tokens of the request's prefix it holds or is about to hold
        (exact + pending), or None where the replica is not in exact mode.

        `hashes_by_size` (optional) is filled with the request's hashes per block size, for
        `predict`."""
        held, _, _ = self.rows(model, tokens, cache_salt, replica_ids, hashes_by_size, lora)
        return dict(zip(replica_ids, held))

    def rows(self, model: str, tokens: Sequence[int], cache_salt: str | None, replica_ids: Sequence[str],
             hashes_by_size: dict[int, tuple[int, ...]] | None = None, lora: str | None = None,
             ) -> tuple[list[int | None], list[int], list[float]]:
        """`match` as columns for the scheduler, reading each replica's state once: per row
        the matched tokens (None: not in exact mode), the block size (1 if unknown) and the
        free tokens."""
        now = self.clock()
        replicas = self.replicas
        held_blocks = self.blocks.replica_blocks
        n = len(replica_ids)
        inf = float("inf")
        matched: list[int | None] = [None] * n
        sizes = [1] * n
        free = [inf] * n
        groups: dict[int, list[int]] = {}  # block size -> the rows in exact mode with it
        for i, rid in enumerate(replica_ids):
            state = replicas.get(rid)
            if state is None:
                continue
            if state.mode(now) == EXACT:
                groups.setdefault(state.block_size or 1, []).append(i)
            size = state.block_size
            if not size:
                continue
            sizes[i] = size
            cap = state.capacity_blocks  # from its num_gpu_blocks (None: unknown, so unbounded)
            if cap:
                free[i] = float((cap - held_blocks(rid)) * size)
        for size, rows in groups.items():
            ids = tuple(replica_ids[i] for i in rows)
            for i, tokens_held in zip(rows, self._held_tokens(model, tokens, size, cache_salt, lora, ids,
                                                              hashes_by_size)):
                matched[i] = tokens_held
        return matched, sizes, free

    def _held_tokens(self, model: str, tokens: Sequence[int], size: int, cache_salt: str | None,
                     lora: str | None, ids: tuple[str, ...],
                     hashes_by_size: dict[int, tuple[int, ...]] | None) -> list[int]:
        """Per replica of `ids` (in exact mode, block size `size`), the tokens of the
        request's prefix it holds or is about to hold (pending)."""
        hashes = self.request_hashes(model, tokens, size, cache_salt, lora)
        # vLLM recomputes at least the prompt's last token: a hit covers at most this many.
        most = (len(tokens) - 1) // size if tokens else 0
        if hashes_by_size is not None:
            hashes_by_size[size] = hashes
        held = self.blocks.match(hashes, ids)
        soon = self.pending.match(hashes, ids)
        out = []
        for rid in ids:
            blocks = held[rid]
            if soon is not None and soon[rid] > blocks:
                blocks = soon[rid]
            out.append((blocks if blocks < most else most) * size)
        return out

    def block_size_of(self, replica_id: str) -> int:
        """The block size of a replica in exact mode (1 if unknown, never 0)."""
        state = self.replicas.get(replica_id)
        return state.block_size or 1 if state is not None else 1

    def any_exact(self, replica_ids: Iterable[str]) -> bool:
        """Is any of these replicas in exact mode (worth tokenizing a request for)?"""
        now = self.clock()
        return any(self._exact_state(rid, now) is not None for rid in replica_ids)

    def _exact_state(self, replica_id: str, now: float) -> ReplicaKV | None:
        """The replica's state if a request can be matched against it now (exact mode,
        block size known), else None."""
        state = self.replicas.get(replica_id)
        if state is None or state.mode(now) != EXACT:
            return None
        return state

    # -- predict-on-route -------------------------------------------------------------------
    def predict(self, replica_id: str, hashes: Sequence[int]) -> Recording | None:
        """Count `hashes` as pending on `replica_id` until `settle` (or `retract`)."""
        return self.pending.record(replica_id, hashes) if hashes else None

    def settle(self, recording: Recording) -> None:
        """The request ended: its blocks stop being pending (pending.py says when)."""
        rid = recording.replica_id
        confirmed = self.blocks.match(recording.hashes, (rid,)).get(rid, 0) if self.pending.confirm_s > 0 else 0
        self.pending.settle(recording, confirmed)

    def retract(self, recording: Recording) -> None:
        """The request failed before the replica started it."""
        self.pending.retract(recording)

    def stats(self) -> dict[str, Any]:
        return {"records": self.blocks.records, "pending_records": self.pending.records,
                "capacity_blocks": self.blocks.capacity_blocks, "replicas": len(self.replicas)}

    def replica_stats(self, replica_id: str) -> dict[str, Any] | None:
        state = self.replicas.get(replica_id)
        if state is None:
            return None
        return {"mode": state.mode(self.clock()), "block_size": state.block_size,
                "blocks": self.blocks.replica_blocks(replica_id), "capacity_blocks": state.capacity_blocks,
                "resets": state.resets, "stored_blocks": state.stored_blocks,
                "removed_blocks": state.removed_blocks, "skipped_blocks": state.skipped_blocks,
                "unknown_events": state.unknown_events}


def _strip_lora(keys: Any, lora: str | None) -> list[Any] | None:
    if keys is None:
        return []
    if not isinstance(keys, (list, tuple)):
        return None
    rest = list(keys)
    if lora is not None and rest and rest[0] == lora:
        rest = rest[1:]
    return rest


def _first_block_salt(keys: Any, lora: str | None) -> tuple[str | None, bool]:
    """(cache_salt, usable) from the extra keys of a chain's first block."""
    rest = _strip_lora(keys, lora)
    if rest is None or len(rest) > 1:
        return None, False
    if not rest:
        return None, True
    return (rest[0], True) if isinstance(rest[0], str) else (None, False)


def _plain_extra(keys: Any, lora: str | None) -> bool:
    """Extra keys of a later block hold nothing but the adapter (text-only)."""
    rest = _strip_lora(keys, lora)
    return rest is not None and not rest
