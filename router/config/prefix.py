"""``prefix:``: how routing text is cut into hashed blocks, and the bounds of both prefix indexes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from router.config.values import integer, number
from yamlcheck import Node


@dataclass(frozen=True, slots=True)
class PrefixConfig:
    block_chars: int = 64  # bytes of routing text per hashed block
    block_tokens: int = 16  # token ids per hashed block when the client sent tokens
    capacity_blocks: int | None = None  # global prefix-index bound (None: the index's default)
    max_blocks_per_request: int = 8192  # blocks hashed per request (one huge prompt cannot flush the index)
    exact: ExactConfig = field(default_factory=lambda: ExactConfig())  # the exact prefix index from vLLM's KV events


@dataclass(frozen=True, slots=True)
class ExactConfig:
    """prefix.exact: the index fed by the replicas' KV events (router/prefix/exact.py)."""

    capacity_blocks: int | None = None  # global bound (None: the index's default)
    relearn_s: float = 10.0  # after lost events: approximate routing for this long
    confirm_s: float = 0.0  # a finished request's blocks its replica has not reported stored stay pending this long
    replay_timeout: float = 2.0  # wait for each replayed batch


_PREFIX_KEYS = ("block_chars", "block_tokens", "capacity_blocks", "max_blocks_per_request", "exact")


_EXACT_KEYS = ("capacity_blocks", "relearn_s", "confirm_s", "replay_timeout")


def parse_prefix(node: Node) -> PrefixConfig:
    node.mapping(_PREFIX_KEYS)
    cap = node.get("capacity_blocks", None)
    exact = node.get("exact", {}).mapping(_EXACT_KEYS)
    exact_cap = exact.get("capacity_blocks", None)
    d = ExactConfig()
    return PrefixConfig(
        block_chars=integer(node, "block_chars", 64, minimum=1, maximum=1 << 20),
        block_tokens=integer(node, "block_tokens", 16, minimum=1, maximum=1 << 16),
        capacity_blocks=None if cap.value is None else cap.integer(minimum=1),
        max_blocks_per_request=integer(node, "max_blocks_per_request", 8192, minimum=1),
        exact=ExactConfig(
            capacity_blocks=None if exact_cap.value is None else exact_cap.integer(minimum=1),
            relearn_s=number(exact, "relearn_s", d.relearn_s, exclusive=False),
            confirm_s=number(exact, "confirm_s", d.confirm_s, exclusive=False),
            replay_timeout=number(exact, "replay_timeout", d.replay_timeout),
        ),
    )
