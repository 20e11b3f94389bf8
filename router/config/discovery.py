"""``models[].discovery``: a model's replicas from DNS records or Kubernetes EndpointSlices.
"""

from __future__ import annotations

import importlib.util
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from router.config.backends import ROLES, TEMPLATE_KEYS, TEMPLATE_KV_KEYS, BackendConfig
from router.config.values import integer, number, read_secret, resolve_path
from yamlcheck import Node, describe

DNS_RECORDS = ("A", "AAAA", "SRV")


@dataclass(frozen=True, slots=True)
class DnsDiscoveryConfig:
    """Replicas are the addresses a DNS name resolves to (router/fleet/discovery/dns.py)."""

    name: str  # the DNS name to resolve
    record: str = "A"  # A | AAAA | SRV (SRV records carry each replica's port)
    port: int | None = None  # A / AAAA: the replicas' port
    nameservers: tuple[tuple[str, int], ...] = ()  # (host, port); empty: the system's resolver
    interval: float = 10.0  # longest wait between resolutions (a shorter record TTL wins)
    min_interval: float = 1.0  # shortest (a TTL of 0 must not make it spin)
    timeout: float = 2.0  # seconds a lookup may take


@dataclass(frozen=True, slots=True)
class KubernetesDiscoveryConfig:
    """Replicas are the ready endpoints of EndpointSlices (router/fleet/discovery/kubernetes.py)."""

    namespace: str  # the Service's namespace
    service: str | None = None  # the Service's slices (label kubernetes.io/service-name)
    selector: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # or these labels
    port: int | None = None  # the replicas' port; None: the slice's port named `port_name` (or its only one)
    port_name: str | None = None  # the EndpointSlice port to use (null: the only one)
    kubeconfig: str | None = None  # None: the in-cluster service account
    context: str | None = None  # a kubeconfig context (None: its current one)
    resync: float = 300.0  # seconds between full re-lists (a watch also restarts on any error)


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """Where a model's replicas come from besides `backends:` (router/fleet/discovery/)."""

    dns: DnsDiscoveryConfig | None = None  # replicas from a DNS name's A/AAAA or SRV records
    kubernetes: KubernetesDiscoveryConfig | None = None  # replicas from a Service's EndpointSlices
    scheme: str = "http"  # http or https, for the discovered replicas' URLs
    max_replicas: int = 1024  # bound on the replicas one source may add
    template: BackendConfig = field(default_factory=lambda: BackendConfig(url=""))  # url unused
    kv_events_port: int | None = None  # per replica: tcp://ITS_ADDRESS:port
    kv_replay_port: int | None = None


_DISCOVERY_KEYS = ("dns", "kubernetes", "scheme", "max_replicas", "backend")


_DNS_KEYS = ("name", "record", "port", "nameservers", "interval", "min_interval", "timeout")


_K8S_KEYS = ("namespace", "service", "selector", "port", "port_name", "kubeconfig", "context", "resync")


def _nameserver(node: Node) -> tuple[str, int]:
    value = node.string()
    host, port = value, 53
    if value.startswith("["):  # [v6]:port
        host, _, rest = value[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else 53
    elif value.count(":") == 1:
        host, _, tail = value.partition(":")
        if not tail.isdigit():
            node.fail(f"expected HOST or HOST:PORT, found {describe(value)}")
        port = int(tail)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        node.fail(f"expected a name server's IP address (optionally :PORT), found {describe(value)}")
    if not 0 < port < 65536:
        node.fail(f"expected a port from 1 to 65535, found {port}")
    return host, port


def _dns_discovery(node: Node) -> DnsDiscoveryConfig:
    node.mapping(_DNS_KEYS)
    record = node.get("record", "A").choice(DNS_RECORDS)
    port = None
    if record != "SRV":
        port = integer(node, "port", None, minimum=1, maximum=65535)
    elif node.has("port"):
        node.get("port").fail("SRV records carry each replica's port: remove port")
    interval = number(node, "interval", 10.0)
    min_interval = number(node, "min_interval", min(1.0, interval), maximum=interval)
    return DnsDiscoveryConfig(
        name=node.get("name").string().rstrip("."), record=record, port=port,
        nameservers=tuple(_nameserver(n) for n in node.get("nameservers", []).items()),
        interval=interval, min_interval=min_interval, timeout=number(node, "timeout", 2.0))


def _kubernetes_discovery(node: Node, base_dir: Path | None) -> KubernetesDiscoveryConfig:
    node.mapping(_K8S_KEYS)
    if importlib.util.find_spec("kubernetes_asyncio") is None:
        node.fail("Kubernetes discovery needs the kubernetes_asyncio package: "
                  "pip install 'vllm-smart-router[kubernetes]'")
    service = node.get("service", None).optional_string()
    selector = node.get("selector", {}).string_map()
    if (service is None) == (not selector):
        node.fail("give exactly one of service (a Service's EndpointSlices) and selector "
                  "(EndpointSlices with these labels)")
    port = integer(node, "port", None, minimum=1, maximum=65535) if node.has("port") else None
    port_name = node.get("port_name", None).optional_string()
    if port is not None and port_name is not None:
        node.get("port_name").fail("give only one of port and port_name")
    kubeconfig = node.get("kubeconfig", None).optional_string()
    return KubernetesDiscoveryConfig(
        namespace=node.get("namespace").string(), service=service,
        selector=MappingProxyType(selector), port=port, port_name=port_name,
        kubeconfig=str(resolve_path(kubeconfig, base_dir)) if kubeconfig else None,
        context=node.get("context", None).optional_string(), resync=number(node, "resync", 300.0))


def parse_discovery(node: Node, env: Mapping[str, str], base_dir: Path | None) -> DiscoveryConfig | None:
    if node.value is None:
        return None
    node.mapping(_DISCOVERY_KEYS)
    if not node.has("dns") and not node.has("kubernetes"):
        node.fail("expected dns: or kubernetes: (where the replicas are listed)")
    dns = _dns_discovery(node.get("dns")) if node.has("dns") else None
    kubernetes = _kubernetes_discovery(node.get("kubernetes"), base_dir) if node.has("kubernetes") else None
    template = node.get("backend", {})
    template.mapping(TEMPLATE_KEYS)
    kv_port = kv_replay = None
    kv_topic = None
    if template.has("kv_events"):
        kv = template.get("kv_events").mapping(TEMPLATE_KV_KEYS)
        kv_port = integer(kv, "port", None, minimum=1, maximum=65535)
        kv_replay = integer(kv, "replay_port", None, minimum=1, maximum=65535) if kv.has("replay_port") else None
        kv_topic = kv.get("topic", "").string(non_empty=False)
    backend = BackendConfig(
        url="", tensor_parallel_size=integer(template, "tensor_parallel_size", 1, minimum=1, maximum=1024),
        weight=number(template, "weight", 1.0), labels=MappingProxyType(template.get("labels", {}).string_map()),
        api_key=read_secret(template, "api_key", env, base_dir), role=template.get("role", "both").choice(ROLES),
        kv_events_topic=kv_topic)
    return DiscoveryConfig(dns=dns, kubernetes=kubernetes,
                           scheme=node.get("scheme", "http").choice(("http", "https")),
                           max_replicas=integer(node, "max_replicas", 1024, minimum=1, maximum=65536),
                           template=backend, kv_events_port=kv_port, kv_replay_port=kv_replay)
