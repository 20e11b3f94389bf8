"""LoRA adapters loaded on demand.

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
from typing import TYPE_CHECKING

import aiohttp

from router.errors import RouterError

if TYPE_CHECKING:
    from router.fleet.replicas import Replica

log = logging.getLogger("router.lora")

_ERROR_TEXT_CAP = 4096


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
