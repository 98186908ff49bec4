"""Crash safety: named kill points for fault-injection tests, and cleanup of what killed runs left half-made.

`failpoint(name)` does nothing unless the environment variable QBENCH_FAILPOINT equals `name`; then the
process SIGKILLs itself, exactly as a preempted job or the OOM killer would end it (no cleanup code runs).
tests/test_faults.py drives every stage through it and through randomly timed kills.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

FAILPOINT_ENV = "QBENCH_FAILPOINT"


def failpoint(name: str) -> None:
    if os.environ.get(FAILPOINT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def temp_prefix(stem: str) -> str:
    """Prefix of a temporary file or folder that names its owner: `.<stem>-<pid>-`."""
    return f".{stem}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_orphans(folder: Path, stem: str) -> list[Path]:
    """Delete the `.<stem>-<pid>-*` leftovers of processes that no longer exist; returns what was removed."""
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.glob(f".{stem}-*-*"):
        pid = path.name[len(stem) + 2:].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed
