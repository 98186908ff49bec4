"""The results table as paper-style tables: rows are algorithms, columns are settings.

    qbench-table                                  # every perplexity in results/, one table per model
    qbench-table dir=results metric=ppl/enwiki-excerpt/gptq model=smollm2-135m
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import pandas as pd
from omegaconf import OmegaConf

from qbench.tracking import ResultsTable

ALGORITHM_ORDER = ["float", "rtn", "optq", "gpfq", "qronos"]


def setting_label(row: pd.Series) -> str:
    """Column label of a run: the weight grid, the preprocessing and the calibration stream."""
    if row["algorithm"] == "float":
        return "float"
    label = str(row.get("quant", ""))
    if row.get("preprocess") not in (None, "none") and not pd.isna(row.get("preprocess")):
        label += f"+{row['preprocess']}"
    if row.get("calib_stream") == "dual":
        label += " (dual)"
    if row.get("backend") == "brevitas":  # Brevitas's solvers: never in the same cell as qbench's
        label += " [brevitas]"
    return label


def perplexity_table(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Pivot one metric: algorithm × setting; the float baseline is a row of its own."""
    frame = frame[frame.get("status", "ok") == "ok"].copy()
    frame = frame[frame[metric].notna()]
    frame["setting"] = frame.apply(setting_label, axis=1)
    pivot = frame.pivot_table(index="algorithm", columns="setting", values=metric, aggfunc="last")
    if "float" in pivot.columns:  # the baseline is a row whose value stands in every setting column
        baseline = pivot.pop("float").dropna()
        if len(pivot.columns) == 0:
            pivot["float"] = float("nan")
        if "float" in baseline.index:
            pivot.loc["float"] = baseline["float"]
    order = [a for a in ALGORITHM_ORDER if a in pivot.index] + [a for a in pivot.index if a not in ALGORITHM_ORDER]
    return pivot.loc[order, sorted(pivot.columns)]


def render(frame: pd.DataFrame, metrics: list[str] | None = None, model: str | None = None) -> str:
    """Markdown tables of the chosen perplexity metrics, one per model."""
    if frame.empty:
        return "(the results table is empty)"
    metrics = metrics or sorted(c for c in frame.columns if c.startswith("ppl/"))
    parts = []
    for name, group in frame.groupby("model"):
        if model and name != model:
            continue
        for metric in metrics:
            if metric not in group or group[metric].isna().all():
                continue
            table = perplexity_table(group, metric)
            cells = table.astype(object).where(table.notna(), None)  # tabulate marks None, not NaN
            parts.append(f"### {name}: {metric}\n\n" + cells.to_markdown(floatfmt=".3f", missingval="—"))
    return "\n\n".join(parts) if parts else "(no matching rows)"


@dataclass
class TableArgs:
    dir: str = "results"  # tracking.dir of the runs
    metric: Optional[str] = None  # e.g. ppl/enwiki-excerpt/gptq; default: every perplexity column
    model: Optional[str] = None


def table_command(argv: list[str] | None = None) -> None:
    """`qbench-table [dir=results] [metric=...] [model=...]`: print algorithm × setting tables."""
    args = OmegaConf.merge(OmegaConf.structured(TableArgs), OmegaConf.from_cli(sys.argv[1:] if argv is None else argv))
    print(render(ResultsTable(args.dir).frame(), [args.metric] if args.metric else None, args.model))


if __name__ == "__main__":
    table_command()
