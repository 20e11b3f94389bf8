"""Continuous batching with chunked prefill and recompute preemption, after vLLM v1.

Each step has a token budget (``max_num_batched_tokens``) and a sequence cap (``max_num_seqs``).

1. Running requests first, in admission order: a decoding request takes 1 token, a request
   still prefilling takes as much of its remaining prompt as the budget allows (chunked
   prefill).  When the KV cache has no block for it, the most recently admitted running
   request is preempted (blocks freed, progress dropped, put back at the head of the queue to
   be recomputed later) until the allocation fits or the request itself was the victim.
2. Then, unless someone was preempted this step, waiting requests in FIFO order: look up the
   longest cached prefix (whole blocks, at most ``num_tokens - 1`` tokens, so the last token is
   always computed), allocate the rest, and stop at the first request that does not fit.

``schedule`` plans a step; ``complete`` applies it once the step's time has passed.  Requests
removed in between (client disconnects) are skipped.  Pure Python, no I/O, no clocks.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engines.sim.kv_cache import NO_KEYS, Allocation, BlockKeys, KVCache, extend_block_hashes


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class SimRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int  # tokens to generate before finishing
    finish_reason_at_max: str = "length"  # "stop" when the client set no max_tokens (a simulated EOS)
    seed: int = 0
    arrival: float = 0.0
    keys: BlockKeys = NO_KEYS  # cache_salt and LoRA adapter: enter the block hashes, as in vLLM
    # Disaggregated serving (kv_transfer.py): prompt tokens a remote prefill computed (taken
    # as computed at admission), and whether to hold the blocks for a remote decode at the end.
    external_tokens: int = 0
    hold_blocks: bool = False
    transfer_answer: dict[str, Any] | None = None  # kv_transfer_params of a held prefill's answer
    output_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    block_hashes: list[bytes] = field(default_factory=list)
    alloc: Allocation = field(default_factory=Allocation)
    num_computed: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first scheduling; -1 before
    num_cache_creation_tokens: int = 0  # prompt tokens this request wrote to the cache (at first token)
    status: Status = Status.WAITING
    num_preemptions: int = 0
    finish_reason: str | None = None
    # Timestamps (simulated seconds), set by the engine.
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    sink: Any = None  # the engine's per-request output channel

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def cache_counts(self) -> tuple[int, int]:
        """(prompt tokens read from the prefix cache, prompt tokens this request wrote to it):
        what every answer's usage reports (0 read before the first scheduling)."""
        return max(self.num_cached_tokens, 0), self.num_cache_creation_tokens


@dataclass(slots=True)
class StepPlan:
    scheduled: list[tuple[SimRequest, int]] = field(default_factory=list)  # (request, new tokens)
    newly_admitted: list[SimRequest] = field(default_factory=list)
    preempted: list[SimRequest] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


@dataclass(slots=True)
class StepOutput:
    request: SimRequest
    new_token: int | None  # None: a prefill chunk that sampled nothing yet
    finished: bool


