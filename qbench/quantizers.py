"""Weight grids: uniform integer grids (sym/asym, per-channel/per-group) and the ternary 1.58-bit grid.

A grid is fixed from the float weights before any solver runs (the paper's setting): one scale and
zero point per output row and group of input columns. The solvers only ever call
`grid(w, j)`, which maps values of original column(s) j onto the grid (design.md §4 contract).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GridSpec:
    """What grid to build: bit width (1.58 = levels {-1, 0, 1}), symmetry, grouping, scale search."""

    bits: float = 4
    sym: bool = False
    group_size: int = -1  # -1: one group spanning all input columns (per-channel)
    scale: str = "minmax"  # minmax | mse
    shrink: float = 1.0  # multiplies the range before the scale is taken


def integer_range(bits: float, sym: bool) -> tuple[int, int]:
    """Integer code range [qmin, qmax] for a bit width; 1.58 bits is the ternary {-1, 0, 1}."""
    if math.isclose(bits, 1.58):
        return -1, 1
    b = int(bits)
    if b != bits or not 2 <= b <= 8:
        raise ValueError(f"bits={bits}: use 1.58 or an integer 2..8")
    if sym:
        return -(2 ** (b - 1)), 2 ** (b - 1) - 1
    return 0, 2**b - 1


@dataclass
class Grid:
    """A fixed per-(row, group) affine grid: value = (code - zero) · scale, code in [qmin, qmax]."""

    scale: Tensor  # [M, n_groups]
    zero: Tensor  # [M, n_groups], integer-valued
    qmin: int
    qmax: int
    group_size: int  # columns per group (N for per-channel)

    def __post_init__(self) -> None:
        # one contiguous [M] scale and zero row per group: the solvers quantize a column at a time
        self._scale_rows = self.scale.T.contiguous()
        self._zero_rows = self.zero.T.contiguous()

    def __call__(self, w: Tensor, j: int | Tensor) -> Tensor:
        """Quantize column(s) w ([M] with int j, or [M, k] with a LongTensor of k original indices)."""
        if isinstance(j, int):
            g = j // self.group_size
            s, z = self._scale_rows[g].to(w.dtype), self._zero_rows[g].to(w.dtype)
        else:
            g = j // self.group_size
            s, z = self.scale[:, g].to(w.dtype), self.zero[:, g].to(w.dtype)
        code = torch.clamp(torch.round(w / s) + z, self.qmin, self.qmax)
        return (code - z) * s

    def quantize(self, W: Tensor) -> Tensor:
        """Round every column of W to its nearest grid point (RTN)."""
        return self(W, torch.arange(W.shape[1], device=W.device))

    def codes(self, W: Tensor) -> Tensor:
        """Integer codes of values already on the grid (for checks and packing)."""
        j = torch.arange(W.shape[1], device=W.device)
        g = j // self.group_size
        return torch.round(W / self.scale[:, g] + self.zero[:, g])


def _range_to_grid(xmin: Tensor, xmax: Tensor, qmin: int, qmax: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point that cover [xmin, xmax] (which always contains 0)."""
    if sym:
        amax = torch.maximum(xmax, -xmin)
        # ternary and narrow grids: the largest magnitude maps to qmax (|qmin| may be qmax + 1)
        scale = amax / qmax
        zero = torch.zeros_like(scale)
    else:
        scale = (xmax - xmin) / (qmax - qmin)
        zero = torch.round(qmin - xmin / torch.where(scale > 0, scale, torch.ones_like(scale)))
    # a collapsed range (all-zero group) gets a unit scale so that every value maps to 0 exactly
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zero


def build_grid(W: Tensor, spec: GridSpec) -> Grid:
    """Fix scales and zero points from the float weights W [M, N], per row and group."""
    M, N = W.shape
    group_size = N if spec.group_size in (-1, None) else spec.group_size
    if N % group_size:
        raise ValueError(f"group_size={group_size} does not divide the input dimension {N}")
    qmin, qmax = integer_range(spec.bits, spec.sym)
    Wg = W.detach().to(torch.float32).reshape(M, N // group_size, group_size)
    xmin = Wg.amin(dim=2).clamp(max=0)  # the grid always holds 0 exactly
    xmax = Wg.amax(dim=2).clamp(min=0)
    scale, zero = _range_to_grid(xmin * spec.shrink, xmax * spec.shrink, qmin, qmax, spec.sym)
    if spec.scale == "mse":
        scale, zero = _mse_search(Wg, xmin * spec.shrink, xmax * spec.shrink, qmin, qmax, spec.sym)
    return Grid(scale=scale, zero=zero, qmin=qmin, qmax=qmax, group_size=group_size)


def _mse_search(Wg: Tensor, xmin: Tensor, xmax: Tensor, qmin: int, qmax: int, sym: bool,
                steps: int = 100, max_shrink: float = 0.8) -> tuple[Tensor, Tensor]:
    """Per (row, group), shrink the range by p in [1 - max_shrink, 1] to minimise ‖w - Q(w)‖²."""
    best_err = torch.full(xmin.shape, float("inf"))
    best_scale, best_zero = _range_to_grid(xmin, xmax, qmin, qmax, sym)
    for i in range(int(max_shrink * steps)):
        p = 1 - i / steps
        scale, zero = _range_to_grid(xmin * p, xmax * p, qmin, qmax, sym)
        code = torch.clamp(torch.round(Wg / scale[..., None]) + zero[..., None], qmin, qmax)
        err = ((code - zero[..., None]) * scale[..., None] - Wg).pow(2).sum(dim=2)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def spec_from_config(quant) -> GridSpec:
    """The weight GridSpec of a `quant` config group."""
    return GridSpec(bits=float(quant.w_bits), sym=bool(quant.w_sym), group_size=int(quant.w_group_size),
                    scale=str(quant.w_scale), shrink=float(quant.w_shrink))
