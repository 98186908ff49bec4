"""The results table as paper-style tables and plots: rows are algorithms, columns are settings.

    qbench-table                                  # every perplexity in results/, one table per model
    qbench-table dir=results metric=ppl/enwiki-excerpt/gptq model=smollm2-135m
    qbench-table query='algorithm == "qronos" and w_bits == 3' columns=[run_key,quant,preprocess]
    qbench-report                                 # results/report/: report.md, report.tex, PNG plots
    qbench-report dir=results out=results/report metric=ppl/enwiki-excerpt/brevitas
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qbench.tracking import ResultsTable

ALGORITHM_ORDER = ["float", "rtn", "optq", "gpfq", "qronos"]
ALGORITHM_NAMES = {"float": "float", "rtn": "RTN", "optq": "OPTQ", "gpfq": "GPFQ", "qronos": "Qronos"}
REFERENCE = Path(__file__).resolve().parent / "reference" / "qronos_llama3.2-1b.csv"
# a zero-shot average column, e.g. zeroshot/avg_acc_norm (the zero-shot evaluation names it)
ZEROSHOT_AVERAGE = re.compile(r"(zero.?shot|0.?shot).*(avg|average|mean)", re.I)
MISSING = "—"


class ReportError(ValueError):
    """Bad arguments or an unusable table: one line for the user."""


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


def load_reference(path: Path = REFERENCE) -> pd.DataFrame:
    """The paper's reference numbers (design.md §6), one row per model, setting and algorithm."""
    return pd.read_csv(path, comment="#", dtype={"quant": str, "preprocess": str})


