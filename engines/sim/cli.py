"""`python -m engines.sim --port 8101 --model NAME [options]`: run one simulated vLLM replica.

Flag names follow `vllm serve` where vLLM has the same knob (--max-model-len, --block-size,
--num-gpu-blocks-override, --max-num-seqs, --max-num-batched-tokens, --enable-prefix-caching,
--tensor-parallel-size, --kv-events-config, --enable-prompt-tokens-details,
--served-model-name), so a launcher can hand both kinds the same arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

import orjson
from aiohttp import web

from engines.sim.cost_model import CostModel
from engines.sim.engine import Engine, EngineConfig
from engines.sim.faults import Faults
from engines.sim.kv_events import KVEventPublisher, KVEventsConfig
from engines.sim.kv_transfer import DEFAULT_BANDWIDTH_GBPS, DEFAULT_LEASE_S, KVTransfer, TransferConfig
from engines.sim.lora import Adapters, parse_lora_modules, runtime_updating_allowed
from engines.sim.metrics import SimMetrics
from engines.sim.options import ServerOptions
from engines.sim.protocol import VLLM_VERSION
from engines.sim.response_store import store_enabled_by_env
from engines.sim.server import SimServer
from engines.sim.tokenizer import RealTokenizer, Tokenizer

log = logging.getLogger("engines.sim")


UVICORN_BACKLOG = 2048


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engines.sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_tag", nargs="?", help="model (like `vllm serve MODEL`); --model wins")
    p.add_argument("--model", help="served model name")
    p.add_argument("--served-model-name", help="alias of --model, as in vLLM")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default 16, vLLM's GPU default)")
    p.add_argument("--num-gpu-blocks", "--num-gpu-blocks-override", dest="num_gpu_blocks", type=int,
                   help="KV blocks (default: what fits on the modelled GPUs)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-num-queued-reqs", type=int, default=10_000,
                   help="answer 503 (vLLM's QueueOverflowError) beyond this many unfinished requests; "
                        "vLLM's default is unlimited, the simulator keeps a bound (0: unlimited)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--enable-prompt-tokens-details", action=argparse.BooleanOptionalAction, default=True,
                   help="usage.prompt_tokens_details.cached_tokens (on by default in the simulator)")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1)
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="run the schedule this many times faster than real time; metrics stay in "
                        "simulated seconds")
    p.add_argument("--default-output-len", type=int, default=128,
                   help="tokens generated (then finish_reason stop) when a chat request sets no max_tokens")
    p.add_argument("--legacy-metric-names", action="store_true",
                   help="emit vllm:gpu_cache_usage_perc / vllm:gpu_prefix_cache_* instead")
    p.add_argument("--kv-events-config", type=orjson.loads, default=None,
                   help="vLLM's JSON, e.g. '{\"enable_kv_cache_events\": true, \"publisher\": \"zmq\", "
                        "\"endpoint\": \"tcp://*:5557\", \"replay_endpoint\": \"tcp://*:5558\", \"topic\": \"kv\"}'")
    p.add_argument("--kv-events-endpoint", help="shorthand: publish KV events on this ZMQ endpoint "
                   "(e.g. tcp://*:5557); merged into --kv-events-config")
    p.add_argument("--kv-events-replay-endpoint", help="shorthand: the replay ROUTER endpoint")
    p.add_argument("--kv-events-topic", help="shorthand: the PUB topic (vLLM's default: empty)")
    p.add_argument("--vocab-size", type=int, default=128256)
    p.add_argument("--tokenizer", metavar="PATH",
                   help="a model directory (tokenizer.json + tokenizer_config.json with a chat "
                        "template) to tokenize with, like a real replica; default: a 4-character "
                        "chunk tokenizer")
    pd = p.add_argument_group("disaggregated prefill/decode (vLLM's NixlConnector protocol, kv_transfer.py)")
    pd.add_argument("--kv-transfer-config", type=orjson.loads, default=None,
                    help="vLLM's JSON, e.g. '{\"kv_connector\": \"NixlConnector\", \"kv_role\": \"kv_both\"}'")
    pd.add_argument("--kv-transfer-bandwidth-gbps", type=float, default=DEFAULT_BANDWIDTH_GBPS,
                    help="GB/s of the simulated KV transfer link")
    pd.add_argument("--kv-lease-s", type=float, default=DEFAULT_LEASE_S,
                    help="simulated seconds a prefill holds its blocks for the decode replica to read")
    ag = p.add_argument_group("the agentic APIs (/v1/responses: responses.py; /v1/messages: anthropic.py)")
    ag.add_argument("--enable-responses-api-store", action="store_true",
                    help="keep responses in memory for previous_response_id, GET, cancel and background "
                         "(also: VLLM_ENABLE_RESPONSES_API_STORE=1, vLLM's switch); without it `store` is "
                         "ignored, as in vLLM")
    ag.add_argument("--responses-store-size", type=int, default=4096,
                    help="stored responses kept, the oldest finished dropped first (vLLM keeps all)")
    ag.add_argument("--tool-call-parser", default="sim",
                    help="vLLM's flag; the simulator never emits tool calls, but with 'none' it refuses "
                         "tool_choice auto/required/named like vLLM without a parser (default: accepts them)")
    ag.add_argument("--enable-auto-tool-choice", action=argparse.BooleanOptionalAction, default=True,
                    help="vLLM's flag (on by default in the simulator)")
    lo = p.add_argument_group("LoRA adapters (vLLM's flags; engines/sim/lora.py)")
    lo.add_argument("--enable-lora", action="store_true")
    lo.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                    help="adapters served from the start (implies --enable-lora)")
    lo.add_argument("--max-loras", type=int, default=1, help="adapters in one batch / GPU slots (vLLM: 1)")
    lo.add_argument("--max-lora-rank", type=int, default=16, help="accepted for vLLM's command lines")
    lo.add_argument("--max-cpu-loras", type=int, default=None, help="accepted for vLLM's command lines")
    lo.add_argument("--lora-load-s", type=float, default=0.05,
                    help="simulated seconds a step spends loading an adapter into a GPU slot")
    lo.add_argument("--allow-runtime-lora-updating", action="store_true",
                    help="serve /v1/load_lora_adapter and /v1/unload_lora_adapter (also: "
                         "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, as for vLLM)")
    cm = p.add_argument_group("cost model (defaults: Llama-3.1-8B on H100 SXM; see cost_model.py)")
    defaults = CostModel()
    for name in ("params_b", "peak_tflops", "hbm_tbps", "gpu_mem_gib", "gpu_memory_utilization", "mfu",
                 "bw_efficiency", "step_overhead_s", "tp_efficiency"):
        cm.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    for name in ("num_layers", "hidden_size", "num_kv_heads", "head_dim"):
        cm.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    f = p.add_argument_group("fault injection (also at run time: POST /admin/faults)")
    f.add_argument("--fail-rate", type=float, default=0.0)
    f.add_argument("--fail-status", type=int, default=500, help="status of --fail-rate answers")
    f.add_argument("--fail-retry-after", type=int, default=None,
                   help="Retry-After seconds of --fail-rate answers")
    f.add_argument("--hang-rate", type=float, default=0.0)
    f.add_argument("--slow-factor", type=float, default=1.0)
    f.add_argument("--cut-after-chunks", type=int)
    f.add_argument("--cut-rate", type=float, default=1.0)
    f.add_argument("--exit-after", type=int)
    f.add_argument("--unhealthy-for", type=float, default=0.0)
    f.add_argument("--start-delay", type=float, default=0.0,
                   help="seconds before the port is even opened (real vLLM refuses connections until up)")
    f.add_argument("--fault-seed", type=int, default=0)
    p.add_argument("--log-level", default="info")
    return p


def _cost_model(args: argparse.Namespace) -> CostModel:
    names = CostModel.__dataclass_fields__
    return CostModel(**{k: getattr(args, k) for k in names if hasattr(args, k)})


def _kv_events_config(args: argparse.Namespace) -> KVEventsConfig | None:
    raw = dict(args.kv_events_config or {})
    if args.kv_events_endpoint:
        raw.update(enable_kv_cache_events=True, publisher="zmq", endpoint=args.kv_events_endpoint)
    if args.kv_events_replay_endpoint:
        raw["replay_endpoint"] = args.kv_events_replay_endpoint
    if args.kv_events_topic is not None:
        raw["topic"] = args.kv_events_topic
    return KVEventsConfig.from_json(raw) if raw else None


async def serve(args: argparse.Namespace) -> None:
    model = args.model or args.served_model_name or args.model_tag or "sim-model"
    user_block_size = args.block_size is not None
    args.block_size = args.block_size or 16
    cost = _cost_model(args)
    num_blocks = args.num_gpu_blocks or cost.num_gpu_blocks(args.block_size)
    max_model_len = args.max_model_len
    capacity = max(1, num_blocks - 1) * args.block_size  # less vLLM's null block
    if capacity < max_model_len:
        # One request must always fit, or it could wait forever: shrink the context instead.
        max_model_len = capacity
        log.warning("KV cache holds only %d tokens: max_model_len lowered from %d to %d",
                    max_model_len, args.max_model_len, max_model_len)
    kv_cfg = _kv_events_config(args)
    if args.start_delay > 0:
        await asyncio.sleep(args.start_delay)
    metrics = SimMetrics(model, block_size=args.block_size, num_gpu_blocks=num_blocks,
                         enable_prefix_caching=args.enable_prefix_caching,
                         gpu_memory_utilization=cost.gpu_memory_utilization, max_model_len=max_model_len,
                         num_gpu_blocks_override=args.num_gpu_blocks, user_specified_block_size=user_block_size,
                         legacy_names=args.legacy_metric_names)
    tokenizer = RealTokenizer(args.tokenizer) if args.tokenizer else Tokenizer(vocab_size=args.vocab_size)
    faults = Faults(fail_rate=args.fail_rate, fail_status=args.fail_status,
                    fail_retry_after=args.fail_retry_after, hang_rate=args.hang_rate,
                    slow_factor=args.slow_factor,
                    cut_after_chunks=args.cut_after_chunks, cut_rate=args.cut_rate, exit_after=args.exit_after,
                    seed=args.fault_seed)
    if args.unhealthy_for:
        faults.update({"unhealthy_for": args.unhealthy_for})
    adapters = None
    if args.enable_lora or args.lora_modules:
        adapters = Adapters(parse_lora_modules(args.lora_modules), max_loras=args.max_loras,
                            load_s=args.lora_load_s, check_paths=True)
        metrics.enable_lora()
    publisher = KVEventPublisher(kv_cfg, faults=faults) if kv_cfg is not None and kv_cfg.enabled else None
    engine = Engine(EngineConfig(model=model, max_model_len=max_model_len, block_size=args.block_size,
                                 num_gpu_blocks=num_blocks, max_num_seqs=args.max_num_seqs,
                                 max_num_batched_tokens=args.max_num_batched_tokens,
                                 enable_prefix_caching=args.enable_prefix_caching, time_scale=args.time_scale),
                    cost, tokenizer, metrics, publisher, faults, adapters)
    transfer = None
    if args.kv_transfer_config:
        transfer = KVTransfer(TransferConfig.from_json(args.kv_transfer_config,
                                                       bandwidth_gbps=args.kv_transfer_bandwidth_gbps,
                                                       lease_s=args.kv_lease_s),
                              engine.kv, host=args.host, port=args.port,
                              kv_bytes_per_token=cost.kv_bytes_per_token, tp=args.tp)
    server = SimServer(engine, tokenizer, faults,
                       ServerOptions(host=args.host, prompt_tokens_details=args.enable_prompt_tokens_details,
                                     default_output_len=args.default_output_len,
                                     max_num_queued_reqs=args.max_num_queued_reqs or None,
                                     runtime_lora_updating=args.allow_runtime_lora_updating
                                     or runtime_updating_allowed(),
                                     responses_store=args.enable_responses_api_store or store_enabled_by_env(),
                                     responses_store_size=args.responses_store_size,
                                     tool_call_parser=None if args.tool_call_parser in ("", "none")
                                     else args.tool_call_parser,
                                     enable_auto_tool_choice=args.enable_auto_tool_choice),
                       kv_cfg, publisher, transfer)
    runner = web.AppRunner(server.build_app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    # vLLM serves through uvicorn, whose listen backlog is 2048 (aiohttp's default is 128:
    # a burst of new connections would see refusals real vLLM does not give).
    site = web.TCPSite(runner, args.host, args.port, reuse_address=True, shutdown_timeout=1.0,
                       backlog=UVICORN_BACKLOG)
    await site.start()
    if publisher is not None:
        publisher.start()
    engine_task = asyncio.create_task(engine.run(), name="engine")
    log.info("simulated vLLM %s serving %s on http://%s:%d (tp=%d, %d blocks of %d, time scale %g)",
             VLLM_VERSION, model, args.host, args.port, args.tp, num_blocks, args.block_size, args.time_scale)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    done, _ = await asyncio.wait([engine_task, asyncio.create_task(stop.wait())],
                                 return_when=asyncio.FIRST_COMPLETED)
    died = engine_task in done and engine_task.exception() is not None
    if died:
        log.error("engine loop died", exc_info=engine_task.exception())
    engine_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await engine_task
    await runner.cleanup()
    await server.close()
    if publisher is not None:
        await publisher.close()
    if died:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
