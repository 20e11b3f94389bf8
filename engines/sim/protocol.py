"""OpenAI/vLLM wire shapes: request validation and response bodies, field for field as
vLLM 0.32 writes them (../shared/reference/*.json, *.sse).  No I/O here."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson

VLLM_VERSION = "0.32.0"


class ApiError(Exception):
    """An error vLLM would answer with ``{"error": {...}}`` and this status."""

    TYPES = {400: "BadRequestError", 404: "NotFoundError", 429: "RateLimitError",
             500: "InternalServerError", 503: "ServiceUnavailableError"}

    @classmethod
    def queue_full(cls) -> ApiError:
        """vLLM's QueueOverflowError (--max-num-queued-reqs exceeded)."""
        return cls(503, "The engine is currently busy and cannot accept new requests. "
                        "Please try again later or on a different instance.")

    def __init__(self, status: int, message: str, param: str | None = None,
                 error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.error_type = error_type or self.TYPES.get(status, "Error")

    def body(self) -> bytes:
        return orjson.dumps({"error": {"message": self.message, "type": self.error_type,
                                       "param": self.param, "code": self.status}})


def random_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(8)}"


@dataclass(slots=True)
class GenerationParams:
    """What the engine needs from a completion or chat request."""

    kind: str  # "completion" | "chat"
    model: str
    prompt_ids: list[int]
    max_tokens: int | None  # None: the client set none
    stream: bool
    include_usage: bool
    continuous_usage: bool
    seed: int
    body: dict[str, Any]


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"JSON decode error: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "Input should be a valid dictionary or object to extract fields from")
    return body


def _opt(body: dict[str, Any], name: str, types: tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types:
        raise ApiError(400, f"{name}: Input should be a valid {types[0].__name__}", name)
    if not isinstance(value, types):
        raise ApiError(400, f"{name}: Input should be a valid {types[0].__name__}", name)
    return value


def check_model(body: dict[str, Any], served: str, adapters: Any = ()) -> str:
    """The request's model: the served name or one of `adapters` (a container of names)."""
    model = body.get("model")
    if model is None:
        return served
    if not isinstance(model, str):
        raise ApiError(400, "model: Input should be a valid string", "model")
    if model != served and model not in adapters:
        raise ApiError(404, f"The model `{model}` does not exist. Valid aliases: {served}.", "model")
    return model


def common_params(body: dict[str, Any]) -> tuple[int | None, bool, bool, bool, int]:
    max_tokens = _opt(body, "max_completion_tokens", (int,)) or _opt(body, "max_tokens", (int,))
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
    stream = _opt(body, "stream", (bool,), False)
    opts = _opt(body, "stream_options", (dict,), {})
    include_usage = bool(opts.get("include_usage", False))
    continuous = bool(opts.get("continuous_usage_stats", False))
    n = _opt(body, "n", (int,), 1)
    if n != 1:
        raise ApiError(400, "The simulator supports n=1 only.", "n")
    seed = _opt(body, "seed", (int,), 0)
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        _opt(body, name, (int, float))
    return max_tokens, stream, include_usage, continuous, seed


def check_length(prompt_len: int, max_tokens: int | None, max_model_len: int) -> None:
    if prompt_len > max_model_len:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, "
                            f"your request has {prompt_len} input tokens. Please reduce the length of "
                            f"the input messages.", "input_tokens")
    if max_tokens is not None and prompt_len + max_tokens > max_model_len:
        raise ApiError(400, f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This "
                            f"model's maximum context length is {max_model_len} tokens and your request "
                            f"has {prompt_len} input tokens ({max_tokens} > {max_model_len} - "
                            f"{prompt_len}).", "max_tokens")


