"""A deterministic, cheap stand-in for a real tokenizer.

Text is cut into 4-character chunks from the start of each *segment*; every chunk becomes one
token whose id is a stable hash of the chunk.  Segments are the stretches between special
tokens (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``), each a single token like in a
real BPE vocabulary.  Two properties follow and the router relies on both:

* if text A is a prefix of text B, then ``encode(A)[:-1]`` is a prefix of ``encode(B)``
  (only A's last, partial chunk can differ), so prefix relations in text are prefix relations
  in tokens, as with a real tokenizer;
* chat turns rendered with the ChatML-like template restart chunking after every special
  token, so turn N+1's tokens extend turn N's tokens up to the last partial chunk.

``decode`` is exact for any ids this process produced recently (a bounded memory keeps
id -> chunk for the last 65,536 distinct chunks; hash collisions resolve to the newest
chunk).  Unknown ids decode to a fixed filler.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence

import orjson

CHARS_PER_TOKEN = 4

SPECIAL_TOKENS: dict[str, int] = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
SPECIAL_IDS: dict[int, str] = {v: k for k, v in SPECIAL_TOKENS.items()}
_FIRST_REGULAR_ID = 256  # ids below are reserved for special tokens
_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in SPECIAL_TOKENS))

# Generated text: a fixed cycle of 4-character pieces, so every generated token is one chunk
# and a reply pasted back into the next turn tokenizes to the same ids.
_OUTPUT_PIECES = ("The ", "sim ", "says", " hel", "lo, ", "and ", "this", " is ", "text",
                  " ok.")


class Tokenizer:
    """Chunk tokenizer with a bounded decode memory."""

    supports_developer_role = False  # the ChatML-like template does not name it (see developer_as_system)

    def __init__(self, vocab_size: int = 128256, decode_memory: int = 65536) -> None:
        if vocab_size <= _FIRST_REGULAR_ID:
            raise ValueError(f"vocab_size must be > {_FIRST_REGULAR_ID}")
        self.vocab_size = vocab_size
        self._span = vocab_size - _FIRST_REGULAR_ID
        # chunk -> id and id -> chunk for the most recently *new* chunks (FIFO, bounded): the
        # first saves hashing on the hot path, the second makes decode exact.
        self._ids: dict[str, int] = {}
        self._memory: dict[int, str] = {}
        self._memory_cap = decode_memory

    # -- encoding ---------------------------------------------------------------------------
    def chunk_id(self, chunk: str) -> int:
        tid = self._ids.get(chunk)
        if tid is not None:
            return tid
        digest = hashlib.blake2b(chunk.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        tid = _FIRST_REGULAR_ID + int.from_bytes(digest, "big") % self._span
        if len(self._ids) >= self._memory_cap:
            old_chunk = next(iter(self._ids))
            old_id = self._ids.pop(old_chunk)
            if self._memory.get(old_id) == old_chunk:
                del self._memory[old_id]
        self._ids[chunk] = tid
        self._memory[tid] = chunk
        return tid

    def _encode_plain(self, text: str, out: list[int]) -> None:
        ids, chunk_id = self._ids, self.chunk_id
        for i in range(0, len(text), CHARS_PER_TOKEN):
            chunk = text[i:i + CHARS_PER_TOKEN]
            tid = ids.get(chunk)
            out.append(tid if tid is not None else chunk_id(chunk))

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        pos = 0
        for m in _SPECIAL_RE.finditer(text):
            self._encode_plain(text[pos:m.start()], out)
            out.append(SPECIAL_TOKENS[m.group(0)])
            pos = m.end()
        self._encode_plain(text[pos:], out)
        return out

    # -- decoding ---------------------------------------------------------------------------
    def token_str(self, tid: int) -> str:
        special = SPECIAL_IDS.get(tid)
        if special is not None:
            return special
        return self._memory.get(tid, "\ufffd")

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.token_str(t) for t in ids)

    # -- generation -------------------------------------------------------------------------
    def output_token(self, index: int, seed: int = 0) -> int:
        """The id of the ``index``-th generated token of a request seeded with ``seed``."""
        return self.chunk_id(_OUTPUT_PIECES[(index + seed) % len(_OUTPUT_PIECES)])

    def encode_chat(self, body: Mapping[str, object]) -> list[int]:
        """A chat body's prompt ids: the ChatML-like rendering, chunked."""
        messages = body.get("messages")
        assert isinstance(messages, list)
        return self.encode(render_chat(messages, bool(body.get("add_generation_prompt", True)),
                                       bool(body.get("continue_final_message", False)), body.get("tools")))


