"""What a scenario file may name: modes, workload, arrival, fleet and target kinds, each
router's policies, and every workload's parameters with their defaults.

The parser (benchmarks/scenario.py) checks a file against these; the report orders its
targets by TARGET_KINDS, and the tests walk WORKLOAD_PARAMS.  They are plain data, kept
apart from the parsing so that a new policy or parameter is one edit in one place.
"""

from __future__ import annotations

from typing import Any

WORKLOAD_KINDS = ("multi_turn", "shared_prefix", "agentic", "no_reuse", "lora", "trace")
ARRIVAL_KINDS = ("poisson", "sweep", "closed", "trace")
FLEET_KINDS = ("sim", "real")
MODES = ("routing", "overhead")

OUR_POLICIES = ("round_robin", "least_load", "prefix_affinity", "session", "cache_aware",
                "power_of_two", "random")
PEER_POLICIES = {
    "vllm-router": ("cache_aware", "round_robin", "kv_aware", "power_of_two", "random",
                    "consistent_hash", "sticky_least_loaded"),
    "sglang-router": ("cache_aware", "round_robin", "power_of_two", "random"),
    # smg (Shepherd Model Gateway) 1.13, the successor of sglang-router
    "smg": ("cache_aware", "least_load", "prefix_hash", "round_robin", "power_of_two", "random",
            "consistent_hashing"),
}
# envoy-picker: Envoy 1.40 carries the bytes and asks our router over ext_proc (`router pick`)
TARGET_KINDS = ("ours", "envoy-picker", "vllm-router", "smg", "sglang-router", "direct")

# Per workload kind: parameter -> (default, kind) where kind is "int", "num", "bool" or "str".
WORKLOAD_PARAMS: dict[str, dict[str, tuple[Any, str]]] = {
    "multi_turn": {
        "users": (16, "int"),
        "rounds": (4, "int"),
        "system_prompt_tokens": (1000, "int"),
        "history_tokens": (0, "int"),  # each user's own earlier conversation, before round 1
        "question_tokens": (50, "int"),
        "answer_tokens": (100, "int"),
        "think_time_s": (1.0, "num"),
    },
    "shared_prefix": {
        "groups": (16, "int"),
        "prompts_per_group": (8, "int"),
        "prefix_tokens": (2000, "int"),
        "question_tokens": (128, "int"),
        "answer_tokens": (64, "int"),
        "zipf": (0.0, "num"),  # 0: every group gets prompts_per_group; s > 0: Zipf(s) popularity
    },
    "agentic": {
        "agents": (4, "int"),
        "steps": (12, "int"),
        "system_prompt_tokens": (1500, "int"),
        "context_tokens": (4000, "int"),
        "tool_result_tokens": (200, "int"),
        "answer_tokens": (48, "int"),
        "think_time_s": (0.0, "num"),
        "tool_calls": (False, "bool"),  # a real tool loop: each answer calls the tool (agent_apis.py)
    },
    "lora": {  # one adapter per task: its own instructions, Zipf-popular; names adapter-0..N-1
        "adapters": (8, "int"),
        "requests": (200, "int"),
        "prompt_tokens": (600, "int"),  # the adapter's task instructions, shared by its requests
        "question_tokens": (60, "int"),
        "answer_tokens": (48, "int"),
        "zipf": (1.0, "num"),
    },
    "trace": {  # a public production trace, replayed at its timestamps (benchmarks/trace.py)
        "file": ("benchmarks/traces/mooncake/conversation_trace.jsonl", "str"),
        "start_s": (0.0, "num"),  # the window: trace seconds [start_s, start_s + duration_s)
        "duration_s": (120.0, "num"),
        "time_scale": (1.0, "num"),  # arrivals this many times faster (load)
        "token_scale": (0.25, "num"),  # prompt lengths (and the 512-token blocks) times this
        "output_scale": (1.0, "num"),
        "max_requests": (0, "int"),  # 0: the whole window
    },
    "no_reuse": {
        "requests": (128, "int"),
        "prompt_tokens": (1000, "int"),
        "answer_tokens": (64, "int"),
    },
}
