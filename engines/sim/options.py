"""The simulated server's options (`python -m engines.sim`'s serving flags, see cli.py).

Its own module so that every endpoint module can read the options without importing the
server that holds them (server.py imports the endpoint modules: the other way round would be
an import circle).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServerOptions:
    host: str = "127.0.0.1"
    root: str | None = None  # /v1/models "root"; default: the model name
    prompt_tokens_details: bool = True  # vLLM's --enable-prompt-tokens-details
    default_output_len: int = 128  # tokens a request without max_tokens generates before "stop"
    embedding_dim: int = 256
    max_num_queued_reqs: int | None = 10_000  # vLLM: unlimited by default; here a hard bound
    runtime_lora_updating: bool = False  # /v1/load_lora_adapter and /v1/unload_lora_adapter
    responses_store: bool = False  # vLLM's VLLM_ENABLE_RESPONSES_API_STORE (responses.py)
    responses_store_size: int = 4096  # stored responses kept (vLLM: unbounded)
    tool_call_parser: str | None = "sim"  # None: like vLLM without --tool-call-parser (anthropic.py)
    enable_auto_tool_choice: bool = True
