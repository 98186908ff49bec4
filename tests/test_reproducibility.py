"""Same config and seed: bitwise-identical quantized weights and metrics; a numerical failure is recorded
as a failed row, never as a NaN result."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

QBENCH = str(Path(sys.executable).parent / "qbench")
TINY = ["model=tiny-llama", "data.seqlen=64", "data.nsamples=4", "eval.seqlen=128", "eval.max_tokens=1024",
        "tracking.wandb_mode=disabled", "eval.float_baseline=false"]


def run_row(cwd: Path, *args: str) -> dict:
    proc = subprocess.run([QBENCH, *TINY, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = [json.loads(p.read_text()) for p in (cwd / "results" / "rows").glob("*.json")]
    return row


def test_same_config_and_seed_give_identical_weights_and_metrics(tmp_path):
    """Random rotation signs (QuaRot), calibration windows and a data-driven solver: run twice, compare bits;
    then another seed changes them (and the run key)."""
    args = ("algorithm=qronos", "quant=w3", "preprocess=quarot")
    for folder in ("a", "b", "c"):
        (tmp_path / folder).mkdir()
    rows = [run_row(tmp_path / name, *args, *extra) for name, extra in
            (("a", ()), ("b", ()), ("c", ("seed=1",)))]
    first, second, other = rows
    assert first["run_key"] == second["run_key"] and first["deterministic"] is True
    assert first["weights_sha256"] == second["weights_sha256"] and len(first["weights_sha256"]) == 64
    metrics = [k for k in first if k.startswith("ppl/")]
    assert metrics and all(first[k] == second[k] for k in metrics)
    assert [t["output_rel_error"] for t in first["telemetry"]] == [t["output_rel_error"] for t in second["telemetry"]]
    assert other["run_key"] != first["run_key"] and other["weights_sha256"] != first["weights_sha256"]
    assert other["config"]["data"]["seed"] == other["config"]["preprocess"]["rotation_seed"] == 1


def test_nan_from_a_broken_transform_is_a_failed_row(tmp_path, monkeypatch):
    """A transform that breaks the float model: calibration sees NaN, the run exits 3 with one line, and the
    row says status=failed with the reason (a re-run retries it)."""
    from hydra import compose, initialize_config_dir

    from qbench import cli, tracking
    from qbench.config import register_configs

    real_preprocess = cli.preprocess

    def broken(model, cfg, calibration, device):
        report = real_preprocess(model, cfg, calibration, device)
        with torch.no_grad():
            model.model.layers[1].input_layernorm.weight.fill_(float("nan"))
        return report

    monkeypatch.setattr(cli, "preprocess", broken)
    register_configs()
    with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, "algorithm=optq", f"tracking.dir={tmp_path}"])
    with pytest.raises(cli.RunFailed, match="block 1 self_attn.q_proj: the calibration inputs hold NaN or Inf"):
        cli.run(cfg)
    (row,) = tracking.ResultsTable(str(tmp_path)).frame().to_dict("records")
    assert row["status"] == "failed" and "NaN" in row["error"]
    assert not any(k.startswith("ppl/") for k in row)
    assert not tracking.ResultsTable(str(tmp_path)).finished(row["run_key"])


def test_out_of_memory_in_a_block_is_a_failed_row_naming_it(tmp_path, monkeypatch):
    """Out of device memory in block 1: one line naming the block and a setting that fits, exit 3 through
    RunFailed, a failed row (retried by the next run), no perplexity."""
    from hydra import compose, initialize_config_dir

    from qbench import cli, pipeline, tracking
    from qbench.config import register_configs

    real = pipeline._solve_group

    def solve(group, H, G, solver, spec, options, i):
        if i == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real(group, H, G, solver, spec, options, i)

    monkeypatch.setattr(pipeline, "_solve_group", solve)
    register_configs()
    with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, "algorithm=gpfq", f"tracking.dir={tmp_path}"])
    with pytest.raises(cli.RunFailed, match=r"block 1 did not fit on cpu \(CUDA out of memory.*calibration\.batch_size=2"):
        cli.run(cfg)
    (row,) = tracking.ResultsTable(str(tmp_path)).frame().to_dict("records")
    assert row["status"] == "failed" and "block 1 did not fit" in row["error"]
    assert not any(k.startswith("ppl/") for k in row)
