"""Make-before-break for reloads: a replica the new file drops serves until its successors do.

A reload that swapped a model's backends used to remove the old replicas at once, while the
new ones got no traffic until their first passing probe: requests in between found no
replica and got 503 "No healthy replica" (34 of 1,000 at 100 requests/s with a swap every
second, issue 23).  Now a dropped replica *leaves*:

* it stays in the fleet, ranked like any other, while its model waits for its successors;
* its model's leaving replicas go (`Fleet.remove`: their in-flight requests finish, as
  always) once the model has as many HEALTHY routable replicas among those that stay or
  join as it had routable ones when the reload began (never more than stay or join: a
  file that shrinks a model waits for nothing more than what it keeps);
* a leaving replica goes at once when it is or turns unroutable (it serves nothing), and
  when ``health.handover_timeout`` has passed since it began to leave, whatever the
  successors do (a successor that never comes up must not keep a retired one forever);
* a later reload that lists it again keeps it (it stops leaving: the newest file wins);
  one that drops more replicas adds them, with their own deadlines, and the model's
  target is what was routable just before that reload.

New replicas are probed the moment they join (the monitor's first round starts at once,
router/fleet/monitor.py), so a handover between healthy replicas lasts one probe's round trip.
What waits is checked when a replica's health changes, when a reload applies, and when
the earliest deadline comes (one timer).  Entries are the fleet's own replicas and leave
with them (this is a fleet listener), so the bookkeeping is bounded by the fleet.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterable

from router.fleet.replicas import Fleet, Health, Replica

log = logging.getLogger("router.handover")

SUCCESSORS_HEALTHY = "successors_healthy"
TIMEOUT = "timeout"
UNROUTABLE = "unroutable"
_SLACK_S = 0.01  # a timer may fire this much before its time; the deadline counts as passed


class Handover:
    """The replicas a reload dropped that still serve; see the module docstring."""

    def __init__(self, fleet: Fleet, *, on_leave: Callable[[str], None] | None = None) -> None:
        self.fleet = fleet
        self.on_leave = on_leave  # told each departure's outcome (a metric)
        self._deadlines: dict[Replica, float] = {}  # leaving replica -> loop time it goes anyway
        self._needed: dict[str, int] = {}  # model -> routable replicas it had before the reload
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._deadlines)

    def is_leaving(self, replica: Replica) -> bool:
        return replica in self._deadlines

    def leaving(self) -> list[Replica]:
        return list(self._deadlines)

    # -- a reload ------------------------------------------------------------------------
    def capacity(self) -> Counter[str]:
        """Routable replicas per model now (call it before a reload changes the fleet)."""
        return Counter(r.model for r in self.fleet if r.routable)

    def keep(self, replica: Replica) -> None:
        """A reload lists `replica` again: it stops leaving."""
        if self._deadlines.pop(replica, None) is not None:
            log.info("replica %s of %s is listed again: it stays", replica.id, replica.model)

    def leave(self, replicas: Iterable[Replica], before: Counter[str], timeout: float) -> None:
        """Start the departure of the replicas a reload dropped; `before`: `capacity()` from
        before the reload.  Those with nothing to wait for go now."""
        deadline = asyncio.get_running_loop().time() + timeout
        for replica in replicas:
            self._deadlines.setdefault(replica, deadline)
            self._needed[replica.model] = before[replica.model]
        self.settle()

    # -- what moves it on ------------------------------------------------------------------
    def on_health(self, replica: Replica, old: Health, new: Health) -> None:
        """Monitor listener: a successor turned healthy, or a leaving replica unhealthy."""
        if self._deadlines:
            self.settle()

    def settle(self) -> None:
        """Remove every leaving replica whose wait is over; re-arm the timer for the rest."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._deadlines:
            self._needed.clear()
            return
        now = asyncio.get_running_loop().time()
        models = {r.model for r in self._deadlines}
        for model in models:
            leaving = [r for r in self._deadlines if r.model == model]
            successors = [r for r in self.fleet.for_model(model) if r not in self._deadlines]
            target = min(self._needed.get(model, 0), len(successors))
            healthy = sum(1 for r in successors if r.health is Health.HEALTHY and r.routable)
            for replica in leaving:
                if not replica.routable:
                    self._go(replica, UNROUTABLE)
                elif healthy >= target:
                    self._go(replica, SUCCESSORS_HEALTHY)
                elif now + _SLACK_S >= self._deadlines[replica]:
                    log.warning("replica %s of %s leaves after health.handover_timeout: %d of "
                                "the %d healthy successor(s) it waited for are healthy",
                                replica.id, model, healthy, target)
                    self._go(replica, TIMEOUT)
        waiting = {r.model for r in self._deadlines}
        for model in [m for m in self._needed if m not in waiting]:
            del self._needed[model]
        if self._deadlines:
            when = min(self._deadlines.values())
            self._timer = asyncio.get_running_loop().call_at(when, self.settle)

    def _go(self, replica: Replica, outcome: str) -> None:
        self._deadlines.pop(replica, None)
        log.info("replica %s of %s leaves (%s)", replica.id, replica.model, outcome)
        self.fleet.remove(replica)  # its in-flight requests finish (router/fleet/membership.py)
        if self.on_leave is not None:
            self.on_leave(outcome)

    def close(self) -> None:
        """The router stops: no timer outlives it (the replicas stay as they are)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- the fleet's listener --------------------------------------------------------------
    def replica_added(self, replica: Replica) -> None:
        pass

    def replica_removed(self, replica: Replica) -> None:
        """Removed by anyone (DELETE /admin/replicas too): no longer leaving."""
        self._deadlines.pop(replica, None)
