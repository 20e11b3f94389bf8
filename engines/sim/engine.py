"""The engine loop: one asyncio task that schedules a step, waits the step's modelled time,
applies it, and hands new tokens to the requests' output channels.

Time.  ``Clock`` reads *simulated* seconds.  Idle, they pass at ``time_scale`` times the wall
clock.  Busy, each step advances them by exactly its modelled duration: the loop sleeps
duration / time_scale of wall time, and whatever the simulator itself costs beyond that (its
Python, the event loop's timer granularity, HTTP work) is dropped from simulated time instead
of leaking into it, multiplied by the scale.  So every latency the replica reports
(/metrics histograms) is model time, the same at ``--time-scale 1`` and ``100``; what a client
measures on the wall is at least simulated time / time_scale, more when the process cannot
keep up (``/admin/stats`` shows the accumulated ``clock_lag_s``).  Benchmarks compare targets
under the same scale.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from engines.sim.cost_model import CostModel
from engines.sim.faults import Faults
from engines.sim.kv_cache import KVCache
from engines.sim.lora import Adapters
from engines.sim.metrics import SimMetrics
from engines.sim.scheduler import Scheduler, SimRequest, Status
from engines.sim.tokenizer import Tokenizer


class Clock:
    """Simulated seconds: wall time x scale while idle; exact model time while busy."""

    def __init__(self, scale: float = 1.0) -> None:
        if scale <= 0:
            raise ValueError("time scale must be > 0")
        self.scale = scale
        self._t0 = time.monotonic()
        self.lag = 0.0  # simulated seconds dropped because the process ran behind the model
        self._cap: float | None = None  # while busy: the end of the step under way
        self._last = 0.0

    def _raw(self) -> float:
        return (time.monotonic() - self._t0) * self.scale - self.lag

    def now(self) -> float:
        t = self._raw()
        if self._cap is not None and t > self._cap:
            t = self._cap
        if t > self._last:
            self._last = t
        return self._last

    async def advance_to(self, t: float) -> None:
        """The engine's step: simulated time moves to ``t`` (and no further until the next
        step or ``release``), taking (t - now) / scale of wall time or less if behind."""
        self._cap = t
        await asyncio.sleep(max(0.0, (t - self._raw()) / self.scale))
        self._absorb()
        # The step is done: simulated time is now exactly t, even if the event loop woke
        # early (uvloop rounds timers down to whole milliseconds, so at a large time scale
        # most steps' sleeps return at once).  The wall time still owed stays in _raw() < t
        # and lengthens the next sleep, so the wall pace keeps to the scale on average.
        if t > self._last:
            self._last = t

    def release(self) -> None:
        """The engine goes idle: simulated time runs with the wall clock again from here."""
        self._absorb()
        self._cap = None

    def _absorb(self) -> None:
        if self._cap is not None:
            over = self._raw() - self._cap
            if over > 0:
                self.lag += over

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of simulated time outside the engine loop (e.g. an embedding)."""
        await asyncio.sleep(seconds / self.scale)


class OutputChannel:
    """New tokens of one request, waiting for its HTTP handler.  Holds at most the tokens of
    one request (bounded by max_tokens)."""

    __slots__ = ("pending", "done", "_event")

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.done = False
        self._event = asyncio.Event()

    def push(self, token: int | None, done: bool) -> None:
        if token is not None:
            self.pending.append(token)
        self.done = self.done or done
        self._event.set()

    async def next(self) -> tuple[list[int], bool]:
        """Tokens produced since the last call, and whether the request has finished."""
        while not self.pending and not self.done:
            self._event.clear()
            await self._event.wait()
        tokens, self.pending = self.pending, []
        return tokens, self.done


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str
    max_model_len: int = 8192
    block_size: int = 16
    num_gpu_blocks: int = 2048
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    time_scale: float = 1.0


