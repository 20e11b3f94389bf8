"""The OpenAI Responses API's wire shapes as vLLM 0.32 writes them, field for field and in
its key order (tests/reference/agentic/responses*.json, *.sse).  No I/O here.

* `input_messages`: a request's conversation as chat messages, vLLM's
  ``construct_input_messages``: the instructions as a system message, then the stored
  history of ``previous_response_id`` (its messages without their system messages, then its
  output text as assistant messages), then the new input items;
* `ResponseShape`: the response object (``object: "response"``) and its usage;
* `EventStream`: the named SSE events of a streamed response, with sequence numbers.
"""

from __future__ import annotations

import json
import time
from typing import Any

from engines.sim.agentic import function_tool, text_of
from engines.sim.answers import sse_event
from engines.sim.protocol import ApiError, random_id

# function tools as the openai types vLLM 0.32 validates them into echo these keys, in order
_FUNCTION_TOOL_KEYS = ("name", "parameters", "strict", "type", "allowed_callers", "async", "defer_loading",
                       "description", "output_schema")
CUSTOM_TOOL_INPUT_KEY = "input"  # vLLM wraps a custom tool call's input as {"input": ...}


def input_messages(instructions: str | None, input_: str | list[Any], prev_messages: list[dict[str, Any]] | None,
                   prev_output: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The chat messages of one turn (vLLM's construct_input_messages).  Instructions do not
    carry over: the previous turn's system messages are dropped and this turn's instructions
    lead.  Only the previous output's *message* items come back (as assistant text), not its
    reasoning or function calls."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    if prev_messages is not None:
        messages.extend(m for m in prev_messages if m.get("role") != "system")
    for item in prev_output or ():
        if item.get("type") == "message":
            for part in item.get("content") or ():
                messages.append({"role": "assistant", "content": part.get("text")})
    if isinstance(input_, str):
        messages.append({"role": "user", "content": input_})
    else:
        messages.extend(item_messages(input_))
    return messages


def item_messages(items: list[Any]) -> list[dict[str, Any]]:
    """Input items as chat messages (vLLM's construct_chat_messages_with_tool_call): a
    ``function_call`` joins the previous assistant message's tool_calls (or starts one), a
    ``function_call_output`` becomes a ``tool`` message, an assistant message's text fills
    a previous tool-calling assistant message that has none, ``reasoning`` becomes the
    assistant's reasoning; anything with a role is a message as it is."""
    messages: list[dict[str, Any]] = []
    for item in items:
        if not isinstance(item, dict):
            raise ApiError(400, "input: each item must be an object", "input", "BadRequestError")
        msg = _item_message(item, messages[-1] if messages else None)
        if msg is not None:
            messages.append(msg)
    return messages


def _item_message(item: dict[str, Any], prev: dict[str, Any] | None) -> dict[str, Any] | None:
    prev_assistant = prev if prev is not None and prev.get("role") == "assistant" else None
    kind = item.get("type")
    call = None
    if kind == "function_call":
        name = str(item.get("name", ""))
        if item.get("namespace"):
            name = f"{item['namespace']}__{name}"
        call = {"id": item.get("call_id"), "function": {"name": name, "arguments": item.get("arguments")},
                "type": "function"}
    elif kind == "custom_tool_call":
        call = {"id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"),
                             "arguments": json.dumps({CUSTOM_TOOL_INPUT_KEY: item.get("input") or ""},
                                                     ensure_ascii=False)}}
    if call is not None:
        if prev_assistant is not None:
            prev_assistant.setdefault("tool_calls", []).append(call)
            return None
        return {"role": "assistant", "tool_calls": [call]}
    if kind == "reasoning":
        if item.get("encrypted_content"):
            raise ApiError(400, "Encrypted content is not supported. (parameter=input)", "input", "BadRequestError")
        texts = item.get("content") or item.get("summary") or []
        reasoning = texts[0].get("text", "") if texts and isinstance(texts[0], dict) else ""
        if prev_assistant is not None and prev_assistant.get("reasoning") is None:
            prev_assistant["reasoning"] = reasoning
            return None
        return {"role": "assistant", "reasoning": reasoning}
    if kind in ("function_call_output", "custom_tool_call_output"):
        return {"role": "tool", "content": item.get("output"), "tool_call_id": item.get("call_id")}
    if item.get("role") == "assistant":
        content = item.get("content")
        text = content if isinstance(content, str) else (
            content[0].get("text") if isinstance(content, list) and content and isinstance(content[0], dict)
            else None)
        if text is not None:
            if prev_assistant is not None and prev_assistant.get("content") is None:
                prev_assistant["content"] = text
                return None
            return {"role": "assistant", "content": text}
    if "role" in item:
        return {**item, "content": text_of(item.get("content"))}
    raise ApiError(400, f"Unsupported input item type: {kind} (parameter=input)", "input", "BadRequestError")


def continues_final_message(input_: str | list[Any]) -> bool:
    """An input ending in a partial assistant message (status in_progress / incomplete) is
    continued instead of answered (no generation prompt), as in vLLM."""
    if isinstance(input_, str) or not input_:
        return False
    last = input_[-1]
    if not isinstance(last, dict) or last.get("type", "message") not in ("message", "reasoning"):
        return False
    return last.get("status") in ("in_progress", "incomplete")


def chat_tools(tools: list[Any]) -> list[dict[str, Any]]:
    """Function tools in the chat form the template gets (vLLM's construct_tool_dicts)."""
    out = []
    for tool in tools:
        if isinstance(tool, dict) and tool.get("type") == "function":
            out.append(function_tool(tool.get("name"), tool.get("description"), tool.get("parameters"),
                                     tool.get("strict"), tool.get("defer_loading")))
    return out


