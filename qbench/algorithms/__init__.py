"""The solvers, one pure function per module, and the registry that maps `algorithm.name` to them.

Every solver follows design.md §4: `quantize(W, H, G, quantizer, *, info=None, **options) -> Q`.
`needs` says which calibration statistics the pipeline must accumulate for it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from ._linalg import all_finite  # noqa: F401  (the pipeline's NaN/Inf checks use the solvers' fast one)


@dataclass(frozen=True)
class Solver:
    """A registered algorithm: where its quantize() lives and which statistics it consumes."""

    module: str
    needs_H: bool
    needs_G: bool

    @property
    def quantize(self) -> Callable:
        return importlib.import_module(f"qbench.algorithms.{self.module}").quantize


REGISTRY: dict[str, Solver] = {
    "rtn": Solver("rtn", needs_H=False, needs_G=False),
    "optq": Solver("optq", needs_H=True, needs_G=False),
    "gpfq": Solver("gpfq", needs_H=True, needs_G=True),
    "qronos": Solver("qronos", needs_H=True, needs_G=True),
}
