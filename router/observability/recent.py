"""`RecentRequests`: the last requests' outcomes and each replica's share of the recent
traffic, for the live status page (/admin/status, router/frontdoor/status_page.py).

Both data planes end a request in `Intake.finish`, which adds it here; the page reads a
snapshot.  Bounded twice: the last `size` requests are kept whole (their routing decision
with its per-term costs), and the last `window` routed ones only as the replica that took
each, counted incrementally so a share costs nothing to keep.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

from router.observability.access_log import RequestRecord

DEFAULT_SIZE = 50  # requests shown whole
DEFAULT_WINDOW = 1000  # routed requests the traffic shares are over


class RecentRequests:
    """A ring of the last requests and the replicas that took the last routed ones."""

    def __init__(self, size: int = DEFAULT_SIZE, window: int = DEFAULT_WINDOW) -> None:
        self._last: deque[tuple[float, float, RequestRecord]] = deque(maxlen=size)
        self._taken: deque[str] = deque()
        self._window = window
        self._counts: Counter[str] = Counter()  # replica id -> requests among the last `window`

    def add(self, record: RequestRecord, duration: float) -> None:
        """One request's end: kept whole among the last ones; its replica counted."""
        self._last.append((time.time(), duration, record))
        replica = record.replica
        if replica is not None:
            taken, counts = self._taken, self._counts
            taken.append(replica)
            counts[replica] += 1
            if len(taken) > self._window:
                gone = taken.popleft()
                counts[gone] -= 1
                if counts[gone] <= 0:
                    del counts[gone]

    def shares(self) -> dict[str, float]:
        """Replica id -> its fraction of the last routed requests (at most `window`)."""
        total = len(self._taken)
        return {replica: n / total for replica, n in self._counts.items()} if total else {}

    def snapshot(self) -> list[dict[str, Any]]:
        """The last requests, newest first, as the page shows them."""
        out = []
        for ts, duration, r in reversed(self._last):
            out.append({"ts": round(ts, 3), "request_id": r.request_id, "method": r.method, "path": r.path,
                        "model": r.model, "replica": r.replica, "status": r.status, "stream": r.stream,
                        "attempts": r.attempts, "policy": r.policy, "why": r.why, "error": r.error,
                        "ttfb_ms": None if r.ttfb is None else round(r.ttfb * 1000, 3),
                        "duration_ms": round(duration * 1000, 3), "cached_tokens": r.cached_tokens,
                        "predicted_cached_tokens": r.predicted_tokens, "prefill_replica": r.prefill_replica})
        return out

    def __len__(self) -> int:
        return len(self._last)
