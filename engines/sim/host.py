"""What the endpoint modules need of the server that hosts them, as a `typing.Protocol`.

The endpoint modules (completions.py, prompts.py, embeddings.py, responses.py,
anthropic.py) are handed the server (server.SimServer) when it builds them.  Typing that
argument as `SimServer` would make each of them import server.py, which imports them: an
import circle.  They name this protocol instead; `SimServer` satisfies it structurally and
this module imports nothing above it.
"""

from __future__ import annotations

from typing import Any, Protocol

from engines.sim.engine import Engine
from engines.sim.faults import Faults
from engines.sim.kv_transfer import KVTransfer
from engines.sim.lora import Adapters
from engines.sim.options import ServerOptions
from engines.sim.protocol import ApiError
from engines.sim.scheduler import SimRequest
from engines.sim.tokenizer import RealTokenizer, Tokenizer


class SimHost(Protocol):
    """The server's state and its request lifecycle, shared by every generating endpoint."""

    engine: Engine
    tok: Tokenizer | RealTokenizer
    faults: Faults
    opts: ServerOptions
    transfer: KVTransfer | None  # --kv-transfer-config: disaggregated prefill/decode
    model: str  # the served model name
    max_model_len: int
    fingerprint: str  # system_fingerprint of chat and completion answers
    in_flight: int  # requests being answered (GET /load)

    def adapter_names(self) -> Adapters | tuple[()]:
        """The adapter names a request's `model` may name besides the base model."""
        ...

    def chat_ids(self, body: dict[str, Any]) -> list[int]:
        """A chat body's prompt token ids (the chat template, then the tokenizer)."""
        ...

    async def admission(self) -> tuple[ApiError, dict[str, str]] | None:
        """The error (and headers) refusing a generation before it enters the engine, or None."""
        ...

    def new_request(self, prompt_ids: list[int], max_tokens: int | None, seed: int, body: dict[str, Any],
                    model: str) -> SimRequest:
        """An engine request for these prompt ids."""
        ...

    def answered_one(self) -> None:
        """A generation answered in full (the exit_after fault counts these)."""
        ...
