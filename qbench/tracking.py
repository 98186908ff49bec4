"""The results table (one row per run key, written atomically) and W&B logging.

Rows live as one JSON file per run key under `<dir>/rows/`, each written to a temporary file and
renamed into place, so a killed run leaves no partial row and concurrent jobs never lose one another's
rows. The compiled table (`results.parquet`, `results.csv`) is rebuilt from those files after each run,
under an exclusive lock, so the last compile of a sweep always sees every row.

W&B: one run per config under `<dir>/wandb` (offline unless asked), grouped per sweep, with the
resolved config, every metric, the per-Linear telemetry as a table and as history over the layer index,
and lm-eval's results through lm-eval's own `WandbLogger` (`log_lm_eval_results`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator, Optional

import pandas as pd

from qbench import faults

SCHEMA_VERSION = 1
# fields that do not change what is measured: where results go, and memory/speed knobs
KEY_EXCLUDES = ("tracking", "calibration.float_cache_gb", "eval.cache_responses")
SECRET_NAME = re.compile(r"(api_?key|secret|password|passwd|credential|(^|_)(access_|auth_|hf_)?token$)", re.I)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _measured(resolved: dict) -> dict:
    """A copy of the resolved config without the KEY_EXCLUDES fields (they do not change any number)."""
    payload = json.loads(_canonical(resolved))
    for dotted in KEY_EXCLUDES:
        *parents, leaf = dotted.split(".")
        node = payload
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return payload


def run_key(resolved: dict) -> str:
    """Hash of the resolved config minus tracking fields: equal keys measure the same thing."""
    return hashlib.sha256(_canonical(_measured(resolved)).encode()).hexdigest()[:16]


def float_key(resolved: dict) -> str:
    """Key of the float baseline: only what changes the float model's numbers."""
    measured = _measured(resolved)
    payload = {"baseline": "float", "model": measured["model"], "eval": measured["eval"],
               "seed": measured.get("seed"), "device": measured.get("device")}
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()[:16]


def scrub(obj: Any) -> Any:
    """Drop any field whose name looks like a secret, recursively (configs, rows, W&B)."""
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items() if not SECRET_NAME.search(str(k))}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


def qbench_version() -> str:
    try:
        return version("qbench")
    except PackageNotFoundError:
        return "unknown"


def git_sha() -> str:
    """Commit of the qbench checkout that ran (with '+dirty' when it had uncommitted changes)."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha or "unknown") + ("+dirty" if sha and dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    faults.remove_orphans(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=faults.temp_prefix(path.name), suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        faults.failpoint(f"write:{path.suffix.lstrip('.')}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class ResultsTable:
    """The results table under one directory."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.rows_dir = self.dir / "rows"

    def check_writable(self) -> None:
        """Fail before any heavy work when the table cannot be written; creates nothing (a run that fails
        later must not leave an empty results folder behind): probes the deepest folder that exists."""
        existing = self.rows_dir
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            if not existing.is_dir():
                raise NotADirectoryError(20, "not a directory")
            fd, probe = tempfile.mkstemp(dir=existing, prefix=".qbench-probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise PermissionError(f"tracking.dir={str(self.dir)!r} is not writable ({exc.strerror}); "
                                  "choose another tracking.dir") from None

    def get(self, key: str) -> Optional[dict]:
        path = self.rows_dir / f"{key}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:  # cannot happen through write(), but a hand-edited file might
            return None

    def finished(self, key: str) -> bool:
        row = self.get(key)
        return row is not None and row.get("status") == "ok"

    def write(self, row: dict) -> Path:
        """Write one row atomically and refresh the compiled table."""
        row = scrub(dict(row, schema_version=SCHEMA_VERSION))
        path = self.rows_dir / f"{row['run_key']}.json"
        _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(row, indent=1, default=str)))
        self.compile()
        return path

    def frame(self) -> pd.DataFrame:
        rows = []
        for path in sorted(self.rows_dir.glob("*.json")):
            try:
                rows.append(json.loads(path.read_text()))
            except json.JSONDecodeError:
                continue
        frame = pd.DataFrame(rows)
        if not frame.empty and "time" in frame:
            frame = frame.sort_values("time", kind="stable").reset_index(drop=True)
        return frame

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One compile at a time across processes (and SLURM nodes sharing the folder through flock)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".compile.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def compile(self) -> pd.DataFrame:
        """Rebuild results.csv and results.parquet from the rows. Compiles are serialised, and each reads
        the rows only once it holds the lock, so the compile that finishes last has seen every row."""
        with self._exclusive():
            return self._compile_unlocked()

    def _compile_unlocked(self) -> pd.DataFrame:
        frame = self.frame()
        if frame.empty:
            return frame
        _atomic_write(self.dir / "results.csv", lambda tmp: frame.to_csv(tmp, index=False))
        flat = frame.copy()
        for col in flat.columns:  # parquet wants one type per column: nested values go as JSON text
            if flat[col].map(lambda v: isinstance(v, (dict, list))).any():
                flat[col] = flat[col].map(lambda v: _canonical(v) if isinstance(v, (dict, list)) else v)
        _atomic_write(self.dir / "results.parquet", lambda tmp: flat.to_parquet(tmp, index=False))
        return frame


def wandb_environment(directory: str | os.PathLike) -> dict:
    """Environment that keeps every W&B file inside the configured directory."""
    root = Path(directory).resolve() / "wandb"
    return {"WANDB_DIR": str(root.parent), "WANDB_CACHE_DIR": str(root / "cache"),
            "WANDB_DATA_DIR": str(root / "data"), "WANDB_CONFIG_DIR": str(root / "config"),
            "WANDB_ARTIFACT_DIR": str(root / "artifacts")}


