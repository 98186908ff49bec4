"""The embedded model converts once into the qbench cache and reloads as a plain HF folder."""

import time

import pytest
import torch

from qbench import models
from qbench.config import ModelConfig


def test_embedded_gguf_is_located_without_importing_its_package():
    path = models.embedded_gguf("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6


def test_killed_conversion_leaves_nothing_that_looks_finished(qbench_cache):
    """SIGKILL after the converted files are written, before the rename: no model folder, only a hidden
    leftover, which the next conversion (the test below) removes."""
    import os
    import signal
    import subprocess
    import sys

    target = models.cache_dir() / "models" / "smollm2-135m"
    if target.exists():
        pytest.skip("the shared test cache already holds the converted model")
    code = "from qbench.models import ensure_embedded; ensure_embedded('smollm2-135m')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "QBENCH_FAILPOINT": "convert"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".smollm2-135m-")]


def test_embedded_model_converts_once_and_reloads(qbench_cache):
    start = time.perf_counter()
    folder = models.ensure_embedded("smollm2-135m")
    assert str(folder).startswith(qbench_cache)
    stamp = (folder / "config.json").stat().st_mtime_ns
    again = models.ensure_embedded("smollm2-135m")  # cached: no second conversion
    assert again == folder and (folder / "config.json").stat().st_mtime_ns == stamp
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no half-made folders left
    loaded = models.load(ModelConfig(name="smollm2-135m", embedded="smollm2-135m"))
    cfg = loaded.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads) == (30, 576, 1536, 3)
    assert models.count_parameters(loaded.model) == pytest.approx(134.5e6, rel=0.005)
    assert not hasattr(cfg, "quantization_config") or cfg.quantization_config is None
    assert loaded.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert "Q4_1" in loaded.note
    ids = loaded.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([ids])).logits
    assert torch.isfinite(logits).all()
    print(f"conversion + load + forward: {time.perf_counter() - start:.1f} s")


def test_linear_groups_follow_execution_order(tiny_llama):
    groups = models.linear_groups(models.decoder_blocks(tiny_llama)[0])
    assert [[n for n, _ in g] for g in groups] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_unsupported_architecture_is_named(tiny_llama):
    tiny_llama.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        models.check_architecture(tiny_llama)
