"""How long one engine step takes: a roofline model of a dense decoder on H100-class GPUs.

A step runs a batch of prefill chunks and decode tokens.  Its time is

    overhead + max(compute, memory) / tp_speedup

* compute = (2 * params * batch_tokens + attention FLOPs) / (peak FLOP/s * mfu);
  attention FLOPs = 4 * layers * hidden * new_tokens * context_attended, so prefill time grows
  with the uncached tokens (cached ones are never computed) and with the context they attend to.
* memory = (weight bytes + KV bytes read) / (HBM bandwidth * bandwidth efficiency); every
  decode token reads its sequence's whole KV, so decode time grows with batch size and context.
* tp_speedup = tp * tp_efficiency ** log2(tp): tensor parallelism splits both terms across
  GPUs, losing ``1 - tp_efficiency`` (default 15%) per doubling to all-reduces.

Default constants: Llama-3.1-8B (8.03 B parameters, 32 layers, hidden 4096, 8 KV heads of 128,
bf16) on one H100 SXM (989 TFLOP/s dense bf16, 3.35 TB/s HBM3, 80 GB; NVIDIA H100 datasheet).
With mfu 0.45 and bandwidth efficiency 0.8 this gives about 26k prompt tokens/s of prefill
(75 ms for a 2,000-token prompt, 0.34 s for 8,192), a 7.0 ms decode step at batch 1, 10 ms at
batch 64 and 20 ms at batch 256 with 1k-token contexts, and 28k blocks of 16 tokens.
The calibration target is the regime public reports describe for vLLM serving Llama-3(.1)-8B on
one H100 (vLLM blog, "vLLM v0.6.0: 2.7x Throughput Improvement and 5x Latency Reduction",
https://blog.vllm.ai/2024/09/05/perf-update.html; Azure HPC blog, "Performance of Llama 3.1 8B
AI Inference using vLLM on ND-H100-v5", 2025): decode memory-bound at single-digit ms per
token at low batch, prefill compute-bound at tens of thousands of tokens/s.  The constants
are derived from the datasheet, not fitted to a measured trace; every one is a flag (see
``python -m engines.sim --help``) so other models and GPUs can be described.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 1024 ** 3


@dataclass(frozen=True, slots=True)
class CostModel:
    params_b: float = 8.03  # billions of parameters
    num_layers: int = 32
    hidden_size: int = 4096
    num_kv_heads: int = 8
    head_dim: int = 128
    dtype_bytes: int = 2
    peak_tflops: float = 989.0  # per GPU, dense bf16
    hbm_tbps: float = 3.35  # per GPU
    gpu_mem_gib: float = 80.0
    gpu_memory_utilization: float = 0.9
    mfu: float = 0.45
    bw_efficiency: float = 0.8
    step_overhead_s: float = 0.001  # scheduling + launch, per step (not parallelized)
    tp: int = 1
    tp_efficiency: float = 0.85  # kept per doubling of tp

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.params_b * 1e9 * self.dtype_bytes

    @property
    def tp_speedup(self) -> float:
        return self.tp * self.tp_efficiency ** math.log2(self.tp) if self.tp > 1 else 1.0

    def num_gpu_blocks(self, block_size: int) -> int:
        """KV blocks that fit: per GPU, memory budget minus its weight shard (and ~2 GiB of
        activations), divided by its share of a block."""
        per_gpu = (self.gpu_mem_gib * self.gpu_memory_utilization - 2.0) * GIB \
            - self.weight_bytes / self.tp
        block_bytes_per_gpu = self.kv_bytes_per_token * block_size / self.tp
        return max(1, int(per_gpu // block_bytes_per_gpu))

    def step_time(self, prefill: list[tuple[int, int]], decode_contexts: list[int]) -> float:
        """Seconds for one step.

        prefill: (new tokens computed, context length after them) per prefilling request.
        decode_contexts: context length of each decoding request (one new token each).
        """
        new_tokens = sum(n for n, _ in prefill) + len(decode_contexts)
        if new_tokens == 0:
            return 0.0
        attn_pairs = sum(n * (ctx - n / 2) for n, ctx in prefill) + sum(decode_contexts)
        flops = 2 * self.params_b * 1e9 * new_tokens \
            + 4 * self.num_layers * self.hidden_size * attn_pairs
        compute = flops / (self.peak_tflops * 1e12 * self.mfu)
        kv_read = self.kv_bytes_per_token * (sum(decode_contexts) + sum(ctx for _, ctx in prefill))
        memory = (self.weight_bytes + kv_read) / (self.hbm_tbps * 1e12 * self.bw_efficiency)
        return self.step_overhead_s + max(compute, memory) / self.tp_speedup
