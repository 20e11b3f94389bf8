"""The simulator's HTTP server (aiohttp), shaped like `vllm serve`'s: its state, its route
table, and the life of a generation request (admission, the engine request, the count of
answers); the endpoints live in their own modules.

GET  /health /ping /v1/models /version /metrics /load /kv_event_sources      (here)
POST /v1/completions /v1/chat/completions                                   (completions.py)
POST /v1/embeddings                                                         (embeddings.py)
POST /tokenize /detokenize /v1/completions/render /v1/chat/completions/render (prompts.py)
The agentic APIs, in their own modules: /v1/responses (GET /v1/responses/{id}, POST
/v1/responses/{id}/cancel, /v1/responses/render; responses.py) and /v1/messages
(/v1/messages/count_tokens, /v1/messages/render; anthropic.py).
Admin (the simulator's own): GET|POST /admin/faults, POST /admin/reset (and vLLM's
/reset_prefix_cache; ``?fresh=1``: the KV-event stream restarts too), GET /admin/stats.
With runtime LoRA updating: POST /v1/load_lora_adapter and /v1/unload_lora_adapter; with --kv-transfer-config: POST
/sim/kv_transfer/{request_id}.

The endpoint modules get this server as a `host.SimHost` (what they use of it), so none of
them imports this module.

A client that goes away aborts its request at once: the handler is cancelled (aiohttp's
handler_cancellation) or its next write fails, and the ``finally`` hands the request back to
the engine, which frees its blocks and drops it from the running count.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from typing import Any

from aiohttp import web

from engines.sim.answers import json_response, not_found_json, openai_error
from engines.sim.anthropic import MessagesAPI
from engines.sim.completions import CompletionsAPI
from engines.sim.embeddings import EmbeddingsAPI
from engines.sim.engine import Engine
from engines.sim.faults import Faults
from engines.sim.kv_cache import Allocation, BlockKeys
from engines.sim.kv_events import KVEventPublisher, KVEventsConfig, public_endpoint
from engines.sim.kv_transfer import KVTransfer, expire_later
from engines.sim.lora import Adapters
from engines.sim.options import ServerOptions
from engines.sim.prompts import PromptAPI, chat_ids
from engines.sim.protocol import VLLM_VERSION, ApiError, models_body, parse_json, random_id
from engines.sim.responses import ResponsesAPI
from engines.sim.scheduler import SimRequest
from engines.sim.tokenizer import RealTokenizer, Tokenizer

log = logging.getLogger("engines.sim")


class SimServer:
    def __init__(self, engine: Engine, tokenizer: Tokenizer | RealTokenizer, faults: Faults, opts: ServerOptions,
                 kv_events: KVEventsConfig | None = None, publisher: KVEventPublisher | None = None,
                 transfer: KVTransfer | None = None) -> None:
        self.engine = engine
        self.transfer = transfer  # --kv-transfer-config: disaggregated prefill/decode (kv_transfer.py)
        self._leases: set[asyncio.Task[None]] = set()
        if transfer is not None:
            engine.sched.on_hold = self._hold
        self.tok = tokenizer
        self.faults = faults
        self.opts = opts
        self.model = engine.cfg.model
        self.max_model_len = engine.cfg.max_model_len
        self.kv_events = kv_events
        self.publisher = publisher
        self.fingerprint = f"vllm-{VLLM_VERSION}-{hashlib.blake2b(self.model.encode(), digest_size=4).hexdigest()}"
        self.created = int(time.time())
        self.in_flight = 0
        self.answered = 0
        self.generation = CompletionsAPI(self)
        self.embedding = EmbeddingsAPI(self)
        self.prompts = PromptAPI(self)
        self.responses = ResponsesAPI(self)
        self.messages = MessagesAPI(self)

    # -- app --------------------------------------------------------------------------------
    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[not_found_json], client_max_size=64 * 1024 * 1024)
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/ping", self.health)
        r.add_get("/v1/models", self.models)
        r.add_get("/version", self.version)
        r.add_get("/metrics", self.metrics)
        r.add_get("/load", self.load)
        r.add_get("/kv_event_sources", self.kv_event_sources)
        r.add_post("/v1/completions", self.generation.completions)
        r.add_post("/v1/chat/completions", self.generation.chat)
        r.add_post("/v1/embeddings", self.embedding.embeddings)
        r.add_post("/tokenize", self.prompts.tokenize)
        r.add_post("/detokenize", self.prompts.detokenize)
        r.add_post("/v1/completions/render", self.prompts.render_completion)
        r.add_post("/v1/chat/completions/render", self.prompts.render_chat)
        r.add_get("/admin/faults", self.get_faults)
        r.add_post("/admin/faults", self.set_faults)
        r.add_post("/admin/reset", self.reset)
        r.add_post("/reset_prefix_cache", self.reset)
        r.add_get("/admin/stats", self.stats)
        self.responses.register(r)
        self.messages.register(r)
        if self.transfer is not None:
            r.add_post("/sim/kv_transfer/{request_id}", self.kv_read)
        if self.engine.adapters is not None and self.opts.runtime_lora_updating:
            r.add_post("/v1/load_lora_adapter", self.load_lora_adapter)
            r.add_post("/v1/unload_lora_adapter", self.unload_lora_adapter)
        return app

    async def close(self) -> None:
        for lease in list(self._leases):
            lease.cancel()
        await self.responses.close()
        if self.transfer is not None:
            await self.transfer.close()

    # -- disaggregated prefill/decode (engines/sim/kv_transfer.py) --------------------------
    def _hold(self, req: SimRequest) -> None:
        """A prefill for a remote decode finished: its blocks wait to be read, for a lease."""
        transfer = self.transfer
        assert transfer is not None
        blocks = transfer.held.hold(req.request_id, req.alloc, len(req.prompt_ids))
        req.alloc = Allocation()
        req.transfer_answer = transfer.answer_params(req.request_id, blocks, len(req.prompt_ids))
        lease = asyncio.get_running_loop().create_task(
            expire_later(transfer, req.request_id, transfer.config.lease_s / self.engine.clock.scale))
        self._leases.add(lease)
        lease.add_done_callback(self._leases.discard)

    async def kv_read(self, request: web.Request) -> web.Response:
        transfer = self.transfer
        assert transfer is not None
        try:
            body = parse_json(await request.read())
        except ApiError as exc:
            return openai_error(exc)
        tokens = transfer.read(request.match_info["request_id"], body.get("engine_id"))
        if tokens is None:
            return openai_error(ApiError(404, "no KV blocks held for this request (unknown, read or expired)"))
        self.engine._refresh_load()
        return json_response({"num_tokens": tokens, "block_size": self.engine.cfg.block_size})

    # -- LoRA adapters (engines/sim/lora.py) -------------------------------------------------
    def adapter_names(self) -> Adapters | tuple[()]:
        """The adapter names a request's `model` may name besides the base model."""
        adapters = self.engine.adapters
        return () if adapters is None else adapters

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        return await self._lora_change(request, load=True)

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        return await self._lora_change(request, load=False)

    async def _lora_change(self, request: web.Request, *, load: bool) -> web.Response:
        adapters = self.engine.adapters
        assert adapters is not None
        try:
            body = parse_json(await request.read())
            name, path = body.get("lora_name"), body.get("lora_path")
            if not isinstance(name, str) or not name:
                raise ApiError(400, "lora_name: Field required", "lora_name")
            if load and (not isinstance(path, str) or not path):
                raise ApiError(400, "lora_path: Field required", "lora_path")
            if name == self.model:
                raise ApiError(400, f"The lora adapter '{name}' has the base model's name.")
            message = adapters.load(name, path) if load else adapters.unload(name)
        except ApiError as exc:
            return openai_error(exc)
        return web.Response(text=message)

    # -- simple GETs ------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.faults.healthy() else 503)

    async def models(self, request: web.Request) -> web.Response:
        adapters = [(a.name, a.path) for a in self.engine.adapters or ()]
        return json_response(models_body(self.model, self.opts.root or self.model, self.max_model_len,
                                         self.created, adapters))

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": VLLM_VERSION})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.engine.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def load(self, request: web.Request) -> web.Response:
        return json_response({"server_load": self.in_flight})

    async def kv_event_sources(self, request: web.Request) -> web.Response:
        cfg = self.kv_events
        if cfg is None or not cfg.enabled:
            return json_response([])
        return json_response([{"data_parallel_rank": 0, "endpoint": public_endpoint(cfg.endpoint, self.opts.host),
                               "replay_endpoint": public_endpoint(cfg.replay_endpoint, self.opts.host),
                               "topic": cfg.topic}])

    async def stats(self, request: web.Request) -> web.Response:
        kv = self.engine.kv
        return json_response({
            "running": len(self.engine.sched.running), "waiting": len(self.engine.sched.waiting),
            "num_gpu_blocks": self.engine.cfg.num_gpu_blocks, "usable_blocks": kv.num_blocks,
            "free_blocks": kv.num_free_blocks,
            "cached_blocks": kv.num_cached_blocks, "kv_cache_usage": kv.usage(),
            "in_flight": self.in_flight, "answered": self.answered,
            "clock_lag_s": self.engine.clock.lag,
            "kv_events_buffered": self.publisher.buffered if self.publisher else 0,
            "lora_loads": self.engine.adapters.loads if self.engine.adapters else 0,
            "lora_slots": list(self.engine.adapters.slots) if self.engine.adapters else [],
            "responses_store": self.responses.stats(),
            "kv_transfer": {"held": len(self.transfer.held), "reads": self.transfer.pulls,
                            "read_failures": self.transfer.pull_failures}
            if self.transfer else None})

    # -- admin ------------------------------------------------------------------------------
    async def get_faults(self, request: web.Request) -> web.Response:
        return json_response(self.faults.state())

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            self.faults.update(parse_json(await request.read()))
        except ApiError as exc:
            return openai_error(exc)
        except (TypeError, ValueError) as exc:
            return openai_error(ApiError(400, str(exc)))
        return json_response(self.faults.state())

    async def reset(self, request: web.Request) -> web.Response:
        """vLLM's /reset_prefix_cache (and /admin/reset): the prefix cache dropped, an
        ``AllBlocksCleared`` event published.  ``/admin/reset?fresh=1`` (the simulator's own):
        the KV-event stream also starts again as a fresh engine's (nothing to replay,
        sequence 0), which a real vLLM has only after a restart."""
        if not self.engine.reset_prefix_cache():
            return openai_error(ApiError(400, "cannot reset the prefix cache while requests hold blocks"))
        if request.path == "/admin/reset" and request.query.get("fresh") == "1" and self.publisher is not None:
            self.publisher.restart()
        return web.Response(status=200)

    # -- a generation request's life (host.SimHost, for the endpoint modules) ---------------
    def chat_ids(self, body: dict[str, Any]) -> list[int]:
        """The prompt ids of chat-shaped messages built by the agentic APIs (responses.py,
        anthropic.py): as vLLM does, they go through the chat template, so a Responses or
        Messages conversation and its chat equivalent are the same tokens."""
        return chat_ids(self.tok, body)

    async def admission(self) -> tuple[ApiError, dict[str, str]] | None:
        """Before a generation request enters the engine: fault injection and the queue bound.
        The error to answer (and its headers), or None; a drawn hang never returns (until the
        client goes away and the handler is cancelled)."""
        if self.faults.draw_fail():
            return (ApiError(self.faults.fail_status, "Simulated failure (fault injection)"),
                    self.faults.failure_headers())
        if self.faults.draw_hang():
            await asyncio.Future()
        limit = self.opts.max_num_queued_reqs
        if limit is not None and self.engine.num_unfinished() + 1 > limit:
            self.engine.metrics.rejected_queue_full.inc()
            return ApiError.queue_full(), {}
        return None

    def new_request(self, prompt_ids: list[int], max_tokens: int | None, seed: int, body: dict[str, Any],
                    model: str) -> SimRequest:
        """An engine request: ``max_tokens`` None generates --default-output-len tokens and
        finishes with "stop" (a simulated EOS); the body's cache_salt and the model's LoRA
        adapter enter its block hashes."""
        if max_tokens is None:
            n = min(self.opts.default_output_len, self.max_model_len - len(prompt_ids))
            req = SimRequest(random_id("req-"), prompt_ids, max(1, n), "stop", seed)
        else:
            req = SimRequest(random_id("req-"), prompt_ids, max_tokens, "length", seed)
        salt = body.get("cache_salt")
        adapter = self.engine.adapters.get(model) if self.engine.adapters is not None else None
        req.keys = BlockKeys(cache_salt=salt if isinstance(salt, str) and salt else None,
                             lora_name=adapter.name if adapter else None,
                             lora_id=adapter.id if adapter else None,
                             lora_path=adapter.path if adapter else None)
        return req

    def answered_one(self) -> None:
        """A generation answered in full (the exit_after fault counts these)."""
        self.answered += 1
        limit = self.faults.exit_after
        if limit is not None and self.answered >= limit:
            log.warning("fault injection: exiting after %d answered requests", self.answered)
            asyncio.get_running_loop().call_later(0.05, os._exit, 1)
