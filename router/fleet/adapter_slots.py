"""LoRA adapters: which ones a replica likely holds on its GPU, and loading one on demand.

vLLM keeps at most ``--max-loras`` adapters in GPU slots (least recently used out) and
puts at most that many distinct adapters in one batch; a request for an adapter in no
slot waits for the load, and one for an adapter beyond a full batch waits for a slot.
The router cannot ask vLLM which adapters sit in its slots; it knows two things:
* what it dispatched: every attempt for an adapter touches it in the replica's
  `AdapterSlots` (hooks.AdapterFeedback), the same least-recently-used order vLLM keeps;
* what the replica reports: ``vllm:lora_requests_info`` names the adapters of running and
  waiting requests and ``max_lora`` (vllm_metrics.py); each scrape touches those.
So `AdapterSlots` is the replica's slots as far as this router can tell: exact when it is
the replica's only client, and corrected by each scrape otherwise.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.fleet.engine_load import EngineLoad

DEFAULT_SLOTS = 1  # vLLM's --max-loras default, until the replica reports its own
MAX_SLOTS = 256  # bound on the adapters remembered per replica, whatever a replica reports


class AdapterSlots:
    """The adapters a replica likely holds in its GPU slots, most recent last (bounded by
    its ``max_loras``, at most MAX_SLOTS)."""

    __slots__ = ("_recent", "max_loras", "running", "in_flight")

    def __init__(self) -> None:
        self._recent: OrderedDict[str, None] = OrderedDict()
        self.max_loras: int | None = None  # reported; None: not yet
        self.running: frozenset[str] = frozenset()  # adapters of its running requests (scraped)
        # This router's requests on it now, per adapter (dispatch +1, completion -1): fresher
        # than the scrape.  Bounded: an entry leaves at 0, and requests in flight are bounded.
        self.in_flight: dict[str, int] = {}

    @property
    def capacity(self) -> int:
        return min(self.max_loras or DEFAULT_SLOTS, MAX_SLOTS)

    def touch(self, name: str) -> None:
        recent = self._recent
        recent[name] = None
        recent.move_to_end(name)
        while len(recent) > self.capacity:
            recent.popitem(last=False)

    def observe(self, load: EngineLoad) -> None:
        """A scrape: its max_lora and the adapters its requests use now."""
        if load.max_loras is not None:
            self.max_loras = load.max_loras
        self.running = load.running_adapters
        for name in sorted(load.waiting_adapters | load.running_adapters):
            self.touch(name)

    def dispatched(self, name: str) -> None:
        self.touch(name)
        self.in_flight[name] = self.in_flight.get(name, 0) + 1

    def finished(self, name: str) -> None:
        left = self.in_flight.get(name, 0) - 1
        if left > 0:
            self.in_flight[name] = left
        else:
            self.in_flight.pop(name, None)

    def holds(self, name: str) -> bool:
        return name in self._recent

    def full(self) -> bool:
        """Would loading one more adapter push another out of its slots?"""
        return len(self._recent) >= self.capacity

    def batch_full_without(self, name: str) -> bool:
        """Would a request for `name` wait for a batch slot (every slot busy with others)?
        Busy: adapters the last scrape saw running, and those this router has requests of
        in flight there now (running or queued: either way they hold the batch's slots)."""
        busy = self.running.union(self.in_flight) if self.in_flight else self.running
        return len(busy) >= self.capacity and name not in busy

    def names(self) -> list[str]:
        return list(self._recent)
