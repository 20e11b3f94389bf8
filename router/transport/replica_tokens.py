"""Tokenizing a request by asking a replica: vLLM's own ``POST /tokenize`` (``tokenizer: replica``).

The alternative to a local tokenizer.json (tokenization/): the replica applies its own chat
template and tokenizer, so the ids are right by construction whatever the model, at the cost
of one loopback-or-LAN round trip before routing (what llm-d's precise scorer and
vllm-router's cache_aware do).  ``/tokenize`` takes a completion's ``prompt`` or a chat's
``messages`` (with ``tools``, ``add_generation_prompt``, ``continue_final_message``,
``chat_template_kwargs``, ``add_special_tokens``) and answers ``{"tokens": [...]}``
(../shared/reference/tokenize*.json).

* The replica asked is the request's candidate with the fewest requests in flight (a busy
  engine's API server answers late), with its ``api_key``; the wait is bounded by
  ``timeout`` and any failure (refused, slow, an error answer, a shape we do not know)
  returns None: the request is routed approximately.
* A bounded cache (``max_entries`` bodies, ``max_tokens`` ids in all, least recently used
  out) answers a body seen before (retries, identical prompts) without a round trip.  A new
  turn of a conversation is a new body and costs one round trip: vLLM's /tokenize has no
  incremental form, and gluing a cached prefix's ids to the new suffix's would not be what
  the replica computes (BPE merges across the seam).
"""

from __future__ import annotations

import asyncio
import logging
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import xxhash

if TYPE_CHECKING:
    from router.fleet.replicas import Replica

log = logging.getLogger("router.tokenize")

_CHAT = "/v1/chat/completions"
_COMPLETIONS = "/v1/completions"
_CHAT_FIELDS = ("messages", "tools", "add_generation_prompt", "continue_final_message",
                "chat_template_kwargs", "add_special_tokens", "documents", "chat_template")
DEFAULT_TIMEOUT = 0.25  # seconds: past this the request is routed approximately
DEFAULT_MAX_ENTRIES = 4096
DEFAULT_MAX_TOKENS = 4_000_000


class ReplicaTokenizer:
    """Token ids from a replica's /tokenize, with a bounded cache; see the module docstring."""

    def __init__(self, session: aiohttp.ClientSession, *, timeout: float = DEFAULT_TIMEOUT,
                 max_entries: int = DEFAULT_MAX_ENTRIES, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.session = session
        self.timeout = timeout
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self._cache: OrderedDict[bytes, array[int]] = OrderedDict()
        self._cached_tokens = 0
        self.hits = 0
        self.misses = 0
        self.failures = 0

    @staticmethod
    def tokenize_body(model: str, path: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """The /tokenize request for a chat or completion body (None: nothing to tokenize)."""
        if path == _CHAT:
            out = {k: body[k] for k in _CHAT_FIELDS if k in body}
            out.setdefault("add_special_tokens", False)
            return {"model": model, **out}
        if path == _COMPLETIONS:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if isinstance(prompt, str):
                return {"model": model, "prompt": prompt,
                        "add_special_tokens": body.get("add_special_tokens", True) is not False}
        return None

    async def tokens(self, model: str, path: str, body: Mapping[str, Any],
                     candidates: Sequence[Replica]) -> array[int] | None:
        request = self.tokenize_body(model, path, body)
        if request is None or not candidates:
            return None
        payload = orjson.dumps(request)
        key = xxhash.xxh3_128_digest(payload)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return cached
        self.misses += 1
        replica = min(candidates, key=_in_flight)  # the least busy: a busy one answers late
        headers = {"Content-Type": "application/json"}
        if replica.api_key:
            headers["Authorization"] = f"Bearer {replica.api_key}"
        try:
            async with asyncio.timeout(self.timeout):
                async with self.session.post(replica.url + "/tokenize", data=payload, headers=headers) as resp:
                    if resp.status != 200:
                        raise ValueError(f"answered {resp.status}")
                    data = orjson.loads(await resp.read())
            ids = data.get("tokens") if isinstance(data, dict) else None
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError("no token list in the answer")
            tokens = array("I", ids)
        except (TimeoutError, aiohttp.ClientError, ValueError, OverflowError) as exc:
            self.failures += 1
            log.debug("tokenizing on %s failed: %s", replica.id, exc)
            return None
        self._remember(key, tokens)
        return tokens

    def _remember(self, key: bytes, tokens: array[int]) -> None:
        if len(tokens) > self.max_tokens:
            return
        cache = self._cache
        cache[key] = tokens
        self._cached_tokens += len(tokens)
        while len(cache) > self.max_entries or self._cached_tokens > self.max_tokens:
            _, old = cache.popitem(last=False)
            self._cached_tokens -= len(old)

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._cache), "tokens": self._cached_tokens, "hits": self.hits,
                "misses": self.misses, "failures": self.failures}


def _in_flight(replica: Replica) -> int:
    return replica.in_flight
