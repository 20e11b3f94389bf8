"""A replica of ``models[].backends`` (and the template of a discovery section): its URL,
capacity, labels, API key, KV-event endpoints and prefill/decode role.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from router.config.values import integer, number, read_secret, url_value, zmq_endpoint
from yamlcheck import Node


@dataclass(frozen=True, slots=True)
class BackendConfig:
    url: str  # normalized: scheme://host:port[/path] without trailing slash
    tensor_parallel_size: int = 1  # GPUs per replica: its capacity in the load terms
    weight: float = 1.0  # relative capacity beyond tensor parallelism
    # free-form labels (shown in /admin/replicas)
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # the replica's own key, sent as Authorization (or api_key_env / api_key_file)
    api_key: str | None = field(default=None, repr=False)
    kv_events_endpoint: str | None = None  # tcp://host:port of the replica's KV-event publisher
    kv_replay_endpoint: str | None = None
    kv_events_topic: str | None = None
    role: str = "both"  # prefill / decode / both: its pools in disaggregated serving (flows.py)


ROLES = ("prefill", "decode", "both")


TEMPLATE_KEYS = ("tensor_parallel_size", "weight", "labels", "api_key", "api_key_env", "api_key_file",
                  "kv_events", "role")


TEMPLATE_KV_KEYS = ("port", "replay_port", "topic")


BACKEND_KEYS = ("url", "tensor_parallel_size", "weight", "labels", "api_key", "api_key_env",
                 "api_key_file", "kv_events", "role")


KV_EVENTS_KEYS = ("endpoint", "replay_endpoint", "topic")


def parse_backend(node: Node) -> BackendConfig:
    """One `backends:` entry from outside a file (the admin API): no env or file secrets."""
    return parse_backend_in(node, {}, None)


def parse_backend_in(node: Node, env: Mapping[str, str], base_dir: Path | None = None) -> BackendConfig:
    if isinstance(node.value, str):  # shorthand: just the URL
        return BackendConfig(url=url_value(node))
    node.mapping(BACKEND_KEYS)
    api_key = read_secret(node, "api_key", env, base_dir)
    kv_endpoint = kv_replay = kv_topic = None
    if node.has("kv_events"):
        kv = node.get("kv_events").mapping(KV_EVENTS_KEYS)
        kv_endpoint = zmq_endpoint(kv.get("endpoint"))
        replay = kv.get("replay_endpoint", None)
        kv_replay = None if replay.value is None else zmq_endpoint(replay)
        kv_topic = kv.get("topic", "").string(non_empty=False)
    return BackendConfig(
        kv_events_endpoint=kv_endpoint,
        kv_replay_endpoint=kv_replay,
        kv_events_topic=kv_topic,
        url=url_value(node.get("url")),
        tensor_parallel_size=integer(node, "tensor_parallel_size", 1, minimum=1, maximum=1024),
        weight=number(node, "weight", 1.0),
        labels=MappingProxyType(node.get("labels", {}).string_map()),
        api_key=api_key,
        role=node.get("role", "both").choice(ROLES),
    )
