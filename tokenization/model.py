"""Tokenizing requests exactly like the replica: the model's tokenizer.json and chat template.

The exact index (exact.py) matches token ids, so a request's ids must equal what vLLM will
compute for it.  vLLM (through Hugging Face transformers) does, and so does this module:

* **completions**: a string prompt is encoded with ``add_special_tokens=True`` (the
  tokenizer's post-processor adds a BOS where the model wants one); token ids sent by the
  client are used as sent.  A batch of prompts has no single prefix: not tokenized.
* **chat**: the chat template (jinja2, sandboxed, ``trim_blocks`` and ``lstrip_blocks``,
  the ``loopcontrols`` extension, ``raise_exception`` and ``strftime_now`` as globals, the
  tokenizer's special tokens as variables: what transformers' ``apply_chat_template``
  sets up) renders ``messages`` with ``tools``, ``add_generation_prompt`` (default true),
  ``continue_final_message`` and ``chat_template_kwargs``; the text is encoded with
  ``add_special_tokens=False`` (vLLM's chat default; a body's own ``add_special_tokens``
  wins in both cases).  Content given as a list of text parts is joined with newlines,
  vLLM's "string" content format.

`tokenizers` releases the GIL while it encodes, so `ModelTokenizer.tokens` can run in a
worker thread (the API does that for long prompts; see ``OFF_LOOP_CHARS``).  Any failure
(a template error, a body it cannot render) returns None: the request is then routed with
the approximate index, never refused.
"""

from __future__ import annotations

import json
import logging
from array import array
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("tokenization")

# Prompts longer than this many characters are tokenized in a worker thread: encoding costs
# about 0.22 us a character (32k characters: 7.1 ms, 1k: 0.18 ms; tiny Llama's byte-level BPE,
# 2-core AMD EPYC), so 4,096 characters stay under the 1 ms the loop can spare.
OFF_LOOP_CHARS = 4_096

_CHAT = "/v1/chat/completions"
_COMPLETIONS = "/v1/completions"


class TokenizerError(ValueError):
    """The configured tokenizer cannot be loaded (a config error, reported at startup)."""


def _raise(message: str) -> None:
    raise ValueError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ModelTokenizer:
    """One model's tokenizer.json and chat template, loaded once."""

    def __init__(self, path: str | Path) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        path = Path(path)
        directory = path if path.is_dir() else path.parent
        file = path / "tokenizer.json" if path.is_dir() else path
        try:
            self.tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception
            raise TokenizerError(f"cannot load {file}: {exc}") from None
        self.path = file
        config: dict[str, Any] = {}
        config_file = directory / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text())
            except (OSError, ValueError) as exc:
                raise TokenizerError(f"cannot read {config_file}: {exc}") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja_file = directory / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        self.special: dict[str, Any] = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            self.special[key] = value
        self.template = None
        if isinstance(template, str):
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = _strftime_now
            try:
                self.template = env.from_string(template)
            except Exception as exc:  # noqa: BLE001 - jinja2 syntax errors
                raise TokenizerError(f"the chat template of {directory} does not compile: {exc}") from None

    # -- rendering -----------------------------------------------------------------------
    def render_chat(self, body: Mapping[str, Any]) -> str | None:
        """The text vLLM's chat template makes of a chat body (None: no template)."""
        if self.template is None:
            return None
        messages = [_string_content(m) for m in body.get("messages") or ()]
        continue_final = body.get("continue_final_message") is True
        add_generation = body.get("add_generation_prompt", True) is not False and not continue_final
        kwargs = body.get("chat_template_kwargs")
        context: dict[str, Any] = {**self.special, **(kwargs if isinstance(kwargs, dict) else {})}
        context.update(messages=messages, add_generation_prompt=add_generation)
        if body.get("tools") is not None:
            context["tools"] = body.get("tools")
        if body.get("documents") is not None:
            context["documents"] = body.get("documents")
        text = self.template.render(**context)
        if continue_final and messages:
            final = messages[-1].get("content")
            if isinstance(final, str) and final and final in text:
                text = text[:text.rindex(final) + len(final)]
        return text

    # -- tokens --------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def chat_tokens(self, body: Mapping[str, Any]) -> list[int] | None:
        """A chat body's prompt ids: the template, then the tokenizer (None: no template).
        Raises whatever the template raises (the simulator answers it as a 400)."""
        text = self.render_chat(body)
        if text is None:
            return None
        return self.encode(text, body.get("add_special_tokens") is True)

    def tokens(self, path: str, body: Mapping[str, Any]) -> array[int] | None:
        """The prompt token ids vLLM will compute for this body (None: cannot say), packed
        as unsigned 32-bit ints: the exact index hashes them as such, and packing here
        (in the worker thread for long prompts) keeps that copy off the event loop."""
        try:
            if path == _CHAT:
                ids = self.chat_tokens(body)
                return None if ids is None else array("I", ids)
            if path == _COMPLETIONS:
                special = body.get("add_special_tokens")
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1:
                    prompt = prompt[0]
                if isinstance(prompt, str):
                    return array("I", self.encode(prompt, special is not False))
                if isinstance(prompt, list) and prompt and all(
                        isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                    return array("I", prompt)
            return None
        except Exception as exc:  # noqa: BLE001 - never refuse a request for this
            log.debug("tokenizing for the exact index failed: %s", exc)
            return None


def _string_content(message: Any) -> Any:
    """A message with list-of-text-parts content joined the way vLLM's "string" format does."""
    if not isinstance(message, Mapping):
        return message
    content = message.get("content")
    if isinstance(content, list):
        texts: Sequence[str] = [p["text"] for p in content
                                if isinstance(p, Mapping) and p.get("type", "text") == "text"
                                and isinstance(p.get("text"), str)]
        return {**message, "content": "\n".join(texts)}
    return message


def prompt_chars(path: str, body: Mapping[str, Any]) -> int:
    """A cheap size of what `tokens` would encode, to decide on or off the loop."""
    if path == _CHAT:
        total = 0
        for m in body.get("messages") or ():
            content = m.get("content") if isinstance(m, Mapping) else None
            if isinstance(content, str):
                total += len(content)
            elif isinstance(content, list):
                total += sum(len(p.get("text", "")) for p in content if isinstance(p, Mapping)
                             and isinstance(p.get("text", ""), str))
        return total
    prompt = body.get("prompt")
    return len(prompt) if isinstance(prompt, str) else 0
