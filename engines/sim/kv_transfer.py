"""Disaggregated prefill/decode between simulated replicas, speaking vLLM's NixlConnector
protocol (``--kv-transfer-config '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}'``).

The protocol, as vLLM 0.32 runs it (distributed/kv_transfer/kv_connector/v1/nixl/):

1. A *prefill* request carries ``kv_transfer_params: {"do_remote_decode": true, ...}``.
   The replica computes the prompt, samples one token (max_tokens is cut to 1) and, instead
   of freeing the prompt's KV blocks, holds them for a lease; its answer carries
   ``kv_transfer_params: {"do_remote_prefill": true, "remote_engine_id", "remote_request_id",
   "remote_block_ids", "remote_host", "remote_port", "tp_size", ...}``.
2. A *decode* request carries those params.  The replica reads the blocks from the prefill
   replica, takes them as computed (cached_tokens counts them) and only decodes.  A read
   that fails (unknown or expired request, other engine, unreachable host) fails the
   request the way vLLM's ``kv_load_failure_policy: fail`` does: 500 "Internal server
   error", or, streamed, a 200 whose stream carries the error event.
   Params without the remote fields are ignored (vLLM logs "invalid KVTransferParams" and
   prefills locally).

Here the "read" is an HTTP call to the prefill replica's own port (``POST
/sim/kv_transfer/{remote_request_id}``, which releases the held blocks), and its time is
modelled as the KV bytes over ``bandwidth_gbps`` (engines/sim/cost_model.py's bytes per
token), waited in simulated time before the request enters the decode replica's queue.
Held blocks are bounded by the KV cache itself and by ``max_held`` requests.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import aiohttp

from engines.sim.kv_cache import Allocation, KVCache

DEFAULT_BANDWIDTH_GBPS = 25.0  # GB/s: a 200 Gb/s RDMA link
DEFAULT_LEASE_S = 480.0  # vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT
PULL_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class TransferConfig:
    connector: str
    role: str
    engine_id: str
    bandwidth_gbps: float = DEFAULT_BANDWIDTH_GBPS
    lease_s: float = DEFAULT_LEASE_S

    @classmethod
    def from_json(cls, raw: dict[str, Any], *, bandwidth_gbps: float = DEFAULT_BANDWIDTH_GBPS,
                  lease_s: float = DEFAULT_LEASE_S) -> TransferConfig:
        connector = raw.get("kv_connector")
        if not isinstance(connector, str) or not connector:
            raise ValueError("--kv-transfer-config needs kv_connector (e.g. NixlConnector)")
        role = raw.get("kv_role", "kv_both")
        if role not in ("kv_producer", "kv_consumer", "kv_both"):
            raise ValueError(f"--kv-transfer-config kv_role must be kv_producer, kv_consumer or kv_both, "
                             f"got {role!r}")
        engine_id = raw.get("engine_id") or str(uuid.uuid4())
        return cls(connector, role, str(engine_id), bandwidth_gbps, lease_s)


class TransferError(Exception):
    """The decode side could not read the prefill's blocks (vLLM: a failed KV load)."""


def wants_remote_decode(params: Any) -> bool:
    return isinstance(params, dict) and params.get("do_remote_decode") is True


def remote_prefill(params: Any) -> dict[str, Any] | None:
    """The params of a decode request whose prompt a remote replica computed, or None
    (absent, or without the fields a read needs: vLLM then prefills locally)."""
    if not isinstance(params, dict) or params.get("do_remote_prefill") is not True:
        return None
    needed = ("remote_engine_id", "remote_request_id", "remote_host", "remote_port")
    if any(params.get(k) in (None, "") for k in needed):
        return None
    return params


class HeldBlocks:
    """Prompt blocks a prefill replica keeps for its decode replica, until read or expired."""

    def __init__(self, kv: KVCache, *, max_held: int = 4096) -> None:
        self.kv = kv
        self.max_held = max_held
        self._held: OrderedDict[str, tuple[Allocation, int]] = OrderedDict()  # id -> (blocks, tokens)

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, request_id: str, alloc: Allocation, num_tokens: int) -> list[int]:
        """Keep `alloc`'s blocks (the request has finished); their ids."""
        self._held[request_id] = (alloc, num_tokens)
        while len(self._held) > self.max_held:
            _, (old, _) = self._held.popitem(last=False)
            self.kv.free(old)
        return list(alloc.block_ids)

    def release(self, request_id: str) -> int | None:
        """Free the held blocks (read, or the lease ran out): their tokens, None if unknown."""
        entry = self._held.pop(request_id, None)
        if entry is None:
            return None
        alloc, tokens = entry
        self.kv.free(alloc)
        return tokens


class KVTransfer:
    """One replica's side of the protocol (module docstring)."""

    def __init__(self, config: TransferConfig, kv: KVCache, *, host: str, port: int,
                 kv_bytes_per_token: int, tp: int = 1) -> None:
        self.config = config
        self.held = HeldBlocks(kv)
        self.host = host
        self.port = port
        self.kv_bytes_per_token = kv_bytes_per_token
        self.tp = tp
        self.pulls = self.pull_failures = 0
        self._session: aiohttp.ClientSession | None = None

    # -- prefill side ------------------------------------------------------------------------
    def answer_params(self, request_id: str, block_ids: list[int], num_tokens: int) -> dict[str, Any]:
        return {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [block_ids],
                "remote_engine_id": self.config.engine_id, "remote_request_id": request_id,
                "remote_host": self.host, "remote_port": self.port, "tp_size": self.tp,
                "dcp_size": 1, "pp_size": 1, "remote_num_tokens": num_tokens,
                "remote_blocks_expiry_time": None}

    def read(self, request_id: str, engine_id: Any) -> int | None:
        """The decode replica reads a held request's blocks: their tokens (None: not held)."""
        if engine_id != self.config.engine_id:
            return None
        return self.held.release(request_id)

    # -- decode side -------------------------------------------------------------------------
    async def pull(self, params: dict[str, Any]) -> int:
        """Read the remote prefill's blocks; their tokens.  TransferError when it fails."""
        self.pulls += 1
        url = f"http://{params['remote_host']}:{params['remote_port']}/sim/kv_transfer/" \
              f"{params['remote_request_id']}"
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PULL_TIMEOUT_S))
        try:
            async with self._session.post(url, json={"engine_id": params["remote_engine_id"]}) as resp:
                body = await resp.json(content_type=None)
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            self.pull_failures += 1
            raise TransferError(f"KV read from {url} failed: {exc or type(exc).__name__}") from None
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("num_tokens"), int):
            self.pull_failures += 1
            raise TransferError(f"KV read from {url}: {status} {body}")
        return int(body["num_tokens"])

    def transfer_seconds(self, num_tokens: int) -> float:
        return num_tokens * self.kv_bytes_per_token / (self.config.bandwidth_gbps * 1e9)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def expire_later(transfer: KVTransfer, request_id: str, seconds: float) -> None:
    """The lease: blocks nobody read are freed after `seconds` (wall time)."""
    await asyncio.sleep(seconds)
    transfer.held.release(request_id)
