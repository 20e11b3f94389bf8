"""POST /v1/embeddings: a deterministic unit vector per input, after the prefill time the
cost model gives its tokens (no engine queue, no KV cache: vLLM's pooling runner)."""

from __future__ import annotations

import hashlib
import math
import time

import orjson
from aiohttp import web

from engines.sim.answers import json_response, openai_error
from engines.sim.host import SimHost
from engines.sim.prompts import model_body
from engines.sim.protocol import ApiError, check_length, random_id


class EmbeddingsAPI:
    def __init__(self, host: SimHost) -> None:
        self.srv = host

    async def embeddings(self, request: web.Request) -> web.Response:
        srv = self.srv
        try:
            body, model = await model_body(srv, request)
            inputs = body.get("input")
            if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
                inputs = [inputs]
            if not isinstance(inputs, list) or not inputs:
                raise ApiError(400, "input: Field required", "input")
            token_lists = []
            for item in inputs:
                ids = srv.tok.encode(item) if isinstance(item, str) else item
                if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                    raise ApiError(400, "input: strings or lists of token ids", "input")
                check_length(len(ids), None, srv.max_model_len)
                token_lists.append(ids)
        except ApiError as exc:
            return openai_error(exc)
        if srv.faults.draw_fail():
            return openai_error(ApiError(srv.faults.fail_status, "Simulated failure (fault injection)"),
                                srv.faults.failure_headers())
        n = sum(len(ids) for ids in token_lists)
        await srv.engine.clock.sleep(srv.engine.cost.step_time([(n, n)], []) * srv.faults.slow_factor)
        data = [{"index": i, "object": "embedding", "embedding": embedding(ids, srv.opts.embedding_dim)}
                for i, ids in enumerate(token_lists)]
        return json_response({"id": random_id("embd-"), "object": "list", "created": int(time.time()),
                              "model": model, "data": data,
                              "usage": {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0,
                                        "prompt_tokens_details": None}})


def embedding(ids: list[int], dim: int) -> list[float]:
    """A deterministic unit vector per token sequence."""
    seed = hashlib.blake2b(orjson.dumps(ids), digest_size=16).digest()
    vec: list[float] = []
    block = seed
    while len(vec) < dim:
        block = hashlib.blake2b(block, digest_size=64).digest()
        vec.extend((b - 127.5) / 127.5 for b in block)
    vec = vec[:dim]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]
