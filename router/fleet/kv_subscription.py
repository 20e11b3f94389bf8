"""One replica's KV-event subscription: a ZMQ SUB that feeds the exact index, and never
trusts a broken stream silently.

All of it runs on the event loop with pyzmq's asyncio sockets: no threads, no blocking
call.  `KVEvents` (router/fleet/kv_events.py) owns one `Subscription` per replica.

**Never trust a broken stream silently.**  Every message carries the publisher's sequence
number.  A subscription keeps the last one it applied and, when the next is not last + 1:

* a **gap** (some were lost: HWM overflow, a reconnect): it asks the replica's replay
  endpoint (a DEALER to vLLM's ROUTER, ``["", start]``; batches then an end marker with
  sequence -1) for the missing batches.  If they come back from exactly where it stopped,
  the stream is whole again (``gaps_replayed``); if they are gone (the replay buffer has
  moved on, or there is no replay endpoint), the replica's exact entries are dropped and it
  is routed by the approximate index while it re-learns (``gaps_lost``, exact.py).
* a sequence that goes **backwards** (and is not a batch already replayed): the engine
  restarted with an empty cache.  Its entries are dropped; it is exact again at once when
  what it published since the restart can be replayed from 0.
* on every (re)**connect** (ZMQ socket monitor), it first replays what it missed: from 0 the
  first time, so a router started after the replica has been serving learns what is still
  in the replay buffer; from last + 1 after a reconnect.
* ``restart_hint`` (the monitor saw the replica's prefix-cache counters go backwards): the
  same as a backwards sequence, even if the restarted replica has published nothing yet.

Bounds: ZMQ's receive high-water mark bounds what queues in the socket; one replay reads at
most ``max_replay_batches`` batches, each within ``replay_timeout`` of the last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import xxhash
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from router.prefix.events import BadPayload, decode_batch, decode_sequence

if TYPE_CHECKING:
    from router.prefix.exact import ExactIndex

log = logging.getLogger("router.kv_events")

DEFAULT_REPLAY_TIMEOUT = 2.0
DEFAULT_MAX_REPLAY_BATCHES = 100_000
RCVHWM = 100_000  # messages queued in the SUB socket before ZMQ drops (then: a gap)
RATE_WINDOW_S = 10  # events/s is averaged over this many whole seconds


@dataclass(slots=True)
class StreamStats:
    """What /admin/replicas and the metrics say about one replica's event stream."""

    connected: bool = False
    last_sequence: int | None = None
    batches: int = 0
    events: int = 0
    gaps: int = 0
    gaps_replayed: int = 0
    gaps_lost: int = 0
    restarts: int = 0
    replays: int = 0
    bad_messages: int = 0
    _per_second: deque[list[int]] = field(default_factory=lambda: deque(maxlen=RATE_WINDOW_S + 1))

    def count_events(self, n: int, now: float) -> None:
        self.events += n
        second = int(now)
        buckets = self._per_second
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += n
        else:
            buckets.append([second, n])

    def events_per_s(self, now: float) -> float:
        current = int(now)
        total = sum(n for second, n in self._per_second if current - RATE_WINDOW_S <= second < current)
        return total / RATE_WINDOW_S

    def as_dict(self, now: float) -> dict[str, Any]:
        return {"connected": self.connected, "last_sequence": self.last_sequence, "batches": self.batches,
                "events": self.events, "events_per_s": round(self.events_per_s(now), 3), "gaps": self.gaps,
                "gaps_replayed": self.gaps_replayed, "gaps_lost": self.gaps_lost, "restarts": self.restarts,
                "replays": self.replays, "bad_messages": self.bad_messages}


