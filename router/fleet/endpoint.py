"""`Endpoint`: a replica's base URL, parsed once when the replica joins the fleet.

It lives with the replicas, not the upstream pool (router/transport/upstream.py), because a
replica is created in the fleet and the pool only reads it: the transport sits above the
fleet in the layers (ARCHITECTURE.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A replica base URL, parsed once: where to connect and what to put in the request line."""

    key: tuple[str, str, int]  # (scheme, host, port): the pool key
    host: str
    port: int
    tls: bool
    path_prefix: str  # the URL's path (no trailing slash), before each request's path
    host_header: bytes

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        host = parts.hostname or ""
        port = parts.port or (443 if tls else 80)
        default = port == (443 if tls else 80)
        shown = f"[{host}]" if ":" in host else host
        return cls((parts.scheme, host, port), host, port, tls, parts.path.rstrip("/"),
                   (shown if default else f"{shown}:{port}").encode("idna"))
