"""An Envoy bootstrap that puts the router in front as its endpoint picker (``router
envoy-bootstrap``): a listener whose ext_proc filter asks the picker, and the replicas of
routes.yaml as one cluster under Envoy's override_host load-balancing policy.

Why override_host and not an ORIGINAL_DST cluster: ORIGINAL_DST takes exactly one
``ip:port`` from the header (a list is a 503), so it cannot walk the picker's fallback list;
override_host reads the list from ``envoy.lb`` metadata, tries its first endpoint, and each
retry the next (``retry_policy``), and it reports the endpoint that served back to the picker
(``selected_host_key``).  Its hosts must be the cluster's: they are the replicas of routes.yaml.

Fail-closed (the default) streams the request body through the picker (FULL_DUPLEX_STREAMED,
what the GIE protocol asks); a picker that is down is then a 500 for the client.  Fail-open
sends the body BUFFERED (Envoy 1.40 fails open only in that mode, and keeps the body's
Content-Length): a down picker lets requests through to the pool's round robin.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from router.config import Config
from router.picker.messages import DESTINATION, LB_NAMESPACE, SERVED, address_of

_TYPES = "type.googleapis.com/envoy.extensions"
RETRY_ON = "connect-failure,refused-stream,reset-before-request,5xx,retriable-status-codes"


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def replica_addresses(config: Config, launched: Sequence[str] = ()) -> list[str]:
    """Every backend of routes.yaml (and the URLs its ``launch:`` block starts) as
    ``ip:port``, once: the cluster's hosts."""
    seen: dict[str, None] = {}
    for url in [*(b.url for m in config.models for b in m.backends), *launched]:
        seen.setdefault(address_of(url), None)
    return list(seen)


def bootstrap(config: Config, *, listen: tuple[str, int], picker: tuple[str, int],
              admin_port: int | None = None, fail_open: bool = False, lean: bool = False,
              launched: Sequence[str] = ()) -> dict[str, Any]:
    """The bootstrap as a mapping (`render` writes it as YAML)."""
    hosts = []
    for address in replica_addresses(config, launched):
        host, port = address.rsplit(":", 1)
        hosts.append({"endpoint": {"address": _address(host.strip("[]"), int(port))}})
    body_mode = "BUFFERED" if fail_open or lean else "FULL_DUPLEX_STREAMED"
    ext_proc = {
        "@type": f"{_TYPES}.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "endpoint_picker"}, "timeout": "10s"},
        "failure_mode_allow": fail_open,
        "message_timeout": "5s",  # (BUFFERED mode; full-duplex mode sets no timer)
        "processing_mode": {
            "request_header_mode": "SEND",
            "request_body_mode": body_mode,
            "request_trailer_mode": "SKIP" if body_mode == "BUFFERED" else "SEND",
            "response_header_mode": "SEND",
            # the answer's first byte and usage (cached tokens); lean: its status and end only
            "response_body_mode": "NONE" if lean else "FULL_DUPLEX_STREAMED",
            "response_trailer_mode": "SKIP" if lean else "SEND",
        },
        "metadata_options": {"forwarding_namespaces": {"untyped": [LB_NAMESPACE, f"{LB_NAMESPACE}.subset_hint"]},
                             "receiving_namespaces": {"untyped": [LB_NAMESPACE]}},
    }
    retries = max(0, config.proxy.max_attempts - 1)
    route = {"cluster": "vllm_pool", "timeout": "0s", "idle_timeout": f"{int(config.proxy.read_timeout)}s",
             "retry_policy": {"retry_on": RETRY_ON, "num_retries": retries,
                              "retriable_status_codes": [429]}}
    hcm = {
        "@type": f"{_TYPES}.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "inference",
        "stream_idle_timeout": f"{int(max(300, config.proxy.read_timeout))}s",
        "route_config": {"virtual_hosts": [{
            "name": "inference", "domains": ["*"],
            # Retries (the fallback list) need the body kept: up to the router's own body limit.
            "request_body_buffer_limit": config.server.max_body_bytes,
            "routes": [{"match": {"prefix": "/"}, "route": route}]}]},
        "http_filters": [
            {"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc},
            {"name": "envoy.filters.http.router",
             "typed_config": {"@type": f"{_TYPES}.filters.http.router.v3.Router"}},
        ],
    }
    round_robin = {"typed_extension_config": {
        "name": "envoy.load_balancing_policies.round_robin",
        "typed_config": {"@type": f"{_TYPES}.load_balancing_policies.round_robin.v3.RoundRobin"}}}
    pool = {
        "name": "vllm_pool", "type": "STATIC", "connect_timeout": f"{config.proxy.connect_timeout:g}s",
        "load_assignment": {"cluster_name": "vllm_pool", "endpoints": [{"lb_endpoints": hosts}]},
        "load_balancing_policy": {"policies": [{"typed_extension_config": {
            "name": "envoy.load_balancing_policies.override_host",
            "typed_config": {
                "@type": f"{_TYPES}.load_balancing_policies.override_host.v3.OverrideHost",
                "override_host_sources": [{"metadata": {"key": LB_NAMESPACE, "path": [{"key": DESTINATION}]}}],
                "selected_host_key": {"key": LB_NAMESPACE, "path": [{"key": SERVED}]},
                "fallback_policy": {"policies": [round_robin]}}}}]},
    }
    picker_cluster = {
        "name": "endpoint_picker", "type": "STATIC", "connect_timeout": "1s",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": f"{_TYPES}.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
        "load_assignment": {"cluster_name": "endpoint_picker",
                            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(*picker)}}]}]},
    }
    out: dict[str, Any] = {"static_resources": {
        "listeners": [{"name": "inference", "address": _address(*listen),
                       "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                       "typed_config": hcm}]}]}],
        "clusters": [picker_cluster, pool]}}
    if admin_port is not None:
        out["admin"] = {"address": _address(listen[0], admin_port)}
    return out


def render(config: Config, **options: Any) -> str:
    return yaml.safe_dump(bootstrap(config, **options), sort_keys=False, width=120)
