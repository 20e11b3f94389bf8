"""What the agentic APIs (responses.py: OpenAI Responses; anthropic.py: Anthropic Messages)
share: request validation errors in the shape vLLM's FastAPI layer gives them, the render
endpoints' GenerateRequest, tools and message content as the chat template gets them, and
the tool-choice check.  (Their JSON and SSE answers: answers.py.)

Both APIs turn their request into chat messages (plus tools) and tokenize those through the
chat template, exactly as vLLM 0.32 does, so a later turn extends the earlier turn's tokens
and hits its cached blocks; the request then runs in the engine like a chat request (the same
scheduler, KV cache, KV events and metrics)."""

from __future__ import annotations

from typing import Any

from engines.sim.options import ServerOptions
from engines.sim.protocol import ApiError


def missing(field: str, body: dict[str, Any]) -> ApiError:
    """A required field is absent: FastAPI's 400, as vLLM 0.32 words it."""
    return invalid(field, "missing", "Field required", f"'<dict of {len(body)} items>'")


def invalid(field: str, kind: str, msg: str, value: object) -> ApiError:
    """A field failed validation: vLLM's 400 for a pydantic error (type "Bad Request", param
    ``body.<field>``)."""
    shown = value if isinstance(value, str) and value.startswith("'") else repr(value)
    if len(shown) > 100:
        shown = shown[:97] + "..."
    text = f"1 validation error:\n  {{'type': '{kind}', 'loc': 'body.{field}', 'msg': {msg!r}, 'input': {shown}}}"
    return ApiError(400, text, f"body.{field}", "Bad Request")


def generate_request(request_id: str, ids: list[int], sampling: dict[str, Any], model: Any, stream: bool,
                     body: dict[str, Any]) -> dict[str, Any]:
    """The render endpoints' answer (vLLM 0.32's GenerateRequest, in its key order)."""
    return {"request_id": request_id, "token_ids": ids, "token_offsets": None, "features": None,
            "content_parts": None, "sampling_params": sampling, "model": model, "reasoning_ended": None,
            "reasoning_parser_kwargs": None, "return_token_ids": None, "output_mode": "tokens", "stream": stream,
            "stream_options": None, "cache_salt": body.get("cache_salt"), "priority": body.get("priority", 0),
            "kv_transfer_params": body.get("kv_transfer_params"), "ec_transfer_params": None}


def function_tool(name: object, description: object, parameters: object, strict: object = None,
                  defer_loading: object = None) -> dict[str, Any]:
    """A tool as vLLM hands it to the chat template (ChatCompletionToolsParam.model_dump():
    ``strict`` and ``defer_loading`` only when set)."""
    fn: dict[str, Any] = {"name": name, "description": description, "parameters": parameters}
    if strict is not None:
        fn["strict"] = strict
    if defer_loading is not None:
        fn["defer_loading"] = defer_loading
    return {"type": "function", "function": fn}


def text_of(content: object) -> str | None:
    """The text of a message's content as vLLM's "string" content format joins it: a string, or
    the text parts of a list (``text`` / ``input_text`` / ``output_text``) joined by newlines."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
                 and p.get("type", "text") in ("text", "input_text", "output_text")]
        return "\n".join(texts)
    raise ApiError(400, "content: a string or a list of content parts", "input")


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages as the chat template sees them in vLLM: content a string (None, an
    assistant message that only calls tools, renders as empty text)."""
    out = []
    for m in messages:
        msg = dict(m)
        msg.pop("type", None)
        msg.pop("status", None)
        msg.pop("id", None)
        msg["content"] = text_of(m.get("content")) or ""
        out.append(msg)
    return out


def check_tool_choice(opts: ServerOptions, tool_choice: object) -> None:
    """vLLM refuses a tool choice other than none when it has no tool-call parser
    (--tool-call-parser), and "auto" without --enable-auto-tool-choice; the simulator has one
    unless started with ``--tool-call-parser none``."""
    if tool_choice in (None, "none"):
        return
    parser = opts.tool_call_parser
    if tool_choice == "auto":
        if parser is None or not opts.enable_auto_tool_choice:
            raise ApiError(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                                "to be set")
        return
    if parser is None:
        if isinstance(tool_choice, dict):
            fn = tool_choice.get("function")
            desc = f'function "{fn.get("name") if isinstance(fn, dict) else tool_choice.get("name")}"'
        else:
            desc = f'"{tool_choice}"'
        raise ApiError(400, f"tool_choice={desc} requires --tool-call-parser to be set")
