"""config/engines.yaml validated into an `EnginesConfig` (specs.py): `parse_config` for loaded
data, `load_config` for a file.

`yamlcheck.Node` makes every error name the file, the key path and, for a misspelt key, the
closest known one.  Checks that need the whole file (GPUs given twice, fixed ports that clash)
are gpus.py's and ports.py's, run from `parse_config`.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engines.vllm.gpus import check_gpus
from engines.vllm.ports import check_fixed_ports
from engines.vllm.specs import DEVICES, DTYPES, KINDS, LOCALHOST, EnginesConfig, KvEventsSpec, ModelSpec, ReplicaSpec
from yamlcheck import Node, load_yaml

_MODEL_KEYS = (
    "name", "kind", "model", "served_model_name", "device", "executable", "host", "port",
    "replicas", "tensor_parallel_size", "pipeline_parallel_size", "dtype",
    "gpu_memory_utilization", "max_model_len", "quantization", "enable_prefix_caching",
    "block_size", "max_num_seqs", "num_gpu_blocks_override", "kv_events", "gpus", "cpus",
    "cpu_kvcache_space_gib", "load_format", "enforce_eager", "extra_args", "env", "sim",
    "health_timeout_s",
)
# What one replica may override in the list form of `replicas:`.
_REPLICA_KEYS = ("tensor_parallel_size", "pipeline_parallel_size", "gpus", "port", "cpus",
                 "extra_args", "env", "sim")
_KV_EVENT_KEYS = ("enabled", "port", "replay_port", "topic", "host")


def _port(node: Node) -> int | str:
    if node.value == "auto":
        return "auto"
    if isinstance(node.value, str):
        node.fail(f"expected a port number or 'auto', found string {node.value!r}")
    return node.integer(minimum=1, maximum=65535)


def _int_list(node: Node, *, minimum: int = 0) -> tuple[int, ...]:
    if isinstance(node.value, int) and not isinstance(node.value, bool):
        return (node.integer(minimum=minimum),)
    values = tuple(item.integer(minimum=minimum) for item in node.items())
    if len(set(values)) != len(values):
        node.fail(f"lists the same id twice: {list(values)}")
    return values


def _args(node: Node) -> tuple[str, ...]:
    """extra_args: a list of strings (numbers are accepted and stringified) or one string."""
    if isinstance(node.value, str):
        return tuple(shlex.split(node.value))
    out = []
    for item in node.items():
        if isinstance(item.value, (int, float)) and not isinstance(item.value, bool):
            out.append(str(item.value))
        else:
            out.append(item.string())
    return tuple(out)


def _sim_knobs(node: Node) -> dict[str, Any]:
    """The `sim:` section: knobs passed to `python -m engines.sim` as --dashed-flags."""
    if node.value is None:
        return {}
    node.mapping(node.value.keys() if isinstance(node.value, Mapping) else ())
    known = sim_flag_names()
    out: dict[str, Any] = {}
    for key in node.value:
        child = node.get(key, None)
        if known is not None and key.replace("_", "-") not in known:
            import difflib

            options = sorted(k.replace("-", "_") for k in known)
            hint = difflib.get_close_matches(key, options, n=1)
            suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
            child.fail(f"unknown simulator option '{key}'{suggestion}")
        value = child.value
        if not isinstance(value, (str, int, float, bool, list)) and value is not None:
            child.fail(f"expected a scalar or a list, found {type(value).__name__}")
        out[key] = value
    return out


def sim_flag_names() -> set[str] | None:
    """Long option names (without '--') of the simulator's CLI, or None if it is unavailable."""
    try:
        from engines.sim import cli as sim_cli  # type: ignore[attr-defined]
    except Exception:  # the simulator is optional for validation
        return None
    build = getattr(sim_cli, "build_parser", None) or getattr(sim_cli, "make_parser", None)
    if build is None:
        return None
    names: set[str] = set()
    for action in build()._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                names.add(opt[2:])
    return names


def _replica_node(node: Node, base: ReplicaSpec) -> ReplicaSpec:
    node.mapping(_REPLICA_KEYS)
    return ReplicaSpec(
        tensor_parallel_size=node.get("tensor_parallel_size", base.tensor_parallel_size)
        .integer(minimum=1),
        pipeline_parallel_size=node.get("pipeline_parallel_size", base.pipeline_parallel_size)
        .integer(minimum=1),
        gpus=_int_list(node.get("gpus")) if node.has("gpus") else None,
        port=_port(node.get("port")) if node.has("port") else None,
        cpus=_int_list(node.get("cpus")) if node.has("cpus") else None,
        extra_args=base.extra_args + (_args(node.get("extra_args")) if node.has("extra_args") else ()),
        env={**base.env, **node.get("env", {}).string_map()},
        sim={**base.sim, **_sim_knobs(node.get("sim", {}))},
    )


