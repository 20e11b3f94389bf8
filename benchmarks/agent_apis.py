"""One agent conversation in each API's shape: chat, OpenAI Responses, Anthropic Messages.

The agentic workload (workloads.py) is a tool loop: a task, then call after call a tool
result.  With ``tool_calls: true`` its turns are sent as a real tool loop: each answer is an
assistant turn that calls the tool, and the next turn is that call's result.  The same
conversation is encoded for each API, so the three scenarios (`api: chat | responses |
messages`) send one conversation three ways and their hit rates can be compared:

    chat       assistant {content, tool_calls: [{id, function: {name, arguments}}]},
               tool {tool_call_id, content}
    responses  instructions = the system text; input items: user message, assistant
               message (output_text), function_call {call_id, name, arguments},
               function_call_output {call_id, output}
    messages   system; assistant content [text, tool_use {id, name, input}], then a user
               turn [tool_result {tool_use_id, content}]

Answers are parsed from each API's stream (vLLM 0.32's events): chat chunks
(``choices[].delta.content``), Responses events (``response.output_text.delta``, the usage
in ``response.completed``), Messages events (``content_block_delta`` / ``text_delta``, the
usage in ``message_start`` and ``message_delta``).
"""

from __future__ import annotations

from typing import Any

TOOL_NAME = "run_tool"
_PARAMETERS = {"type": "object", "properties": {"step": {"type": "integer"}}, "required": ["step"]}
CHAT_TOOLS = [{"type": "function", "function": {"name": TOOL_NAME, "description": "Run the next tool step.",
                                                "parameters": _PARAMETERS}}]
RESPONSES_TOOLS = [{"type": "function", "name": TOOL_NAME, "description": "Run the next tool step.",
                    "parameters": _PARAMETERS}]
ANTHROPIC_TOOLS = [{"name": TOOL_NAME, "description": "Run the next tool step.", "input_schema": _PARAMETERS}]
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
         "responses": "/v1/responses", "messages": "/v1/messages"}
DONE_EVENTS = ("response.completed", "message_stop")


def call_id(turn: int) -> str:
    return f"call_{turn:04d}"


def tool_loop_messages(system: str | None, texts: list[str], answers: list[str]) -> list[dict[str, Any]]:
    """Chat messages of a tool loop: `texts[0]` the task, `texts[k]` the result of the k-th
    call, `answers[k]` the assistant's text before that call (len(answers) == len(texts) - 1)."""
    out: list[dict[str, Any]] = []
    if system is not None:
        out.append({"role": "system", "content": system})
    out.append({"role": "user", "content": texts[0]})
    for k, answer in enumerate(answers):
        out.append({"role": "assistant", "content": answer, "tool_calls": [
            {"id": call_id(k), "type": "function",
             "function": {"name": TOOL_NAME, "arguments": f'{{"step": {k}}}'}}]})
        out.append({"role": "tool", "tool_call_id": call_id(k), "content": texts[k + 1]})
    return out


def responses_input(messages: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """(instructions, input items) of chat messages."""
    instructions = None
    items: list[dict[str, Any]] = []
    for m in messages:
        role = m["role"]
        if role == "system":
            instructions = m["content"]
        elif role == "user":
            items.append({"role": "user", "content": m["content"]})
        elif role == "assistant":
            if m.get("content"):
                items.append({"type": "message", "role": "assistant",
                              "content": [{"type": "output_text", "text": m["content"]}]})
            for call in m.get("tool_calls") or ():
                items.append({"type": "function_call", "call_id": call["id"],
                              "name": call["function"]["name"], "arguments": call["function"]["arguments"]})
        elif role == "tool":
            items.append({"type": "function_call_output", "call_id": m["tool_call_id"], "output": m["content"]})
    return instructions, items


def anthropic_messages(messages: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """(system, messages) of chat messages; tool results are user turns, as Anthropic has it."""
    import orjson

    system = None
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m["role"]
        if role == "system":
            system = m["content"]
        elif role == "user":
            out.append({"role": "user", "content": m["content"]})
        elif role == "assistant":
            blocks: list[dict[str, Any]] = []
            if m.get("content"):
                blocks.append({"type": "text", "text": m["content"]})
            for call in m.get("tool_calls") or ():
                blocks.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                               "input": orjson.loads(call["function"]["arguments"])})
            out.append({"role": "assistant", "content": blocks})
        elif role == "tool":
            out.append({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": m["tool_call_id"], "content": m["content"]}]})
    return system, out


def encode(api: str, body: dict[str, Any], messages: list[dict[str, Any]], tools: bool) -> None:
    """Put `messages` into `body` in `api`'s shape (the chat fields already set are renamed)."""
    if api == "chat":
        body["messages"] = messages
        if tools:
            body["tools"] = CHAT_TOOLS
        return
    max_tokens = body.pop("max_tokens")
    body.pop("user", None)
    body.pop("stream_options", None)
    if api == "responses":
        instructions, items = responses_input(messages)
        if instructions is not None:
            body["instructions"] = instructions
        body["input"] = items
        body["max_output_tokens"] = max_tokens
        if tools:
            body["tools"] = RESPONSES_TOOLS
    elif api == "messages":
        system, turns = anthropic_messages(messages)
        if system is not None:
            body["system"] = system
        body["messages"] = turns
        body["max_tokens"] = max_tokens
        if tools:
            body["tools"] = ANTHROPIC_TOOLS
    else:
        raise ValueError(f"unknown api {api!r}")


def event_text(data: dict[str, Any]) -> str | None:
    """The answer text a Responses or Messages stream event adds (None: it adds none)."""
    kind = data.get("type")
    if kind == "response.output_text.delta":
        return data.get("delta") or None
    if kind == "content_block_delta":
        delta = data.get("delta") or {}
        return delta.get("text") if delta.get("type") == "text_delta" else None
    return None


def event_usage(data: dict[str, Any]) -> dict[str, Any] | None:
    """The usage a Responses or Messages event carries, in chat's names."""
    kind = data.get("type")
    if kind == "response.completed":
        return responses_usage((data.get("response") or {}).get("usage"))
    if kind == "message_start":
        return anthropic_usage((data.get("message") or {}).get("usage"))
    if kind == "message_delta":
        return anthropic_usage(data.get("usage"))
    return None


def responses_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not usage:
        return None
    return {"prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens"),
            "prompt_tokens_details": usage.get("input_tokens_details") or {}}


def anthropic_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Anthropic counts cached tokens apart from input_tokens: prompt = both (vLLM's split)."""
    if not usage:
        return None
    cached = usage.get("cache_read_input_tokens")
    prompt = usage.get("input_tokens")
    if prompt is not None and cached:
        prompt += cached + (usage.get("cache_creation_input_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": usage.get("output_tokens"),
            "prompt_tokens_details": {"cached_tokens": cached}}


def whole_answer(api: str, data: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """(text, usage in chat's names) of a non-streamed answer."""
    if api == "responses":
        text = "".join(part.get("text") or "" for item in data.get("output") or ()
                       if item.get("type") == "message" for part in item.get("content") or ())
        return text, responses_usage(data.get("usage"))
    if api == "messages":
        text = "".join(block.get("text") or "" for block in data.get("content") or ()
                       if block.get("type") == "text")
        return text, anthropic_usage(data.get("usage"))
    choice = (data.get("choices") or [{}])[0]
    return (choice.get("message") or {}).get("content") or choice.get("text") or "", data.get("usage")
