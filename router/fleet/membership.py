"""Fleet membership: replicas made from ``backends:`` entries, the fleet a config names,
launched backends merged in, and a backend's changed settings applied in place.

What a reload or a registration *does* with these (start polling, drop learned state,
make-before-break) is wiring across the router's parts: router/reload.py.
"""

from __future__ import annotations

import dataclasses

from router.config import BackendConfig, Config, ModelConfig
from router.fleet.replicas import Fleet, Replica


def replica_from(model: str, backend: BackendConfig) -> Replica:
    return Replica(url=backend.url, model=model,
                   tensor_parallel_size=backend.tensor_parallel_size, weight=backend.weight,
                   labels=dict(backend.labels), api_key=backend.api_key,
                   kv_events_endpoint=backend.kv_events_endpoint,
                   kv_replay_endpoint=backend.kv_replay_endpoint,
                   kv_events_topic=backend.kv_events_topic, role=backend.role)


def build_fleet(config: Config) -> Fleet:
    fleet = Fleet()
    for model in config.models:
        for backend in model.backends:
            fleet.add(replica_from(model.name, backend))
    return fleet


def merge_backends(config: Config, launched: list[tuple[str, BackendConfig]]) -> Config:
    """The config with launched replicas added to their models (new models appended)."""
    models = {m.name: m for m in config.models}
    order = [m.name for m in config.models]
    for name, backend in launched:
        model = models.get(name)
        if model is None:
            model = ModelConfig(name=name)
            order.append(name)
        if any(b.url == backend.url for b in model.backends):
            continue
        models[name] = dataclasses.replace(model, backends=model.backends + (backend,))
    return dataclasses.replace(config, models=tuple(models[n] for n in order))


def update_in_place(replica: Replica, backend: BackendConfig) -> bool:
    """Apply a backend's changed settings to the replica that stays; True if any changed."""
    new = {"tensor_parallel_size": backend.tensor_parallel_size, "weight": backend.weight,
           "labels": dict(backend.labels), "api_key": backend.api_key, "role": backend.role}
    changed = False
    for name, value in new.items():
        if getattr(replica, name) != value:
            setattr(replica, name, value)
            changed = True
    return changed


class NoSuchReplica(LookupError):
    """DELETE /admin/replicas named a replica the fleet does not have."""