def _model(node: Node, index: int) -> ModelSpec:
    node.mapping(_MODEL_KEYS)
    name = node.get("name").string()
    kind = node.get("kind").choice(KINDS)
    model = node.get("model").string() if node.has("model") else None
    if kind == "vllm" and model is None:
        node.get("model")  # raises "required key is missing" at models[i].model
    device = node.get("device", "gpu").choice(DEVICES)
    base = ReplicaSpec(
        tensor_parallel_size=node.get("tensor_parallel_size", 1).integer(minimum=1),
        pipeline_parallel_size=node.get("pipeline_parallel_size", 1).integer(minimum=1),
        gpus=None, port=None, cpus=None,
        extra_args=_args(node.get("extra_args")) if node.has("extra_args") else (),
        env=node.get("env", {}).string_map(),
        sim=_sim_knobs(node.get("sim", {})),
    )
    replicas_node = node.get("replicas", 1)
    if isinstance(replicas_node.value, list):
        if not replicas_node.value:
            replicas_node.fail("expected at least one replica")
        replicas = tuple(_replica_node(item, base) for item in replicas_node.items())
    else:
        count = replicas_node.integer(minimum=1, maximum=256)
        replicas = tuple(base for _ in range(count))
    if kind == "vllm" and device == "cpu":
        for i, rep in enumerate(replicas):
            if rep.tensor_parallel_size * rep.pipeline_parallel_size != 1:
                where = node.get("replicas") if isinstance(replicas_node.value, list) else node
                where.fail(f"replica {i}: the CPU build runs one process per replica here; "
                           "use tensor_parallel_size 1 and pipeline_parallel_size 1 with device: cpu")
    kv_events = None
    kv_node = node.get("kv_events", False)
    if isinstance(kv_node.value, bool):
        if kv_node.value:
            kv_events = KvEventsSpec(port="auto", replay_port="auto")
    else:
        kv_node.mapping(_KV_EVENT_KEYS)
        if kv_node.get("enabled", True).boolean():
            replay = kv_node.get("replay_port", "auto")
            kv_events = KvEventsSpec(
                port=_port(kv_node.get("port", "auto")),
                replay_port=None if replay.value is False else _port(replay),
                topic=kv_node.get("topic", "kv").string(non_empty=False),
                host=kv_node.get("host", LOCALHOST).string(),
            )
    gpu_util = None
    if node.has("gpu_memory_utilization"):
        gpu_util = node.get("gpu_memory_utilization").number(minimum=0.0, maximum=1.0,
                                                              exclusive_minimum=True)
    block_size = node.get("block_size").integer(minimum=1) if node.has("block_size") else None
    if kind == "vllm" and device == "cpu" and block_size is not None and block_size % 32:
        node.get("block_size").fail(f"the CPU build needs a multiple of 32, found {block_size}")
    return ModelSpec(
        name=name,
        kind=kind,
        model=model,
        served_model_name=node.get("served_model_name", name).string(),
        device=device,
        executable=node.get("executable").string() if node.has("executable") else None,
        host=node.get("host", LOCALHOST).string(),
        port=_port(node.get("port", "auto")),
        replicas=replicas,
        dtype=node.get("dtype").choice(DTYPES) if node.has("dtype") else None,
        gpu_memory_utilization=gpu_util,
        max_model_len=node.get("max_model_len").integer(minimum=1) if node.has("max_model_len") else None,
        quantization=node.get("quantization").string() if node.has("quantization") else None,
        enable_prefix_caching=node.get("enable_prefix_caching", True).boolean(),
        block_size=block_size,
        max_num_seqs=node.get("max_num_seqs").integer(minimum=1) if node.has("max_num_seqs") else None,
        num_gpu_blocks_override=(node.get("num_gpu_blocks_override").integer(minimum=1)
                                 if node.has("num_gpu_blocks_override") else None),
        kv_events=kv_events,
        gpus=_int_list(node.get("gpus")) if node.has("gpus") else None,
        cpus=_int_list(node.get("cpus")) if node.has("cpus") else None,
        cpu_kvcache_space_gib=node.get("cpu_kvcache_space_gib", 1).integer(minimum=1),
        load_format=node.get("load_format").string() if node.has("load_format") else None,
        enforce_eager=node.get("enforce_eager").boolean() if node.has("enforce_eager") else None,
        health_timeout_s=node.get("health_timeout_s", 600.0 if kind == "vllm" else 60.0)
        .number(minimum=0.0, exclusive_minimum=True),
        path=node.path,
    )


def parse_config(data: Any, file: str | Path | None = None) -> EnginesConfig:
    """Validate a loaded engines.yaml (plain dicts and lists) into an `EnginesConfig`."""
    root = Node(data, "", file).mapping(("models", "state_dir"))
    models_node = root.get("models")
    models = tuple(_model(item, i) for i, item in enumerate(models_node.items()))
    if not models:
        models_node.fail("expected at least one model")
    seen: dict[str, int] = {}
    for i, spec in enumerate(models):
        if spec.name in seen:
            models_node.items()[i].get("name").fail(
                f"duplicate name '{spec.name}' (also models[{seen[spec.name]}].name)")
        seen[spec.name] = i
    config = EnginesConfig(models=models, state_dir=root.get("state_dir", ".engines").string(),
                           file=str(file) if file is not None else None)
    check_gpus(config, models_node)
    check_fixed_ports(config, models_node)
    return config


def load_config(path: str | Path) -> EnginesConfig:
    root = load_yaml(path)
    return parse_config(root.value, path)
