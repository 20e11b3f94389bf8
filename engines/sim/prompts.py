"""A request's prompt as token ids, and the endpoints that only tokenize it (no generation):
POST /tokenize, /detokenize, /v1/completions/render and /v1/chat/completions/render.

`chat_ids` and `prompt_ids` are what every generating endpoint turns its body into before the
engine sees it (completions.py; responses.py and anthropic.py through the server's chat_ids),
so the token ids /tokenize answers are the ones generation uses.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from engines.sim.answers import json_response, openai_error
from engines.sim.host import SimHost
from engines.sim.protocol import ApiError, check_model, parse_json, random_id
from engines.sim.tokenizer import RealTokenizer, Tokenizer, content_text, developer_as_system

SAMPLING_KEYS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                 "max_tokens", "min_tokens", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "ignore_eos", "logprobs", "skip_special_tokens")


def chat_ids(tok: Tokenizer | RealTokenizer, body: dict[str, Any]) -> list[int]:
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
    if not tok.supports_developer_role and any(m["role"] == "developer" for m in messages):
        body = {**body, "messages": developer_as_system(messages)}
    try:
        return tok.encode_chat(body)
    except Exception as exc:  # noqa: BLE001 - a real template may raise on odd input
        raise ApiError(400, f"messages: the chat template failed: {exc}", "messages") from None


def prompt_ids(tok: Tokenizer | RealTokenizer, body: dict[str, Any]) -> list[int]:
    """A completion body's prompt token ids: a string, token ids, or a list of one of them."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "prompt cannot be empty", "prompt")
        return tok.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                   for t in prompt):
        if any(t < 0 or t >= tok.vocab_size for t in prompt):
            raise ApiError(400, "Token id out of vocabulary", "prompt")
        return list(prompt)
    if prompt is None:
        raise ApiError(400, "prompt: Field required", "prompt")
    raise ApiError(400, "prompt: a string, a list of token ids, or a list of one of them", "prompt")


async def model_body(srv: SimHost, request: web.Request) -> tuple[dict[str, Any], str]:
    """A request's JSON body and the model it names (the base model or one of its adapters).
    Raises ApiError."""
    body = parse_json(await request.read())
    return body, check_model(body, srv.model, srv.adapter_names())


class PromptAPI:
    """The tokenize and render endpoints of the OpenAI-shaped API."""

    def __init__(self, host: SimHost) -> None:
        self.srv = host

    async def tokenize(self, request: web.Request) -> web.Response:
        srv = self.srv
        try:
            body, _ = await model_body(srv, request)
            if "messages" in body:
                ids = chat_ids(srv.tok, body)
            else:
                prompt = body.get("prompt")
                if not isinstance(prompt, str):
                    raise ApiError(400, "prompt: Input should be a valid string", "prompt")
                ids = srv.tok.encode(prompt)
        except ApiError as exc:
            return openai_error(exc)
        strs = [srv.tok.token_str(t) for t in ids] if body.get("return_token_strs") else None
        return json_response({"count": len(ids), "max_model_len": srv.max_model_len, "tokens": ids,
                              "token_strs": strs})

    async def detokenize(self, request: web.Request) -> web.Response:
        srv = self.srv
        try:
            body, _ = await model_body(srv, request)
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                raise ApiError(400, "tokens: Input should be a valid list of integers", "tokens")
        except ApiError as exc:
            return openai_error(exc)
        return json_response({"prompt": srv.tok.decode(tokens)})

    def _generate_request(self, kind: str, body: dict[str, Any], ids: list[int]) -> dict[str, Any]:
        sampling = {k: body[k] for k in SAMPLING_KEYS if body.get(k) is not None}
        if "max_tokens" not in sampling and body.get("max_completion_tokens") is not None:
            sampling["max_tokens"] = body["max_completion_tokens"]
        return {"request_id": random_id("chatcmpl-" if kind == "chat" else "cmpl-"), "token_ids": ids,
                "features": None, "sampling_params": sampling, "model": self.srv.model,
                "stream": bool(body.get("stream", False)), "stream_options": body.get("stream_options"),
                "cache_salt": body.get("cache_salt"), "priority": body.get("priority", 0),
                "kv_transfer_params": None, "token_offsets": None}

    async def render_completion(self, request: web.Request) -> web.Response:
        srv = self.srv
        try:
            body, _ = await model_body(srv, request)
            prompts = body.get("prompt")
            if isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts):
                out = [self._generate_request("completion", body, prompt_ids(srv.tok, {"prompt": p}))
                       for p in prompts]
            else:
                out = [self._generate_request("completion", body, prompt_ids(srv.tok, body))]
        except ApiError as exc:
            return openai_error(exc)
        return json_response(out)

    async def render_chat(self, request: web.Request) -> web.Response:
        srv = self.srv
        try:
            body, _ = await model_body(srv, request)
            out = self._generate_request("chat", body, chat_ids(srv.tok, body))
            out["assistant_tokens_mask"] = None
        except ApiError as exc:
            return openai_error(exc)
        return json_response(out)
