"""The agentic APIs' conversations as chat messages: one shape for routing and tokenizing.

OpenAI's Responses API (``/v1/responses``) and Anthropic's Messages API (``/v1/messages``)
carry the same thing as chat completions (a system text, turns, tool calls and their
results, tool definitions) in other shapes, and vLLM turns both into chat messages before
it applies the model's chat template.  Mapping them here onto the chat shape lets one
renderer (rendering.render_messages) give every API its routing text, and one tokenizer
path (the chat template) its exact token ids, so that:

* the next turn of an agent loop extends the previous turn's routing text, as in chat
  (each item maps to messages independently of the items after it);
* the same conversation routes alike through all three APIs.

Responses (``instructions``, ``input``, ``tools``):
    ``instructions``                      -> a system message, first
    ``input`` as a string                 -> one user message
    message items (``role``, ``content``
      as a string or input_text /
      output_text / input_image parts)    -> a message of that role (``developer`` as system)
    ``function_call`` (call_id, name,
      arguments)                          -> an assistant message with one tool call
    ``function_call_output`` (call_id,
      output)                             -> a tool message
    ``reasoning``                         -> nothing (chat templates drop earlier turns'
                                             reasoning; its text is not part of the prompt)
    any other item                        -> a message of role ``item:{type}`` holding the
                                             item itself (a stable placeholder once rendered)
Messages (``system``, ``messages``, ``tools``):
    ``system`` (a string or text blocks)  -> a system message, first
    a message's text blocks               -> a message of its role
    ``tool_use`` blocks (id, name, input) -> tool calls of that assistant message
    ``tool_result`` blocks                -> a tool message each, before the rest of the turn
    ``thinking`` / ``redacted_thinking``  -> nothing (as reasoning above)
    other blocks (image, document, ...)   -> kept as parts (stable placeholders)
Tools keep their own shape (their canonical JSON is what is rendered).

A malformed conversation is not refused here (vLLM answers it with its own 400): whatever
it holds is mapped to something stable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

Messages = list[dict[str, Any]]
_ROLE_ALIASES = {"developer": "system"}
_SKIPPED_ITEMS = ("reasoning",)
_SKIPPED_BLOCKS = ("thinking", "redacted_thinking")


def _arguments(value: Any) -> str:
    """Tool-call arguments as chat carries them: a JSON string."""
    if isinstance(value, str):
        return value
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode("utf-8")


def _tool_call(call_id: Any, name: Any, arguments: Any) -> dict[str, Any]:
    return {"id": call_id if isinstance(call_id, str) else "", "type": "function",
            "function": {"name": name if isinstance(name, str) else "", "arguments": _arguments(arguments)}}


# -- Responses ----------------------------------------------------------------------------

_RESPONSE_TEXT_PARTS = ("input_text", "output_text")


def _parts(content: Any) -> Any:
    """A message item's content with its text parts in chat's shape ({"type": "text"})."""
    if not isinstance(content, list):
        return content
    return [{"type": "text", "text": p["text"]} if isinstance(p, Mapping) and p.get("type") in
            _RESPONSE_TEXT_PARTS and isinstance(p.get("text"), str) else p for p in content]


def _response_item(item: Any, out: Messages) -> None:
    if isinstance(item, str):  # (not in OpenAI's schema; a bare string is a user turn)
        out.append({"role": "user", "content": item})
        return
    if not isinstance(item, Mapping):
        out.append({"role": "item:value", "content": [{"type": "value", "value": item}]})
        return
    kind = item.get("type", "message")
    if kind == "message" or (kind is None and "role" in item):
        role: str = item["role"] if isinstance(item.get("role"), str) else "user"
        out.append({"role": _ROLE_ALIASES.get(role, role), "content": _parts(item.get("content"))})
    elif kind == "function_call":
        out.append({"role": "assistant", "content": None,
                    "tool_calls": [_tool_call(item.get("call_id"), item.get("name"), item.get("arguments"))]})
    elif kind == "function_call_output":
        output = item.get("output")
        out.append({"role": "tool", "tool_call_id": item.get("call_id") or "",
                    "content": output if isinstance(output, (str, list)) else _arguments(output)})
    elif kind in _SKIPPED_ITEMS:
        return
    else:
        out.append({"role": f"item:{kind}", "content": [dict(item)]})


def responses_to_chat(data: Mapping[str, Any]) -> tuple[Messages, list[Any] | None]:
    """(chat messages, tools) of a Responses request body."""
    out: Messages = []
    instructions = data.get("instructions")
    if isinstance(instructions, str) and instructions:
        out.append({"role": "system", "content": instructions})
    items = data.get("input")
    if isinstance(items, str):
        out.append({"role": "user", "content": items})
    elif isinstance(items, list):
        for item in items:
            _response_item(item, out)
    tools = data.get("tools")
    return out, (tools if isinstance(tools, list) and tools else None)


# -- Anthropic Messages ---------------------------------------------------------------------

def _anthropic_turn(message: Any, out: Messages) -> None:
    if not isinstance(message, Mapping):
        out.append({"role": "item:value", "content": [{"type": "value", "value": message}]})
        return
    role = message.get("role") if isinstance(message.get("role"), str) else "user"
    content = message.get("content")
    if not isinstance(content, list):
        out.append({"role": role, "content": content})
        return
    parts: list[Any] = []
    calls: list[dict[str, Any]] = []
    for block in content:
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind in _SKIPPED_BLOCKS:
            continue
        if kind == "tool_use":
            calls.append(_tool_call(block.get("id"), block.get("name"), block.get("input")))
        elif kind == "tool_result":
            result = block.get("content")
            out.append({"role": "tool", "tool_call_id": block.get("tool_use_id") or "",
                        "content": result if isinstance(result, (str, list)) else _arguments(result)})
        else:
            parts.append(block)
    if parts or calls:
        turn: dict[str, Any] = {"role": role, "content": parts or None}
        if calls:
            turn["tool_calls"] = calls
        out.append(turn)


def anthropic_to_chat(data: Mapping[str, Any]) -> tuple[Messages, list[Any] | None]:
    """(chat messages, tools) of an Anthropic Messages request body."""
    out: Messages = []
    system = data.get("system")
    if isinstance(system, str) and system:
        out.append({"role": "system", "content": system})
    elif isinstance(system, list) and system:
        out.append({"role": "system", "content": system})
    messages = data.get("messages")
    if isinstance(messages, list):
        for message in messages:
            _anthropic_turn(message, out)
    tools = data.get("tools")
    return out, (tools if isinstance(tools, list) and tools else None)


def as_chat(path: str, data: Mapping[str, Any]) -> tuple[Messages, list[Any] | None] | None:
    """(chat messages, tools) of a request on an agentic API's path (None for other paths)."""
    if path == RESPONSES_PATH:
        return responses_to_chat(data)
    if path == MESSAGES_PATH:
        return anthropic_to_chat(data)
    return None


def chat_body(path: str, data: Mapping[str, Any]) -> dict[str, Any] | None:
    """The chat-completions body equivalent to an agentic request (None for other paths):
    what the local chat template or the replica's /tokenize is given in exact mode."""
    chat = as_chat(path, data)
    if chat is None:
        return None
    messages, tools = chat
    body: dict[str, Any] = {"model": data.get("model"), "messages": messages}
    if tools:
        body["tools"] = tools
    return body


RESPONSES_PATH = "/v1/responses"
MESSAGES_PATH = "/v1/messages"
