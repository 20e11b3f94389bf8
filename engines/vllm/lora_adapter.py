"""A tiny random LoRA adapter (PEFT's file layout) for the tiny local model.

No adapter can be downloaded on these machines, so the conformance suite makes one: an
``adapter_config.json`` and an ``adapter_model.safetensors`` with random low-rank
matrices for the attention projections of every layer.  The safetensors file is written
by hand (an 8-byte header length, a JSON header, raw little-endian float32 data) so that
neither the router's environment nor the simulator needs numpy, torch or safetensors.

Usage: ``python -m engines.vllm.lora_adapter MODEL_DIR OUT_DIR [--rank 8] [--seed 1]``.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
from array import array
from pathlib import Path
from typing import Any

TARGETS = ("q_proj", "v_proj")


def _projection_sizes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) features of the targeted projections of a Llama-style config."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    return {"q_proj": (hidden, heads * head_dim), "v_proj": (hidden, kv_heads * head_dim)}


def write_tiny_lora(model_dir: str | Path, out_dir: str | Path, *, rank: int = 8,
                    alpha: int = 16, seed: int = 1) -> Path:
    """Write a random rank-`rank` LoRA adapter for the model in `model_dir`; returns `out_dir`."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    layers = int(config["num_hidden_layers"])
    sizes = _projection_sizes(config)
    rng = random.Random(seed)
    tensors: list[tuple[str, tuple[int, int], array]] = []
    for layer in range(layers):
        for target in TARGETS:
            fan_in, fan_out = sizes[target]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            a = array("f", (rng.gauss(0.0, 0.02) for _ in range(rank * fan_in)))
            b = array("f", (rng.gauss(0.0, 0.02) for _ in range(fan_out * rank)))
            tensors.append((f"{prefix}.lora_A.weight", (rank, fan_in), a))
            tensors.append((f"{prefix}.lora_B.weight", (fan_out, rank), b))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, data in tensors:
        size = len(data) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "adapter_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, _, data in tensors:
            if sys.byteorder != "little":
                data.byteswap()
            f.write(data.tobytes())
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": list(TARGETS), "modules_to_save": None,
        "base_model_name_or_path": str(Path(model_dir).resolve()),
    }, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    print(write_tiny_lora(args.model_dir, args.out_dir, rank=args.rank, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
