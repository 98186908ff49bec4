"""Result rows are atomic, keyed by the config minus tracking, scrubbed of secrets; W&B stays offline."""

import json
import multiprocessing
import os

import pandas as pd
import pytest

from qbench import tracking
from qbench.tracking import ResultsTable, run_key


def config(**tracking_fields):
    return {"model": {"name": "m"}, "quant": {"w_bits": 4}, "algorithm": {"name": "rtn"},
            "tracking": {"dir": "results", **tracking_fields}}


def test_run_key_ignores_tracking_and_sees_everything_else():
    assert run_key(config()) == run_key(config(dir="elsewhere", wandb_mode="disabled"))
    cached, recomputed = config(), config()
    cached["calibration"], recomputed["calibration"] = {"float_cache_gb": 4.0}, {"float_cache_gb": 0.0}
    assert run_key(cached) == run_key(recomputed)  # a memory knob, not a different measurement
    other = config()
    other["quant"]["w_bits"] = 3
    assert run_key(other) != run_key(config())


def test_row_written_atomically_and_compiled(tmp_path):
    table = ResultsTable(tmp_path)
    table.write({"run_key": "abc", "status": "ok", "time": "t1", "ppl/x/gptq": 12.5, "telemetry": [{"a": 1}]})
    assert table.finished("abc")
    frame = pd.read_parquet(tmp_path / "results.parquet")
    assert frame.loc[0, "ppl/x/gptq"] == 12.5 and frame.loc[0, "schema_version"] == tracking.SCHEMA_VERSION
    assert pd.read_csv(tmp_path / "results.csv").shape[0] == 1
    assert not [p for p in os.listdir(tmp_path / "rows") if p.startswith(".")]  # no temporary leftovers


def test_a_write_that_dies_half_way_leaves_no_row(tmp_path, monkeypatch):
    table = ResultsTable(tmp_path)

    def die(self, text, *args, **kwargs):  # the process dies while the row is being written
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(tracking.Path, "write_text", die)
    with pytest.raises(KeyboardInterrupt):
        table.write({"run_key": "half", "status": "ok", "time": "t"})
    monkeypatch.undo()
    assert table.get("half") is None and not table.finished("half")
    assert list((tmp_path / "rows").iterdir()) == []  # neither the row nor its temporary file


def test_secrets_never_land_in_a_row(tmp_path):
    table = ResultsTable(tmp_path)
    table.write({"run_key": "s", "status": "ok", "time": "t", "config": {"wandb": {"api_key": "SECRET"},
                 "hf_token": "SECRET", "bos_token_id": 1}})
    text = (tmp_path / "rows" / "s.json").read_text()
    assert "SECRET" not in text and "bos_token_id" in text


def test_unwritable_directory_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="tracking.dir"):
        ResultsTable(blocker / "results").check_writable()


def _write_after_other(directory, read, other_done):
    """Compile that reads the rows, then waits (up to 2 s) for another process's compile before it writes."""
    table = ResultsTable(directory)
    frame = ResultsTable.frame

    def slow_frame(self):
        rows = frame(self)
        read.set()
        other_done.wait(timeout=2)
        return rows

    ResultsTable.frame = slow_frame
    table.write({"run_key": "a", "status": "ok", "time": "t1"})


def _write_other(directory, read, other_done):
    read.wait(timeout=10)
    ResultsTable(directory).write({"run_key": "b", "status": "ok", "time": "t2"})
    other_done.set()


def test_concurrent_compiles_lose_no_rows(tmp_path):
    """A compile that read the rows before another job wrote its row must not replace the table last."""
    ctx = multiprocessing.get_context("fork")
    read, other_done = ctx.Event(), ctx.Event()
    jobs = [ctx.Process(target=f, args=(tmp_path, read, other_done)) for f in (_write_after_other, _write_other)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=30)
        assert job.exitcode == 0
    assert sorted(pd.read_parquet(tmp_path / "results.parquet")["run_key"]) == ["a", "b"]
    assert sorted(pd.read_csv(tmp_path / "results.csv")["run_key"]) == ["a", "b"]


def test_sweep_group_names_one_group_per_sweep():
    assert tracking.sweep_group("mine", "results/multirun/2026-01-01_00-00-00", "weight-only") == "mine"
    assert tracking.sweep_group(None, "results/multirun/2026-01-01_00-00-00", "weight-only") == \
        "weight-only-2026-01-01_00-00-00"
    assert tracking.sweep_group(None, "results/multirun/2026-01-01_00-00-00", None) == "sweep-2026-01-01_00-00-00"
    assert tracking.sweep_group(None, None, "weight-only") is None  # a single run


