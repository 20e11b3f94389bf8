"""The bounded, approximate prefix index: which replica was sent which prompt prefix.

Without KV events (or for a request it cannot tokenize) the router cannot see the replicas'
KV caches (exact.py is the index that can), so it remembers what it sent where: at
dispatch, the request's chained block hashes (hashing.py) are recorded for the chosen
replica.  A later request whose hashes start
with the same k hashes was sent a prompt sharing its first k blocks with one that replica
already prefilled, so (unless the replica evicted them since) its prefix cache holds them.

Structure: a hash-trie without child maps.
    A chained hash already names its whole prefix (h_i depends on blocks 1..i), so a trie
    node needs no parent pointer or child map: the trie is one flat mapping
    ``chained hash -> bitmask of replica slots that were sent this prefix``.  The path of a
    request is simply its hash list; a node's parent is the previous hash of the path.
Longest-prefix match for every candidate replica in one walk:
    walk the request's hashes from the root, keep a bitmask of the candidates still
    matching, stop at the first hash that is absent or held by none of them.  A replica's
    match length is the depth where its bit dropped out.  Cost: O(matched blocks) dict
    lookups and int ANDs, independent of how many prompts are stored and of how many
    replicas are asked (the bits are decoded only when the mask changes).
"When": a logical clock.
    Every ``record`` takes the next tick; each replica keeps its blocks in an LRU order
    (an OrderedDict ``hash -> tick of the last record``), and the global mapping is kept in
    LRU order too.  Ticks identify a record so that ``forget`` undoes exactly it.
Leaves first, so the trie stays consistent:
    ``record`` touches the path from its deepest block up to the root, so in every LRU
    order an ancestor is always more recent than its descendants.  Evicting the oldest
    entry therefore always removes a leaf, never a prefix whose extensions stay behind:
    every replica's set of blocks stays prefix-closed, and so does the trie.

Hard bounds:
* ``capacity_blocks`` (global): the most (block, replica) records kept; a block held by
  three replicas counts three, which makes the bound a memory bound.  Over it, the
  globally least recently recorded node goes, with all its records.  The default keeps
  the index under ``DEFAULT_MEMORY_BUDGET_BYTES`` (256 MiB) at the measured worst-case
  cost per record (see ``BYTES_PER_NODE`` / ``BYTES_PER_RECORD``).
* per replica (``set_replica_capacity_tokens``): a replica with a KV cache of T tokens
  cannot hold more than T / tokens_per_block blocks, so the index drops that replica's
  least recently sent blocks beyond that, forgetting what the replica itself must have
  evicted (it also caches outputs and other clients' prompts, so this still over-trusts a
  little; the replica's own hit counters are the ground truth).
* ``remove_replica``: a replica that leaves the fleet leaves the index.

Record at dispatch (so a burst of same-prefix requests sees each other), and ``forget``
the returned Recording if the request failed before the replica started it.

Memory (measured with tracemalloc by tests/unit/test_prefix_index.py and
benchmarks/routing_micro.py, CPython 3.11, 64-bit): see BYTES_PER_NODE and
BYTES_PER_RECORD below; ``memory_bytes()`` is the estimate they give.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from router.prefix.hashing import DEFAULT_BLOCK_TOKENS

# Measured with tracemalloc (CPython 3.11, x86-64; re-checked by tests/unit/
# test_prefix_index.py), steady state under a flood of distinct prompts, including the
# transient peak of dict resizes and dict fill-factor slack: a node with a single record
# costs at most ~475 bytes (hash int, global OrderedDict entry, mask int, the replica's
# OrderedDict entry), ~300 bytes per record when two replicas share each node, ~230 with
# four.  These constants bound all of those: memory <= nodes*320 + records*160.
BYTES_PER_NODE = 320
BYTES_PER_RECORD = 160
DEFAULT_MEMORY_BUDGET_BYTES = 256 * 1024 * 1024
DEFAULT_CAPACITY_BLOCKS = DEFAULT_MEMORY_BUDGET_BYTES // (BYTES_PER_NODE + BYTES_PER_RECORD)
_MAX_WANTED_CACHE = 256  # distinct candidate-id tuples whose slot masks are cached


@dataclass(frozen=True, slots=True)
class Recording:
    """Handle of one ``record`` call, for ``forget``."""

    replica_id: str
    hashes: tuple[int, ...]
    start: int  # blocks the replica already had before this record
    tick: int


class PrefixIndex:
    """Bounded hash-trie of chained block hashes, per replica; see the module docstring."""

    def __init__(
        self,
        capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
        *,
        tokens_per_block: int = DEFAULT_BLOCK_TOKENS,
    ) -> None:
        if capacity_blocks < 1:
            raise ValueError("capacity_blocks must be >= 1")
        if tokens_per_block < 1:
            raise ValueError("tokens_per_block must be >= 1")
        self.capacity_blocks = capacity_blocks
        self.tokens_per_block = tokens_per_block
        self._nodes: OrderedDict[int, int] = OrderedDict()  # hash -> replica bitmask, LRU order
        self._held: dict[str, OrderedDict[int, int]] = {}  # replica -> hash -> tick, LRU order
        self._slot: dict[str, int] = {}  # replica id -> bit position
        self._id_of_slot: dict[int, str] = {}
        self._free_slots: list[int] = []  # heap of released bit positions
        self._caps: dict[str, int] = {}  # replica id -> capacity in blocks
        self._records = 0  # sum of len(held) over replicas
        # replica-id tuple -> (slot bitmask, ids without a slot); cleared when slots change
        self._wanted_cache: dict[tuple[str, ...], tuple[int, tuple[str, ...]]] = {}
        self._tick = 0
        self.evicted_global = 0  # records dropped by the global bound
        self.evicted_replica = 0  # records dropped by per-replica capacities

    # -- queries ------------------------------------------------------------------
    def match(self, hashes: Sequence[int], replica_ids: Iterable[str]) -> dict[str, int]:
        """Blocks of `hashes` each replica is known to hold as a prefix (0 if none)."""
        ids = replica_ids if isinstance(replica_ids, tuple) else tuple(replica_ids)
        want, unknown = self._wanted(ids)
        if not want or not hashes:
            return dict.fromkeys(ids, 0)
        get = self._nodes.get
        n = len(hashes)
        phases: list[tuple[int, int]] = []  # (replicas whose match ends here, depth)
        mask = want
        depth = 0  # every replica in `mask` holds hashes[:depth]
        while mask and depth < n:
            # Prefix closure makes "holds all of mask" monotone along the path (a
            # replica holding a block holds its ancestors), so the next depth where the
            # mask shrinks is found by galloping then bisecting: O(log run) lookups
            # per distinct mask instead of one lookup per block.
            if get(hashes[depth], 0) & mask == mask:
                lo, step = depth, 1  # hashes[lo] holds all of mask
                hi = n
                while lo + step < n:
                    if get(hashes[lo + step], 0) & mask == mask:
                        lo += step
                        step <<= 1
                    else:
                        hi = lo + step
                        break
                while hi - lo > 1:  # invariant: hashes[lo] holds all, hashes[hi] not (or end)
                    mid = (lo + hi) >> 1
                    if get(hashes[mid], 0) & mask == mask:
                        lo = mid
                    else:
                        hi = mid
                depth = lo + 1
                if depth == n:
                    break
            still = mask & get(hashes[depth], 0)
            phases.append((mask ^ still, depth))
            mask = still
            depth += 1 if still else 0
        if mask:
            phases.append((mask, depth))
        # Most replicas usually end in the same phase (e.g. all hold the shared system
        # prompt): fill the result with that depth in C, then set the others bit by bit.
        bulk = max(phases, key=lambda phase: phase[0].bit_count())
        result = dict.fromkeys(ids, bulk[1])
        for rid in unknown:
            result[rid] = 0
        id_of_slot = self._id_of_slot
        for phase in phases:
            if phase is not bulk:
                dropped, at = phase
                while dropped:
                    low = dropped & -dropped
                    result[id_of_slot[low.bit_length() - 1]] = at
                    dropped ^= low
        return result

    def _wanted(self, ids: tuple[str, ...]) -> tuple[int, tuple[str, ...]]:
        """(bitmask of the slots of `ids`, the ids without a slot), cached per id tuple."""
        entry = self._wanted_cache.get(ids)
        if entry is None:
            want = 0
            unknown = []
            slot = self._slot
            for rid in ids:
                bit = slot.get(rid)
                if bit is None:
                    unknown.append(rid)
                else:
                    want |= 1 << bit
            if len(self._wanted_cache) >= _MAX_WANTED_CACHE:
                self._wanted_cache.clear()
            entry = self._wanted_cache[ids] = (want, tuple(unknown))
        return entry

    def __len__(self) -> int:
        """Number of trie nodes (distinct prefixes)."""
        return len(self._nodes)

    @property
    def records(self) -> int:
        """Number of (block, replica) records: what ``capacity_blocks`` bounds."""
        return self._records

    def replica_blocks(self, replica_id: str) -> int:
        held = self._held.get(replica_id)
        return len(held) if held else 0

    def replica_capacity_blocks(self, replica_id: str) -> int | None:
        return self._caps.get(replica_id)

    def free_blocks(self, replica_ids: Sequence[str], unit: int = 1) -> list[float]:
        """Per replica, blocks it can still be sent before the index must forget some of
        its prefixes (its capacity minus what it holds), times `unit` (tokens_per_block
        gives tokens); infinite without a capacity."""
        caps = self._caps
        held = self._held
        inf = float("inf")
        return [inf if (cap := caps.get(rid)) is None else (cap - len(held.get(rid, ()))) * unit
                for rid in replica_ids]

    def memory_bytes(self) -> int:
        """Estimated heap bytes of the index (measured per-node and per-record costs)."""
        return len(self._nodes) * BYTES_PER_NODE + self._records * BYTES_PER_RECORD

    def stats(self) -> dict[str, object]:
        return {
            "nodes": len(self._nodes),
            "records": self._records,
            "capacity_blocks": self.capacity_blocks,
            "memory_bytes": self.memory_bytes(),
            "evicted_global": self.evicted_global,
            "evicted_replica": self.evicted_replica,
            "replicas": {rid: len(held) for rid, held in self._held.items()},
        }

    # -- updates --------------------------------------------------------------------
    def record(self, hashes: Sequence[int], replica_id: str) -> Recording:
        """Remember that `replica_id` was sent the prefix `hashes` (call at dispatch)."""
        self._tick += 1
        tick = self._tick
        hashes = tuple(hashes)
        if not hashes:
            return Recording(replica_id, hashes, 0, tick)
        bit = 1 << self._slot_of(replica_id)
        held = self._held.setdefault(replica_id, OrderedDict())
        nodes = self._nodes
        start = len(hashes)  # first block the replica did not hold yet
        added = 0
        # Deepest first, so every ancestor ends up more recent than its descendants.
        for i in range(len(hashes) - 1, -1, -1):
            h = hashes[i]
            held_by = nodes.get(h)
            if held_by is None:
                nodes[h] = bit
            else:
                if not held_by & bit:
                    nodes[h] = held_by | bit
                nodes.move_to_end(h)
            if h in held:
                held.move_to_end(h)
            else:
                added += 1
                start = i
            held[h] = tick
        self._records += added
        cap = self._caps.get(replica_id)
        if cap is not None and len(held) > cap:
            self._shrink_replica(replica_id, cap)
        if self._records > self.capacity_blocks:
            self._shrink_global()
        return Recording(replica_id, hashes, start, tick)

    def forget(self, recording: Recording, *, added_only: bool = True) -> None:
        """Undo `recording` (the request failed before the replica started it).

        Only blocks this recording added and no later record touched are dropped, so a
        concurrent request that sent the same prefix keeps its record.  ``added_only=False``
        drops every block whose last record this was, those an earlier record added too:
        for an index of what is *in use* (exact.py's pending blocks), where a finished
        request's blocks must go even if an earlier, finished one sent them first (else a
        conversation's first prompt stayed pending forever under its later turns).
        """
        held = self._held.get(recording.replica_id)
        if not held:
            return
        bit = 1 << self._slot[recording.replica_id]
        hashes = recording.hashes
        for i in range(len(hashes) - 1, recording.start - 1 if added_only else -1, -1):
            h = hashes[i]
            if held.get(h) == recording.tick:
                del held[h]
                self._records -= 1
                self._unset(h, bit)

    def set_replica_capacity_tokens(self, replica_id: str, tokens: int | None) -> None:
        """Bound what the index believes `replica_id` holds by its KV capacity in tokens.

        None removes the bound.  The capacity in blocks is tokens // tokens_per_block
        (at least 1).  Applies at once: the replica's oldest blocks beyond it are dropped.
        """
        if tokens is None:
            self._caps.pop(replica_id, None)
            return
        cap = max(1, int(tokens) // self.tokens_per_block)
        self._caps[replica_id] = cap
        held = self._held.get(replica_id)
        if held is not None and len(held) > cap:
            self._shrink_replica(replica_id, cap)

    def set_replica_capacity_blocks(self, replica_id: str, blocks: int | None) -> None:
        """Bound what the index believes `replica_id` holds to `blocks` blocks (None: no
        bound); the exact index uses the replica's own ``num_gpu_blocks``."""
        if blocks is None:
            self._caps.pop(replica_id, None)
            return
        cap = self._caps[replica_id] = max(1, int(blocks))
        held = self._held.get(replica_id)
        if held is not None and len(held) > cap:
            self._shrink_replica(replica_id, cap)

    def discard(self, replica_id: str, hashes: Iterable[int]) -> int:
        """Drop `replica_id`'s records of `hashes` (the replica evicted those blocks);
        returns how many it held.  Unlike the LRU bounds this could remove an inner block of
        a chain, which ``match``'s galloping (it assumes prefix closure) might step over;
        vLLM frees a request's blocks tail first and evicts in that order, so its events
        remove leaves first and the closure holds in practice."""
        held = self._held.get(replica_id)
        if not held:
            return 0
        bit = 1 << self._slot[replica_id]
        dropped = 0
        for h in hashes:
            if held.pop(h, None) is not None:
                dropped += 1
                self._unset(h, bit)
        self._records -= dropped
        return dropped

    def remove_replica(self, replica_id: str) -> None:
        """Forget everything about `replica_id` (it left the fleet)."""
        self._caps.pop(replica_id, None)
        held = self._held.pop(replica_id, None)
        bit_pos = self._slot.pop(replica_id, None)
        if bit_pos is None:
            return
        if held:
            bit = 1 << bit_pos
            for h in held:
                self._unset(h, bit)
            self._records -= len(held)
        del self._id_of_slot[bit_pos]
        heapq.heappush(self._free_slots, bit_pos)
        self._wanted_cache.clear()

    # -- internals --------------------------------------------------------------------
    def _slot_of(self, replica_id: str) -> int:
        bit_pos = self._slot.get(replica_id)
        if bit_pos is None:
            bit_pos = heapq.heappop(self._free_slots) if self._free_slots else len(self._slot)
            self._slot[replica_id] = bit_pos
            self._id_of_slot[bit_pos] = replica_id
            self._wanted_cache.clear()
        return bit_pos

    def _unset(self, h: int, bit: int) -> None:
        held_by = self._nodes.get(h)
        if held_by is None:
            return
        held_by &= ~bit
        if held_by:
            self._nodes[h] = held_by
        else:
            del self._nodes[h]

    def _shrink_replica(self, replica_id: str, cap: int) -> None:
        held = self._held[replica_id]
        bit = 1 << self._slot[replica_id]
        while len(held) > cap:
            h, _ = held.popitem(last=False)
            self._records -= 1
            self.evicted_replica += 1
            self._unset(h, bit)

    def _shrink_global(self) -> None:
        nodes = self._nodes
        id_of_slot = self._id_of_slot
        while self._records > self.capacity_blocks and nodes:
            h, mask = nodes.popitem(last=False)
            while mask:
                low = mask & -mask
                mask ^= low
                del self._held[id_of_slot[low.bit_length() - 1]][h]
                self._records -= 1
                self.evicted_global += 1
