"""qbench-table: rows are algorithms, columns are settings, the float baseline is a row of its own."""

import pandas as pd

from qbench.report import perplexity_table, render


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
    table = perplexity_table(frame(), "ppl/d/gptq")
    assert list(table.index) == ["float", "rtn", "qronos"]
    assert list(table.columns) == ["w3", "w3 (dual)", "w4"]
    assert table.loc["float", "w4"] == 10.0 and table.loc["qronos", "w3 (dual)"] == 28.0
    assert pd.isna(table.loc["qronos", "w4"])


def test_render_marks_missing_cells():
    text = render(frame(), ["ppl/d/gptq"])
    assert "### m: ppl/d/gptq" in text and "—" in text and "nan" not in text
    assert render(pd.DataFrame()) == "(the results table is empty)"


def test_brevitas_backend_rows_get_their_own_column():
    rows = frame()
    rows = pd.concat([rows, pd.DataFrame([dict(model="m", status="ok", preprocess="none", calib_stream="quantized",
                                               algorithm="qronos", quant="w3", backend="brevitas",
                                               **{"ppl/d/gptq": 31.0})])], ignore_index=True)
    table = perplexity_table(rows, "ppl/d/gptq")
    assert table.loc["qronos", "w3"] == 30.0 and table.loc["qronos", "w3 [brevitas]"] == 31.0