def paper_settings(reference: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(quant preset, preprocess preset) -> the paper's name of that setting, e.g. ('w4', 'none') -> 'W4'."""
    known = reference.dropna(subset=["quant", "preprocess"])
    return {(q, p): s for q, p, s in zip(known["quant"], known["preprocess"], known["setting"])}


def paper_label(names: dict[tuple[str, str], str]) -> Callable[[pd.Series], str]:
    """Label function: the paper's setting name where the presets match one, else `setting_label`."""
    def label(row: pd.Series) -> str:
        name = names.get((str(row.get("quant")), str(row.get("preprocess"))))
        if name is None or row["algorithm"] == "float":
            return setting_label(row)
        return name + (" (dual)" if row.get("calib_stream") == "dual" else "")
    return label


def _finished(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"].eq("ok")] if "status" in frame else frame


def _ordered(pivot: pd.DataFrame, column_order: list[str]) -> pd.DataFrame:
    rows = [a for a in ALGORITHM_ORDER if a in pivot.index] + [a for a in pivot.index if a not in ALGORITHM_ORDER]
    known = [c for c in column_order if c in pivot.columns]
    return pivot.loc[rows, known + sorted(c for c in pivot.columns if c not in known)]


def metric_table(frame: pd.DataFrame, metric: str, label: Callable[[pd.Series], str] = setting_label,
                 column_order: Optional[list[str]] = None) -> pd.DataFrame:
    """Pivot one metric: algorithm × setting; the float baseline is a row of its own, repeated in every
    setting column. Several runs in one cell (e.g. other calibration sizes): the latest is shown."""
    frame = _finished(frame)
    frame = frame[frame[metric].notna()].copy()
    if frame.empty:
        return pd.DataFrame()
    frame["setting"] = frame.apply(label, axis=1)
    pivot = frame.pivot_table(index="algorithm", columns="setting", values=metric, aggfunc="last")
    if "float" in pivot.columns:  # the baseline is a row whose value stands in every setting column
        baseline = pivot.pop("float").dropna()
        if len(pivot.columns) == 0:
            pivot["float"] = float("nan")
        if "float" in baseline.index:
            pivot.loc["float"] = baseline["float"]
    return _ordered(pivot, column_order or [])


EVAL_SETTINGS = ("eval_seqlen", "eval_max_tokens")  # numbers measured on different text never share a table


def by_evaluation(frame: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """Split rows by what their perplexity was measured on (window length, tokens per split), each part
    with a short label and a file-name tag (e.g. 8192x2048); a float baseline then only stands beside
    runs evaluated the same way."""
    keys = [c for c in EVAL_SETTINGS if c in frame]
    if not keys:
        return [("", "", frame)]
    whole = "whole split"  # max_tokens null: every token of the split
    settings = frame[keys].astype(object).where(frame[keys].notna(), whole)
    parts = []
    for values, part in frame.groupby([settings[c] for c in keys], sort=True, dropna=False):
        named = dict(zip(keys, values if isinstance(values, tuple) else (values,)))
        tokens, window = named.get("eval_max_tokens", whole), named.get("eval_seqlen", whole)
        label = whole if tokens == whole else f"first {int(tokens)} tokens per split"
        label += "" if window == whole else f", {int(window)}-token windows"
        tag = "x".join(str(int(v)) for v in (tokens, window) if v != whole) or "all"
        parts.append((label, tag, part))
    return parts


def render(frame: pd.DataFrame, metrics: list[str] | None = None, model: str | None = None) -> str:
    """Markdown tables of the chosen perplexity metrics, one per model."""
    if frame.empty:
        return "(the results table is empty)"
    metrics = metrics or sorted(c for c in frame.columns if c.startswith("ppl/"))
    parts = []
    for name, rows in frame.groupby("model"):
        if model and name != model:
            continue
        evaluations = by_evaluation(rows)
        for evaluation, _, group in evaluations:
            where = f" ({evaluation})" if len(evaluations) > 1 else ""
            for metric in metrics:
                if metric not in group or group[metric].isna().all():
                    continue
                table = metric_table(group, metric)
                cells = table.astype(object).where(table.notna(), None)  # tabulate marks None, not NaN
                parts.append(f"### {name}: {metric}{where}\n\n"
                             + cells.to_markdown(floatfmt=".3f", missingval=MISSING))
    return "\n\n".join(parts) if parts else "(no matching rows)"


# ---- paper-style tables


def format_ppl(value: float) -> str:
    """Two decimals below 1000, else one significant decimal and a power of ten (2.0e4), as papers do."""
    if pd.isna(value):
        return MISSING
    if not math.isfinite(value):
        return "inf"
    if value >= 1000:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.2f}"


def format_accuracy(value: float) -> str:
    return MISSING if pd.isna(value) else f"{value:.2f}"


def as_percent(values: pd.DataFrame) -> pd.DataFrame:
    """lm-eval reports accuracies as fractions; papers print percentages."""
    finite = values.stack().dropna()
    return values * 100 if len(finite) and finite.abs().max() <= 1.0 else values


def best_mask(values: pd.DataFrame, lower_is_better: bool) -> pd.DataFrame:
    """True where a quantized algorithm holds the best value of its column (ties all marked)."""
    quantized = values.drop(index="float", errors="ignore")
    best = quantized.min() if lower_is_better else quantized.max()
    mask = values.eq(best, axis=1) & values.notna()
    if "float" in mask.index:
        mask.loc["float"] = False
    return mask


def pick_metric(frame: pd.DataFrame, requested: Optional[str]) -> str:
    """The perplexity column of the report: the one asked for, else the paper's WikiText-2 under the
    brevitas protocol, else the first brevitas perplexity, else the first perplexity."""
    columns = [c for c in frame.columns if c.startswith("ppl/") and frame[c].notna().any()]
    if requested:
        if requested not in frame.columns:
            raise ReportError(f"metric={requested} is not in the results table; choose one of {sorted(columns)}")
        return requested
    if not columns:
        raise ReportError("the results table has no perplexity column (ppl/<dataset>/<protocol>)")
    preferred = ["ppl/wikitext2/brevitas"] + sorted(c for c in columns if c.endswith("/brevitas")) + sorted(columns)
    return next(c for c in preferred if c in columns)


def pick_zeroshot(frame: pd.DataFrame, requested: Optional[str]) -> Optional[str]:
    """The zero-shot average column (None when the table has none)."""
    if requested:
        if requested not in frame.columns:
            raise ReportError(f"zeroshot={requested} is not in the results table")
        return requested
    return next((c for c in sorted(frame.columns) if ZEROSHOT_AVERAGE.search(c) and frame[c].notna().any()), None)


def reference_tables(reference: pd.DataFrame, model: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The reference perplexity and zero-shot tables of `model` (empty when the paper has none)."""
    ref = reference[reference["model"] == model]
    if ref.empty:
        return pd.DataFrame(), pd.DataFrame()
    order = list(dict.fromkeys(ref["setting"]))
    tables = []
    for value in ("ppl", "zeroshot"):
        pivot = ref.pivot_table(index="algorithm", columns="setting", values=value, aggfunc="first")
        if "float" in pivot.columns:
            baseline = pivot.pop("float")["float"]
            pivot.loc["float"] = baseline
        tables.append(_ordered(pivot, order))
    return tables[0], tables[1]


def cell_text(ppl: pd.DataFrame, zeroshot: Optional[pd.DataFrame], bold: Callable[[str], str]) -> pd.DataFrame:
    """'ppl / 0-shot' per cell, the best quantized value of each column in bold."""
    text = ppl.apply(lambda col: col.map(format_ppl))
    text = text.where(~best_mask(ppl, lower_is_better=True), text.map(bold))
    if zeroshot is None or zeroshot.empty:
        return text
    zeroshot = zeroshot.reindex(index=ppl.index, columns=ppl.columns)
    zs_best = best_mask(zeroshot, lower_is_better=False)
    zs_text = zeroshot.apply(lambda col: col.map(format_accuracy))
    zs_text = zs_text.where(~zs_best, zs_text.map(bold))
    return text + " / " + zs_text


def paper_table(frame: pd.DataFrame, metric: str, zeroshot: Optional[str], reference: pd.DataFrame,
                bold: Callable[[str], str]) -> pd.DataFrame:
    """One model's table: algorithms × settings, 'ppl / 0-shot' cells; beside each setting the paper
    reports, a '(paper)' column with its reference numbers."""
    model = frame["model"].iloc[0]
    names = paper_settings(reference)
    order = list(dict.fromkeys(reference["setting"]))
    label = paper_label(names)
    ppl = metric_table(frame, metric, label, order)
    if ppl.empty:
        return ppl
    zs = as_percent(metric_table(frame, zeroshot, label, order)) if zeroshot else None
    cells = cell_text(ppl, zs, bold)
    ref_ppl, ref_zs = reference_tables(reference, model)
    columns = []
    for setting in cells.columns:
        columns.append((setting, cells[setting]))
        if setting in ref_ppl.columns:
            ref_cells = cell_text(ref_ppl[[setting]], ref_zs[[setting]], bold)[setting]
            columns.append((f"{setting} (paper)", ref_cells.reindex(cells.index)))
    table = pd.DataFrame(dict(columns)).fillna(MISSING)
    table.index = [ALGORITHM_NAMES.get(a, a) for a in table.index]
    table.index.name = "algorithm"
    return table


def latex_escape(text: str) -> str:
    return re.sub(r"([_&%#$])", r"\\\1", text)


def to_latex(table: pd.DataFrame, caption: str) -> str:
    """A booktabs table through pandas' Styler (labels escaped; cells carry their own \\textbf)."""
    cells = table.replace(MISSING, "--")
    cells.index.name = None
    styler = cells.style.format_index(escape="latex", axis=0).format_index(escape="latex", axis=1)
    return styler.to_latex(hrules=True, caption=latex_escape(caption), column_format="l" + "c" * len(cells.columns))


def _caption(model: str, metric: str, zeroshot: Optional[str], with_reference: bool) -> str:
    what = f"perplexity ({metric})" + (f" / 0-shot ({zeroshot}, %)" if zeroshot else "")
    text = f"{model}: {what}; best quantized value per column in bold."
    if with_reference:
        text += (" (paper) columns: Brevitas docs for the Qronos paper, WikiText-2 perplexity (brevitas protocol) /"
                 " 0-shot average acc_norm over PIQA, ARC-e, ARC-c, Winogrande, HellaSwag; BF16 model.")
    return text


# ---- plots


PLOT_DEFAULTS = {"preprocess": "none", "w_group_size": -1, "calib_stream": "quantized", "a_bits": 16}


def _weight_only(frame: pd.DataFrame) -> pd.DataFrame:
    frame = _finished(frame).assign(**{k: v for k, v in PLOT_DEFAULTS.items() if k not in frame})
    return frame[frame["a_bits"].fillna(16) >= 16]


def plot_ppl_vs_bits(frame: pd.DataFrame, metric: str, path: Path) -> Optional[Path]:
    """Perplexity against weight bits: a line per algorithm (and per preprocessing, group size and
    stream where runs differ in them), the float baseline dashed. Weight-only runs only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _weight_only(frame)
    rows = rows[rows[metric].notna()]
    quantized = rows[rows["algorithm"] != "float"]
    if quantized.empty:
        return None
    fig, ax = plt.subplots(figsize=(8.0, 4.2))
    colors = {a: f"C{i}" for i, a in enumerate(ALGORITHM_ORDER[1:])}
    series_of = {}
    for (algorithm, preprocess, group_size, stream), series in quantized.groupby(
            ["algorithm", "preprocess", "w_group_size", "calib_stream"], dropna=False):
        extra = [] if pd.isna(preprocess) or preprocess == "none" else [str(preprocess)]
        extra += [] if pd.isna(group_size) or group_size == -1 else [f"g{int(group_size)}"]
        extra += ["dual"] if stream == "dual" else []
        series_of[(tuple(extra), algorithm)] = series.sort_values("w_bits").drop_duplicates("w_bits", keep="last")
    variants = sorted({extra for extra, _ in series_of}, key=lambda e: (len(e), e))  # plain runs: solid lines
    order = {a: i for i, a in enumerate(ALGORITHM_ORDER)}
    for extra, algorithm in sorted(series_of, key=lambda k: (variants.index(k[0]), order.get(k[1], 99), k[1])):
        series = series_of[(extra, algorithm)]
        style = ["-o", "--s", ":^", "-.D"][variants.index(extra) % 4]
        label = ALGORITHM_NAMES.get(algorithm, algorithm) + (f" ({', '.join(extra)})" if extra else "")
        ax.plot(series["w_bits"], series[metric], style, color=colors.get(algorithm), label=label)
    baseline = rows.loc[rows["algorithm"] == "float", metric]
    if not baseline.empty:
        ax.axhline(baseline.iloc[-1], color="grey", linestyle="--", linewidth=1, label="float")
    values = rows[metric]
    ax.set_yscale("log" if values.max() > 10 * values.min() else "linear")  # papers' W2 numbers span decades
    bits = sorted(quantized["w_bits"].unique())
    ax.set_xticks(bits, [f"{b:g}" for b in bits])
    ax.set_xlabel("weight bits")
    ax.set_ylabel(metric)
    ax.set_title(f"{frame['model'].iloc[0]}: perplexity against weight bits")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


LAYER_ERRORS = {"output_rel_error": "output error ‖X̃ᵀ(W−Q)ᵀ‖/‖X̃ᵀWᵀ‖", "weight_rel_error": "weight error ‖W−Q‖/‖W‖"}


def plot_layer_errors(frame: pd.DataFrame, path: Path, label: Callable[[pd.Series], str] = setting_label,
                      column_order: Optional[list[str]] = None) -> Optional[Path]:
    """Per-layer reconstruction error (from each row's telemetry) against the Linear's position: a panel
    per setting, a line per algorithm; relative output error on the calibration tokens above, relative
    weight error below (RTN sees no data, so it has only the latter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _finished(frame)
    rows = rows[rows["algorithm"] != "float"]
    rows = rows[rows["telemetry"].map(lambda t: isinstance(t, list) and len(t) > 0)] if "telemetry" in rows else rows[:0]
    if rows.empty:
        return None
    rows = rows.assign(setting=rows.apply(label, axis=1))
    known = [s for s in (column_order or []) if s in set(rows["setting"])]
    settings = known + sorted(set(rows["setting"]) - set(known))
    fig, axes = plt.subplots(2, len(settings), figsize=(4.2 * len(settings), 6.4), squeeze=False, sharex="col")
    for j, setting in enumerate(settings):
        for _, row in rows[rows["setting"] == setting].drop_duplicates("algorithm", keep="last").iterrows():
            telemetry = pd.DataFrame(row["telemetry"])
            for i, column in enumerate(LAYER_ERRORS):
                if column in telemetry and telemetry[column].notna().any():
                    axes[i, j].plot(telemetry.index, telemetry[column], linewidth=0.9,
                                    color=f"C{ALGORITHM_ORDER.index(row['algorithm']) - 1}"
                                    if row["algorithm"] in ALGORITHM_ORDER else None,
                                    label=ALGORITHM_NAMES.get(row["algorithm"], row["algorithm"]))
        axes[0, j].set_title(setting)
        axes[1, j].set_xlabel("Linear layer (execution order)")
        for i, name in enumerate(LAYER_ERRORS.values()):
            axes[i, j].set_yscale("log")
            axes[i, j].grid(True, which="both", alpha=0.3)
            if j == 0:
                axes[i, j].set_ylabel(name)
            if axes[i, j].lines:
                axes[i, j].legend(fontsize=7)
    fig.suptitle(f"{frame['model'].iloc[0]}: per-layer reconstruction error")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the report


def build_report(frame: pd.DataFrame, out: Path, metric: Optional[str] = None, zeroshot: Optional[str] = None,
                 model: Optional[str] = None, plots: bool = True,
                 reference: Optional[pd.DataFrame] = None) -> tuple[str, str]:
    """Write report.md, report.tex and the plots into `out`; return the Markdown and LaTeX texts."""
    if frame.empty:
        raise ReportError("the results table is empty; run a sweep first")
    reference = load_reference() if reference is None else reference
    models = [m for m in frame["model"].dropna().unique() if model in (None, m)]
    if not models:
        raise ReportError(f"model={model} has no rows; the table holds {sorted(frame['model'].dropna().unique())}")
    out.mkdir(parents=True, exist_ok=True)
    order = list(dict.fromkeys(reference["setting"]))
    markdown, latex = [], []
    sections = []
    for name in models:
        evaluations = by_evaluation(frame[frame["model"] == name])
        several = len(evaluations) > 1
        sections += [(name, label if several else "", tag if several else "", group)
                     for label, tag, group in evaluations]
    for name, evaluation, tag, group in sections:
        try:
            ppl_metric = pick_metric(group, metric)
        except ReportError:
            if len(sections) > 1:  # this evaluation lacks the metric; another section has it
                continue
            raise
        zs_metric = pick_zeroshot(group, zeroshot)
        md = paper_table(group, ppl_metric, zs_metric, reference, bold=lambda s: f"**{s}**")
        if md.empty:
            continue
        with_reference = any(c.endswith("(paper)") for c in md.columns)
        caption = _caption(name, ppl_metric, zs_metric, with_reference)
        title = f"{name}, {evaluation}" if evaluation else name
        section = [f"## {title}", ""]
        note = group["model_note"].dropna().iloc[-1] if "model_note" in group and group["model_note"].notna().any() else ""
        section += [f"{caption}" + (f" Model: {note}." if note else ""), "", md.to_markdown(), ""]
        tex = paper_table(group, ppl_metric, zs_metric, reference, bold=lambda s: f"\\textbf{{{s}}}")
        latex.append(to_latex(tex, caption))
        if plots:
            # one plot pair per evaluation: e.g. -eval8192x2048 for 8192 tokens per split, 2048-token windows
            safe = re.sub(r"[^\w.-]", "_", str(name) + (f"-eval{tag}" if tag else ""))
            bits_png = plot_ppl_vs_bits(group, ppl_metric, out / f"ppl_vs_bits-{safe}.png")
            layers_png = plot_layer_errors(group, out / f"layer_error-{safe}.png", paper_label(paper_settings(reference)),
                                           order)
            section += [f"![perplexity against bits]({p.name})" for p in (bits_png,) if p]
            section += [f"![per-layer reconstruction error]({p.name})" for p in (layers_png,) if p]
            section.append("")
        markdown.append("\n".join(section))
    if not markdown:
        raise ReportError("no finished run has the chosen perplexity metric")
    md_text, tex_text = "\n".join(markdown), "\n".join(latex)
    (out / "report.md").write_text(md_text)
    (out / "report.tex").write_text(tex_text)
    return md_text, tex_text


# ---- commands


@dataclass
class TableArgs:
    dir: str = "results"  # tracking.dir of the runs
    metric: Optional[str] = None  # e.g. ppl/enwiki-excerpt/gptq; default: every perplexity column
    model: Optional[str] = None
    query: Optional[str] = None  # pandas query over the rows: 'algorithm == "qronos" and `ppl/x/gptq` < 30'
    columns: Optional[list] = None  # print these columns of the matching rows instead of the tables


@dataclass
class ReportArgs:
    dir: str = "results"  # tracking.dir of the runs
    out: Optional[str] = None  # default: <dir>/report
    metric: Optional[str] = None  # perplexity column; default: ppl/wikitext2/brevitas, else a brevitas one
    zeroshot: Optional[str] = None  # zero-shot average column; default: one named like zeroshot/.../avg
    model: Optional[str] = None
    plots: bool = True


def _parse(schema, argv: list[str] | None, command: str):
    try:
        return OmegaConf.merge(OmegaConf.structured(schema),
                               OmegaConf.from_cli(sys.argv[1:] if argv is None else argv))
    except OmegaConfBaseException as exc:
        _fail(command, f"{str(exc).splitlines()[0]}; arguments are key=value with keys "
                       f"{', '.join(schema.__dataclass_fields__)}")


def _fail(command: str, message: str) -> None:
    print(f"{command}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _load(command: str, directory: str) -> pd.DataFrame:
    table = ResultsTable(directory)
    if not table.rows_dir.is_dir():
        _fail(command, f"no results table under dir={directory} (no rows/ folder); run qbench there first")
    return table.frame()


def select(frame: pd.DataFrame, query: Optional[str]) -> pd.DataFrame:
    """Rows matching a pandas query (column names with '/' go in backticks)."""
    if not query or frame.empty:
        return frame
    try:
        return frame.query(query)
    except Exception as exc:  # noqa: BLE001 - pandas raises many types for a bad expression
        raise ReportError(f"query={query!r} failed: {exc}") from None


def table_command(argv: list[str] | None = None) -> None:
    """`qbench-table [dir=results] [metric=...] [model=...] [query=...] [columns=[...]]`."""
    args = _parse(TableArgs, argv, "qbench-table")
    frame = _load("qbench-table", args.dir)
    try:
        frame = select(frame, args.query)
        if args.columns:
            unknown = [c for c in args.columns if c not in frame.columns]
            if unknown:
                raise ReportError(f"columns {unknown} are not in the results table")
            print(frame[list(args.columns)].to_markdown(index=False, floatfmt=".3f"))
            return
    except ReportError as exc:
        _fail("qbench-table", str(exc))
    print(render(frame, [args.metric] if args.metric else None, args.model))


def report_command(argv: list[str] | None = None) -> None:
    """`qbench-report [dir=results] [out=<dir>/report] [metric=...] [zeroshot=...] [model=...] [plots=true]`:
    write the paper-style tables (Markdown, LaTeX) and plots, and print the Markdown."""
    args = _parse(ReportArgs, argv, "qbench-report")
    frame = _load("qbench-report", args.dir)
    out = Path(args.out) if args.out else Path(args.dir) / "report"
    try:
        markdown, _ = build_report(frame, out, args.metric, args.zeroshot, args.model, args.plots)
    except ReportError as exc:
        _fail("qbench-report", str(exc))
    print(markdown)
    print(f"(written to {out}/report.md, report.tex and the PNG plots)", file=sys.stderr)


if __name__ == "__main__":
    table_command()
