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

import json
import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from engines.sim.agentic import (
    SSEWriter,
    check_tool_choice,
    function_tool,
    generate_request,
    invalid,
    json_response,
    missing,
    openai_error,
    sse_event,
    template_messages,
)
from engines.sim.protocol import ApiError, check_model, parse_json, random_id
from engines.sim.scheduler import SimRequest
from engines.sim.tokenizer import RealTokenizer

if TYPE_CHECKING:
    from engines.sim.server import SimServer

ROLES = ("user", "assistant", "system")
BLOCK_TYPES = ("text", "image", "tool_use", "tool_result", "tool_reference", "thinking", "redacted_thinking",
               "tool_addition", "tool_removal")
_BILLING = "x-anthropic-billing-header"  # Claude Code's per-request header vLLM strips from system text


def anthropic_error(exc: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps({"type": "error", "error": {"type": exc.error_type,
                                                                      "message": exc.message}}),
                        status=exc.status, content_type="application/json", headers=headers)


# -- the request as chat ---------------------------------------------------------------------
def _validate(body: dict[str, Any], *, count: bool) -> None:
    """What vLLM's request model refuses (answered in the OpenAI shape, as FastAPI does)."""
    for name in ("model", "messages") if count else ("model", "messages", "max_tokens"):
        if body.get(name) is None:
            raise missing(name, body)
    if not isinstance(body["model"], str):
        raise invalid("model", "string_type", "Input should be a valid string", body["model"])
    if not body["model"]:
        raise invalid("model", "value_error", "Value error, Model is required", body["model"])
    if not count:
        max_tokens = body["max_tokens"]
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise invalid("max_tokens", "int_type", "Input should be a valid integer", max_tokens)
        if max_tokens <= 0:
            raise invalid("max_tokens", "value_error", "Value error, max_tokens must be positive", max_tokens)
    messages = body["messages"]
    if not isinstance(messages, list):
        raise invalid("messages", "list_type", "Input should be a valid list", messages)
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise invalid(f"messages.{i}", "model_type", "Input should be a valid dictionary", msg)
        if msg.get("role") not in ROLES:
            raise invalid(f"messages.{i}.role", "literal_error",
                          "Input should be 'user', 'assistant' or 'system'", msg.get("role"))
        _check_content(msg.get("content"), f"messages.{i}.content")
    if body.get("system") is not None and not isinstance(body["system"], str):
        _check_content(body["system"], "system")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise invalid("tools", "list_type", "Input should be a valid list", tools)
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                raise missing(f"tools.{i}.name", tool if isinstance(tool, dict) else {})
            if not isinstance(tool.get("input_schema"), dict):
                raise missing(f"tools.{i}.input_schema", tool)
    choice = body.get("tool_choice")
    if choice is not None and (not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool",
                                                                                          "none")):
        raise invalid("tool_choice", "literal_error", "Input should be 'auto', 'any', 'tool' or 'none'", choice)
    if isinstance(choice, dict) and choice.get("type") == "tool" and not choice.get("name"):
        raise invalid("tool_choice", "value_error", "Value error, tool_choice.name is required when type is 'tool'",
                      choice)
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise invalid("stream", "bool_type", "Input should be a valid boolean", body["stream"])


