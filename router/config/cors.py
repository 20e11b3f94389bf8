"""``cors:``: which browser origins may call the router, answered as the Fetch standard asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from router.config.values import header_name, integer
from yamlcheck import Node, describe


@dataclass(frozen=True, slots=True)
class CorsConfig:
    allow_origins: tuple[str, ...] = ()  # empty: no CORS headers at all; "*": any origin
    allow_methods: tuple[str, ...] = ("GET", "POST", "OPTIONS")  # methods a browser may use
    # request headers a browser may send (`*` patterns allowed)
    allow_headers: tuple[str, ...] = ("Authorization", "Content-Type", "X-Request-Id",
                                      "X-Session-Id", "X-Priority", "OpenAI-Organization",
                                      "OpenAI-Project", "X-Stainless-*")
    expose_headers: tuple[str, ...] = ("X-Request-Id", "Retry-After")  # answer headers a browser's script may read
    allow_credentials: bool = False  # browsers may send cookies (never with origin `*`)
    max_age: int = 600  # seconds a browser may cache a preflight answer


_CORS_KEYS = ("allow_origins", "allow_methods", "allow_headers", "expose_headers",
              "allow_credentials", "max_age")


def parse_cors(node: Node) -> CorsConfig:
    node.mapping(_CORS_KEYS)
    d = CorsConfig()
    origins = []
    for item in node.get("allow_origins", []).items():
        origin = item.string().rstrip("/")
        if origin != "*" and not (origin.startswith(("http://", "https://")) and
                                  urlsplit(origin).hostname and not urlsplit(origin).path):
            item.fail(f"expected \"*\" or an origin like https://app.example.com, found {describe(origin)}")
        origins.append(origin)
    credentials = node.get("allow_credentials", d.allow_credentials).boolean()
    if credentials and "*" in origins:
        node.get("allow_credentials").fail(
            "allow_credentials cannot be used with the origin \"*\" (browsers refuse it); list the origins")

    def names(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        if not node.has(key):
            return default
        return tuple(header_name(n) if key != "allow_methods" else n.string().upper()
                     for n in node.get(key).items())

    return CorsConfig(
        allow_origins=tuple(origins),
        allow_methods=names("allow_methods", d.allow_methods),
        allow_headers=names("allow_headers", d.allow_headers),
        expose_headers=names("expose_headers", d.expose_headers),
        allow_credentials=credentials,
        max_age=integer(node, "max_age", d.max_age, minimum=0, maximum=86400),
    )
