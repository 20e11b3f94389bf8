"""`Client`: who a request comes from, as admission, rate limits and model access see it.

The front door (router/core/auth.py) resolves it from the request's key and address;
the core only reads it, so it lives here, below the front door.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.config import ClientKeyConfig

ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Client:
    """The caller of one request, as admission and routing see it."""

    name: str  # the key's name, or ANONYMOUS
    identity: str  # rate-limit and fairness bucket: the key's name, else the address
    address: str | None
    key: ClientKeyConfig | None = None

    @property
    def priority(self) -> int:
        return self.key.priority if self.key is not None else 0
