"""``auth:``: client keys (with their models, priority and rate limit), the admin key, and the
networks the admin API may register replicas in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from router.config.values import integer, networks_or_default, read_secret, resolve_path
from yamlcheck import Node, load_yaml


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """Token buckets of one client: requests per second (with a burst) and tokens per minute."""

    requests_per_s: float | None = None  # a token bucket per key: refill rate (null: no request limit)
    burst: float | None = None  # requests the bucket holds (default: one second's worth, >= 1)
    tokens_per_min: float | None = None  # prompt tokens (estimated) + requested max_tokens


@dataclass(frozen=True, slots=True)
class ClientKeyConfig:
    name: str  # shown in logs and metrics instead of the key
    key: str = field(repr=False)  # the secret (or key_env / key_file); compared in constant time, never logged
    models: tuple[str, ...] = ()  # models (or aliases) this key may use; empty: all
    priority: int = 0  # admission priority class (higher first)
    rate_limit: RateLimitConfig | None = None  # overrides admission.rate_limit


@dataclass(frozen=True, slots=True)
class AuthConfig:
    keys: tuple[ClientKeyConfig, ...] = ()  # empty: no client authentication
    admin_key: str | None = field(default=None, repr=False)  # None: /admin only from loopback
    protect_metrics: bool = False  # /metrics needs the admin key too
    # Where POST /admin/replicas may point the router (router/fleet/replica_networks.py); None:
    # loopback and the hosts the router already serves from.
    admin_replica_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.keys)


_AUTH_KEYS = ("keys", "keys_file", "admin_key", "admin_key_env", "admin_key_file",
              "protect_metrics", "admin_replica_networks")


_CLIENT_KEY_KEYS = ("name", "key", "key_env", "key_file", "models", "priority", "rate_limit")


_RATE_LIMIT_KEYS = ("requests_per_s", "burst", "tokens_per_min")


def _rate_limit(node: Node) -> RateLimitConfig:
    node.mapping(_RATE_LIMIT_KEYS)
    if not any(node.has(k) for k in ("requests_per_s", "tokens_per_min")):
        node.fail("expected requests_per_s and/or tokens_per_min")
    rps = node.get("requests_per_s", None)
    burst = node.get("burst", None)
    tpm = node.get("tokens_per_min", None)
    if burst.value is not None and rps.value is None:
        burst.fail("burst needs requests_per_s")
    return RateLimitConfig(
        requests_per_s=None if rps.value is None else rps.number(minimum=0, exclusive_minimum=True),
        burst=None if burst.value is None else burst.number(minimum=1),
        tokens_per_min=None if tpm.value is None else tpm.number(minimum=0, exclusive_minimum=True),
    )


def _client_keys(node: Node, env: Mapping[str, str], base_dir: Path | None,
                 seen_names: dict[str, str], seen_keys: dict[str, str]) -> list[ClientKeyConfig]:
    keys: list[ClientKeyConfig] = []
    for item in node.items():
        item.mapping(_CLIENT_KEY_KEYS)
        name_node = item.get("name")
        name = name_node.string()
        if name in seen_names:
            name_node.fail(f"key name '{name}' is already used at {seen_names[name]}")
        seen_names[name] = name_node.path
        secret = read_secret(item, "key", env, base_dir, required=True, min_length=8)
        assert secret is not None
        if secret in seen_keys:
            item.fail(f"this key is the same as the key at {seen_keys[secret]}")
        seen_keys[secret] = item.path
        keys.append(ClientKeyConfig(
            name=name, key=secret,
            models=tuple(item.get("models", []).string_list()),
            priority=integer(item, "priority", 0, minimum=-1000, maximum=1000),
            rate_limit=_rate_limit(item.get("rate_limit")) if item.has("rate_limit") else None,
        ))
    return keys


def parse_auth(node: Node, env: Mapping[str, str], base_dir: Path | None) -> AuthConfig:
    node.mapping(_AUTH_KEYS)
    names: dict[str, str] = {}
    secrets: dict[str, str] = {}
    keys = _client_keys(node.get("keys", []), env, base_dir, names, secrets)
    if node.has("keys_file"):
        file_node = node.get("keys_file")
        path = resolve_path(file_node.string(), base_dir)
        root = load_yaml(path)
        items = root.value.get("keys") if isinstance(root.value, Mapping) else root.value
        keys += _client_keys(Node(items, "keys", path), env, path.parent, names, secrets)
    return AuthConfig(
        keys=tuple(keys),
        admin_key=read_secret(node, "admin_key", env, base_dir, min_length=8),
        protect_metrics=node.get("protect_metrics", False).boolean(),
        admin_replica_networks=networks_or_default(node.get("admin_replica_networks", None)),
    )
