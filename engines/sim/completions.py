"""POST /v1/completions and /v1/chat/completions: a generation through the engine, answered
in full or streamed chunk by chunk, vLLM 0.32's shapes (protocol.py's `Responder`).

A decode request of a disaggregated pair (``kv_transfer_params`` with the remote fields, see
kv_transfer.py) first reads the prefill replica's KV blocks; a prefill request for a remote
decode is cut to one token and its blocks are held (server.py's hold).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from engines.sim.answers import SSEWriter, cut, json_response, openai_error
from engines.sim.engine import OutputChannel
from engines.sim.host import SimHost
from engines.sim.kv_transfer import TransferError, remote_prefill, wants_remote_decode
from engines.sim.prompts import chat_ids, prompt_ids
from engines.sim.protocol import (
    DONE,
    ApiError,
    GenerationParams,
    Responder,
    check_length,
    check_model,
    common_params,
    parse_json,
    usage,
)
from engines.sim.scheduler import SimRequest

log = logging.getLogger("engines.sim")


class CompletionsAPI:
    def __init__(self, host: SimHost) -> None:
        self.srv = host

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    def _parse(self, kind: str, body: dict[str, Any]) -> GenerationParams:
        srv = self.srv
        model = check_model(body, srv.model, srv.adapter_names())
        max_tokens, stream, include_usage, continuous, seed = common_params(body)
        if kind == "chat":
            ids = chat_ids(srv.tok, body)
        else:
            ids = prompt_ids(srv.tok, body)
            if max_tokens is None:
                max_tokens = 16  # vLLM's default for /v1/completions
        check_length(len(ids), max_tokens, srv.max_model_len)
        return GenerationParams(kind, model, ids, max_tokens, stream, include_usage, continuous, seed, body)

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        srv = self.srv
        srv.in_flight += 1
        try:
            try:
                params = self._parse(kind, parse_json(await request.read()))
            except ApiError as exc:
                return openai_error(exc)
            refused = await srv.admission()
            if refused is not None:
                return openai_error(*refused)
            cut_after = srv.faults.draw_cut()
            transfer_params = params.body.get("kv_transfer_params")
            if transfer_params is not None and not isinstance(transfer_params, dict):
                return openai_error(ApiError(400, "kv_transfer_params: Input should be a valid dictionary",
                                             "kv_transfer_params"))
            if srv.transfer is None:
                transfer_params = None  # no connector: vLLM ignores them
            external = 0
            remote = remote_prefill(transfer_params)
            if remote is not None:
                assert srv.transfer is not None
                try:
                    external = await srv.transfer.pull(remote)
                except TransferError as exc:
                    log.warning("KV load failed: %s", exc)
                    return await self._generation_error(request, params)
                if external != len(params.prompt_ids):
                    log.warning("KV load failed: %d tokens read for a %d-token prompt", external,
                                len(params.prompt_ids))
                    return await self._generation_error(request, params)
                await srv.engine.clock.sleep(srv.transfer.transfer_seconds(external))
            if wants_remote_decode(transfer_params):
                params.max_tokens = 1  # vLLM's _truncate_request_for_prefill
            req = srv.new_request(params.prompt_ids, params.max_tokens, params.seed, params.body, params.model)
            req.external_tokens = external
            req.hold_blocks = wants_remote_decode(transfer_params)
            chan = srv.engine.submit(req)
            try:
                if params.stream:
                    resp = await self._stream(request, req, chan, params, cut_after)
                else:
                    resp = await self._full(request, req, chan, params, cut_after)
            finally:
                srv.engine.abort(req)
            return resp
        finally:
            srv.in_flight -= 1

    async def _generation_error(self, request: web.Request, params: GenerationParams) -> web.StreamResponse:
        """vLLM's answer to a request whose KV load failed (kv_load_failure_policy: fail):
        a GenerationError, 500 "Internal server error"; streamed, an error event in a 200."""
        error = ApiError(500, "Internal server error")
        if not params.stream:
            return openai_error(error)
        writer = SSEWriter(request, None)
        await writer.start()
        await writer.send(b"data: " + error.body() + b"\n\n" + DONE)
        return await writer.end()

    def _usage(self, req: SimRequest, kind: str, stream: bool, n_out: int | None = None) -> dict[str, Any]:
        read, written = req.cache_counts()
        cached = read if self.srv.opts.prompt_tokens_details else None
        return usage(len(req.prompt_ids), len(req.output_ids) if n_out is None else n_out, cached,
                     stream=stream, created=written, chat=kind == "chat")

    async def _full(self, request: web.Request, req: SimRequest, chan: OutputChannel,
                    params: GenerationParams, cut_after: int | None) -> web.StreamResponse:
        srv = self.srv
        done = False
        while not done:
            _, done = await chan.next()
        if cut_after is not None:
            cut(request)
        responder = Responder(params.kind, params.model, srv.fingerprint)
        body = responder.full(srv.tok.decode(req.output_ids), req.finish_reason or "length",
                              self._usage(req, params.kind, stream=False), req.transfer_answer)
        srv.answered_one()
        return json_response(body)

    async def _stream(self, request: web.Request, req: SimRequest, chan: OutputChannel,
                      params: GenerationParams, cut_after: int | None) -> web.StreamResponse:
        srv = self.srv
        responder = Responder(params.kind, params.model, srv.fingerprint)
        writer = SSEWriter(request, cut_after)
        await writer.start()
        n_out = 0

        def running_usage() -> dict[str, Any] | None:
            return usage(len(req.prompt_ids), n_out, stream=True) if params.continuous_usage else None

        done = False
        while not done:
            tokens, done = await chan.next()
            if tokens and n_out == 0 and params.kind == "chat":
                await writer.send(responder.role_chunk(running_usage()))
            for i, tok in enumerate(tokens):
                n_out += 1
                finish = (req.finish_reason or "length") if done and i == len(tokens) - 1 else None
                await writer.send(responder.delta_chunk(srv.tok.token_str(tok), finish, running_usage()))
        if params.include_usage:
            await writer.send(responder.usage_chunk(self._usage(req, params.kind, stream=True, n_out=n_out)))
        await writer.send(DONE)
        resp = await writer.end()
        srv.answered_one()
        return resp
