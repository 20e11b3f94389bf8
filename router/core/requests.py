"""The router's view of one client request: `RouteRequest`.

The API layer parses the client's body once, validates it, and builds a RouteRequest;
everything downstream (policies, prefix index, proxy) reads this object and never parses
the body again.  `body` holds the exact bytes that will be forwarded upstream: the
client's bytes, unless alias resolution had to rewrite `model`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from router.prefix.agentic import MESSAGES_PATH, RESPONSES_PATH, as_chat
from router.prefix.hashing import prefix_hashes

if TYPE_CHECKING:
    from router.fleet.replicas import Replica
from router.prefix.rendering import RoutingInput, render_messages, routing_input


@dataclass(frozen=True, slots=True)
class RouteRequest:
    model: str  # canonical (alias-resolved) model name
    path: str  # e.g. "/v1/chat/completions"
    body: bytes | bytearray  # bytes forwarded upstream (a bytearray as read_body filled it)
    stream: bool = False
    request_id: str = ""
    # Prefix routing inputs (see router/prefix/): the canonical routing text of the
    # prompt or messages (only its hashed head: the whole length is `prompt_chars`, and a
    # 32 MiB prompt must not be held twice while the request is in flight), or the token
    # ids when the client sent tokens; and the chained block hashes computed from them
    # once per request.
    routing_text: str | None = None
    routing_tokens: tuple[int, ...] | None = None
    block_hashes: tuple[int, ...] = ()
    prompt_chars: int = 0  # length of routing text (or token count * 4) for cost models
    session_key: str | None = None  # header (configurable) or body `user`
    cache_salt: str | None = None
    headers: tuple[tuple[str, str], ...] = field(default=())  # forwardable client headers
    # The exact prompt token ids the replica will compute (the model's tokenizer, or the ids
    # the client sent), set only where the exact prefix index can use them (router/prefix/).
    prompt_token_ids: Sequence[int] | None = None  # (an array("I") from the tokenizers)
    # Our chained hashes of those ids per block size, filled when the exact index matches
    # them and read back at dispatch to predict the chosen replica's new blocks.
    exact_hashes: dict[int, tuple[int, ...]] = field(default_factory=dict, compare=False, repr=False)
    # LoRA (router/fleet/lora.py): `model` names an adapter of `base_model`, whose replicas serve
    # it; vLLM's prefix cache is per adapter (the exact index keys by it).  `adapter_path`:
    # no replica serves it yet and the router is to load it from there.
    lora: str | None = None
    base_model: str | None = None
    adapter_path: str | None = None
    # The client's max_tokens (or max_completion_tokens), when an integer: how long a
    # non-stream answer may take to its first byte (router/transport/outliers.py compares like with like).
    max_tokens: int | None = None
    # The HTTP method: POST for inference; GET for a stored response's retrieval, which
    # teaches the scheduler nothing about prefill (hooks skip what is not a POST).
    method: str = "POST"
    # The bytes for an attempt on a given replica, when they depend on it (the Responses
    # id that names its replica, router/core/response_ids.py); None: `body` for every attempt.
    replica_body: Callable[[Replica], bytes] | None = field(default=None, compare=False, repr=False)
    # The decode hop of a disaggregated request reads the prompt's KV blocks from the
    # prefill replica: it computes no prompt tokens (hooks.InFlight counts none).
    prefilled_elsewhere: bool = False


    def body_for(self, replica: Replica) -> bytes | bytearray:
        """The bytes an attempt on `replica` sends."""
        return self.body if self.replica_body is None else self.replica_body(replica)

    @property
    def index_model(self) -> str:
        """The model the replicas were configured with (an adapter's base model)."""
        return self.base_model or self.model

    @property
    def estimated_prompt_tokens(self) -> int:
        """The prompt's tokens: exact when known, else a cheap estimate (about 4 characters
        a token, like the simulator)."""
        if self.prompt_token_ids is not None:
            return len(self.prompt_token_ids)
        if self.routing_tokens is not None:
            return len(self.routing_tokens)
        return max(1, self.prompt_chars // 4)


# --------------------------------------------------------------------------- builder
# Validation of what the router itself reads from a body; everything else is the
# replica's business (vLLM validates its own parameters and answers in the same shape).

_CHAT = "/v1/chat/completions"
_COMPLETIONS = "/v1/completions"
_EMBEDDINGS = "/v1/embeddings"
_RESPONSES = RESPONSES_PATH
_MESSAGES = MESSAGES_PATH


class BodyError(ValueError):
    """A body the router cannot route (400); `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _type_name(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_prompt(value: object, param: str) -> None:
    """A prompt/input: a string, a list of strings, token ids, or lists of token ids."""
    if isinstance(value, str):
        return
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value) or all(_is_int(v) for v in value):
            return
        if all(isinstance(v, list) and v and all(_is_int(t) for t in v) for v in value):
            return
    raise BodyError(f"'{param}' must be a string, an array of strings, an array of token ids "
                    f"or an array of token-id arrays, found {_type_name(value)}"
                    + (" (empty)" if value in ([], "") else ""), param)


def validate_body(path: str, data: object) -> dict[str, Any]:
    """Check the fields the router reads; returns the body as a dict or raises BodyError."""
    if not isinstance(data, dict):
        raise BodyError(f"The request body must be a JSON object, found {_type_name(data)}")
    if "model" in data and not isinstance(data["model"], str):
        raise BodyError(f"'model' must be a string, found {_type_name(data['model'])}", "model")
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BodyError(f"'stream' must be a boolean, found {_type_name(stream)}", "stream")
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BodyError(f"'stream_options' must be an object, found {_type_name(options)}",
                        "stream_options")
    if "kv_transfer_params" in data:
        # They name a host and port a decode replica would read KV blocks from: only the
        # router's own prefill/decode flow (router/transport/flows.py) may set them.
        raise BodyError("'kv_transfer_params' is set by the router for disaggregated serving; "
                        "clients may not send it", "kv_transfer_params")
    for key in ("user", "cache_salt"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise BodyError(f"'{key}' must be a string, found {_type_name(data[key])}", key)
    if path == _CHAT:
        messages = data.get("messages")
        if messages is None:
            raise BodyError("'messages' is required", "messages")
        if not isinstance(messages, list):
            raise BodyError(f"'messages' must be an array, found {_type_name(messages)}", "messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise BodyError(f"'messages[{i}]' must be an object, found {_type_name(message)}",
                                "messages")
            if not isinstance(message.get("role"), str):
                raise BodyError(f"'messages[{i}].role' must be a string", "messages")
        tools = data.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise BodyError(f"'tools' must be an array, found {_type_name(tools)}", "tools")
    elif path == _COMPLETIONS:
        if "prompt" not in data:
            raise BodyError("'prompt' is required", "prompt")
        _check_prompt(data["prompt"], "prompt")
    elif path == _RESPONSES:
        _check_responses(data)
    elif path == _MESSAGES:
        _check_messages(data)
    elif path == _EMBEDDINGS:
        if "input" not in data and "messages" not in data:
            raise BodyError("'input' is required", "input")
        if "input" in data:
            _check_prompt(data["input"], "input")
    return data


def _check_responses(data: dict[str, Any]) -> None:
    """The Responses fields the router reads (routing text, the stored response's replica)."""
    # (`input` may be absent: a stored `prompt` template, or vLLM's own 400 to give)
    if "input" in data and not isinstance(data["input"], (str, list)):
        raise BodyError(f"'input' must be a string or an array, found {_type_name(data['input'])}", "input")
    for key in ("instructions", "previous_response_id"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise BodyError(f"'{key}' must be a string, found {_type_name(data[key])}", key)
    if data.get("tools") is not None and not isinstance(data["tools"], list):
        raise BodyError(f"'tools' must be an array, found {_type_name(data['tools'])}", "tools")
    for key in ("background", "store"):
        if data.get(key) is not None and not isinstance(data[key], bool):
            raise BodyError(f"'{key}' must be a boolean, found {_type_name(data[key])}", key)


def _check_messages(data: dict[str, Any]) -> None:
    """The Anthropic Messages fields the router reads."""
    messages = data.get("messages")
    if messages is None:
        raise BodyError("'messages' is required", "messages")
    if not isinstance(messages, list):
        raise BodyError(f"'messages' must be an array, found {_type_name(messages)}", "messages")
    system = data.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise BodyError(f"'system' must be a string or an array, found {_type_name(system)}", "system")
    if data.get("tools") is not None and not isinstance(data["tools"], list):
        raise BodyError(f"'tools' must be an array, found {_type_name(data['tools'])}", "tools")


def routing_input_of(path: str, data: dict[str, Any]) -> RoutingInput | None:
    """The routing input of a request on `path` (None: the path is not prefix-routed)."""
    if path in (_CHAT, _COMPLETIONS, _EMBEDDINGS):
        return routing_input(data)
    chat = as_chat(path, data)  # Responses, Messages: their conversation as chat messages
    if chat is None:
        return None
    return RoutingInput(text=render_messages(*chat) or None)


def build_route_request(
    *,
    model: str,
    path: str,
    data: dict[str, Any],
    body: bytes | bytearray,
    request_id: str = "",
    headers: tuple[tuple[str, str], ...] = (),
    session_key: str | None = None,
    block_chars: int = 64,
    block_tokens: int = 16,
    max_blocks: int = 8192,
) -> RouteRequest:
    """The RouteRequest of a validated body: routing text, block hashes, session key.

    `model` is the canonical (alias-resolved) name; `body` the bytes to forward.  The
    routing input and its chained block hashes come from router.prefix (rendering.py and
    hashing.py), computed once here.  At most `max_blocks` blocks are hashed: a prompt's
    first blocks are what identifies its prefix, and one huge prompt must neither cost
    the event loop its whole length in hashing nor flood the prefix index (its size
    still counts in full, in `prompt_chars`, for the cost models).
    """
    stream = data.get("stream") is True
    cache_salt = data.get("cache_salt") if isinstance(data.get("cache_salt"), str) else None
    if session_key is None and isinstance(data.get("user"), str) and data["user"]:
        session_key = data["user"]
    text: str | None = None
    hashed_text: str | None = None
    tokens: tuple[int, ...] | None = None
    hashes: tuple[int, ...] = ()
    chars = 0
    rin = routing_input_of(path, data)
    if rin is not None:
        text, tokens, chars = rin.text, rin.tokens, rin.chars
        # UTF-8 has at least one byte a character, so this many characters still fill
        # max_blocks blocks of block_chars bytes.
        hashed_text = text[:max_blocks * block_chars] if text else text
        hashed_tokens = tokens[:max_blocks * block_tokens] if tokens else tokens
        hashes = prefix_hashes(model, text=hashed_text, tokens=hashed_tokens,
                               cache_salt=cache_salt, block_chars=block_chars,
                               block_tokens=block_tokens)[:max_blocks]
    max_tokens = data.get("max_tokens")
    if max_tokens is None:
        max_tokens = data.get("max_completion_tokens", data.get("max_output_tokens"))  # (Responses)
    return RouteRequest(
        model=model,
        path=path,
        body=body,
        stream=stream,
        max_tokens=max_tokens if _is_int(max_tokens) else None,
        request_id=request_id,
        routing_text=hashed_text if text else text,
        routing_tokens=tokens,
        block_hashes=hashes,
        prompt_chars=chars,
        session_key=session_key,
        cache_salt=cache_salt,
        headers=headers,
    )


def rewrite_model(body: bytes | bytearray, data: dict[str, Any], new_model: str) -> bytes:
    """`body` with its top-level "model" value replaced by `new_model`, all else verbatim.

    Used only for aliases.  The top-level string value of every "model" key is swapped in
    place, so every other byte the client sent is forwarded as sent.  If the body's
    layout defeats the scanner (e.g. an escaped key), it is re-encoded as a fallback; so
    is a body over _SCAN_LIMIT bytes, where the scanner (a Python loop over every byte)
    would hold the event loop, and orjson re-encodes in C.
    """
    import orjson

    if len(body) > _SCAN_LIMIT:
        return orjson.dumps({**data, "model": new_model})
    spans = _top_level_string_spans(body, b"model")
    if not spans:
        return orjson.dumps({**data, "model": new_model})
    replacement = orjson.dumps(new_model)
    out = bytearray()
    last = 0
    for start, end in spans:
        out += body[last:start]
        out += replacement
        last = end
    out += body[last:]
    return bytes(out)


_SCAN_LIMIT = 64 * 1024


def _skip_string(buf: bytes | bytearray, i: int) -> int:
    """Index just past the JSON string starting at buf[i] == '"'."""
    n = len(buf)
    i += 1
    while i < n:
        c = buf[i]
        if c == 0x5C:  # backslash
            i += 2
            continue
        if c == 0x22:
            return i + 1
        i += 1
    raise ValueError("unterminated string")


def _top_level_string_spans(buf: bytes | bytearray, key: bytes) -> list[tuple[int, int]]:
    """Byte spans of the string values of `key` in the top-level object of valid JSON."""
    spans: list[tuple[int, int]] = []
    quoted_key = b'"' + key + b'"'
    n = len(buf)
    depth = 0
    i = 0
    expect_key = False
    try:
        while i < n:
            c = buf[i]
            if c == 0x22:  # a string
                end = _skip_string(buf, i)
                if depth == 1 and expect_key:
                    is_key = buf[i:end] == quoted_key
                    j = end
                    while j < n and buf[j] in b" \t\r\n":
                        j += 1
                    if j < n and buf[j] == 0x3A:  # ':'
                        j += 1
                        while j < n and buf[j] in b" \t\r\n":
                            j += 1
                        if is_key:
                            if j < n and buf[j] == 0x22:
                                value_end = _skip_string(buf, j)
                                spans.append((j, value_end))
                                i = value_end
                                expect_key = False
                                continue
                            return []  # non-string model: let the caller re-encode
                        i = j
                        expect_key = False
                        continue
                i = end
                continue
            if c in b"{[":
                depth += 1
                if depth == 1 and c == 0x7B:
                    expect_key = True
            elif c in b"}]":
                depth -= 1
            elif c == 0x2C and depth == 1:  # ','
                expect_key = True
            i += 1
    except ValueError:
        return []
    return spans
