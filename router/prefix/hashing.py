"""Chained block hashes of a routing input: equal hashes mean equal prefixes.

The routing input of a request (canonical routing text, see rendering.py, or the token
ids the client sent) is cut into fixed-size blocks and hashed as a chain:

    h_0 = seed(kind, model, lora, cache_salt, block size)
    h_i = xxh3_64(block_i, seed=h_{i-1})          for i = 1..n

The previous hash enters xxh3 as its 64-bit seed, which plays the role of concatenating
``h_{i-1} || block_i`` without building a new bytes object per block (about 1.5x faster
on the 2-core AMD EPYC development machine; the chaining property is the same).  So h_i
depends on every byte of blocks 1..i: two inputs share their first k hashes exactly when
(barring a 64-bit xxh3 collision) they share their first k blocks.

Decisions, and why:

* **Blocks.**  Text is cut into blocks of ``block_chars`` bytes of its UTF-8 encoding
  (default 64, i.e. 64 characters of ASCII text, about 16 tokens at ~4 characters a
  token).  Cutting the UTF-8 bytes rather than characters costs one ``encode`` per
  request instead of one per block, and keeps the prefix property: if text A is a prefix
  of text B, A's UTF-8 bytes are a prefix of B's.  Token ids are cut into blocks of
  ``block_tokens`` ids (default 16, vLLM's GPU block size), packed as 4-byte unsigned
  integers (8-byte when an id does not fit).
* **Only full blocks are hashed.**  A partial tail block would not be a block of the
  prompt's extension (the next turn fills it with more text), so hashing it would break
  "a prompt's hashes are a prefix of its extension's hashes".  vLLM itself caches only
  full blocks.  The cost is at most one block (< 64 characters) of unmatched tail.
* **Seed.**  The seed is xxh3_64 of a length-prefixed encoding of (format version, kind
  of input, block size, model, LoRA adapter, cache_salt).  Length prefixes make the
  encoding injective, so two different (model, lora, salt, ...) tuples always hash
  different bytes: chains of different models, adapters or salts are separate by
  construction (a match across them would need an xxh3 collision, ~2^-64), and text
  chains never meet token chains.  Because a replica serves one model, the prefix
  index only ever records a replica under its own model's chains as well.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from functools import lru_cache
from struct import Struct

import xxhash

DEFAULT_BLOCK_CHARS = 64  # bytes of UTF-8 routing text per block (= characters for ASCII)
DEFAULT_BLOCK_TOKENS = 16  # token ids per block when the client sent token ids
HASH_FORMAT_VERSION = 1  # bump when the block or seed encoding changes

_xxh3 = xxhash.xxh3_64_intdigest


def _field(value: str | int | None) -> bytes:
    """One length-prefixed field of the seed encoding (None differs from "")."""
    if value is None:
        return b"\xff"
    raw = str(value).encode("utf-8")
    return len(raw).to_bytes(4, "little") + raw


@lru_cache(maxsize=4096)
def chain_seed(
    model: str,
    *,
    kind: str = "text",
    block_size: int = DEFAULT_BLOCK_CHARS,
    lora: str | None = None,
    cache_salt: str | None = None,
) -> int:
    """h_0 of a chain: a 64-bit seed unique to (kind, block size, model, lora, cache_salt)."""
    encoded = b"".join(
        _field(part) for part in (HASH_FORMAT_VERSION, kind, block_size, model, lora, cache_salt)
    )
    return _xxh3(encoded)


_CHUNK_BLOCKS = 32  # blocks cut per struct call: one C call makes 32 bytes objects


@lru_cache(maxsize=64)
def _blocks_of(block_bytes: int, count: int) -> Struct:
    return Struct(f"{block_bytes}s" * count)


def _chain(data: bytes, block_bytes: int, seed: int) -> tuple[int, ...]:
    """Chained hashes of the full `block_bytes`-sized blocks of `data`."""
    n_blocks = len(data) // block_bytes
    if not n_blocks:
        return ()
    out: list[int] = []
    append = out.append
    h = seed
    view = memoryview(data)
    # struct cuts the blocks in C, 32 per call (a tuple of 32 bytes objects): 25 us for 32k
    # characters instead of 33 us one block per struct call, 53 us slicing in Python
    # (2-core AMD EPYC, CPU time per call).
    chunk = _CHUNK_BLOCKS * block_bytes
    whole = n_blocks // _CHUNK_BLOCKS * chunk
    if whole:
        for group in _blocks_of(block_bytes, _CHUNK_BLOCKS).iter_unpack(view[:whole]):
            for block in group:
                h = _xxh3(block, h)
                append(h)
    rest = n_blocks % _CHUNK_BLOCKS
    if rest:
        for block in _blocks_of(block_bytes, rest).unpack_from(view, whole):
            h = _xxh3(block, h)
            append(h)
    return tuple(out)


def chain_tokens(packed: array[int], block_tokens: int, seed: int) -> tuple[int, ...]:
    """Chained hashes of the full blocks of already packed ("I") token ids from `seed`:
    a chain's continuation (the exact index extends a parent's hash this way)."""
    return _chain(packed.tobytes(), block_tokens * packed.itemsize, seed)


def hash_text(
    text: str,
    model: str,
    *,
    lora: str | None = None,
    cache_salt: str | None = None,
    block_chars: int = DEFAULT_BLOCK_CHARS,
) -> tuple[int, ...]:
    """Chained hashes of the full `block_chars`-byte blocks of `text`'s UTF-8 encoding."""
    if block_chars < 1:
        raise ValueError("block_chars must be >= 1")
    seed = chain_seed(model, kind="text", block_size=block_chars, lora=lora, cache_salt=cache_salt)
    return _chain(text.encode("utf-8", "surrogatepass"), block_chars, seed)


def hash_tokens(
    tokens: Sequence[int],
    model: str,
    *,
    lora: str | None = None,
    cache_salt: str | None = None,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
) -> tuple[int, ...]:
    """Chained hashes of the full `block_tokens`-id blocks of `tokens`."""
    if block_tokens < 1:
        raise ValueError("block_tokens must be >= 1")
    try:
        packed, kind = array("I", tokens), "tokens-u32"
    except OverflowError:  # an id >= 2**32 or negative: wider packing, separate chain
        try:
            packed, kind = array("q", tokens), "tokens-i64"
        except OverflowError:  # an id outside int64 (a client's nonsense): wrap it to 64 bits
            packed, kind = array("Q", (t & 0xFFFFFFFFFFFFFFFF for t in tokens)), "tokens-u64"
    seed = chain_seed(model, kind=kind, block_size=block_tokens, lora=lora, cache_salt=cache_salt)
    return _chain(packed.tobytes(), block_tokens * packed.itemsize, seed)


def prefix_hashes(
    model: str,
    *,
    text: str | None = None,
    tokens: Sequence[int] | None = None,
    lora: str | None = None,
    cache_salt: str | None = None,
    block_chars: int = DEFAULT_BLOCK_CHARS,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
) -> tuple[int, ...]:
    """The block hashes of a request: token ids when given, else routing text, else ()."""
    if tokens is not None:
        return hash_tokens(tokens, model, lora=lora, cache_salt=cache_salt, block_tokens=block_tokens)
    if text:
        return hash_text(text, model, lora=lora, cache_salt=cache_salt, block_chars=block_chars)
    return ()
