"""Handles for the labelled metric children a request touches: the same values, less CPU.

prometheus_client's public ``Counter.inc`` and ``Histogram.observe`` check, on every call,
that the child is observable and the amount valid, and a histogram finds its bucket with a
Python loop over the bounds.  A request touches up to eight such children (five histograms,
three counters: thirteen values, a histogram writing a bucket and its sum); with them made no-ops,
a request took 8% fewer instructions (callgrind, benchmarks/profile_router.py).  A
handle does the same writes, found once per child: the counter's value, or the histogram's
bucket (a bisection in C) and sum.  The values are prometheus_client's own (its locks, its
multiprocess files), so exposition, multiprocess aggregation and removal are unchanged.

In a single process the values are ``MutexValue``s, a float under a lock; the local
handles add to that float directly.  The lock guards against other threads, and the
router runs none: its event loop is the only writer, and a scrape reads on that same
loop (a float read is whole under the GIL anyway).  That saves a call and a lock per
value written, up to thirteen per request.  Multiprocess values (files) keep their own ``inc``.

The handles read attributes that prometheus_client does not document (``_value``,
``_buckets`` and ``_sum``, ``_upper_bounds``, and a ``MutexValue``'s own ``_value``); they
have been its layout for years, and ``tests/unit/test_telemetry_children.py`` checks that a
handle's exposition equals the public call's.  Should a release change them, ``handle``
hands back the child itself (or a handle that calls its values' ``inc``): slower, never
wrong.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.values import MutexValue


class CounterHandle:
    """``inc`` of one counter child, without the per-call checks (amounts are >= 0 here)."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def inc(self, amount: float = 1.0) -> None:
        self._value.inc(amount)


class HistogramHandle:
    """``observe`` of one histogram child: its bucket by bisection, then the sum."""

    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, bounds: list[float], buckets: list[Any], total: Any) -> None:
        self._bounds = bounds  # ascending, the last +Inf: every number has a bucket
        self._buckets = buckets
        self._sum = total

    def observe(self, amount: float) -> None:
        if amount != amount:  # NaN: no bucket takes it (as prometheus_client's loop)
            self._sum.inc(amount)
            return
        self._buckets[bisect_left(self._bounds, amount)].inc(1)
        self._sum.inc(amount)


class LocalCounterHandle(CounterHandle):
    """A single-process counter: its ``MutexValue``'s float, added to directly."""

    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        self._value._value += amount


class LocalHistogramHandle(HistogramHandle):
    """A single-process histogram: its bucket's and its sum's floats, added to directly."""

    __slots__ = ()

    def observe(self, amount: float) -> None:
        if amount == amount:  # NaN: no bucket takes it (as prometheus_client's loop)
            self._buckets[bisect_left(self._bounds, amount)]._value += 1
        self._sum._value += amount


def _local(*values: Any) -> bool:
    """Are these single-process values whose float can be added to directly?"""
    return all(type(v) is MutexValue and isinstance(getattr(v, "_value", None), float) for v in values)


def handle(child: Any) -> Any:
    """A fast handle for a labelled counter or histogram child; any other child as it is."""
    if isinstance(child, Counter):
        value = getattr(child, "_value", None)
        if value is not None and hasattr(value, "inc"):
            return LocalCounterHandle(value) if _local(value) else CounterHandle(value)
    elif isinstance(child, Histogram):
        bounds = getattr(child, "_upper_bounds", None)
        buckets = getattr(child, "_buckets", None)
        total = getattr(child, "_sum", None)
        if (isinstance(bounds, list) and isinstance(buckets, list) and len(bounds) == len(buckets)
                and bounds and bounds[-1] == float("inf") and total is not None):
            local = _local(total, *buckets)
            return (LocalHistogramHandle if local else HistogramHandle)(bounds, buckets, total)
    return child
