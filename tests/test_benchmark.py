"""python -m qbench.benchmark: both backends timed in one run, FLOPs by phase, memory, the table on disk."""

import json
import math

import pytest

from qbench import benchmark

TINY = ["model=tiny-llama", "data.nsamples=4", "data.seqlen=32"]


def test_counted_run_has_flops_for_every_phase_and_the_statistics_match_the_budget(one_thread):
    result = benchmark.measure(TINY, "qronos", "qbench", count=True)
    flops = result["phase_flops"]
    assert set(flops) == {"forward", "statistics", "solve"} and all(v > 0 for v in flops.values())
    # FlopCounterMode's count of the H/G products (addmm_) is exactly the pipeline's own n²·tokens budget
    assert flops["statistics"] == result["statistics_flops_analytic"]
    assert result["device_peak_mb"] > 0 and result["layers"] == 14 and result["seconds"] > 0


def test_timed_brevitas_run_reports_its_phases(one_thread):
    pytest.importorskip("brevitas")
    result = benchmark.measure(TINY, "optq", "brevitas", count=False)
    assert {"forward", "forward+statistics", "solve", "setup"} <= set(result["phase_s"])
    assert result["phase_flops"] == {} and result["device_peak_mb"] is None  # CPU: tracked in counted runs only


def test_targets_and_table_from_rows():
    row = lambda a, b, s: {"algorithm": a, "backend": b, "seconds": s, "phase_s": {"solve": 1.0}, "host_peak_mb": 1.0}
    by_key = {("qronos", "qbench"): {**row("qronos", "qbench", 10.0), "x_floor": 1.4},
              ("qronos", "brevitas"): row("qronos", "brevitas", 40.0), ("optq", "qbench"): row("optq", "qbench", 8.0)}
    lines = benchmark.targets(by_key, {"qronos_over_optq": 10.0 / 8.0})
    assert lines[0].startswith("Brevitas Qronos / qbench Qronos = 4.00") and lines[0].endswith("NOT met")
    assert lines[1].endswith("met") and "1.25" in lines[1] and "1.40 x" in lines[2] and lines[2].endswith(": met")
    markdown = benchmark.table(list(by_key.values()))
    assert markdown.count("\n") == 4 and all(line.count("|") == markdown.splitlines()[0].count("|")
                                             for line in markdown.splitlines())


def test_bad_arguments_fail_in_one_line():
    with pytest.raises(SystemExit, match="algorithms contains 'nope'"):
        benchmark.parse(["algorithms=[optq,nope]"])
    with pytest.raises(SystemExit, match="algorithm.backend=brevitas: .*calibration.stream=dual"):
        benchmark.main([*TINY, "calibration.stream=dual", "backends=[brevitas]"])
    # an option only some algorithms have names the one that lacks it, in one line
    with pytest.raises(SystemExit, match=r"^qbench.benchmark: error: with algorithm=rtn: "
                                         r"Could not override 'algorithm.block_size'[^\n]*$"):
        benchmark.main([*TINY, "algorithms=[optq,rtn]", "backends=[qbench]", "algorithm.block_size=128"])


def test_one_run_times_both_backends_and_writes_the_table(tmp_path):
    pytest.importorskip("brevitas")
    benchmark.main([*TINY, "algorithms=[qronos]", f"tracking.dir={tmp_path}"])
    written = json.loads((tmp_path / "benchmark" / "tiny-llama_w4_4x32_cpu.json").read_text())
    rows = {r["backend"]: r for r in written["rows"]}
    assert set(rows) == {"qbench", "brevitas"}
    assert rows["qbench"]["x_floor"] > 0 and math.isclose(
        rows["qbench"]["brevitas_over_qbench"], rows["brevitas"]["seconds"] / rows["qbench"]["seconds"])
    assert rows["brevitas"]["x_floor"] > 0  # set against the native count: the same work
    assert written["summary"]["gemm_gflops"] > 0
    markdown = (tmp_path / "benchmark" / "tiny-llama_w4_4x32_cpu.md").read_text()
    assert "| qronos | brevitas |" in markdown and "Brevitas Qronos / qbench Qronos" in markdown