class Subscription:
    """The event stream of one replica; see the module docstring."""

    def __init__(self, replica_id: str, endpoint: str, *, replay_endpoint: str | None, topic: str,
                 exact: ExactIndex, context: zmq.asyncio.Context,
                 replay_timeout: float = DEFAULT_REPLAY_TIMEOUT,
                 max_replay_batches: int = DEFAULT_MAX_REPLAY_BATCHES) -> None:
        self.replica_id = replica_id
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic.encode()
        self.exact = exact
        self.context = context
        self.replay_timeout = replay_timeout
        self.max_replay_batches = max_replay_batches
        self.stats = StreamStats()
        self._replayed_through = -1  # batches up to here came by replay: a later copy is a duplicate
        self._last_digest = 0  # of the last batch applied: a reconnect checks it is the same engine
        self._resync = False  # restart_hint: replay from 0 as a fresh engine
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"kv-events {self.replica_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def restart_hint(self) -> None:
        """The replica restarted (its counters went backwards): resynchronise from 0."""
        self._resync = True  # (the loop looks at it after each poll, within 200 ms)

    # -- the loop --------------------------------------------------------------------------
    async def _run(self) -> None:
        sub = self.context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, RCVHWM)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sub.connect(self.endpoint)
        poller = zmq.asyncio.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            while True:
                ready = dict(await poller.poll(timeout=200))
                if monitor in ready:
                    await self._on_monitor(await monitor.recv_multipart())
                if sub in ready:
                    await self._on_message(await sub.recv_multipart())
                if self._resync:
                    self._resync = False
                    await self._restart()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a bug here must not take the router down
            log.exception("KV-event subscription to %s failed; exact routing for %s stops",
                          self.endpoint, self.replica_id)
            self.exact.reset(self.replica_id, empty=False)
        finally:
            self.stats.connected = False
            with contextlib.suppress(Exception):
                sub.disable_monitor()
            monitor.close(0)
            sub.close(0)

    async def _on_monitor(self, frames: list[bytes]) -> None:
        event = parse_monitor_message(frames).get("event")
        if event == zmq.EVENT_CONNECTED:
            self.stats.connected = True
            log.info("KV events of %s: connected to %s", self.replica_id, self.endpoint)
            await self._catch_up()
        elif event == zmq.EVENT_DISCONNECTED:
            self.stats.connected = False
            log.info("KV events of %s: disconnected", self.replica_id)

    async def _on_message(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or (seq := decode_sequence(frames[1])) is None or seq < 0:
            self.stats.bad_messages += 1
            return
        await self._receive(seq, frames[2])

    # -- sequence logic ------------------------------------------------------------------------
    async def _receive(self, seq: int, payload: bytes) -> None:
        last = self.stats.last_sequence
        if last is None:
            if seq == 0:
                self.exact.reset(self.replica_id, empty=True)  # a fresh engine, seen from its start
                self._apply(seq, payload)
            else:
                await self._from_start(fresh=False, seq=seq, payload=payload)
        elif seq == last + 1:
            self._apply(seq, payload)
        elif seq <= last:
            if seq <= self._replayed_through:
                return  # already applied from a replay
            log.warning("KV events of %s: sequence went back from %d to %d: the engine restarted",
                        self.replica_id, last, seq)
            await self._restart(seq, payload)
        else:
            self.stats.gaps += 1
            log.warning("KV events of %s: gap after %d (next is %d): replaying", self.replica_id, last, seq)
            await self._recover(last + 1, seq, payload)

    async def _catch_up(self) -> None:
        """After a (re)connect: replay what was published while we were not listening.

        The first time, everything the replica still buffers (from 0).  After a reconnect,
        from the last batch applied, which must come back byte for byte: if it does not,
        the engine behind the endpoint is a new one (a restart, which may already have
        published more batches than we had seen, so the sequence alone cannot tell)."""
        last = self.stats.last_sequence
        if last is None:
            await self._from_start(fresh=False)
            return
        batches = await self._replay(last)
        if batches is None:
            return  # no replay endpoint: a gap shows on the next message
        if batches and batches[0][0] == last and xxhash.xxh3_64_intdigest(batches[0][1]) == self._last_digest:
            if len(batches) > 1:
                self.stats.gaps += 1
                self.stats.gaps_replayed += 1
                self._apply_all(batches[1:], contiguous_from=last + 1)
            return
        if batches and batches[0][0] > last:  # the same engine, but what we missed is gone
            self.stats.gaps += 1
            self.stats.gaps_lost += 1
            self.exact.reset(self.replica_id, empty=False)
            self._apply_all(batches, contiguous_from=batches[0][0])
            return
        log.warning("KV events of %s: batch %d is not the one we applied: the engine restarted",
                    self.replica_id, last)
        await self._restart()

    async def _recover(self, start: int, seq: int, payload: bytes) -> None:
        """Batches start..seq-1 (start > 0) are missing: replay them, or drop what we knew."""
        batches = await self._replay(start)
        if batches and batches[0][0] == start:
            self.stats.gaps_replayed += 1
            self._apply_all(batches, contiguous_from=start)
        else:
            self.stats.gaps_lost += 1
            log.warning("KV events of %s: batches %d..%d are gone; routing it approximately "
                        "while it re-learns", self.replica_id, start, seq - 1)
            self.exact.reset(self.replica_id, empty=False)
            if batches:
                self._apply_all(batches, contiguous_from=batches[0][0])
        self._apply_if_newer(seq, payload)

    async def _restart(self, seq: int | None = None, payload: bytes | None = None) -> None:
        """The engine restarted: its cache is empty; learn what it did since from a replay."""
        self.stats.restarts += 1
        self.stats.last_sequence = None
        self._replayed_through = -1
        await self._from_start(fresh=True, seq=seq, payload=payload)

    async def _from_start(self, *, fresh: bool, seq: int | None = None, payload: bytes | None = None) -> None:
        """Learn the replica's history from a replay from 0, then apply the batch `seq` that
        made us look (if any).  A whole history (or none published yet) means its cache is
        exactly what the batches say; a buffer that starts later, or a `seq` beyond what it
        holds, means part of it is unknown (approximate while it re-learns).  Without a
        replay endpoint, `fresh` says whether its cache is known to be empty."""
        batches = await self._replay(0)
        if batches is None:
            whole = fresh and seq in (None, 0)
        else:
            whole = not batches or batches[0][0] == 0
        self.exact.reset(self.replica_id, empty=whole)
        if batches:
            self._apply_all(batches, contiguous_from=batches[0][0])
        if seq is not None and payload is not None:
            last = self.stats.last_sequence
            if whole and seq > (-1 if last is None else last) + 1:
                self.exact.reset(self.replica_id, empty=False)  # batches before `seq` are gone
            self._apply_if_newer(seq, payload)

    def _apply_if_newer(self, seq: int, payload: bytes) -> None:
        last = self.stats.last_sequence
        if last is None or seq > last:
            self._apply(seq, payload)

    # -- applying ------------------------------------------------------------------------------
    def _apply_all(self, batches: Iterable[tuple[int, bytes]], *, contiguous_from: int) -> None:
        expected = contiguous_from
        for seq, payload in batches:
            if seq != expected:
                break  # the replay itself has a hole: keep what is contiguous
            self._apply(seq, payload)
            expected += 1
        if self.stats.last_sequence is not None:
            self._replayed_through = self.stats.last_sequence

    def _apply(self, seq: int, payload: bytes) -> None:
        self.stats.last_sequence = seq
        self._last_digest = xxhash.xxh3_64_intdigest(payload)
        try:
            batch = decode_batch(payload)
        except BadPayload as exc:
            self.stats.bad_messages += 1
            log.warning("KV events of %s: batch %d undecodable (%s)", self.replica_id, seq, exc)
            return
        self.stats.batches += 1
        self.stats.count_events(len(batch.events), time.time())
        self.exact.apply(self.replica_id, batch.events)

    async def _replay(self, start: int) -> list[tuple[int, bytes]] | None:
        """The replica's buffered batches from `start` (None: no replay endpoint, or it did
        not answer)."""
        if not self.replay_endpoint:
            return None
        self.stats.replays += 1
        dealer = self.context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.replay_endpoint)
        out: list[tuple[int, bytes]] = []
        try:
            # A DEALER's send waits for a peer: bounded too (the replica may be down).
            await asyncio.wait_for(dealer.send_multipart((b"", start.to_bytes(8, "big"))), self.replay_timeout)
            while len(out) < self.max_replay_batches:
                frames = await asyncio.wait_for(dealer.recv_multipart(), self.replay_timeout)
                if len(frames) < 4:
                    continue
                seq = decode_sequence(frames[2])
                if seq is None:
                    continue
                if seq < 0:
                    return out
                out.append((seq, frames[3]))
            return out  # the bound was reached: what we have is still a contiguous prefix
        except TimeoutError:
            log.warning("KV events of %s: replay from %d unanswered within %gs", self.replica_id, start,
                        self.replay_timeout)
            return out or None
        finally:
            dealer.close(0)
