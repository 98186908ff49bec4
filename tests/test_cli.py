"""The `qbench` command: bad input fails fast in one line and writes nothing; a tiny run records rows."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

QBENCH = str(Path(sys.executable).parent / "qbench")
TINY = ["model=tiny-llama", "data.seqlen=64", "data.nsamples=4", "eval.seqlen=128", "eval.max_tokens=1024",
        "tracking.wandb_mode=disabled"]


def qbench(*args, cwd):
    start = time.perf_counter()
    proc = subprocess.run([QBENCH, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    return proc, time.perf_counter() - start


def test_tiny_run_records_float_and_quantized_rows_then_skips(tmp_path):
    proc, _ = qbench(*TINY, "quant=w3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(p.read_text()) for p in (tmp_path / "results" / "rows").glob("*.json")]
    assert sorted(r["algorithm"] for r in rows) == ["float", "rtn"]
    rtn = next(r for r in rows if r["algorithm"] == "rtn")
    assert rtn["w_bits"] == 3 and rtn["status"] == "ok" and rtn["layers_quantized"] == 14
    assert rtn["ppl/enwiki-excerpt/gptq"] > 1 and rtn["ppl/enwiki-excerpt/brevitas"] > 1
    assert rtn["config"]["quant"]["w_bits"] == 3 and len(rtn["telemetry"]) == 14
    assert (tmp_path / "results" / "results.parquet").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    again, _ = qbench(*TINY, "quant=w3", cwd=tmp_path)
    assert again.returncode == 0 and "skipped" in again.stdout + again.stderr
    assert len(list((tmp_path / "results" / "rows").glob("*.json"))) == 2


def test_multirun_sweep_writes_one_row_per_config(tmp_path):
    proc, _ = qbench("-m", *TINY, "quant=w3,w4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(p.read_text()) for p in (tmp_path / "results" / "rows").glob("*.json")]
    assert sorted((r["algorithm"], r["w_bits"]) for r in rows) == [("float", 16.0), ("rtn", 3.0), ("rtn", 4.0)]


def test_experiment_preset_runs_its_sweep(tmp_path):
    proc, _ = qbench("-m", "experiment=weight-only", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(p.read_text()) for p in (tmp_path / "results" / "rows").glob("*.json")]
    runs = sorted((r["algorithm"], r["w_bits"]) for r in rows if r["algorithm"] != "float")
    assert runs == sorted((a, b) for a in ("rtn", "optq", "gpfq", "qronos") for b in (3.0, 4.0))


def test_every_preprocess_preset_runs_and_exact_ones_keep_the_float_model(tmp_path):
    presets = "none,hadamard,quarot,smoothquant,magr,hadamard_magr,quarot_smoothquant"
    proc, _ = qbench("-m", *TINY, "algorithm=qronos", f"preprocess={presets}", "eval.after_preprocess=true",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["preprocess"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "results" / "rows").glob("*.json"))
            if r["algorithm"] != "float"}
    assert set(rows) == set(presets.split(","))
    float_ppl = next(json.loads(p.read_text()) for p in (tmp_path / "results" / "rows").glob("*.json")
                     if json.loads(p.read_text())["algorithm"] == "float")["ppl/enwiki-excerpt/gptq"]
    for name in ("hadamard", "quarot", "smoothquant", "quarot_smoothquant"):  # exact in float
        assert rows[name]["ppl_preprocessed/enwiki-excerpt/gptq"] == pytest.approx(float_ppl, rel=1e-4)
    for name in ("magr", "hadamard_magr"):  # MagR trades a small output change for smaller weights
        assert rows[name]["magr_mean_rel_output_change"] > 0


def test_activation_and_kv_presets_run_with_quarot(tmp_path):
    proc, _ = qbench("-m", *TINY, "algorithm=qronos", "preprocess=quarot", "quant=w4a4,w4a4_mxfp4,w16a16kv4",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["quant"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "results" / "rows").glob("*.json"))}
    assert rows["float"]["a_bits"] == 16 and rows["float"]["kv_bits"] == 16
    w4a4, mx, kv4 = rows["w4a4"], rows["w4a4_mxfp4"], rows["w16a16kv4"]
    assert (w4a4["a_bits"], w4a4["w_format"], w4a4["damping"]) == (4, "int", 1e-3)  # the paper's W4A4 alpha
    assert (mx["a_format"], mx["w_format"], mx["w_group_size"]) == ("mxfp4", "mxfp4", 32)
    assert w4a4["activation_quantizers"] == mx["activation_quantizers"] == 14
    assert kv4["kv_bits"] == 4 and kv4["kv_r3"] is True and "layers_quantized" not in kv4  # float weights
    for row in (w4a4, mx, kv4):
        assert row["ppl/enwiki-excerpt/gptq"] > rows["float"]["ppl/enwiki-excerpt/gptq"] * 0.99
