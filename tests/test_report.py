"""qbench-table and qbench-report: rows are algorithms, columns are settings, the float baseline is a row
of its own; the paper's reference numbers stand beside the settings it reports when the model matches."""

import json

import pandas as pd
import pytest

from qbench import report
from qbench.report import metric_table, render
from qbench.tracking import ResultsTable


def frame():
    base = dict(model="m", status="ok", preprocess="none", calib_stream="quantized")
    return pd.DataFrame([
        dict(base, algorithm="float", quant="float", **{"ppl/d/gptq": 10.0}),
        dict(base, algorithm="rtn", quant="w3", **{"ppl/d/gptq": 50.0}),
        dict(base, algorithm="rtn", quant="w4", **{"ppl/d/gptq": 20.0}),
        dict(base, algorithm="qronos", quant="w3", **{"ppl/d/gptq": 30.0}),
        dict(base, algorithm="qronos", quant="w3", **{"calib_stream": "dual", "ppl/d/gptq": 28.0}),
    ])


def test_pivot_has_float_row_and_settings_columns():
    table = metric_table(frame(), "ppl/d/gptq")
    assert list(table.index) == ["float", "rtn", "qronos"]
    assert list(table.columns) == ["w3", "w3 (dual)", "w4"]
    assert table.loc["float", "w4"] == 10.0 and table.loc["qronos", "w3 (dual)"] == 28.0
    assert pd.isna(table.loc["qronos", "w4"])


def test_render_marks_missing_cells():
    text = render(frame(), ["ppl/d/gptq"])
    assert "### m: ppl/d/gptq" in text and "—" in text and "nan" not in text
    assert render(pd.DataFrame()) == "(the results table is empty)"


def test_number_formats_and_best_marks():
    assert report.format_ppl(10.444) == "10.44" and report.format_ppl(20000.0) == "2.0e4"
    assert report.format_ppl(1.67e6) == "1.7e6" and report.format_ppl(float("nan")) == "—"
    values = pd.DataFrame({"W4": [9.0, 12.0, 11.0, 11.0], "W3": [9.0, None, 40.0, 30.0]},
                          index=["float", "rtn", "optq", "qronos"])
    mask = report.best_mask(values, lower_is_better=True)
    assert mask["W4"].tolist() == [False, False, True, True]  # ties are all best; float never is
    assert mask["W3"].tolist() == [False, False, False, True]
    assert report.as_percent(pd.DataFrame({"a": [0.5, 0.6]}))["a"].tolist() == [50.0, 60.0]
    assert report.as_percent(pd.DataFrame({"a": [50.0]}))["a"].tolist() == [50.0]


def test_metric_choice_prefers_the_papers_protocol():
    table = pd.DataFrame({"ppl/a/gptq": [1.0], "ppl/a/brevitas": [1.0], "ppl/wikitext2/brevitas": [1.0]})
    assert report.pick_metric(table, None) == "ppl/wikitext2/brevitas"
    assert report.pick_metric(table.drop(columns="ppl/wikitext2/brevitas"), None) == "ppl/a/brevitas"
    with pytest.raises(report.ReportError, match="metric=ppl/x/gptq is not in the results table"):
        report.pick_metric(table, "ppl/x/gptq")
    assert report.pick_zeroshot(pd.DataFrame({"zeroshot/avg_acc_norm": [0.5]}), None) == "zeroshot/avg_acc_norm"
    assert report.pick_zeroshot(table, None) is None


def llama_rows():
    """A small table of Llama-3.2-1B runs: W4, W3, W2 with Hadamard + MagR, and one setting the paper lacks."""
    rows = [dict(algorithm="float", quant="float", preprocess="none", w_bits=16.0, ppl=9.1, zs=0.59)]
    for quant, preprocess, bits, scale in (("w4", "none", 4.0, 1.0), ("w3", "none", 3.0, 3.0),
                                           ("w2", "hadamard_magr", 2.0, 9.0), ("w4g128", "none", 4.0, 0.9)):
        for algorithm, ppl, zs in (("rtn", 20.0, 0.45), ("optq", 11.0, 0.54), ("gpfq", 11.5, 0.53),
                                   ("qronos", 10.5, 0.55)):
            rows.append(dict(algorithm=algorithm, quant=quant, preprocess=preprocess, w_bits=bits,
                             ppl=ppl * scale, zs=zs / scale ** 0.1))
    telemetry = [{"block": b, "name": n, "output_rel_error": 0.01 * (i + 1), "weight_rel_error": 0.1}
                 for i, (b, n) in enumerate([(0, "q"), (0, "o"), (1, "q"), (1, "o")])]
    return [dict(run_key=f"k{i}", time=f"t{i:02d}", status="ok", model="llama3.2-1b", calib_stream="quantized",
                 w_group_size=128 if r["quant"] == "w4g128" else -1, a_bits=16, algorithm=r["algorithm"],
                 quant=r["quant"], preprocess=r["preprocess"], w_bits=r["w_bits"],
                 **{"ppl/wikitext2/brevitas": r["ppl"], "zeroshot/avg_acc_norm": r["zs"]},
                 telemetry=[] if r["algorithm"] == "float" else telemetry)
            for i, r in enumerate(rows)]


