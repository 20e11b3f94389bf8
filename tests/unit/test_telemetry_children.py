"""Telemetry.child: remembered metric children stay bounded and never outlive a replica."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from router.observability import telemetry as telemetry_module
from router.observability.telemetry import Telemetry


def test_remembered_children_are_bounded_and_forgotten_with_a_replica(monkeypatch) -> None:
    monkeypatch.setattr(telemetry_module, "MAX_CACHED_CHILDREN", 100)
    t = Telemetry(CollectorRegistry())
    for i in range(1000):
        t.child(t.requests, "m", f"http://r{i}", "200").inc()
        assert len(t._children) <= 100
    child = t.child(t.requests, "m", "http://kept", "200")
    assert t.child(t.requests, "m", "http://kept", "200") is child  # remembered
    t.forget_replica("http://kept")
    assert not t._children  # a removed series is never written through a stale child
    fresh = t.child(t.requests, "m", "http://kept", "200")
    fresh.inc()
    assert fresh is not child and t.requests.labels("m", "http://kept", "200")._value.get() == 1


VALUES = [0.0, 0.0004, 0.001, 0.0011, 0.003, 0.05, 1.0, 2.4999, 7.0, 299.0, 300.0, 1e9, -1.0, float("nan")]


def _series(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    """Every sample but the creation times, NaN as a string (NaN != NaN)."""
    return {(s.name, tuple(sorted(s.labels.items()))): (str(s.value) if s.value != s.value else s.value)
            for family in registry.collect() for s in family.samples if not s.name.endswith("_created")}


def test_a_handle_writes_what_the_public_call_writes() -> None:
    """The handles (router/observability/metric_handles.py) read prometheus_client's private layout: their
    exposition must equal the public calls' for the same values, or the layout changed."""
    public, handled = Telemetry(CollectorRegistry()), Telemetry(CollectorRegistry())
    for value in VALUES:
        public.duration.labels("m", "r").observe(value)
        handled.child(handled.duration, "m", "r").observe(value)
        public.matched_blocks.labels("p").observe(abs(value) if value == value else value)
        handled.child(handled.matched_blocks, "p").observe(abs(value) if value == value else value)
        public.requests.labels("m", "r", "200").inc()
        handled.child(handled.requests, "m", "r", "200").inc()
    # not the fallback: the single-process handles that add to the floats themselves
    assert type(handled.child(handled.duration, "m", "r")).__name__ == "LocalHistogramHandle"
    assert type(handled.child(handled.requests, "m", "r", "200")).__name__ == "LocalCounterHandle"
    assert _series(handled.registry) == _series(public.registry)


def test_a_handle_writes_the_multiprocess_files_too(tmp_path, monkeypatch) -> None:
    """`router --workers N`: a handle's writes reach the worker's files, so the page that sums
    the workers shows them."""
    from prometheus_client import values
    from prometheus_client.multiprocess import MultiProcessCollector

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    values.ValueClass = values.get_value_class()
    try:
        handled = Telemetry(CollectorRegistry(), multiprocess=str(tmp_path))
        # file-backed values: the handles that call their inc, not the local ones
        assert type(handled.child(handled.ttfb, "m", "r")).__name__ == "HistogramHandle"
        assert type(handled.child(handled.decisions, "p", "m", "r")).__name__ == "CounterHandle"
        for value in VALUES[:-1]:
            handled.child(handled.ttfb, "m", "r").observe(value)
            handled.child(handled.decisions, "p", "m", "r").inc()
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=str(tmp_path))
        samples = _series(merged)
    finally:
        monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
        values.ValueClass = values.get_value_class()
    finite = VALUES[:-1]
    assert samples[("router_time_to_first_byte_seconds_count", (("model", "m"), ("replica", "r")))] == len(finite)
    assert samples[("router_time_to_first_byte_seconds_bucket", (("le", "0.001"), ("model", "m"), ("replica", "r")))] \
        == sum(1 for v in finite if v <= 0.001)
    decisions = ("router_policy_decisions_total", (("model", "m"), ("policy", "p"), ("replica", "r")))
    assert samples[decisions] == len(finite)


def test_a_child_of_another_layout_is_used_as_it_is() -> None:
    """Should prometheus_client change the private layout the handles read, the child itself
    is handed back (slower, never wrong); gauges are always handed back as they are."""
    from prometheus_client import Counter, Gauge, Histogram

    from router.observability.metric_handles import handle

    registry = CollectorRegistry()
    gauge = Gauge("g", "g", ["a"], registry=registry).labels("x")
    assert handle(gauge) is gauge
    histogram = Histogram("h", "h", ["a"], registry=registry).labels("x")
    del histogram._buckets  # another layout
    assert handle(histogram) is histogram
    counter = Counter("c", "c", ["a"], registry=registry).labels("x")
    counter._value = None
    assert handle(counter) is counter
    # a value of another class (not a MutexValue with a float): its own inc is called
    from prometheus_client.values import MutexValue

    class OtherValue(MutexValue):
        pass

    other = Counter("o", "o", ["a"], registry=registry).labels("x")
    other._value = OtherValue("counter", "o", "o", (), (), "")
    assert type(handle(other)).__name__ == "CounterHandle"
    handle(other).inc(2)
    assert other._value.get() == 2
