"""The router's parts on their own: metrics parsing, health state machine, baseline
policies, the alias rewrite and the RouteRequest builder (no network)."""

from __future__ import annotations

import orjson
import pytest

from router.config import HealthConfig, MetricsConfig
from router.core.requests import BodyError, RouteRequest, build_route_request, rewrite_model, validate_body
from router.core.scheduling import build_profile as build_policy
from router.fleet.engine_load import EngineLoad
from router.fleet.monitor import Monitor
from router.fleet.replicas import Fleet, Health, Replica
from router.fleet.vllm_metrics import parse_engine_load, parse_models
from router.observability.telemetry import Telemetry
from router.prefix.index import PrefixIndex
from yamlcheck import Node

# Two data-parallel engines of one server (vLLM 0.32 names), plus another model's series.
METRICS_NEW = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_running{engine="0",model_name="other"} 50.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting{engine="1",model_name="m"} 4.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 500.0
vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7e+09
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 300.0
vllm:prefix_cache_hits_total{engine="1",model_name="m"} 100.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",enable_prefix_caching="True",engine="0",model_name="m",num_gpu_blocks="1000",num_cpu_blocks="None"} 1.0
vllm:cache_config_info{block_size="16",enable_prefix_caching="True",engine="1",model_name="m",num_gpu_blocks="1000",num_cpu_blocks="None"} 1.0
"""  # noqa: E501

# Older vLLM: gpu_* names, no model filter needed.
METRICS_LEGACY = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 0.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.75
# TYPE vllm:gpu_prefix_cache_queries counter
vllm:gpu_prefix_cache_queries_total{model_name="m"} 64.0
# TYPE vllm:gpu_prefix_cache_hits counter
vllm:gpu_prefix_cache_hits_total{model_name="m"} 32.0
"""


def test_parse_engine_load_sums_engines_and_filters_models() -> None:
    load = parse_engine_load(METRICS_NEW, ["m"], scraped_at=1.0)
    assert (load.running, load.waiting) == (5.0, 5.0)
    assert load.kv_cache_usage == pytest.approx(0.375)  # a fraction: averaged over engines
    assert (load.prefix_cache_queries, load.prefix_cache_hits) == (1500.0, 400.0)
    assert (load.block_size, load.num_gpu_blocks) == (16, 2000)
    unfiltered = parse_engine_load(METRICS_NEW, ["unknown-name"])
    assert unfiltered.running == 55.0  # no name matched: every series counts


def test_the_intake_rate_is_what_the_engine_took_into_its_batch_since_the_last_scrape() -> None:
    def page(running: float, stop: float, length: float) -> str:
        return ("# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{engine="0",model_name="m"}} {running}\n'
                "# TYPE vllm:request_success counter\n"
                f'vllm:request_success_total{{engine="0",finished_reason="stop",model_name="m"}} {stop}\n'
                f'vllm:request_success_total{{engine="0",finished_reason="length",model_name="m"}} {length}\n')
    first = parse_engine_load(page(10, 3, 2), ["m"], scraped_at=100.0)
    assert (first.finished, first.intake_rate) == (5.0, None)
    # 0.5 s later: 4 more running and 6 more finished: 10 taken in, 20 a second
    second = parse_engine_load(page(14, 7, 4), ["m"], scraped_at=100.5, previous=first)
    assert second.intake_rate == pytest.approx(20.0)
    assert parse_engine_load(page(4, 7, 4), ["m"], scraped_at=101.0, previous=second).intake_rate == 0.0
    assert parse_engine_load(page(1, 0, 0), ["m"], scraped_at=101.0, previous=second).intake_rate is None  # restarted


def test_parse_engine_load_accepts_legacy_names() -> None:
    load = parse_engine_load(METRICS_LEGACY, ["m"])
    assert load.kv_cache_usage == 0.75
    assert (load.prefix_cache_queries, load.prefix_cache_hits) == (64.0, 32.0)
    assert load.block_size is None and load.num_gpu_blocks is None


def test_parse_models() -> None:
    names, max_len = parse_models(orjson.dumps({"object": "list", "data": [
        {"id": "m", "max_model_len": 2048}, {"id": "m-lora", "max_model_len": 4096}]}))
    assert names == {"m", "m-lora"} and max_len == 4096


def monitor_for(replica: Replica, **health: int) -> Monitor:
    return Monitor(Fleet([replica]), session=None,  # type: ignore[arg-type]
                   health=HealthConfig(**health), metrics=MetricsConfig(), telemetry=Telemetry())


