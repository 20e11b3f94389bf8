"""vLLM's KV-cache events, decoded: what a replica stored, evicted or cleared.

A replica started with ``--kv-events-config`` publishes one ZMQ multipart message per engine
step that changed its prefix cache: ``[topic, sequence (8 bytes big-endian), payload]``,
where the payload is msgpack of a KVEventBatch ``[ts, [event, ...], data_parallel_rank]``
(../shared/reference/vllm-cpu.md, kv_events.jsonl).  vLLM 0.32 encodes each event as a map
tagged ``type``; older releases sent tagged arrays ``["BlockStored", block_hashes, ...]`` in
field order.  Both decode here.

Decoding is forgiving on purpose, because vLLM adds fields between releases: unknown fields
are ignored, unknown event kinds become `Unknown` (counted, not fatal), and a payload that is
not a batch at all raises `BadPayload` (the subscriber counts it and goes on).  Block hashes
stay as sent (an int, or bytes for the wider hash modes): they are only ever compared with
other hashes of the same replica.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

GPU = "GPU"  # the medium of blocks in the replica's own prefix cache


class BadPayload(ValueError):
    """A message whose payload is not a KV-event batch."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Full blocks the replica just cached: ``token_ids`` holds all of them, in order."""

    block_hashes: tuple[Any, ...]
    parent_block_hash: Any  # None: the first block starts a chain (no prefix)
    token_ids: Sequence[int]
    block_size: int
    lora_name: str | None = None
    extra_keys: Sequence[Any] | None = None  # per block: vLLM's extra hash keys, or None
    medium: str | None = None
    group_idx: int = 0


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[Any, ...]
    medium: str | None = None
    group_idx: int = 0


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    medium: str | None = None


@dataclass(frozen=True, slots=True)
class Unknown:
    kind: str


Event = BlockStored | BlockRemoved | AllBlocksCleared | Unknown


@dataclass(frozen=True, slots=True)
class Batch:
    ts: float
    events: tuple[Event, ...]
    dp_rank: int = 0


# Field order of the tagged-array form (msgspec ``array_like`` structs of older vLLM).
_ARRAY_FIELDS = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                    "medium", "lora_name", "extra_keys", "group_idx"),
    "BlockRemoved": ("block_hashes", "medium", "group_idx"),
    "AllBlocksCleared": ("medium",),
}


def _as_map(raw: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(raw, dict):
        kind = raw.get("type")
        return (kind if isinstance(kind, str) else "?"), raw
    if isinstance(raw, (list, tuple)) and raw and isinstance(raw[0], str):
        kind = raw[0]
        names = _ARRAY_FIELDS.get(kind, ())
        return kind, dict(zip(names, raw[1:]))
    return "?", {}


def _hashes(value: Any) -> tuple[Any, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(h for h in value if isinstance(h, (int, bytes)))
    return ()


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _medium(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def decode_event(raw: Any) -> Event:
    kind, fields = _as_map(raw)
    if kind == "BlockStored":
        tokens = fields.get("token_ids")
        extra = fields.get("extra_keys")
        lora = fields.get("lora_name")
        parent = fields.get("parent_block_hash")
        return BlockStored(
            block_hashes=_hashes(fields.get("block_hashes")),
            parent_block_hash=parent if isinstance(parent, (int, bytes)) else None,
            token_ids=tokens if isinstance(tokens, list) else [],
            block_size=_int(fields.get("block_size"), 0),
            lora_name=lora if isinstance(lora, str) else None,
            extra_keys=extra if isinstance(extra, list) else None,
            medium=_medium(fields.get("medium")),
            group_idx=_int(fields.get("group_idx"), 0),
        )
    if kind == "BlockRemoved":
        return BlockRemoved(block_hashes=_hashes(fields.get("block_hashes")),
                            medium=_medium(fields.get("medium")),
                            group_idx=_int(fields.get("group_idx"), 0))
    if kind == "AllBlocksCleared":
        return AllBlocksCleared(medium=_medium(fields.get("medium")))
    return Unknown(kind)


def decode_batch(payload: bytes) -> Batch:
    """A message's payload as a Batch; `BadPayload` if it is not one."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise BadPayload(f"not msgpack: {type(exc).__name__}") from None
    if isinstance(raw, dict):  # a map-shaped batch, should a release send one
        raw = [raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank", 0)]
    if not isinstance(raw, (list, tuple)) or len(raw) < 2 or not isinstance(raw[1], (list, tuple)):
        raise BadPayload("not a [ts, events, dp_rank] batch")
    ts = raw[0] if isinstance(raw[0], (int, float)) and not isinstance(raw[0], bool) else 0.0
    dp_rank = _int(raw[2], 0) if len(raw) > 2 else 0
    return Batch(ts=float(ts), events=tuple(decode_event(e) for e in raw[1]), dp_rank=dp_rank)


def decode_sequence(frame: bytes) -> int | None:
    """The 8-byte big-endian sequence number of a message (signed: replay's end is -1)."""
    if len(frame) != 8:
        return None
    return int.from_bytes(frame, "big", signed=True)
