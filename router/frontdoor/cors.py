"""Cross-origin requests from browsers (``cors:``), answered the way the Fetch standard asks.

* With no ``allow_origins`` nothing changes: no CORS headers, and browsers keep pages of
  other origins from reading answers.
* A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) from an
  allowed origin asking for allowed methods and headers gets 204 with
  ``Access-Control-Allow-Origin/-Methods/-Headers/-Max-Age`` (and ``-Credentials`` when
  configured); any other preflight gets a 403 without CORS headers, so the browser blocks
  the request.  Preflights need no API key: browsers never send one with them.
* Every other answer to an allowed origin, streams and errors included, carries
  ``Access-Control-Allow-Origin`` (the origin itself, or ``*`` when any origin is allowed
  and credentials are not), ``Vary: Origin`` and ``Access-Control-Expose-Headers``.  The
  headers are added in aiohttp's ``on_response_prepare`` signal, just before the status
  line goes out, which is the only moment a streamed answer can still get them.
* A plain ``OPTIONS`` (no preflight) gets 204 with ``Allow``.

Header names may end in ``*`` to allow a family (``X-Stainless-*``, which OpenAI's
JavaScript SDK sends).
"""

from __future__ import annotations

from aiohttp import web

from router.config import CorsConfig
from router.errors import RouterError

_ALLOW = "GET, POST, OPTIONS"


class Cors:
    """The configured CORS policy: preflight answers and a response-prepare hook."""

    def __init__(self, config: CorsConfig) -> None:
        self.config = config
        self._any_origin = "*" in config.allow_origins
        self._origins = frozenset(o.lower() for o in config.allow_origins)
        self._methods = frozenset(m.upper() for m in config.allow_methods)
        exact = [h.lower() for h in config.allow_headers if not h.endswith("*")]
        self._headers = frozenset(exact)
        self._header_prefixes = tuple(h[:-1].lower() for h in config.allow_headers if h.endswith("*"))
        self._expose = ", ".join(config.expose_headers)

    @property
    def enabled(self) -> bool:
        return bool(self._origins)

    def origin_allowed(self, origin: str) -> bool:
        return self._any_origin or origin.lower().rstrip("/") in self._origins

    def _header_allowed(self, name: str) -> bool:
        name = name.strip().lower()
        return (not name or name in self._headers
                or any(name.startswith(p) for p in self._header_prefixes)
                # CORS-safelisted request headers never need to be allowed
                or name in ("accept", "accept-language", "content-language"))

    def _allow_origin_value(self, origin: str) -> str:
        return "*" if self._any_origin and not self.config.allow_credentials else origin

    def preflight(self, request: web.Request) -> web.Response:
        """The answer to an ``OPTIONS`` request, whatever its path (the front door asks);
        RouterError 403 for a refused preflight."""
        origin = request.headers.get("Origin")
        wanted = request.headers.get("Access-Control-Request-Method")
        if origin is None or wanted is None:
            return web.Response(status=204, headers={"Allow": _ALLOW})
        requested = request.headers.get("Access-Control-Request-Headers", "")
        if not (self.enabled and self.origin_allowed(origin)):
            raise RouterError(403, "CORS: this origin is not allowed")
        if wanted.upper() not in self._methods:
            raise RouterError(403, f"CORS: method {wanted} is not allowed")
        refused = [h.strip() for h in requested.split(",") if not self._header_allowed(h)]
        if refused:
            raise RouterError(403, f"CORS: header(s) not allowed: {', '.join(refused)}")
        headers = {
            "Access-Control-Allow-Origin": self._allow_origin_value(origin),
            "Access-Control-Allow-Methods": ", ".join(sorted(self._methods)),
            "Access-Control-Max-Age": str(self.config.max_age),
            "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        }
        if requested.strip():
            headers["Access-Control-Allow-Headers"] = requested
        if self.config.allow_credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return web.Response(status=204, headers=headers)

    async def on_response_prepare(self, request: web.Request,
                                  response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is None or not self.enabled or request.method == "OPTIONS":
            return
        if not self.origin_allowed(origin):
            return
        headers = response.headers
        headers["Access-Control-Allow-Origin"] = self._allow_origin_value(origin)
        headers.add("Vary", "Origin")
        if self._expose:
            headers["Access-Control-Expose-Headers"] = self._expose
        if self.config.allow_credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
