"""Which GPUs each replica gets: its own `gpus` list, else consecutive TP x PP slices of its
model's (-> CUDA_VISIBLE_DEVICES); and the config check that no GPU is given to two replicas.

Used while validating (parse.py) and while planning (registry.py)."""

from __future__ import annotations

from engines.vllm.specs import EnginesConfig, ModelSpec
from yamlcheck import ConfigError, Node


def gpu_groups(spec: ModelSpec, models_node: Node | None = None,
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


def check_gpus(config: EnginesConfig, models_node: Node) -> None:
    owner: dict[int, str] = {}
    for index, spec in enumerate(config.models):
        for i, group in enumerate(gpu_groups(spec, models_node, index)):
            for gpu in group:
                name = f"{spec.name}-{i}"
                if gpu in owner and spec.kind == "vllm" and spec.device == "gpu":
                    models_node.items()[index].get("gpus", None).fail(
                        f"GPU {gpu} is given to both {owner[gpu]} and {name}")
                owner.setdefault(gpu, name)