# per-Linear telemetry values plotted over the layer index (RTN has no output error: it sees no data)
TELEMETRY_PLOTS = ("output_rel_error", "weight_rel_error")


def sweep_group(explicit: Optional[str], sweep_dir: Optional[str], experiment: Optional[str]) -> Optional[str]:
    """W&B group of a run: `tracking.group` when set; otherwise one group per Hydra sweep, named after the
    experiment preset (or 'sweep') and the sweep folder (its launch time); a single run has none."""
    if explicit:
        return explicit
    if not sweep_dir:
        return None
    return f"{experiment or 'sweep'}-{Path(sweep_dir).name}"


def current_sweep() -> tuple[Optional[str], Optional[str]]:
    """(sweep folder, experiment preset) of the running Hydra job; the folder is None outside a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, None
    hydra_cfg = HydraConfig.get()
    experiment = hydra_cfg.runtime.choices.get("experiment")
    return (str(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None), experiment


def telemetry_rows(telemetry: list[dict]) -> tuple[list[str], list[list]]:
    """Columns and rows of the telemetry table; `layer` is the Linear's position in execution order."""
    columns = ["layer", *(c for c in telemetry[0] if c != "layer")]
    return columns, [[i, *(t.get(c) for c in columns[1:])] for i, t in enumerate(telemetry)]


def summary_items(row: dict) -> dict:
    """The row's scalar fields (every metric, times, memory, grid and provenance) for the run summary."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float, str, bool)) and v is not None}


def _log_telemetry(run, telemetry: list[dict]) -> None:
    """The telemetry as a `wandb.Table`, as history over the layer index (W&B draws one line chart per
    value against `layer`) and as explicit line charts built from the table."""
    import wandb

    columns, data = telemetry_rows(telemetry)
    table = wandb.Table(columns=columns, data=data)
    run.define_metric("layer")
    run.define_metric("per_layer/*", step_metric="layer")
    plotted = [k for k in TELEMETRY_PLOTS if k in columns and any(t.get(k) is not None for t in telemetry)]
    for i, t in enumerate(telemetry):
        values = {f"per_layer/{k}": t[k] for k in plotted if t.get(k) is not None}
        if values:
            run.log({"layer": i, **values})
    charts = {f"per_layer_chart/{k}": wandb.plot.line(table, "layer", k, title=f"{k} over the layer index")
              for k in plotted}
    run.log({"telemetry": table, **charts})


def log_lm_eval_results(run, results: dict) -> None:
    """Hand the dict that `lm_eval.simple_evaluate` returns to lm-eval's own `WandbLogger`, attached to
    `run`: per-task metrics, the results table, the task configs and a results artifact, and the
    per-sample tables when `results` holds `samples` (simple_evaluate(log_samples=True))."""
    import wandb
    from lm_eval.loggers import WandbLogger

    if wandb.run is not run:  # WandbLogger attaches to the active run and would otherwise start its own
        raise ValueError("log_lm_eval_results needs the active W&B run (call it between wandb.init and finish)")
    logger = WandbLogger()
    logger.post_init(results)
    logger.log_eval_result()
    if results.get("samples"):
        logger.log_eval_samples(results["samples"])


def log_to_wandb(tracking, resolved: dict, row: dict, telemetry: list[dict], name: str,
                 group: Optional[str] = None, lm_eval_results: Optional[dict] = None) -> Optional[str]:
    """One W&B run per config: the resolved config as its config, the row's metrics in its summary, the
    per-Linear telemetry, and lm-eval's results when given. Always finished, so a multirun process can
    start the next one. Returns the run id (None when W&B is disabled).

    A W&B failure never loses the results row: callers write the row first and treat errors here as
    warnings.
    """
    if tracking.wandb_mode == "disabled":
        return None
    environment = wandb_environment(tracking.dir)
    os.environ.update(environment)
    for path in environment.values():
        Path(path).mkdir(parents=True, exist_ok=True)
    import wandb

    run = wandb.init(project=tracking.project, group=group, job_type=row.get("algorithm"),
                     name=name, config=scrub(resolved), mode=tracking.wandb_mode,
                     dir=environment["WANDB_DIR"], reinit="finish_previous",
                     settings=wandb.Settings(silent=True, console="off"))
    try:
        if telemetry:
            _log_telemetry(run, telemetry)
        if lm_eval_results:
            log_lm_eval_results(run, lm_eval_results)
        run.summary.update(summary_items(row))
        return run.id
    finally:
        run.finish()


def _wandb_inspect(run_dir: str | os.PathLike, *flags: str) -> str:
    """`wandb leet inspect` (wandb >= 0.31 reads the binary .wandb log through its Go core) on one run."""
    run_dir = Path(run_dir).resolve()
    environment = {**os.environ, **wandb_environment(run_dir.parent.parent), "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", *flags, str(run_dir)],
                          capture_output=True, text=True, env=environment, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"wandb leet inspect {run_dir} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def offline_run_summary(run_dir: str | os.PathLike) -> dict:
    """An offline run as W&B reads it back: its config, summary, name, project, state and exit code."""
    return json.loads(_wandb_inspect(run_dir, "--summary", "--json"))


def offline_run_records(run_dir: str | os.PathLike) -> list[dict]:
    """Every record of an offline run's transaction log (run, history, summary, artifact, ...) as dicts."""
    return [json.loads(line) for line in _wandb_inspect(run_dir, "--json").splitlines() if line.strip()]
