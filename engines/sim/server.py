"""The simulator's HTTP surface (aiohttp), shaped like `vllm serve`'s.

GET  /health /ping /v1/models /version /metrics /load /kv_event_sources
POST /v1/completions /v1/chat/completions /v1/embeddings /tokenize /detokenize
     /v1/completions/render /v1/chat/completions/render
The agentic APIs, in their own modules: /v1/responses (GET /v1/responses/{id}, POST
/v1/responses/{id}/cancel, /v1/responses/render; responses.py) and /v1/messages
(/v1/messages/count_tokens, /v1/messages/render; anthropic.py).
Admin (the simulator's own): GET|POST /admin/faults, POST /admin/reset (and vLLM's
/reset_prefix_cache), GET /admin/stats.

A client that goes away aborts its request at once: the handler is cancelled (aiohttp's
handler_cancellation) or its next write fails, and the ``finally`` hands the request back to
the engine, which frees its blocks and drops it from the running count.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from engines.sim.agentic import Cut as _Cut
from engines.sim.agentic import cut as _cut
from engines.sim.anthropic import MessagesAPI
from engines.sim.engine import Engine, OutputChannel
from engines.sim.faults import Faults
from engines.sim.kv_cache import Allocation, BlockKeys
from engines.sim.kv_events import KVEventPublisher, KVEventsConfig, public_endpoint
from engines.sim.kv_transfer import KVTransfer, TransferError, expire_later, remote_prefill, wants_remote_decode
from engines.sim.lora import Adapters
from engines.sim.protocol import (
    DONE,
    VLLM_VERSION,
    ApiError,
    GenerationParams,
    Responder,
    check_length,
    check_model,
    common_params,
    models_body,
    parse_json,
    random_id,
    usage,
)
from engines.sim.responses import ResponsesAPI
from engines.sim.scheduler import SimRequest
from engines.sim.tokenizer import RealTokenizer, Tokenizer, content_text, developer_as_system

log = logging.getLogger("engines.sim")

SAMPLING_KEYS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                 "max_tokens", "min_tokens", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "ignore_eos", "logprobs", "skip_special_tokens")


@dataclass(frozen=True, slots=True)
class ServerOptions:
    host: str = "127.0.0.1"
    root: str | None = None  # /v1/models "root"; default: the model name
    prompt_tokens_details: bool = True  # vLLM's --enable-prompt-tokens-details
    default_output_len: int = 128  # tokens a request without max_tokens generates before "stop"
    embedding_dim: int = 256
    max_num_queued_reqs: int | None = 10_000  # vLLM: unlimited by default; here a hard bound
    runtime_lora_updating: bool = False  # /v1/load_lora_adapter and /v1/unload_lora_adapter
    responses_store: bool = False  # vLLM's VLLM_ENABLE_RESPONSES_API_STORE (responses.py)
    responses_store_size: int = 4096  # stored responses kept (vLLM: unbounded)
    tool_call_parser: str | None = "sim"  # None: like vLLM without --tool-call-parser (anthropic.py)
    enable_auto_tool_choice: bool = True


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=body if isinstance(body, bytes) else orjson.dumps(body), status=status,
                        content_type="application/json")


def _error(exc: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=exc.body(), status=exc.status, content_type="application/json",
                        headers=headers)


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
        self.responses = ResponsesAPI(self)
        self.messages = MessagesAPI(self)

    # -- app --------------------------------------------------------------------------------
    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[_not_found_json], client_max_size=64 * 1024 * 1024)
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/ping", self.health)
        r.add_get("/v1/models", self.models)
        r.add_get("/version", self.version)
        r.add_get("/metrics", self.metrics)
        r.add_get("/load", self.load)
        r.add_get("/kv_event_sources", self.kv_event_sources)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/chat/completions", self.chat)
        r.add_post("/v1/embeddings", self.embeddings)
        r.add_post("/tokenize", self.tokenize)
        r.add_post("/detokenize", self.detokenize)
        r.add_post("/v1/completions/render", self.render_completion)
        r.add_post("/v1/chat/completions/render", self.render_chat)
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
            return _error(exc)
        tokens = transfer.read(request.match_info["request_id"], body.get("engine_id"))
        if tokens is None:
            return _error(ApiError(404, "no KV blocks held for this request (unknown, read or expired)"))
        self.engine._refresh_load()
        return _json({"num_tokens": tokens, "block_size": self.engine.cfg.block_size})

    async def close(self) -> None:
        for lease in list(self._leases):
            lease.cancel()
        await self.responses.close()
        if self.transfer is not None:
            await self.transfer.close()

    async def _generation_error(self, request: web.Request, params: GenerationParams) -> web.StreamResponse:
        """vLLM's answer to a request whose KV load failed (kv_load_failure_policy: fail):
        a GenerationError, 500 "Internal server error"; streamed, an error event in a 200."""
        error = ApiError(500, "Internal server error")
        if not params.stream:
            return _error(error)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        await resp.write(b"data: " + error.body() + b"\n\n" + DONE)
        await resp.write_eof()
        return resp

    # -- LoRA adapters (engines/sim/lora.py) -------------------------------------------------
    def _adapter_names(self) -> Adapters | tuple[()]:
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
            return _error(exc)
        return web.Response(text=message)

    # -- simple GETs ------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.faults.healthy() else 503)

    async def models(self, request: web.Request) -> web.Response:
        adapters = [(a.name, a.path) for a in self.engine.adapters or ()]
        return _json(models_body(self.model, self.opts.root or self.model, self.max_model_len, self.created,
                                 adapters))

    async def version(self, request: web.Request) -> web.Response:
        return _json({"version": VLLM_VERSION})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.engine.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def load(self, request: web.Request) -> web.Response:
        return _json({"server_load": self.in_flight})

    async def kv_event_sources(self, request: web.Request) -> web.Response:
        cfg = self.kv_events
        if cfg is None or not cfg.enabled:
            return _json([])
        return _json([{"data_parallel_rank": 0, "endpoint": public_endpoint(cfg.endpoint, self.opts.host),
                       "replay_endpoint": public_endpoint(cfg.replay_endpoint, self.opts.host),
                       "topic": cfg.topic}])

    async def stats(self, request: web.Request) -> web.Response:
        kv = self.engine.kv
        return _json({"running": len(self.engine.sched.running), "waiting": len(self.engine.sched.waiting),
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
        return _json(self.faults.state())

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            self.faults.update(parse_json(await request.read()))
        except ApiError as exc:
            return _error(exc)
        except (TypeError, ValueError) as exc:
            return _error(ApiError(400, str(exc)))
        return _json(self.faults.state())

    async def reset(self, request: web.Request) -> web.Response:
        if not self.engine.reset_prefix_cache():
            return _error(ApiError(400, "cannot reset the prefix cache while requests hold blocks"))
        return web.Response(status=200)

    # -- tokenizer endpoints ----------------------------------------------------------------
    def chat_ids(self, body: dict[str, Any]) -> list[int]:
        """The prompt ids of chat-shaped messages built by the agentic APIs (responses.py,
        anthropic.py): as vLLM does, they go through the chat template, so a Responses or
        Messages conversation and its chat equivalent are the same tokens."""
        return self._chat_ids(body)

    def _chat_ids(self, body: dict[str, Any]) -> list[int]:
        """A chat body's prompt token ids (the model's chat template, then the tokenizer)."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages: Field required (a non-empty list)", "messages")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, "messages: each message needs a string role", "messages")
            try:
                content_text(m.get("content"))
            except TypeError as exc:
                raise ApiError(400, f"messages: {exc}", "messages") from None
        if not self.tok.supports_developer_role and any(m["role"] == "developer" for m in messages):
            body = {**body, "messages": developer_as_system(messages)}
        try:
            return self.tok.encode_chat(body)
        except Exception as exc:  # noqa: BLE001 - a real template may raise on odd input
            raise ApiError(400, f"messages: the chat template failed: {exc}", "messages") from None

    def _prompt_ids(self, body: dict[str, Any]) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "prompt cannot be empty", "prompt")
            return self.tok.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            if any(t < 0 or t >= self.tok.vocab_size for t in prompt):
                raise ApiError(400, "Token id out of vocabulary", "prompt")
            return list(prompt)
        if prompt is None:
            raise ApiError(400, "prompt: Field required", "prompt")
        raise ApiError(400, "prompt: a string, a list of token ids, or a list of one of them", "prompt")

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            body = parse_json(await request.read())
            check_model(body, self.model, self._adapter_names())
            if "messages" in body:
                ids = self._chat_ids(body)
            else:
                prompt = body.get("prompt")
                if not isinstance(prompt, str):
                    raise ApiError(400, "prompt: Input should be a valid string", "prompt")
                ids = self.tok.encode(prompt)
        except ApiError as exc:
            return _error(exc)
        strs = [self.tok.token_str(t) for t in ids] if body.get("return_token_strs") else None
        return _json({"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": strs})

    async def detokenize(self, request: web.Request) -> web.Response:
        try:
            body = parse_json(await request.read())
            check_model(body, self.model, self._adapter_names())
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                raise ApiError(400, "tokens: Input should be a valid list of integers", "tokens")
        except ApiError as exc:
            return _error(exc)
        return _json({"prompt": self.tok.decode(tokens)})

    def _generate_request(self, kind: str, body: dict[str, Any], ids: list[int]) -> dict[str, Any]:
        sampling = {k: body[k] for k in SAMPLING_KEYS if body.get(k) is not None}
        if "max_tokens" not in sampling and body.get("max_completion_tokens") is not None:
            sampling["max_tokens"] = body["max_completion_tokens"]
        return {"request_id": random_id("chatcmpl-" if kind == "chat" else "cmpl-"), "token_ids": ids,
                "features": None, "sampling_params": sampling, "model": self.model,
                "stream": bool(body.get("stream", False)), "stream_options": body.get("stream_options"),
                "cache_salt": body.get("cache_salt"), "priority": body.get("priority", 0),
                "kv_transfer_params": None, "token_offsets": None}

    async def render_completion(self, request: web.Request) -> web.Response:
        try:
            body = parse_json(await request.read())
            check_model(body, self.model, self._adapter_names())
            prompts = body.get("prompt")
            if isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts):
                out = [self._generate_request("completion", body, self._prompt_ids({"prompt": p}))
                       for p in prompts]
            else:
                out = [self._generate_request("completion", body, self._prompt_ids(body))]
        except ApiError as exc:
            return _error(exc)
        return _json(out)

    async def render_chat(self, request: web.Request) -> web.Response:
        try:
            body = parse_json(await request.read())
            check_model(body, self.model, self._adapter_names())
            out = self._generate_request("chat", body, self._chat_ids(body))
            out["assistant_tokens_mask"] = None
        except ApiError as exc:
            return _error(exc)
        return _json(out)

    # -- generation -------------------------------------------------------------------------
    def _parse(self, kind: str, body: dict[str, Any]) -> GenerationParams:
        model = check_model(body, self.model, self._adapter_names())
        max_tokens, stream, include_usage, continuous, seed = common_params(body)
        if kind == "chat":
            ids = self._chat_ids(body)
        else:
            ids = self._prompt_ids(body)
            if max_tokens is None:
                max_tokens = 16  # vLLM's default for /v1/completions
        check_length(len(ids), max_tokens, self.max_model_len)
        return GenerationParams(kind, model, ids, max_tokens, stream, include_usage, continuous, seed, body)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        self.in_flight += 1
        try:
            try:
                params = self._parse(kind, parse_json(await request.read()))
            except ApiError as exc:
                return _error(exc)
            refused = await self.admission()
            if refused is not None:
                return _error(*refused)
            cut = self.faults.draw_cut()
            transfer_params = params.body.get("kv_transfer_params")
            if transfer_params is not None and not isinstance(transfer_params, dict):
                return _error(ApiError(400, "kv_transfer_params: Input should be a valid dictionary",
                                       "kv_transfer_params"))
            if self.transfer is None:
                transfer_params = None  # no connector: vLLM ignores them
            external = 0
            remote = remote_prefill(transfer_params)
            if remote is not None:
                assert self.transfer is not None
                try:
                    external = await self.transfer.pull(remote)
                except TransferError as exc:
                    log.warning("KV load failed: %s", exc)
                    return await self._generation_error(request, params)
                if external != len(params.prompt_ids):
                    log.warning("KV load failed: %d tokens read for a %d-token prompt", external,
                                len(params.prompt_ids))
                    return await self._generation_error(request, params)
                await self.engine.clock.sleep(self.transfer.transfer_seconds(external))
            if wants_remote_decode(transfer_params):
                params.max_tokens = 1  # vLLM's _truncate_request_for_prefill
            req = self.new_request(params.prompt_ids, params.max_tokens, params.seed, params.body, params.model)
            req.external_tokens = external
            req.hold_blocks = wants_remote_decode(transfer_params)
            chan = self.engine.submit(req)
            try:
                if params.stream:
                    resp = await self._stream(request, req, chan, params, cut)
                else:
                    resp = await self._full(request, req, chan, params, cut)
            finally:
                self.engine.abort(req)
            return resp
        finally:
            self.in_flight -= 1

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

    def _usage(self, req: SimRequest, kind: str, stream: bool, n_out: int | None = None) -> dict[str, Any]:
        cached = max(req.num_cached_tokens, 0) if self.opts.prompt_tokens_details else None
        return usage(len(req.prompt_ids), len(req.output_ids) if n_out is None else n_out, cached,
                     stream=stream, created=req.num_cache_creation_tokens, chat=kind == "chat")

    def answered_one(self) -> None:
        """A generation answered in full (the exit_after fault counts these)."""
        self._answered()

    def _answered(self) -> None:
        self.answered += 1
        limit = self.faults.exit_after
        if limit is not None and self.answered >= limit:
            log.warning("fault injection: exiting after %d answered requests", self.answered)
            asyncio.get_running_loop().call_later(0.05, os._exit, 1)

    async def _full(self, request: web.Request, req: SimRequest, chan: OutputChannel,
                    params: GenerationParams, cut: int | None) -> web.StreamResponse:
        done = False
        while not done:
            _, done = await chan.next()
        if cut is not None:
            _cut(request)
        responder = Responder(params.kind, params.model, self.fingerprint)
        body = responder.full(self.tok.decode(req.output_ids), req.finish_reason or "length",
                              self._usage(req, params.kind, stream=False), req.transfer_answer)
        self._answered()
        return _json(body)

    async def _stream(self, request: web.Request, req: SimRequest, chan: OutputChannel,
                      params: GenerationParams, cut: int | None) -> web.StreamResponse:
        responder = Responder(params.kind, params.model, self.fingerprint)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        sent = n_out = 0

        async def send(chunk: bytes) -> None:
            nonlocal sent
            if cut is not None and sent >= cut:
                _cut(request)
            await resp.write(chunk)
            sent += 1

        def running_usage() -> dict[str, Any] | None:
            return usage(len(req.prompt_ids), n_out, stream=True) if params.continuous_usage else None

        done = False
        while not done:
            tokens, done = await chan.next()
            if tokens and n_out == 0 and params.kind == "chat":
                await send(responder.role_chunk(running_usage()))
            for i, tok in enumerate(tokens):
                n_out += 1
                finish = (req.finish_reason or "length") if done and i == len(tokens) - 1 else None
                await send(responder.delta_chunk(self.tok.token_str(tok), finish, running_usage()))
        if params.include_usage:
            await send(responder.usage_chunk(self._usage(req, params.kind, stream=True, n_out=n_out)))
        await send(DONE)
        await resp.write_eof()
        self._answered()
        return resp

    # -- embeddings -------------------------------------------------------------------------
    async def embeddings(self, request: web.Request) -> web.Response:
        try:
            body = parse_json(await request.read())
            model = check_model(body, self.model, self._adapter_names())
            inputs = body.get("input")
            if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
                inputs = [inputs]
            if not isinstance(inputs, list) or not inputs:
                raise ApiError(400, "input: Field required", "input")
            token_lists = []
            for item in inputs:
                ids = self.tok.encode(item) if isinstance(item, str) else item
                if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                    raise ApiError(400, "input: strings or lists of token ids", "input")
                check_length(len(ids), None, self.max_model_len)
                token_lists.append(ids)
        except ApiError as exc:
            return _error(exc)
        if self.faults.draw_fail():
            return _error(ApiError(self.faults.fail_status, "Simulated failure (fault injection)"),
                          self.faults.failure_headers())
        n = sum(len(ids) for ids in token_lists)
        await self.engine.clock.sleep(self.engine.cost.step_time([(n, n)], []) * self.faults.slow_factor)
        data = [{"index": i, "object": "embedding", "embedding": _embedding(ids, self.opts.embedding_dim)}
                for i, ids in enumerate(token_lists)]
        return _json({"id": random_id("embd-"), "object": "list", "created": int(time.time()), "model": model,
                      "data": data, "usage": {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0,
                                              "prompt_tokens_details": None}})


def _embedding(ids: list[int], dim: int) -> list[float]:
    """A deterministic unit vector per token sequence."""
    seed = hashlib.blake2b(orjson.dumps(ids), digest_size=16).digest()
    vec = []
    block = seed
    while len(vec) < dim:
        block = hashlib.blake2b(block, digest_size=64).digest()
        vec.extend((b - 127.5) / 127.5 for b in block)
    vec = vec[:dim]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


@web.middleware
async def _not_found_json(request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return _json({"detail": "Not Found"}, status=404)
    except web.HTTPMethodNotAllowed:
        return _json({"detail": "Method Not Allowed"}, status=405)
    except (_Cut, ConnectionResetError):
        # The connection is gone (cut on purpose, or by the client); nothing left to answer.
        with contextlib.suppress(Exception):
            if request.transport is not None:
                request.transport.abort()
        raise asyncio.CancelledError() from None
