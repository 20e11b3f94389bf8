"""The model registry's data: what config/engines.yaml says once validated (`EnginesConfig`,
`ModelSpec`, `ReplicaSpec`, `KvEventsSpec`) and what planning makes of it (`ReplicaPlan`: one
replica's argv, environment, port and URL).

Frozen dataclasses and their vocabularies, with no logic beyond a plan's URL and shell line:
every other registry module (parse.py, gpus.py, ports.py, commands.py, registry.py) imports
them, and they import none of those.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KINDS = ("vllm", "sim")
DEVICES = ("gpu", "cpu")
DTYPES = ("auto", "bfloat16", "float", "float16", "float32", "half")
LOCALHOST = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class KvEventsSpec:
    """Where a replica publishes KV-cache events (ZMQ PUB) and its replay socket (ROUTER)."""

    port: int | str  # base port or "auto"
    replay_port: int | str | None  # base port, "auto", or None (no replay socket)
    topic: str = "kv"
    host: str = LOCALHOST  # where subscribers connect


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """Per-replica settings after defaults and overrides are merged."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    gpus: tuple[int, ...] | None  # explicit GPUs for this replica (None: sliced from the model's)
    port: int | None  # explicit port (None: base + index or auto)
    cpus: tuple[int, ...] | None
    extra_args: tuple[str, ...]
    env: Mapping[str, str]
    sim: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One entry of `models:`."""

    name: str
    kind: str
    model: str | None
    served_model_name: str
    device: str
    executable: str | None
    host: str
    port: int | str  # base port or "auto"
    replicas: tuple[ReplicaSpec, ...]
    dtype: str | None
    gpu_memory_utilization: float | None
    max_model_len: int | None
    quantization: str | None
    enable_prefix_caching: bool
    block_size: int | None
    max_num_seqs: int | None
    num_gpu_blocks_override: int | None
    kv_events: KvEventsSpec | None
    gpus: tuple[int, ...] | None
    cpus: tuple[int, ...] | None
    cpu_kvcache_space_gib: int
    load_format: str | None
    enforce_eager: bool | None
    health_timeout_s: float
    path: str  # key path in the file, for errors raised later (e.g. while planning)


@dataclass(frozen=True, slots=True)
class EnginesConfig:
    models: tuple[ModelSpec, ...]
    state_dir: str = ".engines"
    file: str | None = None


@dataclass(frozen=True, slots=True)
class ReplicaPlan:
    """Everything needed to start one replica and to find it afterwards."""

    name: str  # e.g. sim-llama-2
    entry: str  # registry entry name
    kind: str
    served_model_name: str
    host: str
    port: int
    argv: tuple[str, ...]
    env: Mapping[str, str]  # added to the launcher's environment
    tensor_parallel_size: int
    pipeline_parallel_size: int
    gpus: tuple[int, ...]
    kv_events_endpoint: str | None  # where a SUB socket connects, e.g. tcp://127.0.0.1:5557
    kv_replay_endpoint: str | None  # where a DEALER socket connects
    kv_events_topic: str | None
    health_timeout_s: float

    @property
    def url(self) -> str:
        host = LOCALHOST if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    def shell(self) -> str:
        """The command as one copy-pasteable shell line (environment first)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        cmd = shlex.join(self.argv)
        return f"{env} {cmd}" if env else cmd

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "entry": self.entry, "kind": self.kind,
            "served_model_name": self.served_model_name, "url": self.url, "host": self.host,
            "port": self.port, "argv": list(self.argv), "env": dict(self.env),
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size, "gpus": list(self.gpus),
            "kv_events_endpoint": self.kv_events_endpoint,
            "kv_replay_endpoint": self.kv_replay_endpoint,
            "kv_events_topic": self.kv_events_topic,
        }
