"""Canonical routing input of a request: the text (or token ids) whose prefix is cached.

The router never runs the model's chat template (it has no tokenizer).  It needs
something cheaper with the one property that matters for prefix routing: **when one
request's prompt extends another's, its routing text extends the other's routing text**.
Then the chained block hashes of the shorter one (hashing.py) are a prefix of the longer
one's, and the prefix index finds the replica that served the earlier request.

Completions (``prompt``) and embeddings (``input``)
    * a string: the string itself;
    * a list of strings (a batch): the **first** string.  The whole batch goes to one
      replica, batches usually share their prefix (few-shot examples, a system text), and
      the first prompt's blocks are the ones that replica will cache first.  Concatenating
      the batch would produce blocks that no replica ever caches;
    * a list of token ids: the token ids (hashed in token blocks, not as text);
    * a list of token-id lists: the first list, for the same reason as strings.
    An empty prompt has no routing input.

Chat (``messages``, with optional ``tools``) is rendered as the concatenation of one
piece per message, in order, after an optional tools header::

    <|tools|>\\n{canonical JSON of the tools array}\\n          (only when tools are given)
    <|{role}|>[ name={name}][ id={tool_call_id}]\\n              (one header per message)
    {content}                                                  (see below)
    <|tool_call|>{id} {function name}({arguments})\\n           (one per assistant tool call)
    \\n                                                         (end of the message)

Content is a string, or a list of parts rendered in order: ``text`` (and ``refusal``)
parts contribute their text; every other part (``image_url``, ``input_audio``,
``video_url``, ``file``, ...) becomes a stable placeholder ``<|{type}:{hash}|>`` whose
hash is xxh3_64 of the part's canonical JSON, so the same image renders the same
placeholder in every turn and different images never look alike.  Tool results are
messages of role ``tool`` whose header carries the ``tool_call_id``.

Because each message renders independently of the messages after it, the rendering of
messages[:k] is always a prefix of the rendering of messages[:k+j]: the next turn of a
conversation (previous messages + the assistant's reply + a new user message) is a
textual extension of the previous turn.  No escaping is done: a message whose text
imitates a header could render like a different conversation, which costs at most a
wrong cache guess, never a wrong answer (the replica computes the real prompt).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import xxhash

_TEXT_PART_TYPES = ("text", "refusal", "input_text", "output_text")


@dataclass(frozen=True, slots=True)
class RoutingInput:
    """What a request's prefix is made of: routing text, or token ids, or nothing."""

    text: str | None = None
    tokens: tuple[int, ...] | None = None

    @property
    def chars(self) -> int:
        """Prompt size in characters for cost models (token ids count 4 characters each)."""
        if self.tokens is not None:
            return 4 * len(self.tokens)
        return len(self.text) if self.text else 0


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def render_prompt(prompt: Any) -> RoutingInput:
    """Routing input of a completions ``prompt`` (or embeddings ``input``)."""
    if isinstance(prompt, str):
        return RoutingInput(text=prompt or None)
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):  # a batch of strings: the first one
            return RoutingInput(text=first or None)
        if isinstance(first, list):  # a batch of token lists: the first one
            return RoutingInput(tokens=tuple(first)) if first and _is_token_list(first) else RoutingInput()
        if _is_token_list(prompt):
            return RoutingInput(tokens=tuple(prompt))
    return RoutingInput()


_MAX_DEPTH = 64  # nesting kept by _canonical_json's fallback (orjson.dumps stops at 254)


def _bounded(value: Any, depth: int = 0) -> Any:
    """`value` with everything nested deeper than _MAX_DEPTH replaced by a marker."""
    if depth >= _MAX_DEPTH:
        return "<|deep|>"
    if isinstance(value, Mapping):
        return {str(k): _bounded(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_bounded(v, depth + 1) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value if not isinstance(value, int) or -(1 << 63) <= value < (1 << 64) else str(value)
    return repr(value)


def _canonical_json(value: Any) -> bytes:
    """Stable bytes of a JSON value (sorted keys); never raises, whatever the nesting."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # too deep for orjson (JSONEncodeError is a TypeError): cut the depth
        return orjson.dumps(_bounded(value), option=orjson.OPT_SORT_KEYS)


def _placeholder(part: Mapping[str, Any]) -> str:
    kind = part.get("type") if isinstance(part.get("type"), str) and part.get("type") else "part"
    return f"<|{kind}:{xxhash.xxh3_64_hexdigest(_canonical_json(part))}|>"


def _render_content(content: Any, out: list[str]) -> None:
    if content is None:
        return
    if isinstance(content, str):
        out.append(content)
        return
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, Mapping):
                kind = part.get("type")
                key = "refusal" if kind == "refusal" else "text"
                if kind in _TEXT_PART_TYPES and isinstance(part.get(key), str):
                    out.append(part[key])
                else:
                    out.append(_placeholder(part))
            else:
                out.append(_placeholder({"type": "value", "value": part}))
        return
    out.append(_placeholder({"type": "value", "value": content}))


def _text(value: Any) -> str:
    """A field that should be a string, as text: itself, or a stable placeholder."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return _placeholder({"type": "value", "value": value})


def _render_tool_call(call: Any, out: list[str]) -> None:
    if not isinstance(call, Mapping):
        out.append(f"<|tool_call|>{_placeholder({'type': 'value', 'value': call})}\n")
        return
    inner = call.get("function")
    function: Mapping[str, Any] = inner if isinstance(inner, Mapping) else call
    name = _text(function.get("name", ""))
    arguments = function.get("arguments", "")
    if not isinstance(arguments, str):
        arguments = _canonical_json(arguments).decode("utf-8")
    out.append(f"<|tool_call|>{_text(call.get('id', ''))} {name}({arguments})\n")


def _render_message(message: Any, out: list[str]) -> None:
    if not isinstance(message, Mapping):
        out.append(f"<|value|>\n{_placeholder({'type': 'value', 'value': message})}\n")
        return
    header = f"<|{_text(message.get('role', ''))}|>"
    if message.get("name"):
        header += f" name={_text(message['name'])}"
    if message.get("tool_call_id"):
        header += f" id={_text(message['tool_call_id'])}"
    out.append(header + "\n")
    _render_content(message.get("content"), out)
    tool_calls = message.get("tool_calls")
    if not isinstance(tool_calls, list):  # vLLM refuses other types; route it anyway
        tool_calls = [tool_calls] if tool_calls else []
    if message.get("content") is not None and (tool_calls or message.get("function_call")):
        out.append("\n")
    for call in tool_calls:
        _render_tool_call(call, out)
    if isinstance(message.get("function_call"), Mapping):  # legacy single function call
        _render_tool_call({"function": message["function_call"]}, out)
    out.append("\n")


def render_messages(messages: Sequence[Any], tools: Sequence[Any] | None = None) -> str:
    """Canonical routing text of chat ``messages`` (see the module docstring)."""
    out: list[str] = []
    if tools:
        out.append("<|tools|>\n" + _canonical_json(list(tools)).decode("utf-8") + "\n")
    for message in messages:
        _render_message(message, out)
    return "".join(out)


def routing_input(body: Mapping[str, Any]) -> RoutingInput:
    """Routing input of a parsed OpenAI request body (chat, completions or embeddings)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        tools = body.get("tools") if isinstance(body.get("tools"), list) else None
        text = render_messages(messages, tools)
        return RoutingInput(text=text or None)
    if "prompt" in body:
        return render_prompt(body["prompt"])
    if "input" in body:
        return render_prompt(body["input"])
    return RoutingInput()