def test_health_state_machine() -> None:
    replica = Replica(url="http://r", model="m")
    monitor = monitor_for(replica, failure_threshold=3, success_threshold=2)
    assert replica.health is Health.UNKNOWN and not replica.routable
    monitor.record_probe(replica, True)
    assert replica.health is Health.HEALTHY  # a late replica joins on its first pass
    monitor.record_probe(replica, False)
    assert replica.health is Health.SUSPECT and replica.routable
    monitor.record_probe(replica, True)
    assert replica.health is Health.HEALTHY
    for _ in range(3):
        monitor.record_probe(replica, False)
    assert replica.health is Health.UNHEALTHY and not replica.routable
    monitor.record_probe(replica, True)
    assert replica.health is Health.UNHEALTHY  # needs success_threshold passes
    monitor.record_probe(replica, True)
    assert replica.health is Health.HEALTHY
    monitor.mark_suspect(replica)  # request-path connect failure
    assert replica.health is Health.SUSPECT
    text = monitor.telemetry.render()[0].decode()  # type: ignore[union-attr]
    assert 'router_replica_health{model="m",replica="http://r",state="suspect"} 1.0' in text


def replicas(n: int) -> list[Replica]:
    return [Replica(url=f"http://r{i}", model="m", health=Health.HEALTHY) for i in range(n)]


REQ = RouteRequest(model="m", path="/v1/completions", body=b"{}")


def test_round_robin_rotates_and_puts_suspects_last() -> None:
    policy = build_policy("round_robin", Node({}, "routing.params"))
    fleet = replicas(3)
    firsts = [policy.rank(REQ, fleet, PrefixIndex()).ranked[0].url for _ in range(6)]
    assert firsts == ["http://r0", "http://r1", "http://r2"] * 2
    fleet[1].health = Health.SUSPECT
    for _ in range(3):
        ranked = policy.rank(REQ, fleet, PrefixIndex()).ranked
        assert ranked[-1] is fleet[1] and len(ranked) == 3
    with pytest.raises(Exception) as info:
        build_policy("round_robin", Node({"x": 1}, "routing.params"))
    assert "routing.params.x" in str(info.value)


def test_least_load_counts_in_flight_and_scraped_load() -> None:
    policy = build_policy("least_load", Node({}, "routing.params"))
    fleet = replicas(3)
    fleet[0].in_flight = 2
    fleet[1].load = EngineLoad(running=1, waiting=3)
    assert policy.rank(REQ, fleet, PrefixIndex()).ranked == [fleet[2], fleet[0], fleet[1]]
    fleet[2].weight = 0.1  # a small replica: 1 request weighs 10
    fleet[2].in_flight = 1
    assert policy.rank(REQ, fleet, PrefixIndex()).ranked[0] is fleet[0]
    # Ties share the traffic instead of piling on the first replica.
    idle = replicas(4)
    firsts = {policy.rank(REQ, idle, PrefixIndex()).ranked[0].url for _ in range(8)}
    assert len(firsts) == 4
    ignoring = build_policy("least_load", Node({"use_scraped": False}, "routing.params"))
    assert ignoring.rank(REQ, fleet[:2], PrefixIndex()).ranked[0] is fleet[1]


def test_rewrite_model_keeps_every_other_byte() -> None:
    raw = b'{"messages":[{"role":"user","content":"model \\"x\\""}],\n "model" : "alias" ,"n":1}'
    out = rewrite_model(raw, orjson.loads(raw), "canon")
    assert out == raw.replace(b'"alias"', b'"canon"')
    nested_only = b'{"x": {"model": "alias"}, "model":"alias"}'
    assert rewrite_model(nested_only, orjson.loads(nested_only), "c") == b'{"x": {"model": "alias"}, "model":"c"}'
    escaped_key = b'{"mod\\u0065l": "alias", "p": 1}'  # unusual spelling: re-encoded, still right
    assert orjson.loads(rewrite_model(escaped_key, orjson.loads(escaped_key), "c"))["model"] == "c"


def test_validate_body_and_build_route_request() -> None:
    with pytest.raises(BodyError) as info:
        validate_body("/v1/completions", {"model": "m", "prompt": None})
    assert info.value.param == "prompt"
    data = {"model": "m", "messages": [{"role": "system", "content": "S" * 200},
                                        {"role": "user", "content": "hi"}],
            "stream": True, "user": "u1", "cache_salt": "salt"}
    body = orjson.dumps(data)
    route = build_route_request(model="m", path="/v1/chat/completions", data=validate_body(
        "/v1/chat/completions", data), body=body, request_id="rid", block_chars=64)
    assert route.stream and route.session_key == "u1" and route.cache_salt == "salt"
    assert route.body is body and route.routing_text and route.prompt_chars == len(route.routing_text)
    assert len(route.block_hashes) == len(route.routing_text.encode()) // 64
    longer = {**data, "messages": data["messages"] + [{"role": "assistant", "content": "yo"}]}
    route2 = build_route_request(model="m", path="/v1/chat/completions", data=longer,
                                 body=orjson.dumps(longer))
    assert route2.block_hashes[:len(route.block_hashes)] == route.block_hashes
    tokens = build_route_request(model="m", path="/v1/completions",
                                 data={"model": "m", "prompt": list(range(40))}, body=b"",
                                 session_key="hdr")
    assert tokens.routing_tokens == tuple(range(40)) and len(tokens.block_hashes) == 2
    assert tokens.session_key == "hdr"
