"""The Anthropic Messages API as vLLM 0.32 serves it (the facts: engines/sim/README.md, "The
agentic APIs"; the samples: tests/reference/agentic/messages*).

POST /v1/messages               a message: JSON, or its SSE events with ``stream``
POST /v1/messages/count_tokens  ``{"input_tokens": n, "context_management": {...}}``
POST /v1/messages/render        the prompt's token ids (vLLM's GenerateRequest)

vLLM converts a Messages request into a chat request (system first, ``tool_use`` blocks as
the assistant's tool_calls, ``tool_result`` blocks as ``tool`` messages, tools as function
tools) and serves it through the chat path; so does the simulator, so a conversation's next
turn extends the previous turn's tokens exactly as over /v1/chat/completions.  The answer's
id is the chat completion's (``chatcmpl-…``).  Errors raised while serving have Anthropic's
shape ``{"type": "error", "error": {"type", "message"}}``; a body the request model rejects
(a missing field, a wrong role) gets vLLM's OpenAI-shaped 400 instead, as in vLLM.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from engines.sim.agentic import check_tool_choice, generate_request, template_messages
from engines.sim.answers import SSEWriter, json_response, openai_error, sse_event
from engines.sim.anthropic_request import chat_messages, chat_tool_choice, chat_tools, validate
from engines.sim.host import SimHost
from engines.sim.protocol import ApiError, check_model, parse_json, random_id
from engines.sim.scheduler import SimRequest
from engines.sim.tokenizer import RealTokenizer


def anthropic_error(exc: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps({"type": "error", "error": {"type": exc.error_type,
                                                                      "message": exc.message}}),
                        status=exc.status, content_type="application/json", headers=headers)


def stop_reason(finish_reason: str | None) -> str:
    return "max_tokens" if finish_reason == "length" else "end_turn"


class MessagesAPI:
    def __init__(self, server: SimHost) -> None:
        self.srv = server
        self._merge_inline_system: bool | None = None

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/messages", self.create)
        router.add_post("/v1/messages/count_tokens", self.count_tokens)
        router.add_post("/v1/messages/render", self.render)

    def merge_inline_system(self) -> bool:
        """vLLM merges system messages found among the messages into the leading system text
        when the chat template rejects a [system, user, system, user] conversation; the
        simulator's own template accepts it, a real one (--tokenizer) is probed like vLLM does."""
        if self._merge_inline_system is None:
            merge = False
            tok = self.srv.tok
            if isinstance(tok, RealTokenizer):
                probe = [{"role": r, "content": "t"} for r in ("system", "user", "system", "user")]
                try:
                    tok.model.render_chat({"messages": probe, "add_generation_prompt": False})
                except Exception:  # noqa: BLE001 - any template error means "system first only"
                    merge = True
            self._merge_inline_system = merge
        return self._merge_inline_system

    def _prompt(self, body: dict[str, Any], *, count: bool) -> tuple[str, list[int]]:
        """Convert a validated body and tokenize it: (the model, the prompt ids)."""
        srv = self.srv
        model = check_model(body, srv.model, srv.adapter_names())
        messages = chat_messages(body, self.merge_inline_system())
        check_tool_choice(srv.opts, chat_tool_choice(body))
        ids = srv.chat_ids({"messages": template_messages(messages), "tools": chat_tools(body.get("tools"))})
        limit = srv.max_model_len
        if not count:
            max_tokens = body["max_tokens"]
            if max_tokens > limit:
                raise ApiError(400, f"max_completion_tokens={max_tokens} cannot be greater than max_model_len="
                                    f"{limit}. Please request fewer output tokens. (parameter=max_completion_tokens,"
                                    f" value={max_tokens})", "max_completion_tokens")
            if len(ids) >= limit:
                raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, your prompt "
                                    f"contains {len(ids)} input tokens, which exceeds this limit even without any "
                                    f"output tokens. Please reduce the length of the input prompt. "
                                    f"(parameter=input_tokens, value={len(ids)})", "input_tokens")
        return model, ids

    async def _read(self, request: web.Request, *, count: bool) -> tuple[dict[str, Any], str, list[int]] | web.Response:
        """The body, model and prompt ids of a request, or the error to answer: a body the
        request model refuses in the OpenAI shape, a failure after that in Anthropic's."""
        try:
            body = parse_json(await request.read())
            validate(body, count=count)
        except ApiError as exc:
            return openai_error(exc)
        try:
            model, ids = self._prompt(body, count=count)
        except ApiError as exc:
            return anthropic_error(exc)
        return body, model, ids

    async def count_tokens(self, request: web.Request) -> web.Response:
        read = await self._read(request, count=True)
        if isinstance(read, web.Response):
            return read
        _, _, ids = read
        return json_response({"input_tokens": len(ids), "context_management": {"original_input_tokens": len(ids)}})

    async def render(self, request: web.Request) -> web.Response:
        try:
            body = parse_json(await request.read())
            validate(body, count=False)
            _, ids = self._prompt(body, count=False)
        except ApiError as exc:
            return openai_error(exc)
        sampling = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                    "temperature": float(body["temperature"]) if body.get("temperature") is not None else 1.0,
                    "stop": list(body.get("stop_sequences") or []), "stop_token_ids": [],
                    "max_tokens": min(body["max_tokens"], self.srv.max_model_len - len(ids)),
                    "output_kind": 1 if body.get("stream") else 2, "skip_clone": True, "bad_words": [],
                    "skip_reading_prefix_cache": False}
        return json_response(generate_request(random_id("chatcmpl-"), ids, sampling, body.get("model"),
                                              bool(body.get("stream")), body))

    async def create(self, request: web.Request) -> web.StreamResponse:
        srv = self.srv
        srv.in_flight += 1
        try:
            read = await self._read(request, count=False)
            if isinstance(read, web.Response):
                return read
            body, model, ids = read
            refused = await srv.admission()
            if refused is not None:
                return anthropic_error(*refused)
            seed = body.get("seed") if isinstance(body.get("seed"), int) else 0
            max_tokens = min(body["max_tokens"], srv.max_model_len - len(ids))
            req = srv.new_request(ids, max_tokens, seed, body, model)
            if body.get("stream"):
                return await self._stream(request, req, model)
            return await self._full(req, model)
        finally:
            srv.in_flight -= 1

    def _usage(self, req: SimRequest, n_out: int) -> dict[str, Any]:
        """Anthropic's usage from vLLM's: ``input_tokens`` excludes the cache read and the cache
        write, which come apart (only with --enable-prompt-tokens-details, as in vLLM)."""
        prompt = len(req.prompt_ids)
        if not self.srv.opts.prompt_tokens_details:
            return {"input_tokens": prompt, "output_tokens": n_out}
        read, written = req.cache_counts()
        return {"input_tokens": max(0, prompt - read - written), "output_tokens": n_out,
                "cache_creation_input_tokens": written, "cache_read_input_tokens": read}

    async def _full(self, req: SimRequest, model: str) -> web.Response:
        srv = self.srv
        chan = srv.engine.submit(req)
        try:
            done = False
            while not done:
                _, done = await chan.next()
        finally:
            srv.engine.abort(req)
        srv.answered_one()
        return json_response({"id": random_id("chatcmpl-"), "type": "message", "role": "assistant",
                              "content": [{"type": "text", "text": srv.tok.decode(req.output_ids)}],
                              "model": model, "stop_reason": stop_reason(req.finish_reason),
                              "usage": self._usage(req, len(req.output_ids))})

    async def _stream(self, request: web.Request, req: SimRequest, model: str) -> web.StreamResponse:
        """message_start, content_block_start, a content_block_delta per token,
        content_block_stop, message_delta (stop_reason and the usage), message_stop: vLLM
        0.32's sequence (no ping events)."""
        srv = self.srv
        writer = SSEWriter(request, srv.faults.draw_cut())
        await writer.start()
        chan = srv.engine.submit(req)
        n_out = 0
        try:
            await writer.send(sse_event("message_start", {"type": "message_start", "message": {
                "id": random_id("chatcmpl-"), "type": "message", "role": "assistant", "content": [], "model": model,
                "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": len(req.prompt_ids), "output_tokens": 0}}}))
            done = False
            while not done:
                tokens, done = await chan.next()
                for tok in tokens:
                    if n_out == 0:
                        await writer.send(sse_event("content_block_start", {
                            "type": "content_block_start", "content_block": {"type": "text", "text": ""},
                            "index": 0}))
                    n_out += 1
                    await writer.send(sse_event("content_block_delta", {
                        "type": "content_block_delta", "delta": {"type": "text_delta", "text": srv.tok.token_str(tok)},
                        "index": 0}))
        finally:
            srv.engine.abort(req)
        if n_out:
            await writer.send(sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
        await writer.send(sse_event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": stop_reason(req.finish_reason), "stop_sequence": None},
            "usage": self._usage(req, n_out)}))
        await writer.send(sse_event("message_stop", {"type": "message_stop"}))
        srv.answered_one()
        return await writer.end()