def render_chat(messages: Sequence[Mapping[str, object]], add_generation_prompt: bool = True,
                continue_final_message: bool = False, tools: object = None) -> str:
    """Render messages with a ChatML-like template (the tiny reference model uses one too).

    ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then
    ``<|im_start|>assistant\\n`` when a generation prompt is asked for.  Like the templates of
    tool-calling models (Qwen's, Hermes'), a non-empty ``tools`` list is rendered first, as a
    ``<|im_start|>tools`` block of one JSON line per tool, and an assistant message's
    ``tool_calls`` follow its content as ``\\n<tool_call>{"name": ..., "arguments": ...}</tool_call>``;
    so tool definitions are a prefix every turn shares, and turn N+1 still extends turn N.
    """
    parts = []
    if isinstance(tools, list) and tools:
        parts.append(f"<|im_start|>tools\n{_json_lines(tools)}<|im_end|>\n")
    last = len(messages) - 1
    for i, msg in enumerate(messages):
        content = content_text(msg.get("content")) + _tool_calls_text(msg.get("tool_calls"))
        if continue_final_message and i == last:
            parts.append(f"<|im_start|>{msg.get('role')}\n{content}")
        else:
            parts.append(f"<|im_start|>{msg.get('role')}\n{content}<|im_end|>\n")
    if add_generation_prompt and not continue_final_message:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _json_lines(items: list[object]) -> str:
    """One compact JSON line per item (sorted keys, so equal definitions render equally); an item
    that cannot be serialized (too deep, not JSON) renders as a placeholder, never an error."""
    lines = []
    for item in items:
        try:
            lines.append(orjson.dumps(item, option=orjson.OPT_SORT_KEYS).decode())
        except (TypeError, orjson.JSONEncodeError):
            lines.append("<unrenderable>")
    return "\n".join(lines)


def _tool_calls_text(tool_calls: object) -> str:
    if not isinstance(tool_calls, list):
        return ""
    out = []
    for call in tool_calls:
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping):
            continue
        args = fn.get("arguments")
        args_text = args if isinstance(args, str) else _json_lines([args])
        out.append(f'\n<tool_call>{{"name": {orjson.dumps(str(fn.get("name", ""))).decode()}, '
                   f'"arguments": {args_text}}}</tool_call>')
    return "".join(out)


def developer_as_system(messages: list[dict[str, object]]) -> list[dict[str, object]]:
    """vLLM's rendering of ``developer`` messages for a chat template that does not name the
    role (the tiny model's ChatML, the simulator's own): each becomes a system message, then
    all system messages merge into one at the start, their texts joined by a blank line
    (vllm/renderers/hf.py, _convert_developer_to_system + _consolidate_system_messages)."""
    converted = [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]
    systems = [i for i, m in enumerate(converted) if m.get("role") == "system"]
    if not systems or systems == [0]:
        return converted
    texts = [t for m in converted if m.get("role") == "system"
             and (t := "\n".join(p["text"] for p in m["content"] if _is_text_part(p))
                  if isinstance(m.get("content"), list) else str(m.get("content") or ""))]
    rest = [m for m in converted if m.get("role") != "system"]
    return [{"role": "system", "content": "\n\n".join(texts)}, *rest]


def _is_text_part(part: object) -> bool:
    """A content part whose text the prompt takes: type ``text`` (the default) with a string
    (`content_text` refuses a text part without one; other parts' ``text`` keys, a refusal's
    say, are not the prompt's: joined, a non-string one crashed the simulator with a 500)."""
    return isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str)


def content_text(content: object) -> str:
    """Message content as text: a string, or the text parts of a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text"]
        if not all(isinstance(t, str) for t in texts):  # vLLM's schema: 400, "a valid string"
            raise TypeError("a text content part's text must be a string")
        return "".join(texts)
    raise TypeError("message content must be a string or a list of content parts")


class RealTokenizer:
    """A model's real tokenizer.json and chat template (``--tokenizer PATH``), so the
    simulator's token ids, and the KV events that carry them, are a real replica's.

    The same interface as the chunk `Tokenizer`; generated text cycles through the ids of
    a fixed sentence, so a reply pasted into the next turn re-tokenizes close to the same ids
    (a real model's reply does not either, exactly: BPE merges across the boundary)."""

    def __init__(self, path: str) -> None:
        from tokenization import ModelTokenizer

        self.model = ModelTokenizer(path)
        if self.model.template is None:
            raise SystemExit(f"--tokenizer {path}: no chat template in tokenizer_config.json")
        self.vocab_size = self.model.tokenizer.get_vocab_size()
        # vLLM's test: does the template's source name the "developer" role?
        self.supports_developer_role = any(f"{q}developer{q}" in _template_source(path) for q in "'\"")
        self._output = self.model.encode("".join(_OUTPUT_PIECES), False) or [0]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.model.encode(text, add_special_tokens)

    def encode_chat(self, body: Mapping[str, object]) -> list[int]:
        ids = self.model.chat_tokens(body)
        assert ids is not None  # __init__ checked the template
        return ids

    def token_str(self, tid: int) -> str:
        return str(self.model.tokenizer.decode([tid], skip_special_tokens=False))

    def decode(self, ids: Iterable[int]) -> str:
        return str(self.model.tokenizer.decode(list(ids), skip_special_tokens=False))

    def output_token(self, index: int, seed: int = 0) -> int:
        return self._output[(index + seed) % len(self._output)]


def _template_source(path: str) -> str:
    """The chat template's text (tokenizer_config.json's chat_template, or chat_template.jinja)."""
    import json
    from pathlib import Path

    directory = Path(path) if Path(path).is_dir() else Path(path).parent
    try:
        template = json.loads((directory / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        template = None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict)
                         and t.get("name") == "default"), None)
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text()
    return template if isinstance(template, str) else ""