def test_telemetry_rows_number_the_linears_in_execution_order():
    columns, rows = tracking.telemetry_rows([{"block": 0, "name": "q", "e": 0.1}, {"block": 0, "name": "o", "e": None}])
    assert columns == ["layer", "block", "name", "e"] and rows == [[0, 0, "q", 0.1], [1, 0, "o", None]]


TELEMETRY = [{"block": b, "name": n, "output_rel_error": 0.01 * (i + 1), "weight_rel_error": 0.1}
             for i, (b, n) in enumerate([(0, "q"), (0, "o"), (1, "q"), (1, "o")])]


def offline_run(tmp_path, **kwargs):
    from types import SimpleNamespace

    settings = SimpleNamespace(wandb_mode="offline", dir=str(tmp_path), project="qbench-test")
    run_id = tracking.log_to_wandb(settings, {"algorithm": {"name": "rtn"}, "quant": {"w_bits": 4}},
                                   {"run_key": "k", "status": "ok", "algorithm": "rtn", "ppl/x/gptq": 9.5},
                                   TELEMETRY, name="t", **kwargs)
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1
    return runs[0]


def test_offline_wandb_run_holds_config_metrics_and_telemetry(tmp_path):
    run_dir = offline_run(tmp_path, group="sweep-1")
    run = tracking.offline_run_summary(run_dir)  # read back by wandb itself (`wandb leet inspect`)
    assert run["state"] == "finished" and run["name"] == "t" and run["project"] == "qbench-test"
    assert run["config"]["quant"] == {"w_bits": 4} and run["config"]["algorithm"] == {"name": "rtn"}
    assert run["summary"]["ppl/x/gptq"] == 9.5 and run["summary"]["run_key"] == "k"
    table = run["summary"]["telemetry"]
    assert table["_type"] == "table-file" and (table["nrows"], table["ncols"]) == (4, 5)
    saved = json.loads((run_dir / "files" / table["path"]).read_text())
    assert saved["columns"] == ["layer", "block", "name", "output_rel_error", "weight_rel_error"]
    records = tracking.offline_run_records(run_dir)
    header = next(r["run"] for r in records if r["type"] == "run")
    assert header["run_group"] == "sweep-1" and header["job_type"] == "rtn"
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    per_layer = [(h["layer"], h["per_layer/output_rel_error"]) for h in history if "per_layer/output_rel_error" in h]
    assert per_layer == [(i, t["output_rel_error"]) for i, t in enumerate(TELEMETRY)]
    assert {"per_layer_chart/output_rel_error_table", "per_layer_chart/weight_rel_error_table"} <= set(run["summary"])


def lm_eval_results() -> "EvalResults":
    """What lm_eval.simple_evaluate returns for two zero-shot tasks (keys as in lm_eval.result_schema)."""
    from lm_eval.result_schema import EvalResults

    tasks = ("arc_easy", "piqa")
    return EvalResults(
        results={t: {"alias": t, "acc,none": 0.5 + i / 10, "acc_stderr,none": 0.05, "acc_norm,none": 0.55 + i / 10,
                     "acc_norm_stderr,none": 0.04} for i, t in enumerate(tasks)},
        group_subtasks={t: [] for t in tasks},
        configs={t: {"task": t, "output_type": "multiple_choice", "num_fewshot": 0,
                     "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]} for t in tasks},
        versions={t: 1.0 for t in tasks}, **{"n-shot": {t: 0 for t in tasks}},
        higher_is_better={t: {"acc": True, "acc_norm": True} for t in tasks},
        **{"n-samples": {t: {"original": 1000, "effective": 20} for t in tasks}},
        config={"model": "hf", "model_args": "pretrained=tiny", "batch_size": 1, "limit": 20},
        git_hash=None, date=1.7e9,
    )


def test_lm_eval_results_go_through_lm_evals_wandb_logger(tmp_path):
    run = tracking.offline_run_summary(offline_run(tmp_path, lm_eval_results=lm_eval_results()))
    assert run["summary"]["arc_easy/acc_norm"] == 0.55 and run["summary"]["piqa/acc"] == 0.6
    assert run["summary"]["evaluation/eval_results"]["nrows"] == 4  # lm-eval's table: task x metric
    assert run["config"]["task_configs"]["piqa"]["output_type"] == "multiple_choice"
    assert run["config"]["quant"] == {"w_bits": 4}  # qbench's config is kept beside lm-eval's


def test_lm_eval_results_need_the_active_run():
    with pytest.raises(ValueError, match="active W&B run"):
        tracking.log_lm_eval_results(object(), lm_eval_results())
