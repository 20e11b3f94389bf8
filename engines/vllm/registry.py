"""The model registry (config/engines.yaml) and the command lines it turns into.

One YAML file describes every replica we run, real or simulated::

    models:
      - name: llama-8b                 # registry entry; replicas are llama-8b-0, llama-8b-1, ...
        kind: vllm                     # vllm | sim
        model: meta-llama/Llama-3.1-8B-Instruct   # path or hub id
        served_model_name: llama-8b
        tensor_parallel_size: 2
        replicas: 2
        gpus: [0, 1, 2, 3]             # sliced per TP x PP group -> CUDA_VISIBLE_DEVICES
        port: 8000                     # base port (replica i gets base + i) or "auto"

`parse_config` validates it with `yamlcheck.Node` (file + key path + did-you-mean
errors) into frozen dataclasses; `plan` turns those into `ReplicaPlan`s: the exact argv,
the environment, the port and the URL of every replica.  Nothing here starts a process:
that is `engines.launcher`.

This module plans (`plan`); the rest of the registry has a module each: specs.py (the
dataclasses), parse.py (validation: `parse_config`, `load_config`), gpus.py (GPU slices),
ports.py (fixed and free ports), commands.py (the argv).  engines.launcher re-exports the
public interface.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from engines.vllm.commands import sim_argv, vllm_argv
from engines.vllm.gpus import gpu_groups
from engines.vllm.ports import fixed_ports, free_port
from engines.vllm.specs import LOCALHOST, EnginesConfig, ReplicaPlan
from yamlcheck import ConfigError

# vLLM's CPU backend needs these to share 2 cores politely (shared/reference/vllm-cpu.md):
# without them the engine spins on a shared-memory queue and starves the HTTP front end.
CPU_ENV = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": "1",
}


def _connect(host: str, port: int | None) -> str | None:
    if port is None:
        return None
    host = LOCALHOST if host in ("0.0.0.0", "*", "::", "") else host
    return f"tcp://{host}:{port}"


def plan(config: EnginesConfig, *, only: Iterable[str] | None = None,
         python: str | None = None, cpu_count: int | None = None) -> list[ReplicaPlan]:
    """Every replica of `config` as a `ReplicaPlan`, ports resolved ('auto' -> free ports).

    `only` restricts to registry entries (by name) or single replicas (e.g. 'sim-llama-2').
    """
    wanted = set(only or ())
    taken: set[int] = {port for spec in config.models for _, port in fixed_ports(spec)}
    cores = cpu_count or os.cpu_count() or 1
    cpu_cursor = 0
    plans: list[ReplicaPlan] = []

    def pick(base: int | str | None, i: int, host: str) -> int:
        if isinstance(base, int):
            return base + i
        port = free_port(host, taken)
        taken.add(port)
        return port

    for spec in config.models:
        groups = gpu_groups(spec)
        for i, rep in enumerate(spec.replicas):
            name = f"{spec.name}-{i}"
            if wanted and spec.name not in wanted and name not in wanted:
                continue
            port = rep.port if isinstance(rep.port, int) else pick(spec.port, i, spec.host)
            kv_port = replay_port = None
            if spec.kv_events is not None:
                kv_port = pick(spec.kv_events.port, i, spec.host)
                if spec.kv_events.replay_port is not None:
                    replay_port = pick(spec.kv_events.replay_port, i, spec.host)
            env: dict[str, str] = {}
            if spec.kind == "vllm" and spec.device == "cpu":
                env.update(CPU_ENV)
                env["VLLM_CPU_KVCACHE_SPACE"] = str(spec.cpu_kvcache_space_gib)
                pool = rep.cpus or spec.cpus
                if rep.cpus is not None:
                    bind = rep.cpus
                elif pool is not None:
                    bind = (pool[i % len(pool)],)
                else:
                    bind = (cpu_cursor % cores,)
                    cpu_cursor += 1
                env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in bind)
            if groups[i]:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in groups[i])
            env.update(rep.env)
            if spec.kind == "vllm":
                argv = vllm_argv(spec, rep, port=port, kv_port=kv_port, replay_port=replay_port)
            else:
                argv = sim_argv(spec, rep, port=port, kv_port=kv_port, replay_port=replay_port,
                                python=python)
            kv_host = spec.kv_events.host if spec.kv_events else spec.host
            plans.append(ReplicaPlan(
                name=name, entry=spec.name, kind=spec.kind,
                served_model_name=spec.served_model_name, host=spec.host, port=port,
                argv=tuple(argv), env=env,
                tensor_parallel_size=rep.tensor_parallel_size,
                pipeline_parallel_size=rep.pipeline_parallel_size,
                gpus=groups[i],
                kv_events_endpoint=_connect(kv_host, kv_port),
                kv_replay_endpoint=_connect(kv_host, replay_port),
                kv_events_topic=spec.kv_events.topic if spec.kv_events else None,
                health_timeout_s=spec.health_timeout_s,
            ))
    if wanted and not plans:
        names = sorted({s.name for s in config.models})
        raise ConfigError(config.file, "models", f"nothing matches {sorted(wanted)} "
                                                 f"(entries: {', '.join(names)})")
    return plans