class Engine:
    def __init__(self, cfg: EngineConfig, cost: CostModel, tokenizer: Tokenizer,
                 metrics: SimMetrics, publisher=None, faults: Faults | None = None,
                 adapters: Adapters | None = None) -> None:
        self.cfg = cfg
        self.cost = cost
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.publisher = publisher
        self.clock = Clock(cfg.time_scale)
        # vLLM reserves one of num_gpu_blocks as its null block; usage is over the rest.
        self.kv = KVCache(max(1, cfg.num_gpu_blocks - 1), cfg.block_size, cfg.enable_prefix_caching,
                          emit_events=publisher is not None)
        self.sched = Scheduler(self.kv, max_num_seqs=cfg.max_num_seqs,
                               max_num_batched_tokens=cfg.max_num_batched_tokens,
                               max_model_len=cfg.max_model_len,
                               max_loras=adapters.max_loras if adapters is not None else None)
        self.adapters = adapters  # None: LoRA off (no --enable-lora)
        self.faults = faults or Faults()  # slow_factor multiplies every step's time
        self._wake = asyncio.Event()

    # -- requests ---------------------------------------------------------------------------
    def submit(self, req: SimRequest) -> OutputChannel:
        req.arrival = self.clock.now()
        req.sink = OutputChannel()
        self.sched.add(req)
        self._refresh_load()
        self._wake.set()
        return req.sink

    def abort(self, req: SimRequest) -> None:
        """Drop a request at once (client disconnected); a no-op once it has finished.  Like
        vLLM's output processor, a client abort records no finished-request stats."""
        if self.sched.remove(req, "abort"):
            self._refresh_load()
        req.sink = None

    def num_unfinished(self) -> int:
        return len(self.sched.running) + len(self.sched.waiting)

    def reset_prefix_cache(self) -> bool:
        ok = self.kv.reset()
        self._publish_events()
        return ok

    def _refresh_load(self) -> None:
        self.metrics.set_load(len(self.sched.running), len(self.sched.waiting), self.kv.usage())

    # -- the loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            if not self.sched.has_work():
                self._refresh_load()
                if self.adapters is not None:
                    self.metrics.set_lora_info(self.adapters.max_loras, set(), set())
                self.clock.release()
                self._wake.clear()
                await self._wake.wait()
                continue
            start = self.clock.now()
            plan = self.sched.schedule()
            load_s = self._load_adapters(plan.newly_admitted)
            for req in plan.newly_admitted:
                if req.num_preemptions == 0:
                    self.metrics.on_scheduled(req.num_tokens, req.num_computed)
                if req.first_scheduled is None:
                    req.first_scheduled = start
            if plan.preempted:
                self.metrics.preemptions.inc(len(plan.preempted))
            self.metrics.on_step(len(self.sched.running), len(self.sched.waiting), self.kv.usage(),
                                 plan.num_tokens)
            if not plan.scheduled:  # cannot happen with max_model_len <= KV capacity; never spin
                await asyncio.sleep(0.001)
                continue
            prefill, decode = [], []
            for req, n in plan.scheduled:
                if n == 1 and req.output_ids and req.num_computed + 1 == req.num_tokens:
                    decode.append(req.num_tokens)
                else:
                    prefill.append((n, req.num_computed + n))
            step_s = self.cost.step_time(prefill, decode) + load_s
            await self.clock.advance_to(start + step_s * self.faults.slow_factor)
            outputs = self.sched.complete(plan, self._next_token)
            self._publish_events()
            now = self.clock.now()
            for out in outputs:
                if out.new_token is not None:
                    self._on_token(out.request, now, out.finished)
                if out.request.sink is not None:
                    out.request.sink.push(out.new_token, out.finished)

    def _load_adapters(self, admitted: list[SimRequest]) -> float:
        """Seconds this step spends moving newly needed adapters into GPU slots; and the
        step's lora_requests_info."""
        adapters = self.adapters
        if adapters is None:
            return 0.0
        seconds = 0.0
        in_use = self.sched.running_adapters()
        for req in admitted:
            name = req.keys.lora_name
            if name is not None and adapters.activate(name, in_use):
                seconds += adapters.load_s
                self.metrics.lora_loads.inc()
        self.metrics.set_lora_info(adapters.max_loras, in_use, self.sched.waiting_adapters())
        return seconds

    def _next_token(self, req: SimRequest) -> int:
        return self.tokenizer.output_token(len(req.output_ids), req.seed)

    def _publish_events(self) -> None:
        events = self.kv.drain_events()
        if events and self.publisher is not None:
            self.publisher.publish(events)

    def _on_token(self, req: SimRequest, now: float, finished: bool) -> None:
        m = self.metrics
        m.generation_tokens.inc()
        if req.first_token is None:
            req.first_token = now
            # vLLM's created_cache_tokens (chat) / cache_write_tokens (Responses): prompt tokens in
            # the prefix cache when the prefill ends, minus the hit.  Only the prompt's full blocks
            # count: the block the first sampled token completes is not computed yet (its KV comes
            # with the next step), so real vLLM reports 96, not 127, for a 127-token prompt in
            # 32-token blocks (tests/reference/agentic/responses_chain_turn1.json).
            bs = self.kv.block_size
            cached_now = min(req.alloc.num_cached_blocks * bs, len(req.prompt_ids) // bs * bs)
            req.num_cache_creation_tokens = max(0, cached_now - max(req.num_cached_tokens, 0))
            m.on_first_token(len(req.prompt_ids), max(req.num_cached_tokens, 0), now - req.arrival)
        else:
            m.itl.observe(now - req.last_token)
        req.last_token = now
        if finished and req.status is Status.FINISHED:
            n_out = len(req.output_ids)
            m.success[req.finish_reason or "length"].inc()
            m.e2e.observe(now - req.arrival)
            m.request_prompt_tokens.observe(len(req.prompt_ids))
            m.request_generation_tokens.observe(n_out)
            m.params_max_tokens.observe(req.max_tokens)
            first_sched = req.first_scheduled if req.first_scheduled is not None else req.arrival
            m.queue_time.observe(first_sched - req.arrival)
            m.inference_time.observe(now - first_sched)
            m.prefill_time.observe(req.first_token - first_sched)
            m.decode_time.observe(now - req.first_token)
            if n_out > 1:
                m.tpot.observe((now - req.first_token) / (n_out - 1))
