"""Predict-on-route: the blocks of the requests in flight on each replica, before the
replica's events confirm them (the exact index, exact.py, reads them beside its own).

Events arrive only after prefill, so a burst of requests sharing a new prefix would all see
"nobody has it".  At dispatch a request's blocks are recorded as *pending* on the chosen
replica (a bounded `PrefixIndex`), kept while the request runs, forgotten at once if it
failed before the replica started it.

At its end they go too: a replica publishes a prompt's blocks as it prefills them, before
the first token, so by the end they are in the exact index, and what is not has mostly been
evicted since.  Kept 2 s after the end (the old default), they claimed a prefix the replica
had lost: on benchmarks/scenarios/agentic.yaml, where an agent calls again 0.2 s after its
last answer, a replica's events showed 94 blocks of an agent's context while its previous
call's pending record claimed 493, and the agent was sent back to a replica that then had
about half of what the router expected cached.  And under a conversation's later turns its
first prompt stayed pending for good: `PrefixIndex.forget` leaves the blocks an earlier
record added, so here ``added_only=False``.  ``confirm_s`` > 0 keeps the blocks the events
have not shown yet that long after the end, for a replica whose events lag.  A block the
replica reports evicted is no longer pending anywhere (`discard`).

Bounds: ``capacity_blocks`` records (the index's LRU), and at most ``max_pending`` ended
requests waiting for ``confirm_s`` (the oldest go early).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence

from router.prefix.index import PrefixIndex, Recording

DEFAULT_CONFIRM_S = 0.0
DEFAULT_MAX_PENDING = 65_536
DEFAULT_PENDING_CAPACITY_BLOCKS = 1_000_000


class PendingBlocks:
    """Per replica, the blocks of the requests the router sent it that are still running."""

    def __init__(self, capacity_blocks: int = DEFAULT_PENDING_CAPACITY_BLOCKS, *,
                 confirm_s: float = DEFAULT_CONFIRM_S, max_pending: int = DEFAULT_MAX_PENDING,
                 clock: Callable[[], float]) -> None:
        self.index = PrefixIndex(capacity_blocks, tokens_per_block=1)
        self.confirm_s = confirm_s
        self.max_pending = max_pending
        self.clock = clock
        self._expiring: deque[tuple[float, Recording]] = deque()  # (deadline, ended request)

    @property
    def records(self) -> int:
        return self.index.records

    def record(self, replica_id: str, hashes: Sequence[int]) -> Recording:
        """`hashes` are pending on `replica_id` until `settle` (or `retract`)."""
        self.expire()
        return self.index.record(hashes, replica_id)

    def settle(self, recording: Recording, confirmed: int) -> None:
        """The request ended; `confirmed`: how many of its blocks the replica's events show."""
        if self.confirm_s <= 0 or confirmed >= len(recording.hashes):
            self.index.forget(recording, added_only=False)
            return
        expiring = self._expiring
        if len(expiring) >= self.max_pending:
            self.index.forget(expiring.popleft()[1], added_only=False)  # the oldest goes early
        expiring.append((self.clock() + self.confirm_s, recording))

    def retract(self, recording: Recording) -> None:
        """The request failed before the replica started it: nothing of it is pending (what
        an earlier request sent stays: it may still be on its way)."""
        self.index.forget(recording)

    def discard(self, replica_id: str, hashes: Iterable[int]) -> None:
        """The replica evicted these blocks: no prediction claims them any more."""
        if self.index.records:
            self.index.discard(replica_id, hashes)

    def match(self, hashes: Sequence[int], replica_ids: tuple[str, ...]) -> dict[str, int] | None:
        """Per replica, the request's prefix pending there, in blocks (None: nothing is)."""
        self.expire()
        return self.index.match(hashes, replica_ids) if self.index.records else None

    def expire(self) -> None:
        expiring = self._expiring
        if expiring:
            now = self.clock()
            while expiring and expiring[0][0] <= now:
                self.index.forget(expiring.popleft()[1], added_only=False)

    def remove_replica(self, replica_id: str) -> None:
        self.index.remove_replica(replica_id)
