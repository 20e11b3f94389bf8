"""Which request paths reach a replica: an allowlist, checked on the raw bytes of the path.

The router is a front door: a replica behind it serves more than the OpenAI API (vLLM has
``/reset_prefix_cache``, ``/sleep``, ``/v1/load_lora_adapter``, ``/collective_rpc``, the
simulator has ``/admin/faults``), and one client reaching those could break a replica for
everyone.  So:

* Only the POST paths in ``server.forward_paths`` are forwarded, by exact match.  The
  default is the inference API of vLLM 0.32 (``DEFAULT_FORWARD_PATHS``).
* The raw path must be plain before it is compared: percent-encoding (``%2F``, ``%2e``,
  ``%3F``...), a backslash, an empty segment (``//``), a dot segment (``/./``, ``/../``)
  or a control character is a 400, whatever it would decode to.  Nothing is decoded or
  normalized, so there is nothing to smuggle through a decoder: a path either is one of
  the allowed strings byte for byte or it is not forwarded.
* What is forwarded upstream is the allowlist's own string, never the client's bytes, and
  the client's query string is never forwarded.
* Replica management paths (``MANAGEMENT_PATHS``) can never be put on the allowlist: the
  configuration refuses them.
"""

from __future__ import annotations

import re

# POST paths forwarded by default: vLLM 0.32's OpenAI-compatible inference endpoints and
# its stateless helpers (tokenize, render), all routed by the body's `model`.
DEFAULT_FORWARD_PATHS: tuple[str, ...] = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/score",
    "/v1/rerank",
    "/v2/rerank",
    "/rerank",
    "/score",
    "/pooling",
    "/classify",
    "/tokenize",
    "/detokenize",
    "/v1/completions/render",
    "/v1/chat/completions/render",
)

# Paths (and everything below them) that manage a replica rather than use it: never
# forwarded, not even when a configuration lists them.
MANAGEMENT_PATHS: tuple[str, ...] = (
    "/admin",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/reset_prefix_cache",
    "/reset_mm_cache",
    "/reset_encoder_cache",
    "/sleep",
    "/wake_up",
    "/is_sleeping",
    "/collective_rpc",
    "/start_profile",
    "/stop_profile",
    "/scale_elastic_ep",
    "/is_scaling_elastic_ep",
    "/pause",
    "/resume",
    "/is_paused",
    "/update_weights",
    "/server_info",
    "/inference/v1/abort_requests",
)

# Paths the router answers itself; forwarding them would shadow the router's own.
ROUTER_PATHS: tuple[str, ...] = ("/v1/models", "/health", "/ready", "/metrics")

# A plain path: "/" then segments of unreserved characters, no empty or dot segments.
_SEGMENT = r"[A-Za-z0-9_\-~][A-Za-z0-9_.\-~]*"
_PLAIN_PATH = re.compile(rf"^(/{_SEGMENT})+$")
_DOT_SEGMENT = re.compile(r"/\.+(/|$)")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")  # controls and space (one C scan, not a loop per character)


def is_management_path(path: str) -> bool:
    """Does `path` fall under a replica management endpoint?"""
    lowered = path.lower().rstrip("/")
    return any(lowered == m or lowered.startswith(m + "/") for m in MANAGEMENT_PATHS)


def raw_path_problem(raw_path: str) -> str | None:
    """Why the raw request target's path is refused (400), or None if it is plain.

    `raw_path` is the path as the client sent it, before any decoding (aiohttp's
    ``request.raw_path``); the query string, if any, is cut off first.
    """
    path = raw_path.split("?", 1)[0]
    if "%" in path:
        return "percent-encoded characters are not allowed in the path"
    if "\\" in path:
        return "backslashes are not allowed in the path"
    if _CONTROL.search(path):
        return "control characters are not allowed in the path"
    if "//" in path:
        return "empty path segments are not allowed"
    if _DOT_SEGMENT.search(path):
        return "dot segments are not allowed in the path"
    if not path.startswith("/"):
        return "the path must start with /"
    return None


def forward_path_problem(path: str) -> str | None:
    """Why `path` cannot be a forward path in the configuration, or None if it can."""
    if not _PLAIN_PATH.match(path) or _DOT_SEGMENT.search(path):
        return ("expected a plain absolute path like /v1/chat/completions (letters, digits, "
                "'_', '-', '.', '~'; no empty or dot segments, no '%', no query)")
    if is_management_path(path):
        return "replica management endpoints can never be forwarded to clients"
    if path.rstrip("/") in ROUTER_PATHS:
        return "the router serves this path itself"
    return None
