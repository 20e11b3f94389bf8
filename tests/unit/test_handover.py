"""router/fleet/handover.py: when the replicas a reload dropped leave (make-before-break).

No network: a Fleet of Replica objects whose health the test sets, as the monitor would,
telling the handover through `on_health`."""

from __future__ import annotations

import asyncio

from router.fleet.handover import Handover
from router.fleet.replicas import Fleet, Health, Replica


def fleet_of(*urls: str, model: str = "m", health: Health = Health.HEALTHY) -> tuple[Fleet, Handover, list[str]]:
    fleet = Fleet()
    outcomes: list[str] = []
    handover = Handover(fleet, on_leave=outcomes.append)
    fleet.listeners.append(handover)
    for url in urls:
        fleet.add(Replica(url=url, model=model, health=health))
    return fleet, handover, outcomes


def join(fleet: Fleet, url: str, model: str = "m") -> Replica:
    replica = Replica(url=url, model=model)  # UNKNOWN, as a reload adds it
    fleet.add(replica)
    return replica


def turn(handover: Handover, replica: Replica, health: Health) -> None:
    old, replica.health = replica.health, health
    handover.on_health(replica, old, health)


def urls(fleet: Fleet) -> list[str]:
    return sorted(r.url for r in fleet)


async def test_a_swap_keeps_the_old_replicas_until_as_many_successors_are_healthy() -> None:
    fleet, handover, outcomes = fleet_of("http://a", "http://b")
    before = handover.capacity()
    old = fleet.for_model("m")
    c, d = join(fleet, "http://c"), join(fleet, "http://d")
    handover.leave(old, before, timeout=30)
    assert urls(fleet) == ["http://a", "http://b", "http://c", "http://d"] and len(handover) == 2
    turn(handover, c, Health.HEALTHY)
    assert len(handover) == 2  # one healthy successor of the two it had
    turn(handover, d, Health.HEALTHY)
    assert urls(fleet) == ["http://c", "http://d"] and len(handover) == 0
    assert outcomes == ["successors_healthy", "successors_healthy"]
    handover.close()


async def test_a_shrink_or_a_model_dropped_whole_waits_for_nothing() -> None:
    fleet, handover, outcomes = fleet_of("http://a", "http://b", "http://c")
    handover.leave([fleet.find("m", "http://c")], handover.capacity(), timeout=30)  # type: ignore[list-item]
    assert urls(fleet) == ["http://a", "http://b"]  # both that stay are healthy
    handover.leave(fleet.for_model("m"), handover.capacity(), timeout=30)
    assert len(fleet) == 0 and outcomes == ["successors_healthy"] * 3


async def test_unroutable_leaving_replicas_go_at_once_and_when_they_turn_so() -> None:
    fleet, handover, outcomes = fleet_of("http://a", "http://b")
    a, b = fleet.for_model("m")
    a.health = Health.UNHEALTHY
    before = handover.capacity()
    join(fleet, "http://c")
    handover.leave([a, b], before, timeout=30)
    assert urls(fleet) == ["http://b", "http://c"] and outcomes == ["unroutable"]
    turn(handover, b, Health.SUSPECT)  # still routable (ranked last): stays
    assert handover.is_leaving(b)
    turn(handover, b, Health.UNHEALTHY)
    assert urls(fleet) == ["http://c"] and outcomes == ["unroutable", "unroutable"]


async def test_a_successor_that_never_comes_up_lets_them_go_after_the_timeout() -> None:
    fleet, handover, outcomes = fleet_of("http://a")
    before = handover.capacity()
    join(fleet, "http://c")
    handover.leave(fleet.for_model("m")[:1], before, timeout=0.05)
    assert urls(fleet) == ["http://a", "http://c"]
    await asyncio.sleep(0.2)  # the timer, not a health change, ends the wait
    assert urls(fleet) == ["http://c"] and outcomes == ["timeout"]
    # handover_timeout 0: no wait at all
    fleet2, handover2, outcomes2 = fleet_of("http://a")
    before = handover2.capacity()
    join(fleet2, "http://c")
    handover2.leave(fleet2.for_model("m")[:1], before, timeout=0)
    assert urls(fleet2) == ["http://c"] and outcomes2 == ["timeout"]


async def test_a_replica_listed_again_stays_and_one_removed_by_others_is_forgotten() -> None:
    fleet, handover, outcomes = fleet_of("http://a", "http://b")
    a, b = fleet.for_model("m")
    before = handover.capacity()
    join(fleet, "http://c")
    handover.leave([a, b], before, timeout=0.05)
    handover.keep(a)  # the next file lists it again
    fleet.remove(b)  # DELETE /admin/replicas
    assert len(handover) == 0 and outcomes == []
    await asyncio.sleep(0.15)
    assert urls(fleet) == ["http://a", "http://c"] and outcomes == []


async def test_models_are_handed_over_each_on_its_own() -> None:
    fleet, handover, outcomes = fleet_of("http://a")
    fleet.add(Replica(url="http://x", model="n", health=Health.HEALTHY))
    before = handover.capacity()
    c, y = join(fleet, "http://c"), join(fleet, "http://y", model="n")
    handover.leave([fleet.find("m", "http://a"), fleet.find("n", "http://x")], before,  # type: ignore[list-item]
                   timeout=30)
    turn(handover, y, Health.HEALTHY)
    assert urls(fleet) == ["http://a", "http://c", "http://y"]  # n's is gone, m's waits for c
    turn(handover, c, Health.HEALTHY)
    assert urls(fleet) == ["http://c", "http://y"]
    handover.close()
