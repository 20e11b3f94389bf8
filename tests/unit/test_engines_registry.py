"""config/engines.yaml: validation with precise errors, and the exact command lines it yields."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from engines.launcher import load_config, parse_config, plan
from yamlcheck import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def cfg(*models, **top):
    return parse_config({"models": list(models), **top}, "engines.yaml")


def vllm_gpu(**over):
    base = {"name": "llama", "kind": "vllm", "model": "meta-llama/Llama-3.1-8B-Instruct"}
    base.update(over)
    return base


def flag(argv, name):
    """The value after `name` in argv (None if absent)."""
    argv = list(argv)
    return argv[argv.index(name) + 1] if name in argv else None


# -- the shipped files ------------------------------------------------------------------------

def test_default_registry_is_a_mixed_tp_sim_fleet():
    config = load_config(ROOT / "config/engines.yaml")
    plans = plan(config)
    sims = [p for p in plans if p.kind == "sim"]
    assert len(sims) >= 4
    assert sorted(p.tensor_parallel_size for p in sims) == [1, 1, 2, 4]
    assert {p.served_model_name for p in sims} == {"sim-llama"}
    for p in sims:
        assert p.argv[1:4] == ("-m", "engines.sim", "--host")
        assert flag(p.argv, "--tp") == str(p.tensor_parallel_size)
        assert flag(p.argv, "--model") == "sim-llama"
        assert flag(p.argv, "--port") == str(p.port)
    assert len({p.port for p in plans}) == len(plans)


def test_cpu_registry_matches_the_verified_recipe():
    config = load_config(ROOT / "config/engines-cpu.yaml")
    plans = plan(config)
    assert len(plans) == 2
    for i, p in enumerate(plans):
        assert p.kind == "vllm"
        assert p.argv[1:3] == ("serve", ".engines/models/tiny-llama")
        assert p.env["VLLM_TARGET_DEVICE"] == "cpu"
        assert p.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        assert p.env["OMP_NUM_THREADS"] == "1"
        assert p.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
        assert p.env["VLLM_CPU_OMP_THREADS_BIND"] == str(i)
        assert "CUDA_VISIBLE_DEVICES" not in p.env
        for f in ("--load-format", "--max-model-len", "--dtype", "--block-size",
                  "--num-gpu-blocks-override", "--kv-events-config"):
            assert f in p.argv
        assert "--enforce-eager" in p.argv and "--enable-prefix-caching" in p.argv
        assert "--enable-prompt-tokens-details" in p.argv
        assert "--gpu-memory-utilization" not in p.argv
        kv = json.loads(flag(p.argv, "--kv-events-config"))
        assert kv["endpoint"].startswith("tcp://*:") and kv["publisher"] == "zmq"
        assert p.kv_events_endpoint == f"tcp://127.0.0.1:{kv['endpoint'].rsplit(':', 1)[1]}"


def test_commented_examples_are_valid_when_uncommented():
    """The GPU and CPU examples in config/engines.yaml stay in sync with the schema."""
    text = (ROOT / "config/engines.yaml").read_text()
    lines = []
    for line in text.splitlines():
        if line.startswith("  # ") and (line[4:6] == "- " or line[4:6] == "  "):
            lines.append("  " + line[4:])
        elif not line.lstrip().startswith("#"):
            lines.append(line)
    config = parse_config(yaml.safe_load("\n".join(lines)), "uncommented")
    kinds = {(m.kind, m.device) for m in config.models}
    assert ("vllm", "gpu") in kinds and ("vllm", "cpu") in kinds
    plans = plan(config)
    gpu = [p for p in plans if p.entry == "llama-8b"]
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in gpu] == ["0,1", "2,3", "4,5,6,7"]


# -- command lines ----------------------------------------------------------------------------

def test_vllm_gpu_command_line_is_exact():
    config = cfg(vllm_gpu(served_model_name="llama-8b", tensor_parallel_size=2,
                          pipeline_parallel_size=2, dtype="bfloat16", gpu_memory_utilization=0.85,
                          max_model_len=8192, quantization="fp8", port=9000, gpus=[4, 5, 6, 7],
                          max_num_seqs=128, extra_args=["--seed", 7], env={"HF_HOME": "/hf"}))
    (p,) = plan(config)
    assert list(p.argv) == [
        "vllm", "serve", "meta-llama/Llama-3.1-8B-Instruct",
        "--host", "127.0.0.1", "--port", "9000", "--served-model-name", "llama-8b",
        "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2",
        "--dtype", "bfloat16", "--gpu-memory-utilization", "0.85", "--max-model-len", "8192",
        "--quantization", "fp8", "--max-num-seqs", "128",
        "--enable-prefix-caching", "--enable-prompt-tokens-details", "--seed", "7",
    ]
    assert p.env == {"CUDA_VISIBLE_DEVICES": "4,5,6,7", "HF_HOME": "/hf"}
    assert p.url == "http://127.0.0.1:9000"
    assert p.shell().startswith("CUDA_VISIBLE_DEVICES=4,5,6,7 HF_HOME=/hf vllm serve ")
    assert shlex.split(p.shell())[2:] == list(p.argv)


def test_gpus_are_sliced_per_tp_pp_group_and_ports_count_up():
    config = cfg(vllm_gpu(port=8000, gpus=[0, 1, 2, 3, 4, 5, 6, 7],
                          replicas=[{"tensor_parallel_size": 1}, {"tensor_parallel_size": 1},
                                    {"tensor_parallel_size": 2},
                                    {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}]))
    plans = plan(config)
    assert [p.name for p in plans] == ["llama-0", "llama-1", "llama-2", "llama-3"]
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["0", "1", "2,3", "4,5,6,7"]
    assert [p.port for p in plans] == [8000, 8001, 8002, 8003]
    assert "--tensor-parallel-size" not in plans[0].argv
    assert flag(plans[3].argv, "--pipeline-parallel-size") == "2"


def test_prefix_caching_off_and_kv_events_on():
    (p,) = plan(cfg(vllm_gpu(enable_prefix_caching=False,
                             kv_events={"port": 7000, "replay_port": 7100, "topic": "t"})))
    assert "--no-enable-prefix-caching" in p.argv and "--enable-prefix-caching" not in p.argv
    kv = json.loads(flag(p.argv, "--kv-events-config"))
    assert kv == {"enable_kv_cache_events": True, "publisher": "zmq",
                  "endpoint": "tcp://*:7000", "topic": "t", "replay_endpoint": "tcp://*:7100"}
    assert (p.kv_events_endpoint, p.kv_replay_endpoint) == ("tcp://127.0.0.1:7000",
                                                            "tcp://127.0.0.1:7100")


def test_auto_ports_are_free_and_distinct():
    plans = plan(cfg({"name": "s", "kind": "sim", "replicas": 3, "kv_events": True}))
    ports = [p.port for p in plans]
    ports += [int(p.kv_events_endpoint.rsplit(":", 1)[1]) for p in plans]
    ports += [int(p.kv_replay_endpoint.rsplit(":", 1)[1]) for p in plans]
    assert len(set(ports)) == 9
    from engines.vllm.ports import AUTO_PORT_FLOOR, _ephemeral_low
    assert all(AUTO_PORT_FLOOR <= port < _ephemeral_low() for port in ports)


def test_sim_knobs_become_flags():
    (p,) = plan(cfg({"name": "s", "kind": "sim", "port": 8101, "block_size": 16,
                     "max_model_len": 4096, "tensor_parallel_size": 2,
                     "sim": {"time_scale": 10, "num_gpu_blocks": 500}}), python="py")
    assert p.argv[:3] == ("py", "-m", "engines.sim")
    assert flag(p.argv, "--tp") == "2"
    assert flag(p.argv, "--block-size") == "16"
    assert flag(p.argv, "--max-model-len") == "4096"
    assert flag(p.argv, "--time-scale") == "10"
    assert flag(p.argv, "--num-gpu-blocks") == "500"


def test_default_python_for_sim_is_this_interpreter():
    (p,) = plan(cfg({"name": "s", "kind": "sim"}))
    assert p.argv[0] == sys.executable


def test_only_selects_entries_or_replicas():
    config = cfg({"name": "a", "kind": "sim", "replicas": 2}, {"name": "b", "kind": "sim"})
    assert [p.name for p in plan(config, only=["a"])] == ["a-0", "a-1"]
    assert [p.name for p in plan(config, only=["a-1", "b"])] == ["a-1", "b-0"]
    with pytest.raises(ConfigError, match="nothing matches"):
        plan(config, only=["c"])


# -- errors name the file and the key path ------------------------------------------------------

@pytest.mark.parametrize("model, path, text", [
    ({"name": "x", "kind": "vlm"}, "models[0].kind", "did you mean 'vllm'"),
    ({"name": "x", "kind": "vllm"}, "models[0].model", "required key is missing"),
    ({"name": "x", "kind": "sim", "tensor_paralel_size": 2}, "models[0].tensor_paralel_size",
     "did you mean 'tensor_parallel_size'"),
    ({"name": "x", "kind": "sim", "port": "eighty"}, "models[0].port", "'auto'"),
    ({"name": "x", "kind": "sim", "port": 70000}, "models[0].port", "<= 65535"),
    ({"name": "x", "kind": "vllm", "model": "m", "dtype": "bf16"}, "models[0].dtype",
     "expected one of"),
    ({"name": "x", "kind": "vllm", "model": "m", "gpu_memory_utilization": 1.5},
     "models[0].gpu_memory_utilization", "<= 1"),
    ({"name": "x", "kind": "vllm", "model": "m", "tensor_parallel_size": 4, "gpus": [0, 1]},
     "models[0].gpus", "need 4 GPUs"),
    ({"name": "x", "kind": "vllm", "model": "m", "replicas": 2}, "models[0].gpus",
     "need a 'gpus' list"),
    ({"name": "x", "kind": "vllm", "model": "m", "gpus": [0, 0]}, "models[0].gpus", "twice"),
    ({"name": "x", "kind": "vllm", "model": "m", "replicas": [{"tp": 2}]}, "models[0].replicas[0].tp",
     "unknown key"),
    ({"name": "x", "kind": "vllm", "model": "m", "replicas": [{"gpus": [0, 1]}]},
     "models[0].replicas", "TP x PP = 1"),
    ({"name": "x", "kind": "vllm", "model": "m", "device": "cpu", "block_size": 16},
     "models[0].block_size", "multiple of 32"),
    ({"name": "x", "kind": "vllm", "model": "m", "device": "cpu", "tensor_parallel_size": 2},
     "models[0]", "CPU build"),
    ({"name": "x", "kind": "sim", "kv_events": {"prot": 1}}, "models[0].kv_events.prot",
     "did you mean 'port'"),
    ({"name": "x", "kind": "sim", "replicas": 0}, "models[0].replicas", ">= 1"),
])
def test_errors_are_path_precise(model, path, text):
    with pytest.raises(ConfigError) as info:
        cfg(model)
    assert info.value.path == path, str(info.value)
    assert text in info.value.message
    assert str(info.value).startswith("engines.yaml: ")


def test_duplicate_names_and_ports_and_gpus_are_rejected():
    with pytest.raises(ConfigError, match=r"models\[1\]\.name: duplicate name 'a'"):
        cfg({"name": "a", "kind": "sim"}, {"name": "a", "kind": "sim"})
    with pytest.raises(ConfigError, match=r"models\[1\]\.port: port 8001 of b-0 is also used by a-1"):
        cfg({"name": "a", "kind": "sim", "port": 8000, "replicas": 2},
            {"name": "b", "kind": "sim", "port": 8001})
    with pytest.raises(ConfigError, match="GPU 1 is given to both a-0 and b-0"):
        cfg(vllm_gpu(name="a", gpus=[0, 1], tensor_parallel_size=2),
            vllm_gpu(name="b", gpus=[1]))


def test_top_level_errors():
    with pytest.raises(ConfigError, match="models: required key is missing"):
        parse_config({}, "f.yaml")
    with pytest.raises(ConfigError, match="did you mean 'models'"):
        parse_config({"model": []}, "f.yaml")
    with pytest.raises(ConfigError, match="at least one model"):
        parse_config({"models": []}, "f.yaml")


def test_bad_yaml_file_names_the_line(tmp_path):
    bad = tmp_path / "engines.yaml"
    bad.write_text("models:\n  - name: [\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
