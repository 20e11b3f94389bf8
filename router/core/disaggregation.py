"""Prefill/decode disaggregation, the decisions: whether a request takes the prefill hop,
what the prefill hop sends, and what its answer hands the decode hop.

Pure functions over the request and the decode ranking, so the flow that carries the two
hops (router/transport/flows.py: `Disaggregated`) and any other data plane decide alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from router.config import DisaggregationConfig
    from router.core.requests import RouteRequest
    from router.core.scheduling import Decision
    from router.fleet.replicas import Replica

# vLLM's disaggregated protocol (NixlConnector-style connectors): the prefill request asks
# for a remote decode; its answer carries the params the decode replica needs to read the
# KV blocks.  Shared-storage connectors (ExampleConnector, LMCache) answer without params and
# the decode replica finds the KV by the prompt: the decode hop then goes without them.
PREFILL_TRANSFER_PARAMS: dict[str, Any] = {
    "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
    "remote_block_ids": None, "remote_host": None, "remote_port": None}
_PREFILL_DROPS = ("stream_options", "min_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "n")
MAX_TRANSFER_PARAMS_BYTES = 256 * 1024  # of the params a prefill answer may hand to a decode hop

# The decode pool's cost terms: its queue and KV room, and the adapter's slot (no prefill).
DECODE_TERMS: dict[str, float] = {"queue": 1.0, "kv_pressure": 1.0, "lora": 1.0}

# Why a request of a disaggregated model took the path it took (router_pd_requests_total).
DISAGGREGATED = "disaggregated"
SKIP_SHORT = "skipped_short_prompt"
SKIP_CACHED = "skipped_decode_holds_prefix"
SKIP_NO_PREFILL = "skipped_no_prefill_replica"


def prefill_body(data: dict[str, Any]) -> bytes:
    """The prefill hop's body: the client's request computing the prompt and one token."""
    body = {k: v for k, v in data.items() if k not in _PREFILL_DROPS}
    body.update(stream=False, max_tokens=1, kv_transfer_params=PREFILL_TRANSFER_PARAMS)
    if "max_completion_tokens" in data:
        body["max_completion_tokens"] = 1
    return orjson.dumps(body)


def transfer_params_of(answer: bytes) -> dict[str, Any] | None:
    """The kv_transfer_params of a prefill hop's JSON answer (None: none, or not a JSON object)."""
    if len(answer) > MAX_TRANSFER_PARAMS_BYTES + 64 * 1024:
        return None
    try:
        data = orjson.loads(answer)
    except orjson.JSONDecodeError:
        return None
    params = data.get("kv_transfer_params") if isinstance(data, dict) else None
    return params if isinstance(params, dict) and params else None


def prefill_path(route: RouteRequest, decode: Decision, prefill_pool: Sequence[Replica],
          settings: DisaggregationConfig) -> str:
    """Whether a request of a disaggregated model takes the prefill hop (DISAGGREGATED) or
    why it skips it: a short prompt, a decode replica that already holds enough of it, or no
    prefill replica left."""
    prompt = route.estimated_prompt_tokens
    if prompt < settings.min_prompt_tokens:
        return SKIP_SHORT
    held = decode.matched_tokens.get(decode.ranked[0].id, 0)
    if held and held >= settings.skip_cached_fraction * prompt:
        return SKIP_CACHED
    if not prefill_pool:
        return SKIP_NO_PREFILL
    return DISAGGREGATED
