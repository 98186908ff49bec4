"""The results table (one row per run key, written atomically) and W&B logging.

Rows live as one JSON file per run key under `<dir>/rows/`, each written to a temporary file and
renamed into place, so a killed run leaves no partial row and concurrent jobs never lose one another's
rows. The compiled table (`results.parquet`, `results.csv`) is rebuilt from those files after each run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from qbench import faults

SCHEMA_VERSION = 1
# fields that do not change what is measured: where results go, and memory/speed knobs
KEY_EXCLUDES = ("tracking", "calibration.float_cache_gb")
SECRET_NAME = re.compile(r"(api_?key|secret|password|passwd|credential|(^|_)(access_|auth_|hf_)?token$)", re.I)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def run_key(resolved: dict) -> str:
    """Hash of the resolved config minus tracking fields: equal keys measure the same thing."""
    payload = json.loads(_canonical(resolved))
    for dotted in KEY_EXCLUDES:
        *parents, leaf = dotted.split(".")
        node = payload
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()[:16]


def float_key(resolved: dict) -> str:
    """Key of the float baseline: only what changes the float model's numbers."""
    payload = {"baseline": "float", "model": resolved["model"], "eval": resolved["eval"],
               "seed": resolved.get("seed"), "device": resolved.get("device")}
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

    def compile(self) -> pd.DataFrame:
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


def log_to_wandb(tracking, resolved: dict, row: dict, telemetry: list[dict], name: str) -> Optional[str]:
    """One W&B run per config: resolved config, metrics and the per-Linear telemetry. Returns its id.

    A W&B failure never loses the results row: callers write the row first and treat errors here as
    warnings.
    """
    if tracking.wandb_mode == "disabled":
        return None
    os.environ.update(wandb_environment(tracking.dir))
    for path in wandb_environment(tracking.dir).values():
        Path(path).mkdir(parents=True, exist_ok=True)
    import wandb

    run = wandb.init(project=tracking.project, group=tracking.group, job_type=row.get("algorithm"),
                     name=name, config=scrub(resolved), mode=tracking.wandb_mode,
                     dir=os.environ["WANDB_DIR"], reinit="finish_previous",
                     settings=wandb.Settings(silent=True, console="off"))
    try:
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        run.summary.update(metrics)
        run.summary.update({"run_key": row["run_key"], "status": row["status"]})
        if telemetry:
            columns = list(telemetry[0])
            run.log({"telemetry": wandb.Table(columns=columns, data=[[t[c] for c in columns] for t in telemetry])})
        return run.id
    finally:
        run.finish()
