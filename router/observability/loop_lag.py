"""How late the router's own event loop runs, so its timeouts do not blame replicas for it.

A timeout is a timer on the event loop.  When the loop is busy (a burst of thousands of
requests arriving at once on a small machine), timers fire late and, worse, fire before
the I/O that completed in time is processed: an upstream connection the kernel set up
in a millisecond is declared "not accepted within 2 s" because the router itself did not
look for 3 s.  Counted as replica failures, those timeouts eject healthy replicas
(circuit breakers) and mark them unhealthy (probes): a router overload turned into an
outage of the whole fleet (benchmarks/chaos.py, 5,000 streams opened at once, did that).

`LoopLag` is a ticker that sleeps `interval` and records how late it woke.  `stalled_since`
tells whether the loop stalled by at least some amount since a given moment, counting a
stall still going on (the ticker has not run for a while).  The proxy retries a connect
that timed out during such a stall on the same replica instead of failing it over, and
the monitor treats a probe that timed out during one as inconclusive.  The recent
maximum is exported as `router_event_loop_lag_seconds`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time

_WINDOW_S = 10.0  # lag samples kept (bounded: window / interval entries)


class LoopLag:
    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self._samples: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=max(1, int(_WINDOW_S / interval)))
        self._last_tick = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._last_tick = time.monotonic()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            expected = time.monotonic() + self.interval
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            self._samples.append((now, max(0.0, now - expected)))
            self._last_tick = now

    def current(self) -> float:
        """The stall going on now: how long past its due time the ticker has not run."""
        if self._task is None:
            return 0.0
        return max(0.0, time.monotonic() - self._last_tick - self.interval)

    def recent_max(self, seconds: float = _WINDOW_S) -> float:
        """The longest stall of the last `seconds`, the one going on included."""
        since = time.monotonic() - seconds
        return max([lag for at, lag in self._samples if at >= since] + [self.current()])

    def stalled_since(self, started: float, at_least: float) -> bool:
        """Did the loop stall by `at_least` seconds at some point after `started`?"""
        if self.current() >= at_least:
            return True
        # A sample taken at `at` covers the stall that ended then and began `lag` before it.
        return any(lag >= at_least for at, lag in self._samples if at >= started)
