"""How an attempt fails before its answer is committed (`UpstreamFailure`, a failover), the
words for each kind of failure in the client's error when none answered (the proxy's
`_give_up`), and what a replica's Retry-After asks.
"""

from __future__ import annotations

import email.utils
import time

from multidict import CIMultiDict

from router.fleet.replicas import Replica
from router.transport.upstream_connection import UpstreamError

UPSTREAM_ERRORS = (UpstreamError, OSError)


# Failure kinds answered 504 (a wait ran out) rather than 502 when the attempts end.
TIMEOUT_KINDS = frozenset({"connect_timeout", "first_byte_timeout", "read_timeout"})


KIND_TEXT = {
    "connect": "could not be reached",
    "connect_timeout": "did not accept the connection in time",
    "first_byte_timeout": "sent no first byte in time",
    "read_timeout": "sent no answer in time",
    "unhealthy": "turned unhealthy before answering",
    "disconnect": "lost the connection before answering",
    "status_5xx": "answered with a server error",
    "status_429": "answered 429 (overloaded)",
    "oversized": "sent an answer too large for a prefill hop",
    "bad_stream": "answered 200 with an event stream that is not server-sent events",
}


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header (delta-seconds or an HTTP date) in seconds; None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class UpstreamFailure(Exception):
    """An attempt failed before its answer was committed to the client: fail over."""

    def __init__(self, replica: Replica, kind: str, message: str, *, status: int | None = None,
                 body: bytes | None = None, headers: CIMultiDict[str] | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.replica = replica
        self.kind = kind
        self.message = message
        self.status = status
        self.body = body
        self.headers = headers
        self.retry_after = retry_after


class NoReplicaLeft(Exception):
    """Every replica of the ranking became unroutable during failover."""