class Scheduler:
    def __init__(self, kv: KVCache, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, max_loras: int | None = None,
                 on_hold: Callable[[SimRequest], None] | None = None) -> None:
        self.kv = kv
        self.on_hold = on_hold  # takes over the blocks of a finished hold_blocks request
        self.max_loras = max_loras  # distinct adapters in one batch (None: LoRA off)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []

    # -- admission and removal --------------------------------------------------------------
    def add(self, req: SimRequest) -> None:
        extend_block_hashes(req.block_hashes, req.token_ids, self.kv.block_size, req.keys)
        req.status = Status.WAITING
        self.waiting.append(req)

    def remove(self, req: SimRequest, reason: str = "abort") -> bool:
        """Drop a request at once (client gone).  True if it was still live."""
        if req.status is Status.FINISHED:
            return False
        if req.status is Status.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._finish(req, reason)
        return True

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def _finish(self, req: SimRequest, reason: str) -> None:
        if req.hold_blocks and reason != "abort" and self.on_hold is not None:
            self.on_hold(req)  # a prefill for a remote decode: its blocks wait to be read
        else:
            self.kv.free(req.alloc)
        req.status = Status.FINISHED
        req.finish_reason = reason

    # -- planning ---------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        running, kept = self.running, []
        i, end = 0, len(running)  # running[i:end]: not yet visited this step
        while i < end and budget > 0:
            req = running[i]
            i += 1
            n = min(req.num_tokens - req.num_computed, budget)
            while not self.kv.allocate(req.alloc, req.num_computed + n):
                if end > i:  # the most recently admitted request not yet visited
                    end -= 1
                    victim = running[end]
                else:
                    victim = req
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is req:
                    break
            else:
                kept.append(req)
                plan.scheduled.append((req, n))
                budget -= n
        kept.extend(running[i:end])  # out of budget this step, still running
        self.running = kept

        if plan.preempted:
            return plan
        loras = self.running_adapters() if self.max_loras else set()
        skipped: list[SimRequest] = []  # waiting for an adapter slot in the batch, as in vLLM
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            lora = req.keys.lora_name
            if lora is not None and self.max_loras and lora not in loras and len(loras) >= self.max_loras:
                skipped.append(self.waiting.popleft())
                continue
            hit: list[int] = []
            if req.num_computed == 0:
                max_blocks = (req.num_tokens - 1) // self.kv.block_size
                hit = self.kv.find_cached_prefix(req.block_hashes, max_blocks)
            cached = max(len(hit) * self.kv.block_size, min(req.external_tokens, req.num_tokens - 1))
            n = min(req.num_tokens - cached, budget)
            if not self.kv.allocate(req.alloc, cached + n, hit):
                break
            self.waiting.popleft()
            req.num_computed = cached
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = cached
            req.status = Status.RUNNING
            self.running.append(req)
            plan.scheduled.append((req, n))
            plan.newly_admitted.append(req)
            budget -= n
            if lora is not None:
                loras.add(lora)
        self.waiting.extendleft(reversed(skipped))
        return plan

    def running_adapters(self) -> set[str]:
        return {r.keys.lora_name for r in self.running if r.keys.lora_name is not None}

    def waiting_adapters(self) -> set[str]:
        return {r.keys.lora_name for r in self.waiting if r.keys.lora_name is not None}

    def _preempt(self, req: SimRequest) -> None:
        """Recompute preemption; the caller has already taken ``req`` out of ``running``."""
        self.kv.free(req.alloc)
        req.num_computed = 0
        req.external_tokens = 0  # what was read is cached now, or gone
        req.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    # -- applying a finished step -----------------------------------------------------------
    def complete(self, plan: StepPlan, next_token: Callable[[SimRequest], int]) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        bs = self.kv.block_size
        for req, n in plan.scheduled:
            if req.status is not Status.RUNNING:
                continue  # aborted or preempted while the step ran
            req.num_computed += n
            if req.num_computed < req.num_tokens:
                self.kv.cache_full_blocks(req.alloc, req.block_hashes, req.token_ids, req.num_computed,
                                          req.keys)
                outputs.append(StepOutput(req, None, False))
                continue
            tok = next_token(req)
            req.output_ids.append(tok)
            req.token_ids.append(tok)
            if len(req.token_ids) % bs == 0:
                extend_block_hashes(req.block_hashes, req.token_ids, bs, req.keys)
            self.kv.cache_full_blocks(req.alloc, req.block_hashes, req.token_ids, req.num_computed,
                                          req.keys)
            done = len(req.output_ids) >= req.max_tokens or req.num_tokens >= self.max_model_len
            if done:
                reason = req.finish_reason_at_max if len(req.output_ids) >= req.max_tokens else "length"
                self.running.remove(req)
                self._finish(req, reason)
            outputs.append(StepOutput(req, tok, done))
        return outputs
