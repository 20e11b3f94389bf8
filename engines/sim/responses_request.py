"""A Responses API request, parsed and checked as vLLM 0.32 does: `parse_job` turns a POST
/v1/responses (or /render) body into a `Job` (its chat messages, prompt ids and limits), and
`query_bool` / `query_int` read GET /v1/responses/{id}'s query.  The errors are vLLM's, word
for word (tests/reference/agentic/responses*)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from engines.sim.agentic import invalid, missing, template_messages
from engines.sim.host import SimHost
from engines.sim.protocol import ApiError, check_model, random_id
from engines.sim.response_store import ResponseStore
from engines.sim.responses_shapes import chat_tools, continues_final_message, input_messages

_NO_STORE_BACKGROUND = ("This vLLM engine does not support `store=True` and therefore does not support the "
                        "background mode. To enable these features, set the environment variable "
                        "`VLLM_ENABLE_RESPONSES_API_STORE=1` when launching the vLLM server.")


@dataclass
class Job:
    """One parsed request."""

    id: str
    body: dict[str, Any]
    model: str
    prompt_ids: list[int]
    max_tokens: int | None  # what the engine generates (None: --default-output-len, then "stop")
    echo_max: int  # max_output_tokens in the answer: vLLM's sampling max_tokens
    seed: int
    messages: list[dict[str, Any]]
    stream: bool
    background: bool
    store: bool


def not_found(response_id: str) -> ApiError:
    return ApiError(404, f"Response with id '{response_id}' not found.", "response_id", "invalid_request_error")


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, "bool_type", "Input should be a valid boolean", value)
    return value


def _typed(body: dict[str, Any], name: str, types: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
        raise invalid(name, f"{what}_type", f"Input should be a valid {what}", value)
    return value


def parse_job(srv: SimHost, store: ResponseStore | None, body: dict[str, Any], *, render: bool = False) -> Job:
    """The job of a request body; `store` is None when the store is off.  Raises ApiError."""
    if body.get("input") is None:
        # vLLM's "before" validators have set tool_choice by then (to "none" without tools)
        raise missing("input", body if body.get("tools") else {**body, "tool_choice": "none"})
    input_ = body["input"]
    if not isinstance(input_, (str, list)):
        raise invalid("input", "string_type", "Input should be a valid string", input_)
    background = _bool(body, "background", False)
    keep = body.get("store", True) is not False and body.get("store", True) is not None
    if background and not keep:
        raise ApiError(400, "background can only be used when `store` is true (parameter=background)",
                       "background")
    if body.get("prompt") is not None:
        raise ApiError(400, "prompt template is not supported (parameter=prompt)", "prompt")
    instructions = _typed(body, "instructions", (str,), "string")
    requested = _typed(body, "max_output_tokens", (int,), "integer")
    previous = _typed(body, "previous_response_id", (str,), "string")
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        _typed(body, name, (int, float), "number")
    seed = _typed(body, "seed", (int,), "integer") or 0
    stream = _bool(body, "stream", False)
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise invalid("tools", "list_type", "Input should be a valid list", tools)
    model = check_model(body, srv.model, srv.adapter_names())
    prev = None
    if render:
        if previous is not None:
            raise ApiError(400, "previous_response_id is not supported by the stateless render endpoint.",
                           "previous_response_id", "invalid_request_error")
    else:
        if keep and background and store is None:
            raise ApiError(400, _NO_STORE_BACKGROUND, "background", "invalid_request_error")
        keep = keep and store is not None  # vLLM: `store` silently off without the switch
        if previous is not None:
            prev = store.get(previous) if store is not None else None
            if prev is None:
                raise not_found(previous)
    messages = input_messages(instructions, input_, prev.messages if prev else None,
                              prev.body.get("output") if prev else None)
    continue_final = continues_final_message(input_)
    ids = srv.chat_ids({"messages": template_messages(messages), "tools": chat_tools(tools) or None,
                        "add_generation_prompt": not continue_final,
                        "continue_final_message": continue_final})
    limit = srv.max_model_len
    if len(ids) >= limit:
        raise ApiError(400, f"The engine prompt length {len(ids)} exceeds the max_model_len {limit}. "
                            "Please reduce prompt.", "input", "invalid_request_error")
    room = limit - len(ids)
    if requested is not None and requested < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {requested}.", "max_output_tokens")
    max_tokens = None if requested is None else min(requested, room)
    rid = body.get("request_id")
    return Job(id=rid if isinstance(rid, str) and rid else random_id("resp_"), body=body, model=model,
               prompt_ids=ids, max_tokens=max_tokens, echo_max=room if max_tokens is None else max_tokens,
               seed=seed, messages=messages, stream=stream, background=background, store=keep)


_TRUE = ("1", "true", "t", "yes", "y", "on")
_FALSE = ("0", "false", "f", "no", "n", "off")


def query_bool(request: web.Request, name: str) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return False
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ApiError(400, f"{name}: Input should be a valid boolean", f"query.{name}", "Bad Request")


def query_int(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, f"{name}: Input should be a valid integer", f"query.{name}", "Bad Request") from None
