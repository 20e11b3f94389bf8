"""The status page's memory of recent requests (router/observability/recent.py) is bounded."""

from __future__ import annotations

import pytest

from router.observability.access_log import RequestRecord
from router.observability.recent import RecentRequests


def test_the_last_requests_and_the_traffic_shares_are_bounded() -> None:
    recent = RecentRequests(size=50, window=1000)
    for i in range(20_000):
        record = RequestRecord(request_id=str(i), method="POST", path="/v1/completions", model="m")
        record.replica = f"r{i % 7}" if i < 19_000 else "late"  # 7 replicas, then one takes over
        recent.add(record, 0.01)
    assert len(recent) == 50
    snapshot = recent.snapshot()
    assert [entry["request_id"] for entry in snapshot[:2]] == ["19999", "19998"]  # newest first
    shares = recent.shares()
    assert shares == {"late": pytest.approx(1.0)}  # only the last 1,000 count: the others left
    assert len(recent._counts) == 1 and len(recent._taken) == 1000


def test_an_unrouted_request_counts_in_no_share() -> None:
    recent = RecentRequests()
    record = RequestRecord(request_id="x", method="POST", path="/v1/completions", model="m")
    record.replica = None  # refused before any replica (a 429, a 503)
    recent.add(record, 0.0)
    assert recent.shares() == {} and len(recent) == 1
