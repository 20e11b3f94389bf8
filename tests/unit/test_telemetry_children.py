"""Telemetry.child: remembered metric children stay bounded and never outlive a replica."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from router import telemetry as telemetry_module
from router.telemetry import Telemetry


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
