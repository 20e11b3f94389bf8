"""An Anthropic Messages request as vLLM 0.32 takes it: what its request model refuses
(`validate`, answered in the OpenAI shape, as FastAPI does), and the chat request vLLM makes
of it (`chat_messages`, `chat_tools`, `chat_tool_choice`: AnthropicServingMessages'
to_chat_completion_request).  No I/O here; anthropic.py serves the endpoints.
"""

from __future__ import annotations

import json
import time
from typing import Any

from engines.sim.agentic import function_tool, invalid, missing

ROLES = ("user", "assistant", "system")
BLOCK_TYPES = ("text", "image", "tool_use", "tool_result", "tool_reference", "thinking", "redacted_thinking",
               "tool_addition", "tool_removal")
_BILLING = "x-anthropic-billing-header"  # Claude Code's per-request header vLLM strips from system text


def validate(body: dict[str, Any], *, count: bool) -> None:
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
