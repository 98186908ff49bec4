"""Compiled column loops (numba) for the OPTQ and GPFQ sweeps on qbench's integer grid, on the CPU.

Inside a lazy block each column costs a handful of vector ops over the M rows; issued from Python as
torch ops, each is a dispatch of several µs, which for these layer sizes outweighs the arithmetic
(97,920 columns in SmolLM2-135M). One call here does a whole lazy block with the same float operations
in the same order: Q = (clamp(round(w / s + z)) − z)·s on the integer code, then the errors and the
in-block updates. The trailing update of later columns stays one torch matmul per block.
tests/test_kernels.py checks both sweeps against the torch loop, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from qbench.quantizers import Grid

try:
    import numba
except ImportError:  # the torch loop then runs everywhere
    numba = None


@dataclass
class FusedGrid:
    """A Grid unpacked for the kernels: [n_groups, M] scale and zero rows in the solve dtype, and the
    group of each solve step's original column."""

    scale: np.ndarray
    zero: np.ndarray
    group: np.ndarray
    qmin: float
    qmax: float


def fused_grid(quantizer: Callable, WT: Tensor, cols: Sequence[int]) -> Optional[FusedGrid]:
    """The kernels' view of `quantizer` when they can run it (a qbench integer Grid, float32/64 on the
    CPU, numba installed); None sends the sweep down the torch loop.

    Under a torch dispatch mode (the benchmark's FLOP counter and memory tracker, fake tensors) the torch
    loop runs too: the kernels work on raw memory, so such a mode would not see their work."""
    if numba is None or type(quantizer) is not Grid or WT.device.type != "cpu" \
            or WT.dtype not in (torch.float32, torch.float64) or _get_current_dispatch_mode() is not None:
        return None
    group = np.asarray(cols, dtype=np.int64) // quantizer.group_size
    return FusedGrid(scale=quantizer.scale_rows.to(WT.dtype).numpy(), zero=quantizer.zero_rows.to(WT.dtype).numpy(),
                     group=group, qmin=float(quantizer.qmin), qmax=float(quantizer.qmax))


def optq_block(WT: Tensor, QT: Tensor, ET: Tensor, U: Tensor, grid: FusedGrid, i1: int, i2: int) -> None:
    """OPTQ steps i1..i2−1 on WT [N, M] (row t = column t of W), in place: QT[t] = Q(v_t),
    ET[t − i1] = (v_t − q_t)/U[t,t] and v_j −= ET[t − i1]·U[t, j] for t < j < i2."""
    _optq_block(WT.numpy(), QT.numpy(), ET.numpy(), U.numpy(), grid.scale, grid.zero, grid.group,
                grid.qmin, grid.qmax, i1, i2)


def gpfq_block(AT: Tensor, QT: Tensor, H: Tensor, d: Tensor, grid: FusedGrid, i1: int, i2: int) -> None:
    """GPFQ steps i1..i2−1 on AT [N, M], in place: QT[t] = Q(AT[t] / d[t]) and
    AT[j] −= H[t, j]·QT[t] for t < j < i2."""
    _gpfq_block(AT.numpy(), QT.numpy(), H.numpy(), d.numpy(), grid.scale, grid.zero, grid.group,
                grid.qmin, grid.qmax, i1, i2)


def _jit(fn):
    # 'contract' lets LLVM fuse v − u·e into one multiply-add, as torch's vectorised addr_ does on CPUs
    # with FMA: without it the in-block updates differ from the torch loop's in the last bit
    return fn if numba is None else numba.njit(cache=True, nogil=True, fastmath={"contract"})(fn)


@_jit
def _on_grid(w, s, z, qmin, qmax):
    """One value onto the grid, rounding the integer code half to even (as Grid.into does)."""
    code = min(max(np.rint(w / s + z), qmin), qmax)
    return (code - z) * s


@_jit
def _optq_block(WT, QT, ET, U, scale, zero, group, qmin, qmax, i1, i2):
    M = WT.shape[1]
    for t in range(i1, i2):
        s, z, d = scale[group[t]], zero[group[t]], U[t, t]
        w, q, e = WT[t], QT[t], ET[t - i1]
        for m in range(M):
            q[m] = _on_grid(w[m], s[m], z[m], qmin, qmax)
            e[m] = (w[m] - q[m]) / d
        for j in range(t + 1, i2):  # v_j −= e·U[t, j]
            u, v = U[t, j], WT[j]
            for m in range(M):
                v[m] -= u * e[m]


@_jit
def _gpfq_block(AT, QT, H, d, scale, zero, group, qmin, qmax, i1, i2):
    M = AT.shape[1]
    for t in range(i1, i2):
        s, z, a, q = scale[group[t]], zero[group[t]], AT[t], QT[t]
        for m in range(M):
            a[m] /= d[t]
            q[m] = _on_grid(a[m], s[m], z[m], qmin, qmax)
        for j in range(t + 1, i2):  # A[:, j] −= q_t·H[t, j]
            h, b = H[t, j], AT[j]
            for m in range(M):
                b[m] -= h * q[m]
