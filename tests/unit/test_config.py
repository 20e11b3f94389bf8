"""routes.yaml validation: every error names file, key path, found and expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from router.cli import main as cli_main
from router.config import DEFAULT_CONFIG_PATH, Config, load_config, parse_config
from router.core.scheduling import profile_of, validate_policy_params
from yamlcheck import ConfigError

ROOT = Path(__file__).resolve().parents[2]
GOOD = {
    "models": [{"name": "m", "aliases": ["a"], "backends": [
        {"url": "http://127.0.0.1:8101"},
        {"url": "http://127.0.0.1:8102/", "tensor_parallel_size": 4, "weight": 2,
         "labels": {"zone": "b"}, "api_key": "sk-x"},
        "http://127.0.0.1:8103",
    ]}],
}


def error(data: object, **kw: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "routes.yaml", **kw)
    return info.value


def test_minimal_config_gets_documented_defaults() -> None:
    cfg = parse_config(GOOD, "routes.yaml")
    assert isinstance(cfg, Config)
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8000
    assert cfg.routing.policy == "cache_aware"
    assert cfg.health.interval == 1.0
    assert cfg.proxy.max_attempts == 3
    backends = cfg.models[0].backends
    assert [b.url for b in backends] == ["http://127.0.0.1:8101", "http://127.0.0.1:8102",
                                         "http://127.0.0.1:8103"]
    assert backends[1].tensor_parallel_size == 4 and backends[1].weight == 2.0
    assert backends[1].labels == {"zone": "b"} and backends[1].api_key == "sk-x"
    assert cfg.aliases() == {"a": "m"}


def test_config_is_frozen() -> None:
    cfg = parse_config(GOOD)
    with pytest.raises(AttributeError):
        cfg.server.port = 1  # type: ignore[misc]


def test_unknown_key_has_path_and_did_you_mean() -> None:
    exc = error({**GOOD, "helth": {}})
    assert exc.file == "routes.yaml" and exc.path == "helth"
    assert "did you mean 'health'" in str(exc)
    exc = error({"models": [{"name": "m", "backends": [{"url": "http://h:1", "wieght": 2}]}]})
    assert exc.path == "models[0].backends[0].wieght"
    assert "did you mean 'weight'" in str(exc)


@pytest.mark.parametrize("backend, path, found, expected", [
    ({"url": "ftp://x"}, "models[0].backends[1].url", "'ftp://x'", "http(s) URL"),
    ({"url": 8101}, "models[0].backends[1].url", "int 8101", "expected a string"),
    ({"url": "http://h:1", "tensor_parallel_size": 0}, "models[0].backends[1].tensor_parallel_size",
     "found 0", ">= 1"),
    ({"url": "http://h:1", "tensor_parallel_size": "4"}, "models[0].backends[1].tensor_parallel_size",
     "str '4'", "an integer"),
    ({"url": "http://h:1", "weight": -1}, "models[0].backends[1].weight", "found -1", "greater than 0"),
    ({"url": "http://h:99999"}, "models[0].backends[1].url", "99999", "valid port"),
])
def test_bad_backend_values(backend: dict, path: str, found: str, expected: str) -> None:
    data = {"models": [{"name": "m", "backends": [{"url": "http://h:2"}, backend]}]}
    exc = error(data)
    assert exc.path == path
    assert found in str(exc) and expected in str(exc)
    assert str(exc).startswith("routes.yaml: " + path)


@pytest.mark.parametrize("section, key, value, fragment", [
    ("server", "port", "80", "expected an integer"),
    ("server", "port", 70000, "<= 65535"),
    ("server", "log_format", "xml", "expected one of json, text"),
    ("server", "max_body_bytes", 10, ">= 1024"),
    ("health", "interval", 0, "greater than 0"),
    ("health", "failure_threshold", 0, ">= 1"),
    ("proxy", "max_attempts", 0, ">= 1"),
    ("proxy", "backoff_max", 0.001, ">= backoff_initial"),
    ("routing", "policy", "round-robin", "did you mean 'round_robin'"),
    ("metrics", "scrape_interval", "1s", "expected a number"),
])
def test_bad_section_values(section: str, key: str, value: object, fragment: str) -> None:
    exc = error({**GOOD, section: {key: value}})
    assert exc.path == f"{section}.{key}"
    assert fragment in str(exc)


def test_structure_errors() -> None:
    assert "expected a mapping" in str(error([1, 2]))
    assert error({"models": {"name": "m"}}).path == "models"
    assert "at least one model" in str(error({"models": []}))
    exc = error({"models": [{"name": "m", "backends": []}]})
    assert exc.path == "models[0].backends" and "at least one backend" in str(exc)
    assert error({"models": [{"backends": ["http://h:1"]}]}).path == "models[0].name"


def test_duplicates_are_errors() -> None:
    dup_model = {"models": [{"name": "m", "backends": ["http://h:1"]},
                            {"name": "m", "backends": ["http://h:2"]}]}
    exc = error(dup_model)
    assert exc.path == "models[1].name" and "models[0].name" in str(exc)
    dup_alias = {"models": [{"name": "m", "backends": ["http://h:1"]},
                            {"name": "n", "aliases": ["m"], "backends": ["http://h:2"]}]}
    assert error(dup_alias).path == "models[1].aliases[0]"
    dup_url = {"models": [{"name": "m", "backends": ["http://h:1", "http://h:1/"]}]}
    assert error(dup_url).path == "models[0].backends[1]"


def test_api_key_from_environment() -> None:
    data = {"models": [{"name": "m", "backends": [{"url": "http://h:1", "api_key_env": "K"}]}]}
    assert parse_config(data, env={"K": "secret"}).models[0].backends[0].api_key == "secret"
    exc = error(data, env={})
    assert exc.path == "models[0].backends[0].api_key_env" and "'K' is not set" in str(exc)


def test_policy_params_are_validated_with_their_path() -> None:
    cfg = parse_config({**GOOD, "routing": {"policy": "least_load", "params": {"use_scrapped": True}}},
                       "routes.yaml")
    with pytest.raises(ConfigError) as info:
        validate_policy_params(cfg)
    assert info.value.path == "routing.params.use_scrapped"
    assert "did you mean 'use_scraped'" in str(info.value)


@pytest.mark.parametrize(("routing", "path", "fragment"), [
    ({"terms": {"prefil": 1.0}}, "routing.terms.prefil", "did you mean 'prefill'"),
    ({"terms": {"queue": -1}}, "routing.terms.queue", ">= 0"),
    ({"terms": {"queue": "fast"}}, "routing.terms.queue", "expected a number"),
    ({"terms": {"queue": float("inf")}}, "routing.terms.queue", "finite"),
    ({"terms": {"queue": 0, "prefill": 0}}, "routing.terms", "at least one cost term with a weight > 0"),
    ({"terms": [1, 2]}, "routing.terms", "expected a mapping of cost term names to weights"),
    ({"policy": "round_robin", "terms": {"queue": 1}}, "routing.terms", "sums no cost terms"),
    ({"terms": {"eviction": 1}, "params": {"eviction_weight": 2}}, "routing.params.eviction_weight",
     "routing.terms.eviction"),
    ({"params": {"kv_pressure_onset": 1.5}}, "routing.params.kv_pressure_onset", "<= 0.99"),
])
def test_routing_terms_are_validated_with_their_path(routing: dict, path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_policy_params(parse_config({**GOOD, "routing": routing}, "routes.yaml"))
    assert info.value.path == path and info.value.file == "routes.yaml"
    assert fragment in info.value.message, info.value.message


def test_routing_terms_set_the_profile_weights() -> None:
    cfg = parse_config({**GOOD, "routing": {"terms": {"prefill": 1.0, "queue": 0.5, "kv_pressure": 2}}})
    cost = profile_of(cfg.routing).cost
    assert cost is not None and cost.weights == {"prefill": 1.0, "queue": 0.5, "kv_pressure": 2.0}
    default = profile_of(parse_config(GOOD).routing).cost
    assert default is not None and default.weights == {"queue": 1.0, "prefill": 1.0, "eviction": 2.0, "lora": 1.0}
    legacy = profile_of(parse_config({**GOOD, "routing": {"params": {"eviction_weight": 0.5}}}).routing).cost
    assert legacy is not None and legacy.weights["eviction"] == 0.5
    session = parse_config({**GOOD, "routing": {"policy": "session", "terms": {"prefill": 1}}})
    cost = profile_of(session.routing).cost  # the cache_aware fallback of requests without a key
    assert cost is not None and cost.weights == {"prefill": 1.0}


def test_launch_block(tmp_path: Path) -> None:
    (tmp_path / "engines.yaml").write_text("models: []\n")
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"launch": {"config": "engines.yaml"},
                                      "models": [{"name": "m"}]}))
    cfg = load_config(routes)
    assert cfg.launch is not None and cfg.launch.config == str(tmp_path / "engines.yaml")
    assert cfg.models[0].backends == ()  # they come from the launched engines
    exc = error({"launch": {"config": "nope.yaml"}})
    assert exc.path == "launch.config" and "no file" in str(exc)
    assert error({"launch": {}}).path == "launch"
    inline = parse_config({"launch": {"models": [{"name": "s", "kind": "sim"}]}})
    assert inline.launch is not None and inline.launch.inline is not None


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    bad = tmp_path / "routes.yaml"
    bad.write_text("models:\n  - name: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(bad) in str(info.value) and "line" in str(info.value)


def test_embedded_default_config_is_valid() -> None:
    assert DEFAULT_CONFIG_PATH == ROOT / "config" / "routes.yaml"
    assert cli_main(["check-config", str(DEFAULT_CONFIG_PATH)]) == 0
    cfg = load_config(DEFAULT_CONFIG_PATH)
    assert cfg.server.port == 8000 and cfg.routing.policy == "cache_aware"
    assert cfg.launch is not None


def test_check_config_command_exit_status(tmp_path: Path) -> None:
    bad = tmp_path / "routes.yaml"
    bad.write_text(yaml.safe_dump({"models": [{"name": "m", "backends": [{"url": "http://h:1",
                                                                          "tensor_parallel": 2}]}]}))
    proc = subprocess.run([sys.executable, "-m", "router", "check-config", str(bad)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert f"{bad}: models[0].backends[0].tensor_parallel: unknown key" in proc.stderr
    assert "did you mean 'tensor_parallel_size'" in proc.stderr
    assert "Traceback" not in proc.stderr
    # Serving with a bad config is the same error and the same status.
    assert cli_main(["--config", str(bad)]) == 2
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(GOOD))
    proc = subprocess.run([sys.executable, "-m", "router", "check-config", str(good)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout


FOUR_MISTAKES = """\
server:
  log_format: jsn
