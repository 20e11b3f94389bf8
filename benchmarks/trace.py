"""Public production traces as workloads: Mooncake's FAST'25 trace format, replayed open-loop.

A Mooncake trace (kvcache-ai/Mooncake, ``FAST25-release/traces/``, Apache-2.0; the
conversation trace ships in benchmarks/traces/mooncake/) has one JSON line per request::

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, ...]}

``timestamp`` is the arrival in ms, ``hash_ids`` the hashes of the prompt's 512-token blocks:
two requests that share their first k hash ids share that much prefix.  Raw text is not in
the trace, so it is synthesized, deterministically per hash id: block h is always the same
text (pseudo-words from a generator seeded by h), a prompt is its blocks' texts in order,
and the last block is cut to the request's length.  Equal hash-id prefixes are therefore
byte-identical text prefixes, and token prefixes for the simulator's tokenizer (4
characters a token, blocks a whole number of tokens long).

Knobs (a scenario's ``workload: {kind: trace, ...}``):
  ``start_s``, ``duration_s``   the window of the trace replayed (trace seconds)
  ``time_scale``                arrivals this many times faster than in the trace (load)
  ``token_scale``               prompt lengths (and the 512-token block) scaled by this:
                                a 12k-token average prompt is large for simulated caches
  ``output_scale``              output lengths scaled by this
  ``max_requests``              at most this many requests of the window (0: all)
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MOONCAKE_BLOCK_TOKENS = 512
_SYLLABLES = ("ka", "lo", "mi", "ren", "tas", "vo", "qui", "bel", "dor", "fen", "gra", "hul",
              "jin", "pra", "sto", "tur", "wex", "yal", "zon", "mar", "nel", "pos", "rid", "sen")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace, as replayed: when (seconds from the window's start), what."""

    at_s: float
    prompt: str
    output_tokens: int
    hash_ids: tuple[int, ...]


def read_mooncake(path: Path) -> Iterator[dict[str, object]]:
    """The trace's lines, in file order (arrival order)."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            for key in ("timestamp", "input_length", "output_length", "hash_ids"):
                if key not in row:
                    raise ValueError(f"{path}:{number}: no '{key}'")
            yield row


class BlockTexts:
    """The text of each hash id's block: the same for every request that names it."""

    def __init__(self, block_tokens: int, chars_per_token: int = 4, bound: int = 65536) -> None:
        self.block_tokens = block_tokens
        self.chars = block_tokens * chars_per_token
        self._cache: dict[int, str] = {}
        self._bound = bound

    def text(self, hash_id: int) -> str:
        cached = self._cache.get(hash_id)
        if cached is not None:
            return cached
        rng = random.Random(f"mooncake-block:{hash_id}")
        pieces: list[str] = []
        size = 0
        while size < self.chars:
            word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) + " "
            pieces.append(word)
            size += len(word)
        text = "".join(pieces)[:self.chars]
        if len(self._cache) >= self._bound:  # bounded: a long trace names many blocks
            self._cache.pop(next(iter(self._cache)))
        self._cache[hash_id] = text
        return text


def window(rows: Iterator[dict[str, object]], *, start_s: float, duration_s: float, time_scale: float,
           token_scale: float, output_scale: float, max_requests: int = 0) -> list[TraceRequest]:
    """The requests of [start_s, start_s + duration_s) of the trace, with synthesized prompts,
    arrivals compressed by `time_scale`, lengths scaled by `token_scale` / `output_scale`."""
    block_tokens = max(1, round(MOONCAKE_BLOCK_TOKENS * token_scale))
    texts = BlockTexts(block_tokens)
    out: list[TraceRequest] = []
    begin_ms, end_ms = start_s * 1000, (start_s + duration_s) * 1000
    for row in rows:
        ts = float(row["timestamp"])  # type: ignore[arg-type]
        if ts < begin_ms:
            continue
        if ts >= end_ms or (max_requests and len(out) >= max_requests):
            break
        hash_ids = tuple(int(h) for h in row["hash_ids"])  # type: ignore[attr-defined]
        tokens = max(1, round(int(row["input_length"]) * token_scale))  # type: ignore[call-overload]
        chars = tokens * 4
        prompt = "".join(texts.text(h) for h in hash_ids)[:chars]
        out.append(TraceRequest(at_s=(ts - begin_ms) / 1000 / time_scale, prompt=prompt,
                                output_tokens=max(1, round(int(row["output_length"]) * output_scale)),  # type: ignore[call-overload]
                                hash_ids=hash_ids))
    return out
