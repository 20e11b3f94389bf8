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
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yamlcheck import ConfigError, Node, load_yaml

KINDS = ("vllm", "sim")
DEVICES = ("gpu", "cpu")
DTYPES = ("auto", "bfloat16", "float", "float16", "float32", "half")
LOCALHOST = "127.0.0.1"

# vLLM's CPU backend needs these to share 2 cores politely (shared/reference/vllm-cpu.md):
# without them the engine spins on a shared-memory queue and starves the HTTP front end.
CPU_ENV = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": "1",
}

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


# -- validation -----------------------------------------------------------------------------

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
    _check_gpus(config, models_node)
    _check_fixed_ports(config, models_node)
    return config


def load_config(path: str | Path) -> EnginesConfig:
    root = load_yaml(path)
    return parse_config(root.value, path)


def _gpu_groups(spec: ModelSpec, models_node: Node | None = None,
                index: int | None = None) -> list[tuple[int, ...]]:
    """The GPUs of each replica: explicit per replica, else consecutive slices of `gpus`."""
    def fail(key: str, message: str) -> None:
        if models_node is not None and index is not None:
            models_node.items()[index].get(key, None).fail(message)
        raise ConfigError(None, f"{spec.path}.{key}", message)

    groups: list[tuple[int, ...]] = []
    pool = list(spec.gpus or ())
    needed = sum(r.tensor_parallel_size * r.pipeline_parallel_size
                 for r in spec.replicas if r.gpus is None)
    uses_gpus = spec.kind == "vllm" and spec.device == "gpu"
    if spec.gpus is not None and needed > len(pool):
        sizes = " + ".join(str(r.tensor_parallel_size * r.pipeline_parallel_size)
                           for r in spec.replicas if r.gpus is None)
        fail("gpus", f"{len([r for r in spec.replicas if r.gpus is None])} replica(s) need "
                     f"{needed} GPUs (TP x PP per replica: {sizes}) but only {len(pool)} "
                     f"are listed: {list(pool)}")
    if spec.gpus is None and uses_gpus and needed and len(spec.replicas) > 1:
        fail("gpus", f"{len(spec.replicas)} replicas on GPUs need a 'gpus' list "
                     f"({needed} GPUs in all) so each gets its own CUDA_VISIBLE_DEVICES")
    for i, rep in enumerate(spec.replicas):
        size = rep.tensor_parallel_size * rep.pipeline_parallel_size
        if rep.gpus is not None:
            if len(rep.gpus) != size:
                fail("replicas", f"replica {i} lists {len(rep.gpus)} GPU(s) {list(rep.gpus)} "
                                 f"but TP x PP = {size}")
            groups.append(rep.gpus)
        elif spec.gpus is not None:
            groups.append(tuple(pool[:size]))
            del pool[:size]
        else:
            groups.append(())
    return groups


def _check_gpus(config: EnginesConfig, models_node: Node) -> None:
    owner: dict[int, str] = {}
    for index, spec in enumerate(config.models):
        for i, group in enumerate(_gpu_groups(spec, models_node, index)):
            for gpu in group:
                name = f"{spec.name}-{i}"
                if gpu in owner and spec.kind == "vllm" and spec.device == "gpu":
                    models_node.items()[index].get("gpus", None).fail(
                        f"GPU {gpu} is given to both {owner[gpu]} and {name}")
                owner.setdefault(gpu, name)


def _check_fixed_ports(config: EnginesConfig, models_node: Node) -> None:
    used: dict[int, str] = {}
    for index, spec in enumerate(config.models):
        for name, port in _fixed_ports(spec):
            if port in used:
                models_node.items()[index].get("port", None).fail(
                    f"port {port} of {name} is also used by {used[port]}")
            used[port] = name


def _fixed_ports(spec: ModelSpec) -> Iterable[tuple[str, int]]:
    for i, rep in enumerate(spec.replicas):
        name = f"{spec.name}-{i}"
        if isinstance(rep.port, int):
            yield name, rep.port
        elif isinstance(spec.port, int):
            yield name, spec.port + i
        if spec.kv_events is not None:
            if isinstance(spec.kv_events.port, int):
                yield f"{name} (kv events)", spec.kv_events.port + i
            if isinstance(spec.kv_events.replay_port, int):
                yield f"{name} (kv replay)", spec.kv_events.replay_port + i


# -- planning -------------------------------------------------------------------------------

AUTO_PORT_FLOOR = 20000


def _ephemeral_low() -> int:
    """Where the kernel starts handing out ports for bind(0) and outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOCALHOST, exclude: set[int] | None = None) -> int:
    """A TCP port nobody listens on right now (and not in `exclude`).

    Picked at random *below* the kernel's ephemeral range: a replica binds its ports many
    seconds after planning (vLLM opens its KV-event socket only once the engine is up), and a
    port from bind(0) could meanwhile be handed to any other process asking for a free port
    (vLLM itself does so for its internal sockets).  Falls back to bind(0) when that fails.
    """
    import random

    exclude = exclude or set()
    bind_host = host if host not in ("0.0.0.0", "") else LOCALHOST
    low = _ephemeral_low()
    rng = random.SystemRandom()
    if low - AUTO_PORT_FLOOR > 100:
        for _ in range(200):
            port = rng.randrange(AUTO_PORT_FLOOR, low)
            if port not in exclude and _bindable(bind_host, port):
                return port
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((bind_host, 0))
            port = s.getsockname()[1]
        if port not in exclude:
            return port
    raise RuntimeError("no free port found")


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
    taken: set[int] = {port for spec in config.models for _, port in _fixed_ports(spec)}
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
        groups = _gpu_groups(spec)
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