models:
  - backends: ["http://127.0.0.1:8101"]
  - name: m2
    backends: ["http://127.0.0.1:8102"]
    aliasses: [x]
routing:
  policy: cache_aware
  params: {load_factr: 2}
health:
  interval: -1
"""


def test_check_config_reports_every_error_in_file_order(tmp_path: Path) -> None:
    """Four mistakes, found in one run (not four) and listed in file order: the routing
    parameter is checked after the whole file is read, a model without a name is taken out
    and the next one keeps its index in the file."""
    bad = tmp_path / "routes.yaml"
    bad.write_text(FOUR_MISTAKES)
    proc = subprocess.run([sys.executable, "-m", "router", "check-config", str(bad)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    paths = [line.split(": ")[2] for line in lines]
    assert paths == ["server.log_format", "models[0].name", "models[1].aliasses",
                     "routing.params.load_factr", "health.interval"], proc.stderr
    assert "did you mean 'json'" in lines[0] and "required key is missing" in lines[1]
    assert proc.stderr.splitlines()[-1] == f"{bad}: 5 problems"
    # One mistake reads as before: one error, no count.
    one = tmp_path / "one.yaml"
    one.write_text(FOUR_MISTAKES.split("models:")[0] + "models: [{name: m, backends: [http://h:1]}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(one)
    assert not hasattr(info.value, "errors") and info.value.path == "server.log_format"


def test_a_consequence_of_a_reported_mistake_is_not_reported() -> None:
    """The only model has no name: taken out, "expected at least one model" would follow.
    The search ends there (what the file says after it is checked on the next run)."""
    from yamlcheck import every_error

    with pytest.raises(ConfigError) as info:
        every_error({"models": [{"backends": ["http://h:1"]}], "server": {"port": "x"}}, None,
                    lambda data: parse_config(data, None))
    assert info.value.path == "models[0].name" and "required key is missing" in str(info.value)
    assert "at least one model" not in str(info.value)


# -- the front door's keys (production hardening) ----------------------------------------
def test_credentials_in_backend_urls_are_refused_without_quoting_them() -> None:
    for url in ("http://user:hunter2secret@h:1", "http://hunter2secret@h:1"):
        exc = error({"models": [{"name": "m", "backends": [{"url": url, "api_key": "k"}]}]})
        assert exc.path == "models[0].backends[0].url"
        assert "credentials in the URL" in str(exc) and "hunter2secret" not in str(exc)
    exc = error({"models": [{"name": "m", "backends": ["http://u:hunter2secret@h:1"]}]})
    assert "hunter2secret" not in str(exc)


def test_secrets_come_from_config_env_or_file_and_never_show(tmp_path: Path) -> None:
    (tmp_path / "b.key").write_text("sk-from-a-file-123\n")
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump({"keys": [
        {"name": "c", "key": "sk-from-keys-file-1", "models": ["m"]}]}))
    data = {**GOOD, "auth": {
        "keys": [{"name": "a", "key_env": "A_KEY", "priority": 2,
                  "rate_limit": {"requests_per_s": 5, "tokens_per_min": 1000}},
                 {"name": "b", "key_file": "b.key"}],
        "keys_file": "keys.yaml", "admin_key": "admin-secret-1", "protect_metrics": True}}
    cfg = parse_config(data, tmp_path / "routes.yaml", env={"A_KEY": "sk-from-env-12345"})
    keys = {k.name: k for k in cfg.auth.keys}
    assert keys["a"].key == "sk-from-env-12345" and keys["a"].priority == 2
    assert keys["a"].rate_limit.requests_per_s == 5 and keys["a"].rate_limit.tokens_per_min == 1000
    assert keys["b"].key == "sk-from-a-file-123" and keys["c"].models == ("m",)
    assert cfg.auth.admin_key == "admin-secret-1" and cfg.auth.protect_metrics
    text = repr(cfg)
    assert not any(s in text for s in ("sk-from", "admin-secret", "sk-x"))


@pytest.mark.parametrize("auth, path, fragment", [
    ({"keys": [{"name": "a"}]}, "auth.keys[0].key", "one of key, key_env, key_file"),
    ({"keys": [{"name": "a", "key": "short"}]}, "auth.keys[0].key", "at least 8"),
    ({"keys": [{"name": "a", "key": 12345678}]}, "auth.keys[0].key", "expected a string"),
    ({"keys": [{"name": "a", "key": "sk-1234567 8"}]}, "auth.keys[0].key", "whitespace"),
    ({"keys": [{"name": "a", "key": "sk-12345678", "key_env": "X"}]}, "auth.keys[0].key_env",
     "only one of"),
    ({"keys": [{"name": "a", "key": "sk-12345678"}, {"name": "a", "key": "sk-87654321"}]},
     "auth.keys[1].name", "already used"),
    ({"keys": [{"name": "a", "key": "sk-12345678"}, {"name": "b", "key": "sk-12345678"}]},
     "auth.keys[1]", "same as the key at auth.keys[0]"),
    ({"keys": [{"name": "a", "key_file": "/nonexistent/k"}]}, "auth.keys[0].key_file",
     "cannot read"),
    ({"keys": [{"name": "a", "key": "sk-12345678", "rate_limit": {"burst": 3}}]},
     "auth.keys[0].rate_limit", "requests_per_s"),
    ({"admin_key_env": "NOPE"}, "auth.admin_key_env", "'NOPE' is not set"),
])
def test_bad_auth(auth: dict, path: str, fragment: str) -> None:
    exc = error({**GOOD, "auth": auth}, env={})
    assert exc.path == path and fragment in str(exc)
    assert "sk-1234567" not in str(exc) and "sk-8765" not in str(exc)


@pytest.mark.parametrize("section, value, path, fragment", [
    ("server", {"forward_paths": ["/v1/load_lora_adapter"]}, "server.forward_paths[0]",
     "management"),
    ("server", {"forward_paths": ["/admin/faults"]}, "server.forward_paths[0]", "management"),
    ("server", {"forward_paths": ["/v1/x%2F"]}, "server.forward_paths[0]", "plain absolute path"),
    ("server", {"forward_paths": ["/v1/models"]}, "server.forward_paths[0]", "serves this path"),
    ("server", {"forward_paths": []}, "server.forward_paths", "at least one"),
    ("server", {"trusted_proxies": ["10.0.0.0/33"]}, "server.trusted_proxies[0]", "CIDR"),
    ("server", {"max_body_bytes": 4096, "max_inflight_body_bytes": 2048},
     "server.max_inflight_body_bytes", ">= max_body_bytes"),
    ("cors", {"allow_origins": ["app.example.com"]}, "cors.allow_origins[0]", "an origin like"),
    ("cors", {"allow_origins": ["*"], "allow_credentials": True}, "cors.allow_credentials",
     "cannot be used"),
    ("admission", {"max_kv_usage": 1.5}, "admission.max_kv_usage", "<= 1"),
    ("admission", {"queue_size": -1}, "admission.queue_size", ">= 0"),
    ("admission", {"max_queue_time": -1}, "admission.max_queue_time", ">= 0"),
    ("circuit_breaker", {"ejection_time": 10, "max_ejection_time": 5},
     "circuit_breaker.max_ejection_time", ">= ejection_time"),
    ("proxy", {"first_byte_timeout": 0}, "proxy.first_byte_timeout", "greater than 0"),
    ("proxy", {"pool_timeout": -1}, "proxy.pool_timeout", ">= 0"),
    ("auth", {"admin_replica_networks": ["10.0.0.0/8", "10.0.0.300/32"]},
     "auth.admin_replica_networks[1]", "CIDR"),
    ("auth", {"admin_replica_networks": "10.0.0.0/8"}, "auth.admin_replica_networks", "list"),
    ("admission", {"enabeld": True}, "admission.enabeld", "did you mean 'enabled'"),
    ("circuit_breaker", {"latency_factor": 0.5}, "circuit_breaker.latency_factor",
     "0 (off) or a factor above 1"),
    ("circuit_breaker", {"latency_min_requests": 0}, "circuit_breaker.latency_min_requests", ">= 1"),
    ("circuit_breaker", {"max_ejection_percent": 120}, "circuit_breaker.max_ejection_percent",
     "<= 100"),
    ("proxy", {"hedge": {"min_delay": 2, "max_delay": 1}}, "proxy.hedge.max_delay", ">= min_delay"),
    ("proxy", {"hedge": {"multiplier": 0.5}}, "proxy.hedge.multiplier", ">= 1"),
    ("proxy", {"hedge": {"enabled": "yes"}}, "proxy.hedge.enabled", "true or false"),
    ("proxy", {"hedge": {"paths": ["/v1/completions", "v1/x"]}}, "proxy.hedge.paths[1]",
     "starting with '/'"),
    ("proxy", {"hedge": {"delay": 1}}, "proxy.hedge.delay", "unknown"),
])
def test_bad_front_door_values(section: str, value: dict, path: str, fragment: str) -> None:
    exc = error({**GOOD, section: value})
    assert exc.path == path and fragment in str(exc)


def test_front_door_defaults() -> None:
    cfg = parse_config(GOOD, "routes.yaml")
    assert "/v1/chat/completions" in cfg.server.forward_paths and not cfg.auth.enabled
    assert cfg.server.header_timeout == 10 and cfg.proxy.first_byte_timeout == 60
    assert cfg.admission.enabled and cfg.circuit_breaker.failure_threshold == 5
    assert not cfg.cors.allow_origins
    assert cfg.proxy.pool_timeout == 5 and cfg.auth.admin_replica_networks is None
    listed = parse_config({**GOOD, "auth": {"admin_replica_networks": ["10.0.0.0/8", "fd00::/8"]},
                           "proxy": {"pool_timeout": 0}})
    assert [str(n) for n in listed.auth.admin_replica_networks] == ["10.0.0.0/8", "fd00::/8"]
    assert listed.proxy.pool_timeout == 0
    assert parse_config({**GOOD, "auth": {"admin_replica_networks": []}}).auth.admin_replica_networks == ()
    # Latency ejection on, hedging off; when on, hedges only requests without side effects.
    assert cfg.circuit_breaker.latency_factor == 2.5 and cfg.circuit_breaker.latency_min_requests == 10
    assert cfg.circuit_breaker.max_ejection_percent == 50
    hedge = cfg.proxy.hedge
    assert not hedge.enabled and hedge.min_delay == 0.01 and hedge.max_delay == 30
    assert hedge.paths == ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def test_the_configuration_guides_example_is_a_valid_config(tmp_path) -> None:
    """Every key the configuration guide (docs/configuration-guide.md) shows parses, with the
    values it shows."""
    import re
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[2] / "docs" / "configuration-guide.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", guide, re.S).group(1)
    key_file = tmp_path / "batch_key"
    key_file.write_text("sk-batch-0123456789\n")
    (tmp_path / "engines.yaml").write_text("models: []\n")
    text = block.replace("/run/secrets/batch_key", str(key_file))
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    env = {"TEAM_A_KEY": "sk-team-a-0123456789", "ROUTER_ADMIN_KEY": "admin-0123456789",
           "LLAMA_KEY": "backend-0123456789"}
    cfg = load_config(path, env=env)
    assert cfg.auth.keys[0].name == "team-a" and cfg.auth.keys[0].key == env["TEAM_A_KEY"]
    assert cfg.auth.keys[1].key == "sk-batch-0123456789"
    assert cfg.auth.keys[0].rate_limit.tokens_per_min == 200000
    assert cfg.cors.allow_origins == ("https://chat.example.com",)
    assert cfg.admission.queue_size == 1024 and cfg.circuit_breaker.failure_threshold == 5
    assert cfg.proxy.first_byte_timeout == 60 and cfg.server.header_timeout == 10
    assert "/v1/embeddings" in cfg.server.forward_paths
    assert cfg.models[0].tokenizer == "replica" and cfg.prefix.exact.relearn_s == 10
    assert cfg.proxy.pool_timeout == 5 and cfg.auth.admin_replica_networks is None


def test_tokenizer_paths_and_exact_settings(tmp_path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_text("{}")
    doc = {"models": [{"name": "m", "tokenizer": "model", "backends": ["http://127.0.0.1:9"]}],
           "prefix": {"exact": {"relearn_s": 0, "confirm_s": 0.5}}}
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(doc))
    cfg = load_config(path)
    assert cfg.models[0].tokenizer == str(model_dir)  # relative to the config file
    assert cfg.prefix.exact.relearn_s == 0 and cfg.prefix.exact.confirm_s == 0.5
    doc["models"][0]["tokenizer"] = "missing"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "models[0].tokenizer" in str(err.value) and "tokenizer.json" in str(err.value)
    assert str(path) in str(err.value)
    doc["models"][0]["tokenizer"] = "replica"
    doc["prefix"]["exact"] = {"relearn": 1}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "prefix.exact.relearn" in str(err.value) and "relearn_s" in str(err.value)


def test_roles_lora_and_disaggregation_sections() -> None:
    doc = {"models": [{"name": "m", "backends": [
        {"url": "http://127.0.0.1:8101", "role": "prefill"},
        {"url": "http://127.0.0.1:8102", "role": "decode"},
        {"url": "http://127.0.0.1:8103"}],
        "lora": {"adapters": {"sql": "/adapters/sql"}, "dynamic_loading": True},
        "disaggregation": {"min_prompt_tokens": 128}}]}
    model = parse_config(doc, "routes.yaml").models[0]
    assert model.disaggregated and [b.role for b in model.backends] == ["prefill", "decode", "both"]
    assert model.lora.adapters == {"sql": "/adapters/sql"} and model.lora.dynamic_loading
    assert model.disaggregation.min_prompt_tokens == 128 and model.disaggregation.skip_cached_fraction == 0.8
    assert not parse_config(GOOD, "routes.yaml").models[0].disaggregated

    bad_role = {"models": [{"name": "m", "backends": [{"url": "http://127.0.0.1:8101", "role": "prefil"}]}]}
    message = str(error(bad_role))
    assert "routes.yaml" in message and "models[0].backends[0].role" in message and "prefill" in message
    lonely = {"models": [{"name": "m", "backends": [{"url": "http://127.0.0.1:8101", "role": "prefill"}]}]}
    assert "no decode backend" in str(error(lonely))
    no_paths = {"models": [{"name": "m", "backends": ["http://127.0.0.1:8101"],
                            "lora": {"dynamic_loading": True}}]}
    assert "models[0].lora.dynamic_loading" in str(error(no_paths))
    clash = {"models": [{"name": "m", "backends": ["http://127.0.0.1:8101"],
                         "lora": {"adapters": {"m": "/x"}}}]}
    assert "already used" in str(error(clash))


def test_discovery_sections() -> None:
    doc = {"models": [{"name": "m", "discovery": {
        "dns": {"name": "vllm.llm.svc.cluster.local.", "port": 8000,
                "nameservers": ["10.96.0.10", "127.0.0.1:5353"], "interval": 20},
        "kubernetes": {"namespace": "llm", "service": "vllm", "port_name": "http"},
        "backend": {"tensor_parallel_size": 2, "labels": {"pool": "a"},
                    "kv_events": {"port": 5557, "replay_port": 5558, "topic": "kv"}}}}]}
    discovery = parse_config(doc, "routes.yaml").models[0].discovery
    assert discovery is not None and discovery.dns is not None and discovery.kubernetes is not None
    assert discovery.dns.name == "vllm.llm.svc.cluster.local" and discovery.dns.record == "A"
    assert discovery.dns.nameservers == (("10.96.0.10", 53), ("127.0.0.1", 5353))
    assert discovery.dns.interval == 20 and discovery.dns.min_interval == 1.0
    assert discovery.kubernetes.service == "vllm" and discovery.kubernetes.kubeconfig is None
    assert discovery.template.tensor_parallel_size == 2 and discovery.kv_events_port == 5557
    assert discovery.max_replicas == 1024

    def discovery_error(section: dict) -> str:
        return str(error({"models": [{"name": "m", "discovery": section}]}))

    assert "models[0].discovery: expected dns: or kubernetes:" in discovery_error({"scheme": "http"})
    message = discovery_error({"dns": {"name": "x", "record": "SRV", "port": 80}})
    assert "models[0].discovery.dns.port" in message and "SRV records carry" in message
    assert "models[0].discovery.dns.nameservers[0]" in discovery_error(
        {"dns": {"name": "x", "port": 80, "nameservers": ["dns.example"]}})
    assert "exactly one of service" in discovery_error(
        {"kubernetes": {"namespace": "n", "service": "s", "selector": {"app": "v"}}})
    assert "models[0].discovery.kubernetes.namespace" in discovery_error({"kubernetes": {"service": "s"}})
    assert "did you mean 'interval'" in discovery_error({"dns": {"name": "x", "port": 80, "intervall": 3}})