def test_report_renders_paper_tables_beside_the_reference_and_plots(tmp_path):
    table = ResultsTable(tmp_path / "results")
    for row in llama_rows():
        table.write(row)
    report.report_command([f"dir={tmp_path / 'results'}", f"out={tmp_path / 'out'}"])
    markdown = (tmp_path / "out" / "report.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| algorithm"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns == ["algorithm", "W4", "W4 (paper)", "W3", "W3 (paper)", "W2, Hadamard + MagR",
                       "W2, Hadamard + MagR (paper)", "w4g128"]
    qronos = next(line for line in markdown.splitlines() if line.startswith("| Qronos"))
    cells = [c.strip() for c in qronos.strip("|").split("|")]
    assert cells[1] == "**10.50** / **55.00**"  # measured W4: best perplexity and best 0-shot (in %)
    assert cells[2] == "**10.12** / **55.87**"  # the paper's W4 Qronos, its column's best too
    assert cells[4] == "**22.00** / **40.32**" and cells[7] == "**9.45** / **55.58**"
    rtn = next(line for line in markdown.splitlines() if line.startswith("| RTN"))
    assert "2.0e4 / 32.24" in rtn  # the paper's W3 RTN, formatted as the paper prints it
    float_row = next(line for line in markdown.splitlines() if line.startswith("| float"))
    assert "9.10 / 59.00" in float_row and "8.94 / 59.40" in float_row
    latex = (tmp_path / "out" / "report.tex").read_text()
    assert "\\toprule" in latex and "\\textbf{10.50} / \\textbf{55.00}" in latex and "W2, Hadamard + MagR" in latex
    for png in ("ppl_vs_bits-llama3.2-1b.png", "layer_error-llama3.2-1b.png"):
        data = (tmp_path / "out" / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
        assert f"]({png})" in markdown


def test_report_without_a_paper_model_has_no_reference_columns(tmp_path):
    rows = [dict(r, model="smollm2-135m") for r in llama_rows()]
    markdown, _ = report.build_report(pd.DataFrame(rows), tmp_path, plots=False)
    assert "(paper)" not in markdown and "| W4 " in markdown and not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("argv,message", [
    (["nope=1"], "qbench-report: error: Key 'nope' not in 'ReportArgs'"),
    (["dir={tmp}/absent"], "no results table under dir="),
    (["dir={tmp}/results", "metric=ppl/x/gptq"], "metric=ppl/x/gptq is not in the results table"),
    (["dir={tmp}/results", "model=other"], "model=other has no rows"),
])
def test_report_bad_input_is_one_line(tmp_path, capsys, argv, message):
    ResultsTable(tmp_path / "results").write(llama_rows()[1])
    with pytest.raises(SystemExit) as exit_info:
        report.report_command([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err


def test_table_command_filters_rows(tmp_path, capsys):
    table = ResultsTable(tmp_path)
    for row in llama_rows():
        table.write(row)
    report.table_command([f"dir={tmp_path}", 'query=algorithm == "qronos" and w_bits < 4',
                          "columns=[algorithm,quant,ppl/wikitext2/brevitas]"])
    out = capsys.readouterr().out
    assert out.count("| qronos") == 2 and "w2" in out and "w3" in out and "rtn" not in out
    with pytest.raises(SystemExit):
        report.table_command([f"dir={tmp_path}", "query=no_such_column > 1"])
    assert "query='no_such_column > 1' failed" in capsys.readouterr().err


def test_brevitas_backend_rows_get_their_own_column():
    rows = frame()
    rows = pd.concat([rows, pd.DataFrame([dict(model="m", status="ok", preprocess="none", calib_stream="quantized",
                                               algorithm="qronos", quant="w3", backend="brevitas",
                                               **{"ppl/d/gptq": 31.0})])], ignore_index=True)
    table = metric_table(rows, "ppl/d/gptq")
    assert table.loc["qronos", "w3"] == 30.0 and table.loc["qronos", "w3 [brevitas]"] == 31.0


def test_runs_evaluated_on_different_text_get_separate_tables(tmp_path):
    """A float baseline measured on 16384 tokens must not stand beside runs measured on 8192."""
    rows = frame().assign(eval_seqlen=2048, eval_max_tokens=16384)
    short = pd.DataFrame([
        dict(model="m", status="ok", preprocess="quarot", calib_stream="quantized", algorithm=a, quant=q,
             eval_seqlen=2048, eval_max_tokens=8192, **{"ppl/d/gptq": v})
        for a, q, v in (("float", "float", 12.0), ("rtn", "w4a4", 90.0))])
    both = pd.concat([rows, short], ignore_index=True)
    text = render(both, ["ppl/d/gptq"])
    long_part, short_part = text.split("### m: ppl/d/gptq (first 16384")[1], text.split("(first 16384")[0]
    assert "(first 8192 tokens per split, 2048-token windows)" in short_part
    assert "12.000" in short_part and "10.000" not in short_part  # each float beside its own runs
    assert "10.000" in long_part and "12.000" not in long_part and "w4a4" not in long_part
    md, _ = report.build_report(both, tmp_path, metric="ppl/d/gptq", plots=False)
    assert md.count("## m, first") == 2