def echo_tools(tools: list[Any]) -> list[Any]:
    return [{k: t.get(k) for k in _FUNCTION_TOOL_KEYS} | {"type": "function"}
            if isinstance(t, dict) and t.get("type") == "function" else t for t in tools]


def output_message(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"annotations": [], "text": text, "type": "output_text", "logprobs": None}] if text else []
    return {"id": item_id, "content": content, "role": "assistant", "status": status, "type": "message",
            "phase": None}


def usage(prompt: int, output: int, cached: int, written: int) -> dict[str, Any]:
    """A response's usage: ``input_tokens_details.cached_tokens`` is the prefix-cache hit (set
    whatever --enable-prompt-tokens-details says), ``cache_write_tokens`` the prompt tokens this
    request added to the cache; the per-turn lists stay empty outside gpt-oss' tool loop."""
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written,
                                     "input_tokens_per_turn": [], "cached_tokens_per_turn": []},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0,
                                      "output_tokens_per_turn": [], "tool_output_tokens_per_turn": []},
            "total_tokens": prompt + output}


def _float(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


class ResponseShape:
    """The response object of one request (vLLM's ResponsesResponse.from_request)."""

    def __init__(self, response_id: str, body: dict[str, Any], model: str, max_tokens: int) -> None:
        self.id = response_id
        self.body = body
        self.model = model
        self.max_tokens = max_tokens
        self.created_at = int(time.time())

    def obj(self, status: str, output: list[dict[str, Any]], usage_: dict[str, Any] | None) -> dict[str, Any]:
        b = self.body
        tools = b.get("tools") or []
        choice = b.get("tool_choice", "auto")
        if not tools and choice in ("auto", "none"):
            choice = "none"
        include = b.get("include") or []
        return {
            "id": self.id, "created_at": self.created_at,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": b.get("instructions"), "metadata": b.get("metadata"), "model": self.model,
            "object": "response", "output": output,
            "parallel_tool_calls": b.get("parallel_tool_calls") if b.get("parallel_tool_calls") is not None
            else True,
            "temperature": _float(b.get("temperature"), 1.0), "tool_choice": choice, "tools": echo_tools(tools),
            "top_p": _float(b.get("top_p"), 1.0), "background": bool(b.get("background")),
            "max_output_tokens": self.max_tokens, "max_tool_calls": b.get("max_tool_calls"),
            "previous_response_id": b.get("previous_response_id"), "prompt": None,
            "reasoning": b.get("reasoning"), "service_tier": b.get("service_tier") or "auto", "status": status,
            "text": b.get("text"),
            "top_logprobs": b.get("top_logprobs", 0) if "message.output_text.logprobs" in include else None,
            "truncation": b.get("truncation") or "disabled", "usage": usage_, "user": b.get("user"),
            "presence_penalty": _float(b.get("presence_penalty"), 0.0),
            "frequency_penalty": _float(b.get("frequency_penalty"), 0.0),
            "kv_transfer_params": None, "ec_transfer_params": None, "input_messages": None, "output_messages": None,
        }


class EventStream:
    """The events of one streamed response, numbered from 0 (vLLM's sequence_number), in the
    order vLLM 0.32 sends them: response.created, response.in_progress,
    response.output_item.added, response.content_part.added, response.output_text.delta (one
    per token), response.output_text.done, response.content_part.done,
    response.output_item.done, response.completed.  No ``data: [DONE]``."""

    def __init__(self, shape: ResponseShape) -> None:
        self.shape = shape
        self.seq = 0
        self.item_id = random_id("msg_")
        self.text: list[str] = []

    def _event(self, kind: str, fields: dict[str, Any]) -> bytes:
        """An event's top-level keys come in alphabetical order (the openai event types'
        field order), sequence_number and type among them."""
        data = dict(sorted({**fields, "sequence_number": self.seq, "type": kind}.items()))
        self.seq += 1
        return sse_event(kind, data)

    def start(self) -> list[bytes]:
        initial = self.shape.obj("in_progress", [], None)
        return [self._event("response.created", {"response": initial}),
                self._event("response.in_progress", {"response": initial})]

    def delta(self, piece: str) -> list[bytes]:
        out = []
        if not self.text:
            item = {"id": self.item_id, "content": [], "role": "assistant", "status": "in_progress",
                    "type": "message", "phase": None}
            out.append(self._event("response.output_item.added", {"item": item, "output_index": 0}))
            part = {"annotations": [], "text": "", "type": "output_text", "logprobs": []}
            out.append(self._event("response.content_part.added", {
                "content_index": 0, "item_id": self.item_id, "output_index": 0, "part": part}))
        self.text.append(piece)
        out.append(self._event("response.output_text.delta", {
            "content_index": 0, "delta": piece, "item_id": self.item_id, "logprobs": [], "output_index": 0}))
        return out

    def output(self) -> list[dict[str, Any]]:
        return [output_message(self.item_id, "".join(self.text))] if self.text else []

    def finish(self, final: dict[str, Any]) -> list[bytes]:
        out = []
        if self.text:
            text = "".join(self.text)
            out.append(self._event("response.output_text.done", {
                "content_index": 0, "item_id": self.item_id, "logprobs": [], "output_index": 0, "text": text}))
            part = {"annotations": [], "text": text, "type": "output_text", "logprobs": None}
            out.append(self._event("response.content_part.done", {
                "content_index": 0, "item_id": self.item_id, "output_index": 0, "part": part}))
            out.append(self._event("response.output_item.done", {
                "item": output_message(self.item_id, text), "output_index": 0}))
        out.append(self._event("response.completed", {"response": final}))
        return out
