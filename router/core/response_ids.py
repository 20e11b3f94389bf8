"""Stored responses find their replica again: the response id carries the replica's token.

vLLM keeps stored responses (``VLLM_ENABLE_RESPONSES_API_STORE=1``) in the memory of the
server process that produced them.  A follow-up (``previous_response_id``), a ``GET
/v1/responses/{id}`` (also a resumed stream), a ``POST /v1/responses/{id}/cancel`` or a
``background`` job's polling must reach that same replica, or vLLM answers 404.

The scheme is stateless, so it holds across ``--workers N`` and across router processes
with no shared store: vLLM 0.32 takes a ``request_id`` in the Responses request body and
uses it as the response's id.  When the client sets none, the router sets one per attempt,
for the replica the attempt goes to::

    resp_{token}-{32 random hex digits}
    token = the first 16 hex digits of HMAC-SHA256(secret, replica URL)

A later request naming such an id goes to the replica of the fleet whose URL gives that
token (the URL, not the model: the store belongs to the server process, whatever model
names it serves).  ``secret`` is ``routing.response_id_secret``: with one, a client
cannot make up an id that steers its request to a replica of its choosing; every router
process in front of the same fleet must have the same one.  Without one, the token is a
plain hash of the URL (a client could then pick a replica among those serving models
its key may use, nothing more).

An id that is not of this shape (the client chose its own ``request_id``, or the response
came from a replica without the router) gets no affinity: a ``previous_response_id`` then
routes by prefix as any request, and ``GET``/``cancel`` of it is answered 404 by the router.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from typing import TYPE_CHECKING

from router.errors import RouterError

if TYPE_CHECKING:
    from router.fleet.replicas import Replica

_ID = re.compile(r"^resp_([0-9a-f]{16})-[0-9a-f]{32}$")
MAX_CACHED_TOKENS = 4096  # replica URLs whose token is kept
ID_LIMIT = 200  # characters of a response id the router looks at (a path segment or a body field)


class ResponseIds:
    """Response ids that name their replica (see the module docstring)."""

    def __init__(self, secret: str | None = None) -> None:
        self._key = (secret or "").encode("utf-8")
        # Each replica's token, computed once: a follow-up compares the id with every
        # candidate's token, on the request path.  Bounded: cleared when full (the fleet's
        # URLs come back at one HMAC each).
        self._tokens: dict[str, str] = {}

    def token(self, replica: Replica) -> str:
        token = self._tokens.get(replica.url)
        if token is None:
            if len(self._tokens) >= MAX_CACHED_TOKENS:
                self._tokens.clear()
            token = self._tokens[replica.url] = hmac.new(
                self._key, replica.url.encode("utf-8"), hashlib.sha256).hexdigest()[:16]
        return token

    def new_id(self, replica: Replica) -> str:
        """A fresh response id for an attempt on `replica`."""
        return f"resp_{self.token(replica)}-{secrets.token_hex(16)}"

    @staticmethod
    def token_of(response_id: str) -> str | None:
        """The replica token an id carries (None: not an id the router issued)."""
        if len(response_id) > ID_LIMIT:
            return None
        match = _ID.match(response_id)
        return match.group(1) if match else None

    def replica_of(self, response_id: str, replicas: Iterable[Replica]) -> Replica | None:
        """The replica among `replicas` that holds `response_id` (None: none of them)."""
        token = self.token_of(response_id)
        if token is None:
            return None
        for replica in replicas:
            if hmac.compare_digest(self.token(replica), token):
                return replica
        return None

    def holder(self, response_id: str, replicas: Iterable[Replica], param: str) -> list[Replica]:
        """The one replica among `replicas` that holds `response_id`, when the id is one the
        router issued (`not_found` when none of them does); `replicas` as they are for an id
        the router did not issue."""
        if self.token_of(response_id) is None:
            return list(replicas)
        found = self.replica_of(response_id, replicas)
        if found is None:
            raise not_found(response_id, param)
        return [found]


def not_found(response_id: str, param: str) -> RouterError:
    """vLLM's own answer for a stored response it does not hold (404, its wording)."""
    shown = response_id if len(response_id) <= ID_LIMIT else response_id[:ID_LIMIT] + "..."
    return RouterError(404, f"Response with id '{shown}' not found.", param=param,
                       type="invalid_request_error")


def with_request_id(body: bytes | bytearray, request_id: str) -> bytes:
    """A JSON object's bytes with ``"request_id"`` added first, every other byte as sent.

    The body is a validated JSON object (requests.validate_body), so its first non-blank
    byte is ``{``; the field goes right after it, with a comma unless the object is empty."""
    text = bytes(body)
    start = len(text) - len(text.lstrip())
    rest = text[start + 1:]
    empty = rest.lstrip().startswith(b"}")
    field = b'"request_id":"' + request_id.encode("ascii") + (b'"' if empty else b'",')
    return text[:start + 1] + field + rest
