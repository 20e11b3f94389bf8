"""`ModelCatalog`: which model names exist, who may use them, and what /v1/models lists.

Names come from three places: the configured models, their aliases (routes.yaml), and the
names each replica itself reports serving (its /v1/models: extra served names, LoRA
adapters, with their parent).  A replica whose list does not hold the model it is configured
under contributes no name and is not routable (`Replica.model_mismatch`, router/fleet/monitor.py):
a wrong URL must not make another model listed and routable.  A client key limited to some models sees only those (and
their aliases): for every other name it gets the same 404 as for a name that does not
exist, so a key cannot probe which models exist.  Rebuilt from the config on a reload.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from router.errors import RouterError
from router.fleet.replicas import Health

if TYPE_CHECKING:
    from router.config import Config
    from router.core.clients import Client
    from router.fleet.replicas import Fleet, Replica


class ModelCatalog:
    """The model names of the running config and fleet; see the module docstring."""

    def __init__(self, config: Config, fleet: Fleet, *, on_forbidden: Callable[[], None] | None = None) -> None:
        self.fleet = fleet
        self.on_forbidden = on_forbidden  # a key asked for a model it may not use (a metric)
        self.started = int(time.time())  # "created" of the /v1/models entries
        self.apply_config(config)

    def apply_config(self, config: Config) -> None:
        """Names, aliases and per-key access from `config` (at start and after a reload)."""
        self.aliases = config.aliases()
        # Per limited key, the names it may use: its list, with aliases resolved both ways.
        access: dict[str, frozenset[str]] = {}
        for key in config.auth.keys:
            if key.models:
                canon = {self.aliases.get(n, n) for n in key.models}
                access[key.name] = frozenset(
                    set(key.models) | canon | {a for a, m in self.aliases.items() if m in canon})
        self._access = access
        self.model_names = [m.name for m in config.models] or self.fleet.models()
        # Adapters routes.yaml names that the router may load itself: name -> (base model, path).
        self.loadable: dict[str, tuple[str, str]] = {
            name: (m.name, path) for m in config.models if m.lora.dynamic_loading
            for name, path in m.lora.adapters.items()}

    def knows(self, name: str) -> bool:
        """Is `name` a configured model or one a replica reported?  (Only such names become
        metric label values: a client's typo must not mint series.)"""
        return name in self.model_names or name in self.loadable or \
            any(name in r.served_models for r in self.fleet)

    def may_use(self, client: Client | None, name: str) -> bool:
        """May `client` use the model (or alias) `name`?"""
        if client is None or client.key is None or client.name not in self._access:
            return True
        allowed = self._access[client.name]
        return name in allowed or self.aliases.get(name, name) in allowed

    def known_models(self, client: Client | None = None) -> list[str]:
        """Every name a client may use: configured models, aliases, discovered names."""
        names = list(self.model_names) + list(self.aliases) + list(self.loadable)
        for replica in self.fleet:
            names.extend(sorted(replica.served_models - set(names)))
        names = list(dict.fromkeys(names))
        return [n for n in names if self.may_use(client, n)]

    def resolve(self, name: str, client: Client | None = None) -> tuple[str, list[Replica]]:
        """(canonical name, its replicas) for a requested model name or alias; 404 if none.

        Replicas that reported their served models and do not list the canonical name
        are left out (they would answer 404).  A key that may not use `name` gets the
        same 404 as for a model that does not exist.
        """
        canonical = self.aliases.get(name, name)
        if not self.may_use(client, name):
            if self.on_forbidden is not None:
                self.on_forbidden()
            raise self.no_such_model(name, client)
        replicas = [r for r in self.fleet.for_model(canonical)
                    if not r.served_models or canonical in r.served_models]
        if replicas:
            return canonical, replicas
        served = [r for r in self.fleet if name in r.served_models]
        if served:  # e.g. a LoRA adapter or extra served name a replica reported
            return name, served
        if name in self.loadable:  # no replica serves it yet: its base model's may load it
            return name, self.fleet.for_model(self.loadable[name][0])
        if canonical in self.model_names or self.fleet.for_model(canonical):
            return canonical, []  # configured (or replicas that do not list it): 503, not 404
        raise self.no_such_model(name, client)

    def adapter_of(self, name: str, replicas: list[Replica]) -> tuple[str, str | None] | None:
        """(base model, path to load it from or None) when `name` is a LoRA adapter the
        `replicas` serve or the router may load on them; None when it is no adapter."""
        if name in self.loadable:
            base, path = self.loadable[name]
            served = any(name in r.served_models for r in replicas)
            return base, None if served else path
        for replica in replicas:
            if name in replica.adapters:
                return replica.model, None
        return None

    def no_such_model(self, name: str, client: Client | None) -> RouterError:
        valid = ", ".join(self.known_models(client)) or "(none)"
        return RouterError(404, f"The model `{name}` does not exist or you do not have access "
                                f"to it. Valid models: {valid}.", param="model")

    def model_entry(self, name: str, replicas: list[Replica], parent: str | None) -> dict[str, Any]:
        lengths = [r.max_model_len for r in replicas if r.max_model_len]
        return {
            "id": name,
            "object": "model",
            "created": self.started,
            "owned_by": "vllm",
            "root": parent or name,
            "parent": parent,
            "max_model_len": min(lengths) if lengths else None,
            "permission": [],
        }

    def model_list(self) -> list[dict[str, Any]]:
        """The /v1/models entries: models with a healthy replica, their served names and
        adapters (with their parent), and aliases."""
        entries: dict[str, dict[str, Any]] = {}
        healthy_by_model: dict[str, list[Replica]] = {}
        for replica in self.fleet:
            if replica.health is Health.HEALTHY and not replica.model_mismatch:
                healthy_by_model.setdefault(replica.model, []).append(replica)
        for model, replicas in healthy_by_model.items():
            entries.setdefault(model, self.model_entry(model, replicas, None))
            for replica in replicas:
                for served in sorted(replica.served_models):
                    if served not in entries:
                        holders = [r for r in replicas if served in r.served_models]
                        parent = None if served == model else model
                        entries[served] = self.model_entry(served, holders, parent)
        for name, (model, _) in self.loadable.items():
            if model in healthy_by_model and name not in entries:
                entries[name] = self.model_entry(name, healthy_by_model[model], model)
        for alias, model in self.aliases.items():
            if model in healthy_by_model and alias not in entries:
                entries[alias] = self.model_entry(alias, healthy_by_model[model], model)
        return list(entries.values())
