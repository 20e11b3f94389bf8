"""In-flight waits for a replica's bytes, which a health change or the drain can cut short.

Every upstream attempt waits: for its response and first byte (up to
``proxy.first_byte_timeout`` for a stream, ``proxy.read_timeout`` for a whole answer),
then for each next chunk (up to ``proxy.read_timeout`` of silence).  Those waits are
``asyncio.timeout`` contexts, and each attempt's current one is registered here under
its replica, so that:

* when the monitor marks a replica UNHEALTHY, every wait on it is cut to at most
  ``proxy.unhealthy_grace`` seconds from now (and later waits on it get no more than
  that): an attempt that has not had its first byte fails over to another replica, a
  stalled stream ends with an error event, while a stream whose bytes still flow goes on.
  A hung replica (SIGSTOP, a wedged engine) no longer holds requests for 600 s;
* when a drain runs out of time, every wait is cut at once, so streams end with the SSE
  error event and ``[DONE]`` instead of being dropped.

Registrations are removed when the attempt ends, so this holds one entry per attempt in
flight.
"""

from __future__ import annotations

import asyncio

from router.fleet.replicas import Health, Replica

UNHEALTHY = "unhealthy"
DRAIN = "drain"


class Wait:
    """One attempt's waits on its replica."""

    __slots__ = ("replica", "timeout", "cut", "_waits")

    def __init__(self, replica: Replica, waits: Waits) -> None:
        self.replica = replica
        self.timeout: asyncio.Timeout | None = None  # the current wait, while one runs
        self.cut: str | None = None  # why it was cut short: UNHEALTHY or DRAIN
        self._waits = waits

    def limit(self, seconds: float) -> float:
        """The time the next wait may take: `seconds`, less if the replica is sick or draining."""
        if self.cut == DRAIN or self._waits.draining:
            self.cut = DRAIN
            return 0.0
        if self.replica.health is Health.UNHEALTHY:
            self.cut = UNHEALTHY
            return min(seconds, self._waits.unhealthy_grace)
        self.cut = None
        return seconds

    def why(self) -> str | None:
        """After a TimeoutError: UNHEALTHY or DRAIN if the wait was cut short, else None."""
        if self.cut == DRAIN or self._waits.draining:
            return DRAIN
        if self.cut == UNHEALTHY or self.replica.health is Health.UNHEALTHY:
            return UNHEALTHY
        return None


class Waits:
    """Every attempt's Wait, by replica id."""

    def __init__(self, unhealthy_grace: float) -> None:
        self.unhealthy_grace = unhealthy_grace
        self.draining = False
        self._by_replica: dict[str, set[Wait]] = {}

    def __len__(self) -> int:
        return sum(len(waits) for waits in self._by_replica.values())

    def open(self, replica: Replica) -> Wait:
        wait = Wait(replica, self)
        self._by_replica.setdefault(replica.id, set()).add(wait)
        return wait

    def close(self, wait: Wait) -> None:
        waits = self._by_replica.get(wait.replica.id)
        if waits is not None:
            waits.discard(wait)
            if not waits:
                del self._by_replica[wait.replica.id]

    def _shorten(self, wait: Wait, seconds: float) -> None:
        timeout = wait.timeout
        if timeout is None or timeout.expired():
            return
        loop = asyncio.get_running_loop()
        when = timeout.when()
        target = loop.time() + seconds
        if when is None or when > target:
            timeout.reschedule(target)

    def cut_replica(self, replica: Replica) -> None:
        """`replica` turned UNHEALTHY: its waits end within the grace."""
        for wait in list(self._by_replica.get(replica.id, ())):
            wait.cut = UNHEALTHY
            self._shorten(wait, self.unhealthy_grace)

    def cut_all(self) -> None:
        """The drain ran out of time: every wait ends now."""
        self.draining = True
        for waits in list(self._by_replica.values()):
            for wait in list(waits):
                wait.cut = DRAIN
                self._shorten(wait, 0.0)
