"""Sweeps: resume after SIGKILL, parallel launchers, W&B offline runs through the CLI, experiment presets."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from qbench import tracking
from qbench.config import register_configs
from test_cli import QBENCH, TINY, qbench

CONF = Path(__file__).resolve().parent.parent / "conf"
SWEEP = ["-m", *TINY, "algorithm=rtn,optq,gpfq,qronos", "quant=w3"]  # 4 jobs + the float baseline


def rows_of(directory: Path) -> dict:
    """Every row file, parsed (a corrupt one fails the test)."""
    return {p.stem: json.loads(p.read_text()) for p in sorted((directory / "rows").glob("*.json"))}


def assert_clean_table(directory: Path, expected: int) -> None:
    rows = rows_of(directory)
    assert len(rows) == expected and all(key == row["run_key"] for key, row in rows.items())
    settings = [(r["algorithm"], r["w_bits"]) for r in rows.values()]
    assert len(set(settings)) == len(settings)  # no config ran twice under another key
    compiled = pd.read_parquet(directory / "results.parquet")
    assert sorted(compiled["run_key"]) == sorted(rows) and compiled["run_key"].is_unique
    assert (compiled["schema_version"] == tracking.SCHEMA_VERSION).all()


def test_sweep_killed_with_sigkill_reruns_only_the_missing_jobs(tmp_path):
    rows_dir = tmp_path / "results" / "rows"
    proc = subprocess.Popen([QBENCH, *SWEEP], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    deadline = time.monotonic() + 240
    while len(list(rows_dir.glob("*.json"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole sweep process group, mid-sweep
    assert proc.wait() == -signal.SIGKILL
    before = {p.name: p.read_bytes() for p in rows_dir.glob("*.json")}
    assert 3 <= len(before) < 5, f"{len(before)} rows when killed"

    again, _ = qbench(*SWEEP, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    log = again.stdout + again.stderr
    skipped = set(re.findall(r"run (\w+) is already in", log))
    finished_before = {name.removesuffix(".json") for name in before}
    float_key = next(k for k, r in rows_of(tmp_path / "results").items() if r["algorithm"] == "float")
    assert skipped == finished_before - {float_key}  # every finished job skipped ...
    assert log.count("loaded tiny:tiny-llama") == 5 - len(before)  # ... and only the missing ones loaded a model
    for name, content in before.items():
        assert (rows_dir / name).read_bytes() == content  # finished rows untouched
    assert_clean_table(tmp_path / "results", expected=5)
    assert not [p for p in rows_dir.iterdir() if p.suffix == ".json" and p.name.startswith(".")]


def test_joblib_sweep_with_two_workers_keeps_every_row(tmp_path):
    proc, _ = qbench("-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2", *TINY, "algorithm=rtn,optq",
                     "quant=w3,w4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    assert_clean_table(tmp_path / "results", expected=5)


def test_submitit_local_sweep_runs_each_job_in_its_own_process(tmp_path):
    proc, _ = qbench("-m", "hydra/launcher=submitit_local", *TINY, "algorithm=rtn,gpfq", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_clean_table(tmp_path / "results", expected=3)
    logs = list((tmp_path / "results" / "multirun").glob("*/.submitit/*/*_log.out"))
    assert len(logs) == 2  # one submitit job (process) per config, its files inside tracking.dir


def test_offline_wandb_through_the_cli_stays_in_tracking_dir(tmp_path):
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir(), tmp.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    args = [a for a in TINY if not a.startswith("tracking.wandb_mode")]
    proc = subprocess.run([QBENCH, "-m", *args, "quant=w3", "tracking.wandb_mode=offline"], cwd=work,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HOME": str(home), "TMPDIR": str(tmp), "HYDRA_FULL_ERROR": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in work.iterdir()) == ["results"]
    for outside in (home, tmp):  # torch may leave its own caches there; W&B leaves nothing
        assert not [p for p in outside.rglob("*") if "wandb" in str(p.relative_to(outside)).lower()]

    rows = {r["algorithm"]: r for r in rows_of(work / "results").values()}
    runs = {}
    for run_dir in (work / "results" / "wandb").glob("offline-run-*"):
        run = tracking.offline_run_summary(run_dir)
        runs[run["summary"]["algorithm"]] = (run, tracking.offline_run_records(run_dir))
    assert sorted(runs) == ["float", "rtn"]
    run, records = runs["rtn"]
    assert run["state"] == "finished" and run["config"] == rows["rtn"]["config"]  # the resolved Hydra config
    for metric in ("ppl/enwiki-excerpt/gptq", "ppl/enwiki-excerpt/brevitas", "quant_time_s", "layers_quantized"):
        assert run["summary"][metric] == pytest.approx(rows["rtn"][metric])
    assert run["summary"]["telemetry"]["nrows"] == 14
    header = next(r["run"] for r in records if r["type"] == "run")
    assert header["job_type"] == "rtn" and re.fullmatch(r"sweep-\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", header["run_group"])
    weight_errors = [r["history"]["item"]["per_layer/weight_rel_error"] for r in records
                     if r["type"] == "history" and "per_layer/weight_rel_error" in r["history"]["item"]]
    assert weight_errors == pytest.approx([t["weight_rel_error"] for t in rows["rtn"]["telemetry"]])


def compose_config(*overrides):
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def presets(group: str) -> set:
    return {p.stem for p in (CONF / group).glob("*.yaml")}


@pytest.mark.parametrize("experiment", sorted(presets("experiment")))
def test_experiment_presets_target_llama_and_run_here_on_the_embedded_model(experiment):
    paper = compose_config(f"experiment={experiment}")
    params = {k: str(v).split(",") for k, v in paper.hydra.sweeper.params.items()}
    missing = [f"{group}={name}" for group, names in params.items() for name in names if name not in presets(group)]
    if missing:
        pytest.skip(f"experiment={experiment} sweeps presets this branch does not have yet: {missing}")
    assert params["algorithm"] == ["rtn", "optq", "gpfq", "qronos"]
    assert paper.model.name == "llama3.2-1b" and paper.data.name == "wikitext2"
    assert OmegaConf.to_container(paper.eval.datasets, resolve=True) == ["wikitext2"]
    here = compose_config(f"experiment={experiment}", "model=smollm2-135m")
    assert here.model.name == "smollm2-135m" and here.data.name == "enwiki-excerpt"
    assert OmegaConf.to_container(here.eval.datasets, resolve=True) == ["enwiki-excerpt"]
    assert compose_config(f"experiment={experiment}", "data=c4").data.name == "c4"  # the command line wins


def test_launcher_presets_select_hydras_plugins():
    local = compose_config("hydra/launcher=local").hydra.launcher
    assert local._target_.endswith("JoblibLauncher") and local.n_jobs == 2
    slurm = compose_config("hydra/launcher=slurm").hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.gpus_per_node == 1
    assert compose_config("hydra/launcher=submitit_local").hydra.launcher._target_.endswith("LocalLauncher")
