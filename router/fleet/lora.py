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

`AdapterLoader` is the optional dynamic loading (``models[].lora.dynamic_loading``): when
no replica serves an adapter named in routes.yaml, the chosen replica is asked to load it
(``POST /v1/load_lora_adapter``, vLLM's runtime LoRA updating) before the request is
forwarded.  One load per adapter at a time (single flight: concurrent requests wait on
the same load and go to the replica it targets), at most ``max_loads_in_flight`` at once, each bounded by
``load_timeout``; failures are OpenAI-shaped errors that name neither replica nor path.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

import aiohttp

from router.errors import RouterError

if TYPE_CHECKING:
    from router.fleet.replicas import EngineLoad, Replica

log = logging.getLogger("router.lora")

DEFAULT_SLOTS = 1  # vLLM's --max-loras default, until the replica reports its own
MAX_SLOTS = 256  # bound on the adapters remembered per replica, whatever a replica reports
_ERROR_TEXT_CAP = 4096


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


class AdapterLoader:
    """Loads configured adapters on replicas on demand (module docstring)."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self._loads: dict[str, tuple[Replica, asyncio.Task[None]]] = {}  # adapter -> its load
        self.loads_started = 0

    @property
    def in_flight(self) -> int:
        return len(self._loads)

    async def ensure(self, replica: Replica, adapter: str, path: str, *, timeout: float = 30.0,
                     max_in_flight: int = 4) -> Replica:
        """The replica that serves `adapter` once this returns: `replica`, or the one a load
        already under way for the adapter targets (a burst makes one load, not one per
        request or replica).  RouterError if the load failed."""
        if adapter in replica.served_models:
            return replica
        under_way = self._loads.get(adapter)
        if under_way is None:
            if len(self._loads) >= max_in_flight:
                raise RouterError(503, f"Too many LoRA adapter loads are under way to load `{adapter}`; "
                                       "retry shortly", headers={"Retry-After": "1"})
            task = asyncio.create_task(self._load(replica, adapter, path, timeout),
                                       name=f"lora-load {adapter}")
            under_way = self._loads[adapter] = (replica, task)
            task.add_done_callback(functools.partial(self._done, adapter))
            self.loads_started += 1
        target, task = under_way
        # shield: a client that leaves does not cancel the load the others wait on
        await asyncio.shield(task)
        return target

    def _done(self, adapter: str, task: asyncio.Task[None]) -> None:
        self._loads.pop(adapter, None)
        if not task.cancelled():
            task.exception()  # retrieved: waiters got it; no "never retrieved" warning

    async def _load(self, replica: Replica, adapter: str, path: str, timeout: float) -> None:
        headers = {"Authorization": f"Bearer {replica.api_key}"} if replica.api_key else {}
        try:
            async with self.session.post(
                    f"{replica.url}/v1/load_lora_adapter", json={"lora_name": adapter, "lora_path": path},
                    headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                status = resp.status
                text = (await resp.content.read(_ERROR_TEXT_CAP)).decode("utf-8", "replace")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.warning("loading LoRA adapter %s on %s failed: %s", adapter, replica.id,
                        str(exc) or type(exc).__name__)
            raise RouterError(502, f"Loading the LoRA adapter `{adapter}` on a replica failed "
                                   "(no answer in time)", headers={"Retry-After": "1"}) from None
        # vLLM answers 400 "has already been loaded" to a second load: it serves it, fine.
        if status == 200 or (status == 400 and "already been loaded" in text):
            replica.served_models = replica.served_models | {adapter}
            replica.adapters = replica.adapters | {adapter}
            log.info("loaded LoRA adapter %s on %s", adapter, replica.id)
            return
        log.warning("loading LoRA adapter %s on %s: the replica answered %d: %s", adapter,
                    replica.id, status, text[:500])
        hint = " (is VLLM_ALLOW_RUNTIME_LORA_UPDATING=True set on it?)" if status in (404, 405) \
            and "adapter" not in text.lower() else ""
        raise RouterError(502, f"Loading the LoRA adapter `{adapter}` on a replica failed: it "
                               f"answered {status}{hint}")

    async def close(self) -> None:
        tasks = [task for _, task in self._loads.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
