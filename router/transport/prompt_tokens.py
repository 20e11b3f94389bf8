"""A request's prompt token ids for the exact index, per model's ``tokenizer:`` setting.

* a path: the model's tokenizer.json and chat template, loaded once (tokenization/); prompts
  over ``OFF_LOOP_CHARS`` characters are tokenized in a worker thread;
* ``replica``: the replica's own ``/tokenize`` (replica_tokens.py);
* a completion that sent token ids: those ids, whatever the setting (vLLM uses them as sent).

Loading tokenizer files is blocking work: `load` runs at start-up, and a reload calls it in
a worker thread before anything changes (a file that does not load refuses the reload).
Unchanged paths keep their loaded tokenizer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from router.config import REPLICA_TOKENIZER
from router.prefix.agentic import chat_body
from router.transport.replica_tokens import ReplicaTokenizer
from tokenization import OFF_LOOP_CHARS, ModelTokenizer, TokenizerError, prompt_chars
from yamlcheck import ConfigError

if TYPE_CHECKING:
    import aiohttp

    from router.config import Config
    from router.core.requests import RouteRequest
    from router.fleet.replicas import Replica
    from router.observability.telemetry import Telemetry

_COMPLETIONS = "/v1/completions"
_CHAT = "/v1/chat/completions"


def load(config: Config, loaded: Mapping[str, ModelTokenizer] | None = None) -> dict[str, ModelTokenizer]:
    """Each model's local tokenizer (path -> ModelTokenizer, keeping those in `loaded`)."""
    loaded = loaded or {}
    out: dict[str, ModelTokenizer] = {}
    for i, model in enumerate(config.models):
        path = model.tokenizer
        if path is None or path == REPLICA_TOKENIZER or path in out:
            continue
        if path in loaded:
            out[path] = loaded[path]
            continue
        try:
            out[path] = ModelTokenizer(path)
        except TokenizerError as exc:
            raise ConfigError(config.file, f"models[{i}].tokenizer", str(exc)) from None
    return out


class PromptTokens:
    """The router's tokenizers, and the choice of one per request; see the module docstring."""

    def __init__(self, config: Config, session: aiohttp.ClientSession, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.remote = ReplicaTokenizer(session)
        self.files: dict[str, ModelTokenizer] = {}
        self.settings: dict[str, str] = {}
        self.apply(config, load(config))

    def apply(self, config: Config, files: dict[str, ModelTokenizer]) -> None:
        """Make `config`'s settings current, with its files already loaded (`load`)."""
        self.files = files
        self.settings = {m.name: m.tokenizer for m in config.models if m.tokenizer is not None}

    def local(self, model: str) -> ModelTokenizer | None:
        """The model's loaded tokenizer file, if it has one."""
        path = self.settings.get(model)
        return self.files.get(path) if path is not None else None

    async def tokens(self, route: RouteRequest, body: Mapping[str, Any],
                     candidates: Sequence[Replica]) -> Sequence[int] | None:
        """The ids the replica will compute for this request (None: cannot say)."""
        if route.routing_tokens is not None and route.path == _COMPLETIONS:
            return route.routing_tokens
        setting = self.settings.get(route.index_model)  # an adapter tokenizes like its base model
        if setting is None:
            return None
        started = time.perf_counter()
        path = route.path
        chat = chat_body(path, body)  # Responses / Messages: their conversation as chat, which
        if chat is not None:           # is what vLLM gives the chat template too (prefix/agentic.py)
            path, body = _CHAT, chat
        if setting == REPLICA_TOKENIZER:
            tokens = await self.remote.tokens(route.model, path, body, candidates)
        else:
            tokenizer = self.files[setting]
            if prompt_chars(path, body) > OFF_LOOP_CHARS:
                tokens = await asyncio.to_thread(tokenizer.tokens, path, body)
            else:
                tokens = tokenizer.tokens(path, body)
        self.telemetry.tokenize_seconds.labels(route.model).observe(time.perf_counter() - started)
        return tokens
