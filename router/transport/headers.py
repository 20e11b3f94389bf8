"""Which headers cross the router: RFC 9110 hop-by-hop headers never do; of the client's,
neither its credentials nor how the request travelled (X-Forwarded-*, X-Real-IP...) reach a
replica; of the replica's, nothing that names its software or host reaches the client.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

from multidict import CIMultiDictProxy

# RFC 9110 7.6.1 hop-by-hop headers (+ the de-facto Proxy-Connection): never forwarded.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})


# Request headers the router sets itself or must not pass on: the client's credentials
# (OpenAI, Anthropic and Azure styles), lengths, and the body encoding (bodies are
# forwarded decoded, router/frontdoor/limits.py).
_DROP_REQUEST = frozenset({"host", "content-length", "authorization", "x-api-key", "api-key",
                           "expect", "x-request-id", "content-encoding", "cookie"})


# What a client says about the path its request took: never passed on, and the router adds
# none of its own.  A replica has no use for the client's address (the router's access log
# holds it, read through `server.trusted_proxies`, router/core/auth.py), and a value a client
# wrote must not reach a replica (or the logs behind it) looking like a proxy's.
FORWARDING_HEADERS = frozenset({
    "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port",
    "x-forwarded-prefix", "x-forwarded-server", "x-real-ip", "x-client-ip", "true-client-ip",
    "x-cluster-client-ip", "cf-connecting-ip", "x-original-forwarded-for", "via",
})


_NEVER_FORWARDED = HOP_BY_HOP | _DROP_REQUEST | FORWARDING_HEADERS


# Response headers aiohttp (re)computes for the client, and the replica's own that are not
# the client's business (a denylist: what an engine or an API adds stays, e.g. Retry-After,
# OpenAI-style rate-limit headers): what names the replica's software or host (Server,
# X-Powered-By, Via, X-Served-By, X-Backend-Server, Alt-Svc), state of one replica
# (Set-Cookie: replicas are interchangeable, and a cookie - a load balancer's sticky one -
# would be set on the router's host), and a replica's WWW-Authenticate (a challenge about
# the router's own key to it: the client's key was accepted; the client gets the status).
_DROP_RESPONSE = frozenset({"content-length", "date", "x-request-id", "server", "x-powered-by",
                            "via", "x-served-by", "x-backend-server", "alt-svc", "set-cookie",
                            "set-cookie2", "www-authenticate"})


def _connection_tokens(headers: Mapping[str, str] | CIMultiDictProxy[str]) -> set[str]:
    values = headers.getall("Connection", []) if hasattr(headers, "getall") else (
        [headers["Connection"]] if "Connection" in headers else [])
    return _tokens(values)


def _tokens(values: Iterable[str]) -> set[str]:
    """The lower-cased tokens of comma-separated header values (a Connection header's)."""
    return {token.strip().lower() for value in values for token in value.split(",") if token.strip()}


@functools.lru_cache(maxsize=8)
def _never_forwarded(request_id_header: str) -> frozenset[str]:
    """The request headers never forwarded, the configured request-id header among them."""
    return _NEVER_FORWARDED | {request_id_header.lower()}


def forwardable_request_headers(headers: CIMultiDictProxy[str],
                                request_id_header: str = "X-Request-Id") -> tuple[tuple[str, str], ...]:
    """Client headers that may go upstream: no hop-by-hop, Host, credentials, lengths."""
    drop = _never_forwarded(request_id_header)
    if "Connection" in headers:
        drop |= _connection_tokens(headers)
    return tuple((k, v) for k, v in headers.items() if k.lower() not in drop)


_DROP_TO_CLIENT = HOP_BY_HOP | _DROP_RESPONSE


def client_response_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Upstream response headers (as received, in order) that may go to the client."""
    kept: list[tuple[str, str]] = []
    named: list[str] = []  # the Connection header's values
    for k, v in headers:
        lower = k.lower()
        if lower not in _DROP_TO_CLIENT:
            kept.append((k, v))
        elif lower == "connection":
            named.append(v)
    if named:  # the headers its Connection header names are hop-by-hop too
        extra = _tokens(named)
        kept = [(k, v) for k, v in kept if k.lower() not in extra]
    return kept