def _check_content(content: object, where: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise invalid(where, "string_type", "Input should be a valid string", content)
    for j, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") not in BLOCK_TYPES:
            raise invalid(f"{where}.{j}.type", "literal_error", "Input should be a content block type",
                          block.get("type") if isinstance(block, dict) else block)


def _system_text(content: object) -> str | None:
    if isinstance(content, str):
        return None if content.startswith(_BILLING) else content
    parts = [b["text"] for b in content or () if isinstance(b, dict) and b.get("type") == "text"
             and isinstance(b.get("text"), str) and b["text"] and not b["text"].startswith(_BILLING)]
    return "".join(parts) or None


def chat_messages(body: dict[str, Any], merge_inline_system: bool = False) -> list[dict[str, Any]]:
    """The chat messages vLLM makes of a Messages body (AnthropicServingMessages'
    to_chat_completion_request): the ``system`` text first (billing headers dropped), then
    every message; a user message that only carried tool results leaves just its ``tool``
    messages."""
    out: list[dict[str, Any]] = []
    system = body.get("system")
    parts = []
    if isinstance(system, str) and system:
        parts.append(system)
    elif isinstance(system, list):
        parts += [b["text"] for b in system if b.get("type") == "text" and b.get("text")
                  and not b["text"].startswith(_BILLING)]
    if merge_inline_system:
        parts += [t for m in body["messages"] if m["role"] == "system" and (t := _system_text(m["content"]))]
    if parts:
        out.append({"role": "system", "content": "".join(parts)})
    for msg in body["messages"]:
        if msg["role"] == "system":
            text = None if merge_inline_system else _system_text(msg["content"])
            if text:
                out.append({"role": "system", "content": text})
            continue
        chat: dict[str, Any] = {"role": msg["role"]}
        if isinstance(msg["content"], str):
            chat["content"] = msg["content"]
        else:
            _convert_blocks(msg["role"], msg["content"], chat, out)
        if not (msg["role"] == "user" and "content" not in chat):
            out.append(chat)
    return out


def _convert_blocks(role: str, blocks: list[dict[str, Any]], chat: dict[str, Any], out: list[dict[str, Any]]) -> None:
    content: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    reasoning: list[str] = []
    for block in blocks:
        kind = block.get("type")
        if kind == "text" and block.get("text"):
            content.append({"type": "text", "text": block["text"]})
        elif kind == "image" and block.get("source"):
            content.append({"type": "image_url", "image_url": {"url": _image_url(block["source"])}})
        elif kind == "thinking" and block.get("thinking") is not None:
            reasoning.append(block["thinking"])
        elif kind == "tool_use":
            calls.append({"id": block.get("id") or f"call_{int(time.time())}", "type": "function",
                          "function": {"name": block.get("name") or "",
                                       "arguments": json.dumps(block.get("input") or {})}})
        elif kind == "tool_result":
            if role == "user":
                out.extend(_tool_result_messages(block))
            else:
                result = block.get("content")
                content.append({"type": "text", "text": f"Tool result: {str(result) if result else ''}"})
    if reasoning:
        chat["reasoning"] = "".join(reasoning)
    if calls:
        chat["tool_calls"] = calls
    if content:
        chat["content"] = content[0]["text"] if len(content) == 1 and content[0]["type"] == "text" else content


def _image_url(source: dict[str, Any]) -> str:
    if source.get("type") == "url":
        return str(source.get("url", ""))
    return f"data:{source.get('media_type', 'image/jpeg')};base64,{source.get('data', '')}"


def _tool_result_messages(block: dict[str, Any]) -> list[dict[str, Any]]:
    """A user's tool_result: a ``tool`` message (its text parts joined by newlines), then its
    images as a user message and its tool references as another ``tool`` message."""
    result = block.get("content")
    text, images, refs = "", [], []
    if isinstance(result, str):
        text = result
    elif isinstance(result, list):
        texts = []
        for item in result:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "text":
                texts.append(item.get("text", ""))
            elif item.get("type") == "image":
                images.append(_image_url(item.get("source", {})))
            elif item.get("type") == "tool_reference" and (name := item.get("tool_name") or item.get("name")):
                refs.append({"type": "tool_reference", "name": name})
        text = "\n".join(texts)
    call_id = block.get("tool_use_id") or ""
    out: list[dict[str, Any]] = [{"role": "tool", "tool_call_id": call_id, "content": text or ""}]
    if images:
        out.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in images]})
    if refs:
        out.append({"role": "tool", "tool_call_id": call_id, "content": refs})
    return out


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    out = []
    for t in tools:
        schema = dict(t["input_schema"])
        schema.setdefault("type", "object")  # vLLM's AnthropicTool validator
        out.append(function_tool(t["name"], t.get("description"), schema, t.get("strict"), t.get("defer_loading")))
    return out


def chat_tool_choice(body: dict[str, Any]) -> object:
    choice = body.get("tool_choice")
    if choice is None:
        return "auto" if body.get("tools") is not None else None
    kind = choice["type"]
    if kind == "tool":
        return {"type": "function", "function": {"name": choice["name"]}}
    return {"auto": "auto", "any": "required", "none": "none"}[kind]


# -- answers ---------------------------------------------------------------------------------
def stop_reason(finish_reason: str | None) -> str:
    return "max_tokens" if finish_reason == "length" else "end_turn"


class MessagesAPI:
    def __init__(self, server: SimServer) -> None:
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
        model = check_model(body, srv.model, srv._adapter_names())
        messages = chat_messages(body, self.merge_inline_system())
        check_tool_choice(srv, chat_tool_choice(body))
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

    async def count_tokens(self, request: web.Request) -> web.Response:
        try:
            body = parse_json(await request.read())
        except ApiError as exc:
            return openai_error(exc)
        try:
            _validate(body, count=True)
        except ApiError as exc:
            return openai_error(exc)
        try:
            _, ids = self._prompt(body, count=True)
        except ApiError as exc:
            return anthropic_error(exc)
        return json_response({"input_tokens": len(ids), "context_management": {"original_input_tokens": len(ids)}})

    async def render(self, request: web.Request) -> web.Response:
        try:
            body = parse_json(await request.read())
            _validate(body, count=False)
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
            try:
                body = parse_json(await request.read())
                _validate(body, count=False)
            except ApiError as exc:
                return openai_error(exc)
            try:
                model, ids = self._prompt(body, count=False)
            except ApiError as exc:
                return anthropic_error(exc)
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
        read, written = max(req.num_cached_tokens, 0), req.num_cache_creation_tokens
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