# -- response bodies ------------------------------------------------------------------------
def usage(prompt: int, completion: int, cached: int | None = None, *, stream: bool = False,
          created: int | None = None, chat: bool = False) -> dict[str, Any]:
    """Usage as vLLM 0.32 writes it.  ``cached`` None: prompt-token details are off.

    Non-stream bodies carry every field; stream chunks drop unset ones (pydantic
    ``exclude_unset``): a completion's usage chunk has ``{"cached_tokens"}`` only, while chat
    sets ``created_cache_tokens`` too (verified against a live replica by tests/conformance).
    """
    out: dict[str, Any] = {"prompt_tokens": prompt, "total_tokens": prompt + completion,
                           "completion_tokens": completion}
    if cached is None:
        details = None
    elif chat and stream:
        details = {"cached_tokens": cached, "created_cache_tokens": created}
    elif chat:
        details = {"cached_tokens": cached, "created_cache_tokens": created, "multimodal_tokens": None}
    elif stream:
        details = {"cached_tokens": cached}
    else:
        details = {"cached_tokens": cached, "created_cache_tokens": None, "multimodal_tokens": None}
    if stream:
        if details is not None:
            out["prompt_tokens_details"] = details
        return out
    out["prompt_tokens_details"] = details
    out["completion_tokens_details"] = None
    return out


class Responder:
    """Builds the bodies of one completion/chat response."""

    def __init__(self, kind: str, model: str, fingerprint: str) -> None:
        self.kind = kind
        self.model = model
        self.fingerprint = fingerprint
        self.id = random_id("chatcmpl-" if kind == "chat" else "cmpl-")
        self.created = int(time.time())

    def full(self, text: str, finish_reason: str, usage_: dict[str, Any],
             kv_transfer_params: dict[str, Any] | None = None) -> bytes:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None,
                                              "annotations": None, "audio": None, "function_call": None,
                                              "reasoning": None},
                      "logprobs": None, "finish_reason": finish_reason, "stop_reason": None,
                      "token_ids": None, "routed_experts": None}
            return orjson.dumps({"id": self.id, "object": "chat.completion", "created": self.created,
                                 "model": self.model, "choices": [choice], "service_tier": None,
                                 "system_fingerprint": self.fingerprint, "usage": usage_,
                                 "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None,
                                 "kv_transfer_params": kv_transfer_params, "ec_transfer_params": None,
                                 "metrics": None})
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason,
                  "stop_reason": None, "token_ids": None, "prompt_logprobs": None,
                  "prompt_token_ids": None, "routed_experts": None}
        return orjson.dumps({"id": self.id, "object": "text_completion", "created": self.created,
                             "model": self.model, "choices": [choice], "service_tier": None,
                             "system_fingerprint": self.fingerprint, "usage": usage_,
                             "kv_transfer_params": kv_transfer_params, "ec_transfer_params": None,
                             "metrics": None})

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, **extra}
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def role_chunk(self, usage_: dict[str, Any] | None = None) -> bytes:
        """Chat only: the first chunk, carrying the role."""
        extra: dict[str, Any] = {"prompt_token_ids": None, "prompt_text": None}
        if usage_ is not None:
            extra["usage"] = usage_
        return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}], **extra)

    def delta_chunk(self, text: str, finish_reason: str | None,
                    usage_: dict[str, Any] | None = None) -> bytes:
        if self.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "logprobs": None,
                                      "finish_reason": finish_reason}
            if finish_reason is not None:
                choice["stop_reason"] = None
            choice["token_ids"] = None
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason,
                      "stop_reason": None, "prompt_token_ids": None, "token_ids": None}
        extra = {} if usage_ is None else {"usage": usage_}
        return self._chunk([choice], **extra)

    def usage_chunk(self, usage_: dict[str, Any]) -> bytes:
        return self._chunk([], usage=usage_, system_fingerprint=self.fingerprint)


DONE = b"data: [DONE]\n\n"


def _model_card(name: str, root: str, parent: str | None, max_model_len: int | None,
                created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "vllm", "root": root,
            "parent": parent, "max_model_len": max_model_len,
            "permission": [{"id": random_id("modelperm-"), "object": "model_permission", "created": created,
                            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                            "organization": "*", "group": None, "is_blocking": False}]}


def models_body(model: str, root: str, max_model_len: int, created: int,
                adapters: list[tuple[str, str]] = ()) -> bytes:  # type: ignore[assignment]
    """/v1/models: the base model, then its LoRA adapters (name, path) as vLLM lists them:
    root = the adapter's path, parent = the base model, max_model_len null."""
    cards = [_model_card(model, root, None, max_model_len, created)]
    cards += [_model_card(name, path, model, None, created) for name, path in adapters]
    return orjson.dumps({"object": "list", "data": cards})
