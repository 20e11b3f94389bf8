"""The Responses API's store: what ``previous_response_id``, GET /v1/responses/{id}, cancel
and ``background`` read (responses.py).

Off unless ``VLLM_ENABLE_RESPONSES_API_STORE=1`` (vLLM's switch) or
``--enable-responses-api-store``.  It is this process's memory, like vLLM's dicts, but
bounded (``--responses-store-size``, the oldest finished entries go first).
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

STORE_ENV = "VLLM_ENABLE_RESPONSES_API_STORE"


def store_enabled_by_env() -> bool:
    """vLLM's reading of the switch: ``bool(int(value))``, unset meaning off."""
    value = os.environ.get(STORE_ENV, "0")
    try:
        return bool(int(value))
    except ValueError:
        raise SystemExit(f"{STORE_ENV}={value!r}: not an integer") from None


@dataclass(eq=False)
class StoredResponse:
    body: dict[str, Any]  # the response object GET answers (status changes in place)
    messages: list[dict[str, Any]]  # this turn's chat messages: the next turn's history
    events: list[bytes] | None = None  # a background stream's SSE events, for GET ?stream=true
    task: asyncio.Task[None] | None = None  # a background job while it runs
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self) -> None:
        await self._changed.wait()


class ResponseStore:
    """The newest `capacity` responses of this process (vLLM keeps every one forever, a leak
    its own log warns about).  A running background job is never dropped."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, response_id: str) -> StoredResponse | None:
        return self._items.get(response_id)

    def put(self, response_id: str, entry: StoredResponse) -> None:
        self._items[response_id] = entry
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            victim = next((k for k, e in self._items.items() if e.task is None or e.task.done()), None)
            if victim is None:
                break
            del self._items[victim]
