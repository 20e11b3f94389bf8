"""The router's view of one client request: `RouteRequest`.

The API layer parses the client's body once, validates it, and builds a RouteRequest;
everything downstream (policies, prefix index, proxy) reads this object and never parses
the body again.  `body` holds the exact bytes that will be forwarded upstream: the
client's bytes, unless alias resolution had to rewrite `model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RouteRequest:
    model: str  # canonical (alias-resolved) model name
    path: str  # e.g. "/v1/chat/completions"
    body: bytes  # bytes forwarded upstream
    stream: bool = False
    request_id: str = ""
    # Prefix routing inputs (see router/prefix/): the canonical routing text of the
    # prompt or messages, or the token ids when the client sent tokens; and the chained
    # block hashes computed from them once per request.
    routing_text: str | None = None
    routing_tokens: tuple[int, ...] | None = None
    block_hashes: tuple[int, ...] = ()
    prompt_chars: int = 0  # length of routing text (or token count * 4) for cost models
    session_key: str | None = None  # header (configurable) or body `user`
    lora: str | None = None
    cache_salt: str | None = None
    headers: tuple[tuple[str, str], ...] = field(default=())  # forwardable client headers

    @property
    def estimated_prompt_tokens(self) -> int:
        """A cheap token estimate (about 4 characters a token, like the simulator)."""
        if self.routing_tokens is not None:
            return len(self.routing_tokens)
        return max(1, self.prompt_chars // 4)
