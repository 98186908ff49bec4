"""Runs killed at any moment (SIGKILL: no cleanup code runs) leave no partial row and no corrupt cache;
the next run repairs what it finds half-made and completes."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

QBENCH = str(Path(sys.executable).parent / "qbench")
TINY = ["model=tiny-llama", "data.seqlen=64", "data.nsamples=4", "eval.seqlen=128", "eval.max_tokens=1024",
        "tracking.wandb_mode=offline"]
STAGES = ["extract", "calibration", "evaluation", "write:json", "write:csv", "write:parquet"]


def env_for(cache: Path, failpoint: str | None = None) -> dict:
    env = {**os.environ, "QBENCH_CACHE": str(cache), "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    env.pop("QBENCH_FAILPOINT", None)
    if failpoint:
        env["QBENCH_FAILPOINT"] = failpoint
    return env


def check_consistent(workdir: Path, cache: Path, reference_text: dict | None) -> list[dict]:
    """Every visible row parses and is finished; the compiled table (if any) reads; the corpus cache holds
    only complete split files (equal to a clean extraction)."""
    rows_dir = workdir / "results" / "rows"
    rows = []
    for path in sorted(rows_dir.glob("*.json")) if rows_dir.is_dir() else []:
        row = json.loads(path.read_text())  # a torn row would raise here
        assert row["status"] == "ok" and path.stem == row["run_key"]
        rows.append(row)
    for name in ("results.parquet", "results.csv"):
        table = workdir / "results" / name
        if table.is_file():
            frame = pd.read_parquet(table) if name.endswith("parquet") else pd.read_csv(table)
            assert set(frame["run_key"]) <= {r["run_key"] for r in rows}
    corpus = cache / "data" / "enwiki-excerpt-v1"
    for split in ("train", "validation", "test"):
        file = corpus / f"{split}.txt"
        if file.is_file() and reference_text is not None:
            assert file.read_text(encoding="utf-8") == reference_text[split]
    return rows


def leftovers(workdir: Path, cache: Path) -> list[Path]:
    """Hidden temporary files and folders that a finished run should not leave."""
    places = [workdir / "results" / "rows", workdir / "results", cache / "data" / "enwiki-excerpt-v1"]
    return [p for place in places if place.is_dir() for p in place.iterdir()
            if p.name.startswith(".") and p.name != ".compile.lock"]  # the lock file is meant to stay


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A clean run: its rows and the corpus it extracted, to compare every killed run against."""
    workdir, cache = tmp_path_factory.mktemp("clean"), tmp_path_factory.mktemp("clean-cache")
    start = time.perf_counter()
    proc = subprocess.run([QBENCH, *TINY, "algorithm=optq", "quant=w3"], cwd=workdir, env=env_for(cache),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    corpus = cache / "data" / "enwiki-excerpt-v1"
    text = {s: (corpus / f"{s}.txt").read_text(encoding="utf-8") for s in ("train", "validation", "test")}
    rows = {r["algorithm"]: r for r in check_consistent(workdir, cache, text)}
    return {"text": text, "rows": rows, "seconds": time.perf_counter() - start}


@pytest.mark.parametrize("stage", STAGES)
def test_kill_at_each_stage_then_rerun(tmp_path, reference, stage):
    cache = tmp_path / "cache"
    args = [QBENCH, *TINY, "algorithm=optq", "quant=w3"]
    killed = subprocess.run(args, cwd=tmp_path, env=env_for(cache, stage), capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, f"{stage} was never reached: {killed.stderr[-1500:]}"
    rows = check_consistent(tmp_path, cache, reference["text"])
    quantized = [r for r in rows if r["algorithm"] == "optq"]
    if stage in ("extract", "calibration", "evaluation", "write:json"):
        assert not quantized  # killed before its row was in place
    if stage == "extract":
        assert [p for p in (cache / "data" / "enwiki-excerpt-v1").iterdir() if p.name.startswith(".")]
    # the next run repairs and completes: every row, numbers equal to the clean run's, nothing half-made left
    again = subprocess.run(args, cwd=tmp_path, env=env_for(cache), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    rows = {r["algorithm"]: r for r in check_consistent(tmp_path, cache, reference["text"])}
    assert set(rows) == {"float", "optq"}
    for name, row in rows.items():
        assert row["run_key"] == reference["rows"][name]["run_key"]
        assert row["ppl/enwiki-excerpt/gptq"] == reference["rows"][name]["ppl/enwiki-excerpt/gptq"]
    assert leftovers(tmp_path, cache) == []
    assert len(pd.read_parquet(tmp_path / "results" / "results.parquet")) == 2


def test_twenty_random_kills_across_a_sweep_then_a_clean_rerun(tmp_path, reference):
    """SIGKILL a 2-job sweep 20 times at seeded random moments. With tracking.force=true every launch redoes
    both jobs, so the kills land anywhere: imports, model build, corpus extraction, calibration, evaluation,
    row rewrites, table compilation. After each kill the table and caches are consistent; finally an
    uninterrupted run (no force) finishes what is missing and skips what is finished."""
    cache = tmp_path / "cache"
    args = [QBENCH, "-m", *TINY, "algorithm=optq", "quant=w3,w4"]
    rng = random.Random(0)
    horizon = 1.3 * reference["seconds"]  # through the first job and into the second (two take about 2x)
    kills = 0
    while kills < 20:
        proc = subprocess.Popen([*args, "tracking.force=true"], cwd=tmp_path, env=env_for(cache),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0.3, horizon))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        check_consistent(tmp_path, cache, reference["text"])
    rows_dir = tmp_path / "results" / "rows"
    before = {p.name: p.stat().st_mtime_ns for p in rows_dir.glob("*.json")} if rows_dir.is_dir() else {}
    final = subprocess.run(args, cwd=tmp_path, env=env_for(cache), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    rows = check_consistent(tmp_path, cache, reference["text"])
    assert sorted((r["algorithm"], r["w_bits"]) for r in rows) == [("float", 16.0), ("optq", 3.0), ("optq", 4.0)]
    for path in rows_dir.glob("*.json"):  # finished rows were skipped, not redone
        if path.name in before:
            assert path.stat().st_mtime_ns == before[path.name]
    optq_w3 = next(r for r in rows if r["w_bits"] == 3.0)
    assert optq_w3["ppl/enwiki-excerpt/gptq"] == reference["rows"]["optq"]["ppl/enwiki-excerpt/gptq"]
    assert leftovers(tmp_path, cache) == []
    frame = pd.read_parquet(tmp_path / "results" / "results.parquet")
    assert len(frame) == 3 and frame["run_key"].is_unique
