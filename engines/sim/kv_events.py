"""KV-cache events on ZMQ, byte for byte the way vLLM's ZmqEventPublisher sends them.

* PUB socket, multipart ``[topic, seq as 8 bytes big-endian, msgpack payload]``; the payload is
  a KVEventBatch array ``[ts, [event maps...], dp_rank]`` and every event a map tagged by
  ``type`` (BlockStored / BlockRemoved / AllBlocksCleared), as in
  ../shared/reference/kv_events.jsonl.  One batch per engine step that changed the cache.
* Optional replay ROUTER socket: a DEALER sends ``["", start_seq as 8 bytes]`` and gets every
  buffered batch with seq >= start_seq as ``["", topic, seq, payload]``, then the end marker
  ``["", "", -1 as 8 signed bytes, ""]`` (vLLM's ZmqEventPublisher._service_replay).  The
  buffer keeps the last ``buffer_steps`` batches.
* Like vLLM, an endpoint with ``*`` (or ``::``) binds, any other connects.

``publish`` never blocks the engine: batches go through a bounded queue to a sender task; when
the queue is full the oldest unsent batch is dropped (it stays in the replay buffer).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import zmq.asyncio

# pyzmq and msgpack (the `sim` extra) are imported only when a simulator publishes KV
# events, so a simulator without them still runs without those packages.

END_SEQ = (-1).to_bytes(8, "big", signed=True)


@dataclass(frozen=True, slots=True)
class KVEventsConfig:
    """The fields of vLLM's ``--kv-events-config`` this simulator honours."""

    enable_kv_cache_events: bool = False
    publisher: str = "null"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> KVEventsConfig:
        known = {k: v for k, v in obj.items() if k in cls.__dataclass_fields__}
        cfg = cls(**known)
        if cfg.enable_kv_cache_events and cfg.publisher == "null":
            cfg = cls(**{**known, "publisher": "zmq"})
        return cfg

    @property
    def enabled(self) -> bool:
        return self.enable_kv_cache_events and self.publisher == "zmq"


def _bind_or_connect(sock: zmq.asyncio.Socket, endpoint: str) -> None:
    if "*" in endpoint or "::" in endpoint:
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)


def public_endpoint(endpoint: str | None, host: str) -> str | None:
    """The endpoint a subscriber should use: ``*`` replaced by the replica's host."""
    if endpoint is None:
        return None
    return endpoint.replace("*", host)


class KVEventPublisher:
    def __init__(self, cfg: KVEventsConfig, dp_rank: int = 0, faults: Any = None) -> None:
        self.cfg = cfg
        self.faults = faults  # engines.sim.faults.Faults: drop_events / drop_events_replay
        self.dp_rank = dp_rank
        try:
            import msgpack  # noqa: F401 - checked here, used by publish()
            import zmq
            import zmq.asyncio
        except ImportError as exc:
            raise SystemExit(f"the simulator's KV events need pyzmq and msgpack ({exc}): "
                             "pip install 'vllm-smart-router[sim]'") from None

        self._ctx = zmq.asyncio.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, cfg.hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        _bind_or_connect(self._pub, cfg.endpoint)
        self._replay = None
        if cfg.replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            _bind_or_connect(self._replay, cfg.replay_endpoint)
        self._topic = cfg.topic.encode()
        self._seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=max(1, cfg.buffer_steps))
        self._queue: deque[tuple[int, bytes]] = deque(maxlen=max(1, cfg.max_queue_size))
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._send_loop()))
        if self._replay is not None:
            self._tasks.append(asyncio.create_task(self._replay_loop()))

    def publish(self, events: list[dict[str, Any]]) -> None:
        import msgpack

        payload = msgpack.packb([time.time(), events, self.dp_rank], use_bin_type=True)
        item = (self._seq, payload)
        self._seq += 1
        faults = self.faults
        if faults is not None and faults.draw_event_drop():
            if not faults.drop_events_replay:
                self._buffer.append(item)
            return  # lost on the way, as when a PUB high-water mark overflows
        self._buffer.append(item)
        self._queue.append(item)
        self._ready.set()

    def restart(self) -> None:
        """Publish as a freshly started engine would: the replay buffer and the unsent queue
        emptied, the sequence back at 0 (the benchmark harness's reset between targets, so
        that a router started for the next target does not replay the last one's events)."""
        self._buffer.clear()
        self._queue.clear()
        self._seq = 0

    async def _send_loop(self) -> None:
        while True:
            while not self._queue:
                self._ready.clear()
                await self._ready.wait()
            seq, payload = self._queue.popleft()
            await self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))

    async def _replay_loop(self) -> None:
        assert self._replay is not None
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3:
                continue  # vLLM ignores malformed requests too
            client, _, start_bytes = frames
            start = int.from_bytes(start_bytes, "big")
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await self._replay.send_multipart((client, b"", self._topic, seq.to_bytes(8, "big"), payload))
            await self._replay.send_multipart((client, b"", b"", END_SEQ, b""))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._pub.close(0)
        if self._replay is not None:
            self._replay.close(0)
        self._ctx.term()

    @property
    def buffered(self) -> int:
        return len(self._buffer)
