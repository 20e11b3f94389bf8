"""The whole file: ``Config`` (one frozen field per section) and the loader that reads
routes.yaml into it, every error naming the file, the key path and what is expected.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from router.config.admission import AdmissionConfig, parse_admission
from router.config.auth import AuthConfig, parse_auth
from router.config.breaker import CircuitBreakerConfig, parse_circuit_breaker
from router.config.cors import CorsConfig, parse_cors
from router.config.health import HealthConfig, MetricsConfig, parse_health, parse_metrics
from router.config.launch import LaunchConfig, parse_launch
from router.config.models import ModelConfig, parse_models
from router.config.prefix import PrefixConfig, parse_prefix
from router.config.proxy import ProxyConfig, parse_proxy
from router.config.routing import RoutingConfig, parse_routing
from router.config.server import ServerConfig, parse_server
from yamlcheck import Node, every_error, load_yaml

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[2] / "config" / "routes.yaml"


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    cors: CorsConfig = field(default_factory=CorsConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    models: tuple[ModelConfig, ...] = ()
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    circuit_breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    launch: LaunchConfig | None = None
    file: str | None = None

    def aliases(self) -> dict[str, str]:
        """alias -> canonical model name."""
        return {alias: m.name for m in self.models for alias in m.aliases}


_TOP_KEYS = ("server", "auth", "cors", "admission", "models", "routing", "prefix", "health",
             "metrics", "proxy", "circuit_breaker", "launch")


def parse_config(data: Any, file: str | Path | None = None, *,
                 env: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed routes.yaml document into a Config (ConfigError on any problem)."""
    env = os.environ if env is None else env
    root = Node(data, "", file)
    root.mapping(_TOP_KEYS)
    base_dir = Path(file).resolve().parent if file is not None else None
    launch = parse_launch(root.get("launch"), base_dir) if root.has("launch") else None
    models = parse_models(root.get("models", []), env, base_dir)
    if not models and launch is None:
        root.get("models", None).fail(
            "expected at least one model with backends (or a `launch:` block that starts them)")
    for i, model in enumerate(models):
        if not model.backends and launch is None and model.discovery is None:
            Node(None, f"models[{i}].backends", file).fail(
                f"model '{model.name}' needs at least one backend (or a `discovery:` section, "
                "or a `launch:` block)")
    auth = parse_auth(root.get("auth", {}), env, base_dir)
    return Config(
        server=parse_server(root.get("server", {})),
        auth=auth,
        cors=parse_cors(root.get("cors", {})),
        admission=parse_admission(root.get("admission", {})),
        models=models,
        routing=parse_routing(root.get("routing", {}), env, base_dir),
        prefix=parse_prefix(root.get("prefix", {})),
        health=parse_health(root.get("health", {})),
        metrics=parse_metrics(root.get("metrics", {})),
        proxy=parse_proxy(root.get("proxy", {})),
        circuit_breaker=parse_circuit_breaker(root.get("circuit_breaker", {})),
        launch=launch,
        file=str(file) if file is not None else None,
    )


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None,
                then: Callable[[Config], object] | None = None) -> Config:
    """Read and validate routes.yaml; ConfigError names file, key path, found and expected,
    and a file with several problems raises them all, in file order, as one ConfigErrors.
    `then` checks the Config further (the scheduling parameters: core/scheduling/presets.py),
    its problems counted with the others."""
    root = load_yaml(path)

    def validate(data: Any) -> Config:
        config = parse_config(data, root.file, env=env)
        if then is not None:
            then(config)
        return config

    return every_error(root.value, root.file, validate)
