"""router/fleet/discovery/: how a source's answers become fleet membership (no network here:
tests/integration/test_discovery_dns.py and test_discovery_kubernetes.py run the sources
against a real DNS server and a stand-in API server)."""

from __future__ import annotations

import asyncio

from router.config import parse_config
from router.fleet.discovery import Discovery, Endpoint, backend_for
from router.fleet.discovery.kubernetes import endpoints_of, label_selector
from router.fleet.membership import build_fleet

MODEL = "m"


def config(discovery: dict, backends: list | None = None):
    return parse_config({"models": [{"name": MODEL, "backends": backends or [],
                                     "discovery": discovery}]}, "routes.yaml")


async def test_answers_join_and_leave_and_static_backends_win() -> None:
    cfg = config({"dns": {"name": "x.test", "port": 8000}, "max_replicas": 3,
                  "backend": {"labels": {"pool": "a"}, "kv_events": {"port": 5557}}},
                 backends=["http://10.0.0.1:8000"])
    fleet = build_fleet(cfg)
    discovery = Discovery(fleet)
    discovery._configs[MODEL] = cfg.models[0].discovery  # as apply_config does, without starting tasks
    discovery.static = {(MODEL, "http://10.0.0.1:8000")}
    discovery.publish(MODEL, "dns", [Endpoint("10.0.0.1", 8000), Endpoint("10.0.0.2", 8000)])
    urls = sorted(r.url for r in fleet)
    assert urls == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]  # the static one is not doubled
    added = fleet.find(MODEL, "http://10.0.0.2:8000")
    assert added is not None and added.labels == {"pool": "a"}
    assert added.kv_events_endpoint == "tcp://10.0.0.2:5557"
    assert discovery.owns(MODEL, "http://10.0.0.2:8000") and not discovery.owns(MODEL, "http://10.0.0.1:8000")
    # Gone from the answer: gone from the fleet; the static backend stays whatever DNS says.
    discovery.publish(MODEL, "dns", [Endpoint("10.0.0.3", 8000)])
    assert sorted(r.url for r in fleet) == ["http://10.0.0.1:8000", "http://10.0.0.3:8000"]
    discovery.publish(MODEL, "dns", [])
    assert [r.url for r in fleet] == ["http://10.0.0.1:8000"]
    # Bounded: more endpoints than max_replicas are cut and counted.
    discovery.publish(MODEL, "dns", [Endpoint(f"10.1.0.{i}", 8000) for i in range(10)])
    assert len(list(fleet)) == 1 + 3 and discovery.states[(MODEL, "dns")].truncated == 7
    assert len(discovery._backends) == 3
    await asyncio.sleep(0)  # the fleet's listeners schedule nothing here (no wiring)


def test_backend_for_an_ipv6_endpoint() -> None:
    cfg = config({"dns": {"name": "x.test", "record": "AAAA", "port": 8000},
                  "backend": {"kv_events": {"port": 5557, "replay_port": 5558}}})
    backend = backend_for(cfg.models[0].discovery, Endpoint("fd00::5", 8000, {"zone": "z"}))
    assert backend.url == "http://[fd00::5]:8000"
    assert backend.kv_events_endpoint == "tcp://[fd00::5]:5557"
    assert backend.kv_replay_endpoint == "tcp://[fd00::5]:5558"
    assert backend.labels == {"zone": "z"}


def test_endpoint_slices_ready_not_terminating_and_ports() -> None:
    cfg = config({"kubernetes": {"namespace": "llm", "service": "vllm", "port_name": "http"}})
    k8s = cfg.models[0].discovery.kubernetes
    assert label_selector(k8s) == "kubernetes.io/service-name=vllm"
    slices = {
        "a": {"ports": [{"name": "http", "port": 8000}, {"name": "metrics", "port": 9090}],
              "endpoints": [
                  {"addresses": ["10.0.0.1"], "conditions": {"ready": True}, "targetRef": {"name": "p1"},
                   "zone": "z1", "nodeName": "n1"},
                  {"addresses": ["10.0.0.2"], "conditions": {"ready": False}},
                  {"addresses": ["10.0.0.3"], "conditions": {"ready": True, "terminating": True}},
                  {"addresses": ["10.0.0.4"]},  # conditions unknown: ready, says the API
                  {"addresses": []}]},
        "b": {"ports": [{"name": "grpc", "port": 7000}], "endpoints": [{"addresses": ["10.0.0.9"]}]},
    }
    found = endpoints_of(k8s, slices)
    assert [(e.host, e.port) for e in found] == [("10.0.0.1", 8000), ("10.0.0.4", 8000)]
    assert found[0].labels == {"pod": "p1", "zone": "z1", "node": "n1"}
    by_selector = config({"kubernetes": {"namespace": "llm", "selector": {"tier": "gpu", "app": "vllm"}}})
    only = by_selector.models[0].discovery.kubernetes
    assert label_selector(only) == "app=vllm,tier=gpu"
    assert [(e.host, e.port) for e in endpoints_of(only, {"b": slices["b"]})] == [("10.0.0.9", 7000)]
    assert endpoints_of(only, {"a": slices["a"]}) == []  # two ports, no choice: skipped
