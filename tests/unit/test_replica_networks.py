"""Where the admin API may point the router (router/fleet/replica_networks.py), with a fake resolver."""

from __future__ import annotations

import asyncio
import ipaddress
import time

import pytest

from router.config import BackendConfig
from router.errors import RouterError
from router.fleet.replica_networks import ReplicaNetworks, allowed, ip, registration_hosts


def nets(*cidrs: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(c) for c in cidrs]


def resolver(table: dict[str, list[str]]):
    asked: list[str] = []

    async def resolve(host: str) -> list[str]:
        asked.append(host)
        if host not in table:
            raise OSError("no such host")
        return table[host]

    resolve.asked = asked  # type: ignore[attr-defined]
    return resolve


async def refused(networks: ReplicaNetworks, host: str, param: str = "url") -> RouterError:
    with pytest.raises(RouterError) as info:
        await networks.check([(param, host)])
    assert info.value.status == 403 and info.value.param == param
    assert "auth.admin_replica_networks" in info.value.message
    return info.value


def test_link_local_metadata_and_unspecified_need_naming_on_purpose() -> None:
    wide = nets("0.0.0.0/0", "::/0")
    for text in ("169.254.169.254", "0.0.0.0", "::", "fe80::1", "fd00:ec2::254", "::ffff:169.254.169.254",
                 "224.0.0.1", "fe80::1%eth0"):
        address = ip(text)
        assert address is not None and not allowed(address, wide), text
    assert allowed(ip("10.1.2.3"), wide) and allowed(ip("2001:db8::1"), wide)  # type: ignore[arg-type]
    assert allowed(ip("169.254.169.254"), nets("169.254.169.254/32"))  # type: ignore[arg-type]
    assert allowed(ip("fe80::1"), nets("fe80::/64"))  # type: ignore[arg-type]
    assert not allowed(ip("169.254.169.254"), nets("169.254.1.0/24"))  # type: ignore[arg-type]


def test_registration_hosts_cover_the_kv_event_endpoints() -> None:
    backend = BackendConfig(url="http://vllm-3:8000", kv_events_endpoint="tcp://10.0.0.9:5557",
                            kv_replay_endpoint="ipc:///tmp/replay")
    assert registration_hosts(backend) == [("url", "vllm-3"), ("kv_events.endpoint", "10.0.0.9"),
                                           ("kv_events.replay_endpoint", "127.0.0.1")]
    assert registration_hosts(BackendConfig(url="http://[::1]:8000")) == [("url", "::1")]


async def test_listed_networks_are_exactly_what_is_allowed() -> None:
    resolve = resolver({"inside": ["10.0.0.7"], "straddles": ["10.0.0.8", "169.254.169.254"],
                        "localhost": ["127.0.0.1", "::1"]})
    listed = ReplicaNetworks(nets("10.0.0.0/8"), lambda: [], resolve=resolve)
    await listed.check([("url", "10.9.9.9"), ("url", "inside"), ("kv_events.endpoint", "10.1.1.1")])
    await refused(listed, "straddles")  # every address a name resolves to must be allowed
    await refused(listed, "127.0.0.1")  # a list replaces the default: loopback too
    await refused(listed, "localhost")
    await refused(listed, "192.168.1.1", "kv_events.endpoint")
    await refused(listed, "nowhere")  # does not resolve: cannot be checked
    await refused(listed, "", "kv_events.endpoint")  # e.g. tcp://:5557
    assert "" not in resolve.asked
    await refused(ReplicaNetworks((), lambda: [], resolve=resolve), "10.0.0.1")  # []: nothing


async def test_default_is_loopback_and_the_hosts_already_served() -> None:
    resolve = resolver({"vllm-0": ["10.0.0.6"], "localhost": ["127.0.0.1", "::1"],
                        "metadata.internal": ["169.254.169.254"]})
    default = ReplicaNetworks(None, lambda: ["10.0.0.5", "vllm-0", "gone-host", "169.254.169.254"],
                              resolve=resolve)
    await default.check([("url", "127.0.0.1"), ("url", "::1"), ("url", "localhost")])
    assert "vllm-0" not in resolve.asked  # loopback needed no known host
    await default.check([("url", "10.0.0.5"), ("url", "10.0.0.6")])  # a backend's, by literal and name
    await refused(default, "10.0.0.7")  # beside them is not enough: list the network
    await refused(default, "metadata.internal")  # never by default, even if a backend sits there
    await refused(default, "169.254.169.254")
    await refused(default, "0.0.0.0")


async def test_a_slow_resolver_is_refused_within_the_timeout() -> None:
    async def never(host: str) -> list[str]:
        await asyncio.Event().wait()
        return []

    networks = ReplicaNetworks(nets("10.0.0.0/8"), lambda: [], resolve=never, timeout=0.2)
    started = time.monotonic()
    error = await refused(networks, "slow.example")
    assert time.monotonic() - started < 1.0 and "did not resolve" in error.message
