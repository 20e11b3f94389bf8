"""LoRA adapters of a simulated replica, after vLLM 0.32 (checked against the CPU build).

* Adapters are named at start (``--lora-modules name=path``) or at run time through
  ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (only when runtime updating
  is allowed, like vLLM's ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``).  A request names one in
  ``model``; /v1/models lists them with ``root`` = path and ``parent`` = the base model.
* At most ``max_loras`` distinct adapters are in one batch (vLLM's scheduler skips a
  waiting request whose adapter would be one too many; scheduler.py) and as many sit in
  the GPU's adapter slots, least recently used first out.  Scheduling a request whose
  adapter is in no slot loads it: the step that admits it takes ``load_s`` longer.
* The adapter enters every block hash (``("lora", name, path)``), so the prefix cache is
  per adapter, and KV events carry ``lora_name`` / ``lora_id`` (kv_cache.BlockKeys).

Bounded: the registry holds at most ``max_adapters`` names (a load beyond is a 400).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from engines.sim.protocol import ApiError

RUNTIME_UPDATING_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def runtime_updating_allowed() -> bool:
    """vLLM's switch for the load/unload endpoints (``envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING``)."""
    return os.environ.get(RUNTIME_UPDATING_ENV, "").strip().lower() in ("1", "true")


@dataclass(frozen=True, slots=True)
class Adapter:
    name: str
    id: int  # vLLM's lora_int_id: 1, 2, ... in the order adapters were added
    path: str


def parse_lora_modules(values: Iterable[str]) -> list[tuple[str, str]]:
    """``--lora-modules`` values: ``name=path`` (vLLM also takes JSON; name=path is enough here)."""
    modules = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules expects name=path, got {value!r}")
        modules.append((name, path))
    return modules


class Adapters:
    """The adapters a replica serves and the ones in its GPU slots (module docstring)."""

    def __init__(self, modules: Iterable[tuple[str, str]] = (), *, max_loras: int = 1,
                 load_s: float = 0.05, max_adapters: int = 1024, check_paths: bool = False) -> None:
        if max_loras < 1:
            raise ValueError("--max-loras must be >= 1")
        self.max_loras = max_loras
        self.load_s = load_s
        self.max_adapters = max_adapters
        self.check_paths = check_paths  # runtime loads look at the path; start-up modules do not
        self._by_name: dict[str, Adapter] = {}
        self._next_id = 1
        self.slots: OrderedDict[str, None] = OrderedDict()  # on the GPU, least recently used first
        self.loads = 0  # adapters moved into a slot, over the replica's life
        for name, path in modules:
            self._add(name, path)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._by_name

    def get(self, name: str) -> Adapter | None:
        return self._by_name.get(name)

    def _add(self, name: str, path: str) -> Adapter:
        adapter = Adapter(name, self._next_id, path)
        self._next_id += 1
        self._by_name[name] = adapter
        return adapter

    # -- the runtime endpoints (vLLM's messages, statuses and error types) -------------------
    def load(self, name: str, path: str) -> str:
        if name in self._by_name:
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded. If you want to "
                                "load the adapter in place, set 'load_inplace' to True.",
                           error_type="InvalidUserInput")
        if self.check_paths and not os.path.isdir(path):
            raise ApiError(404, f"Loading lora {name} failed: No adapter found for {path}")
        if len(self._by_name) >= self.max_adapters:
            raise ApiError(400, f"The simulator serves at most {self.max_adapters} adapters")
        self._add(name, path)
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload(self, name: str) -> str:
        if self._by_name.pop(name, None) is None:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.")
        self.slots.pop(name, None)
        return f"Success: LoRA adapter '{name}' removed successfully."

    # -- the engine's side -------------------------------------------------------------------
    def activate(self, name: str, in_use: set[str]) -> bool:
        """The scheduler admitted a request for `name`: True if that had to load it into a slot
        (evicting the least recently used adapter that no running request uses)."""
        if name in self.slots:
            self.slots.move_to_end(name)
            return False
        if len(self.slots) >= self.max_loras:
            for old in self.slots:
                if old not in in_use:
                    del self.slots[old]
                    break
        self.slots[name] = None
        self.loads += 1
        return True
