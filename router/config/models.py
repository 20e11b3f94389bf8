"""``models:``: each served model, its aliases, backends, tokenizer, LoRA adapters and
prefill/decode disaggregation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from router.config.backends import BackendConfig, parse_backend_in
from router.config.discovery import DiscoveryConfig, parse_discovery
from router.config.values import integer, number
from yamlcheck import Node


@dataclass(frozen=True, slots=True)
class LoraConfig:
    """A model's LoRA adapters the router may load itself (router/fleet/lora.py)."""

    adapters: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # name -> path
    dynamic_loading: bool = False  # POST /v1/load_lora_adapter when no replica serves one
    load_timeout: float = 30.0  # seconds one load may take
    max_loads_in_flight: int = 4  # distinct (adapter, replica) loads at a time; more wait for none: 503


@dataclass(frozen=True, slots=True)
class DisaggregationConfig:
    """When a model with prefill and decode pools skips the prefill hop (router/core/disaggregation.py)."""

    min_prompt_tokens: int = 256  # shorter prompts go to a decode replica whole
    skip_cached_fraction: float = 0.8  # ... as do prompts the decode replica mostly holds
    transfer_timeout: float = 60.0  # the prefill hop's whole answer (it carries the transfer params)


REPLICA_TOKENIZER = "replica"  # `tokenizer: replica`: the replica's own POST /tokenize


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str  # the model name clients send (as the replicas serve it)
    aliases: tuple[str, ...] = ()  # other names clients may send for it
    # its replicas (URLs, or entries with tensor_parallel_size, weight, labels, api_key, kv_events)
    backends: tuple[BackendConfig, ...] = ()
    tokenizer: str | None = None  # the model's tokenizer.json (or its directory): exact prefix index
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapters the router may load itself
    # when prefill/decode pools skip the prefill hop
    disaggregation: DisaggregationConfig = field(default_factory=DisaggregationConfig)
    discovery: DiscoveryConfig | None = None  # replicas found in DNS or Kubernetes instead of (or beside) backends
    # Served prefill-then-decode: it has a prefill pool and a decode pool.  Derived once
    # here (every request of the model asks).
    disaggregated: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        roles = {b.role for b in self.backends}
        if self.discovery is not None:
            roles.add(self.discovery.template.role)
        object.__setattr__(self, "disaggregated", "prefill" in roles and "decode" in roles)


_MODEL_KEYS = ("name", "aliases", "backends", "tokenizer", "lora", "disaggregation", "discovery")


_LORA_KEYS = ("adapters", "dynamic_loading", "load_timeout", "max_loads_in_flight")


_DISAGG_KEYS = ("min_prompt_tokens", "skip_cached_fraction", "transfer_timeout")


def _lora(node: Node, names: dict[str, str]) -> LoraConfig:
    if node.value is None:
        return LoraConfig()
    node.mapping(_LORA_KEYS)
    adapters_node = node.get("adapters", {})
    adapters = adapters_node.string_map()
    for name in adapters:
        where = f"{adapters_node.path}.{name}"
        if name in names:
            adapters_node.get(name).fail(f"adapter name '{name}' is already used at {names[name]}")
        names[name] = where
    dynamic = node.get("dynamic_loading", False).boolean()
    if dynamic and not adapters:
        node.get("dynamic_loading").fail("dynamic loading needs the adapters' paths: set "
                                         f"{adapters_node.path} (name: path on the replicas)")
    return LoraConfig(adapters=MappingProxyType(adapters), dynamic_loading=dynamic,
                      load_timeout=number(node, "load_timeout", 30.0),
                      max_loads_in_flight=integer(node, "max_loads_in_flight", 4, minimum=1, maximum=1024))


def _disaggregation(node: Node) -> DisaggregationConfig:
    if node.value is None:
        return DisaggregationConfig()
    node.mapping(_DISAGG_KEYS)
    return DisaggregationConfig(
        min_prompt_tokens=integer(node, "min_prompt_tokens", 256, minimum=0),
        skip_cached_fraction=node.get("skip_cached_fraction", 0.8).number(minimum=0.0, maximum=1.0),
        transfer_timeout=number(node, "transfer_timeout", 60.0))


def parse_models(node: Node, env: Mapping[str, str],
            base_dir: Path | None = None) -> tuple[ModelConfig, ...]:
    models: list[ModelConfig] = []
    names: dict[str, str] = {}  # name or alias -> key path where it was defined
    urls: dict[str, str] = {}
    for item in node.items():
        item.mapping(_MODEL_KEYS)
        name_node = item.get("name")
        name = name_node.string()
        if name in names:
            name_node.fail(f"model name '{name}' is already used at {names[name]}")
        names[name] = name_node.path
        aliases: list[str] = []
        for alias_node in item.get("aliases", []).items():
            alias = alias_node.string()
            if alias in names:
                alias_node.fail(f"alias '{alias}' is already used at {names[alias]}")
            names[alias] = alias_node.path
            aliases.append(alias)
        backends: list[BackendConfig] = []
        for backend_node in item.get("backends", []).items():
            backend = parse_backend_in(backend_node, env, base_dir)
            if backend.url in urls:
                backend_node.fail(f"backend URL {backend.url} is already used at {urls[backend.url]}")
            urls[backend.url] = backend_node.path
            backends.append(backend)
        tokenizer = _tokenizer_path(item.get("tokenizer"), base_dir) if item.has("tokenizer") else None
        lora = _lora(item.get("lora", None), names)
        disaggregation = _disaggregation(item.get("disaggregation", None))
        discovery = parse_discovery(item.get("discovery", None), env, base_dir)
        roles = {b.role for b in backends} | ({discovery.template.role} if discovery else set())
        if ("prefill" in roles) != ("decode" in roles):
            have, lack = ("prefill", "decode") if "prefill" in roles else ("decode", "prefill")
            item.get("backends").fail(f"model '{name}' has {have} backends but no {lack} backend: "
                                      "disaggregated serving needs both pools (role: prefill and "
                                      "role: decode; 'both' serves whole requests)")
        models.append(ModelConfig(name=name, aliases=tuple(aliases), backends=tuple(backends),
                                  tokenizer=tokenizer, lora=lora, disaggregation=disaggregation,
                                  discovery=discovery))
    return tuple(models)


def _tokenizer_path(node: Node, base_dir: Path | None) -> str:
    """A model's `tokenizer:`: a tokenizer.json, or a directory holding one (relative paths
    from the config file's directory), or ``replica`` (ask the replica's /tokenize)."""
    if node.string() == REPLICA_TOKENIZER:
        return REPLICA_TOKENIZER
    raw = Path(node.string())
    path = raw if raw.is_absolute() or base_dir is None else base_dir / raw
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        node.fail(f"expected a tokenizer.json, a directory holding one, or '{REPLICA_TOKENIZER}'; "
                  f"{file} does not exist")
    return str(path)
