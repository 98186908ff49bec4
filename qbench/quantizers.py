"""Grids: uniform integer grids (sym/asym, per-channel/per-group), the ternary 1.58-bit grid, and MXFP4.

A weight grid is fixed from the float weights before any solver runs (the paper's setting): one scale
(and zero point) per output row and group of input columns. The solvers only ever call `grid(w, j)`,
which maps values of original column(s) j onto the grid (design.md §4 contract).

Activations and the KV cache use the same number formats with *dynamic* scales, computed from each
token's own values at run time (`quantize_dynamic`).
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
    format: str = "int"  # int | mxfp4 (bits 4, blocks of 32 input columns, power-of-two scales)


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
    """A fixed per-(row, group) affine grid: value = (code - zero) · scale, code in [qmin, qmax].

    code = clamp(round(w / scale + zero)): the rounding happens on the integer code, as in Brevitas's
    IntQuant, so an exact tie (weights that already sit on a coarser grid, like dequantized GGUF) breaks
    to the even *code* in both."""

    scale: Tensor  # [M, n_groups]
    zero: Tensor  # [M, n_groups], integer-valued
    qmin: int
    qmax: int
    group_size: int  # columns per group (N for per-channel)

    def __post_init__(self) -> None:
        # one contiguous [M] scale and zero row per group ([n_groups, M]): the solvers quantize a column at a time
        self.scale_rows = self.scale.T.contiguous()
        self.zero_rows = self.zero.T.contiguous()

    def __call__(self, w: Tensor, j: int | Tensor) -> Tensor:
        """Quantize column(s) w ([M] with int j, or [M, k] with a LongTensor of k original indices)."""
        if isinstance(j, int):
            g = j // self.group_size
            s, z = self.scale_rows[g].to(w.dtype), self.zero_rows[g].to(w.dtype)
        else:
            g = j // self.group_size
            s, z = self.scale[:, g].to(w.dtype), self.zero[:, g].to(w.dtype)
        code = torch.clamp(torch.round(w / s + z), self.qmin, self.qmax)  # ties to even in the code domain
        return (code - z) * s

    def into(self, w: Tensor, j: int, out: Tensor) -> Tensor:
        """`self(w, j)` for one column, written into `out` (same arithmetic, no temporaries: the solvers'
        column loops call this once per column)."""
        g = j // self.group_size
        s, z = self.scale_rows[g], self.zero_rows[g]
        torch.div(w, s, out=out)
        return out.add_(z).round_().clamp_(self.qmin, self.qmax).sub_(z).mul_(s)

    def quantize(self, W: Tensor) -> Tensor:
        """Round every column of W to its nearest grid point (RTN)."""
        return self(W, torch.arange(W.shape[1], device=W.device))

    @staticmethod
    def cat(grids: list["Grid"]) -> "Grid":
        """One grid for the stacked rows of several layers (each keeps its own scales)."""
        return Grid(scale=torch.cat([g.scale for g in grids]), zero=torch.cat([g.zero for g in grids]),
                    qmin=grids[0].qmin, qmax=grids[0].qmax, group_size=grids[0].group_size)

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


def build_grid(W: Tensor, spec: GridSpec) -> "Grid | MXGrid":
    """Fix scales (and zero points) from the float weights W [M, N], per row and group."""
    if spec.format == "mxfp4":
        return build_mx_grid(W)
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
        code = torch.clamp(torch.round(Wg / scale[..., None] + zero[..., None]), qmin, qmax)
        err = ((code - zero[..., None]) * scale[..., None] - Wg).pow(2).sum(dim=2)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


# ---- MXFP4 (OCP Microscaling Formats spec v1.0): FP4 E2M1 elements sharing one E8M0 scale per 32 values

E2M1_LEVELS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitudes; index parity = mantissa bit
E2M1_EMAX = 2  # exponent of the largest normal E2M1 value, 6 = 1.5·2²
MX_BLOCK = 32
E8M0_EXP_RANGE = (-127, 127)


def round_to_e2m1(x: Tensor) -> Tensor:
    """Nearest E2M1 value, ties to the even mantissa, saturating at ±6 (OCP MX §5.3 conversion)."""
    # The E2M1 magnitudes are the multiples of 0.5 below 2, of 1 in [2, 4] and of 2 in [4, 6]; within each
    # range an even multiple has mantissa 0, so torch.round (half to even) is exactly the spec's rounding.
    a = x.abs().clamp(max=E2M1_LEVELS[-1])
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0)).to(x.dtype)
    return torch.copysign(torch.round(a / step) * step, x)


def mx_scale(amax: Tensor) -> Tensor:
    """Shared power-of-two scale of an MX block from its largest magnitude: 2^(floor(log2 amax) − emax).

    The block's largest value then lands in [4, 8) and saturates to 6 above 6, as the spec prescribes.
    An all-zero block gets scale 1."""
    _, exponent = torch.frexp(amax.float())  # amax = m·2^e with m in [0.5, 1): floor(log2 amax) = e − 1
    shared = (exponent - 1 - E2M1_EMAX).clamp(*E8M0_EXP_RANGE)
    scale = torch.ldexp(torch.ones_like(amax, dtype=torch.float32), shared)
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def mx_quantize(x: Tensor) -> Tensor:
    """Fake-quantize x [..., k·32] to MXFP4 along its last dimension, one shared scale per 32 values."""
    shape = x.shape
    xb = x.float().reshape(*shape[:-1], shape[-1] // MX_BLOCK, MX_BLOCK)
    scale = mx_scale(xb.abs().amax(dim=-1, keepdim=True))
    return (round_to_e2m1(xb / scale) * scale).reshape(shape).to(x.dtype)


@dataclass
class MXGrid:
    """A fixed MXFP4 weight grid: value = scale · e2m1, one power-of-two scale per row and 32 columns."""

    scale: Tensor  # [M, N / 32]
    group_size: int = MX_BLOCK

    def __post_init__(self) -> None:
        self._scale_rows = self.scale.T.contiguous()

    def __call__(self, w: Tensor, j: int | Tensor) -> Tensor:
        s = self._scale_rows[j // self.group_size] if isinstance(j, int) else self.scale[:, j // self.group_size]
        s = s.to(w.dtype)
        return round_to_e2m1(w / s) * s  # division by a power of two is exact

    def quantize(self, W: Tensor) -> Tensor:
        return self(W, torch.arange(W.shape[1], device=W.device))

    @staticmethod
    def cat(grids: list["MXGrid"]) -> "MXGrid":
        return MXGrid(scale=torch.cat([g.scale for g in grids]))


def build_mx_grid(W: Tensor) -> MXGrid:
    """MXFP4 scales of W [M, N] (N a multiple of 32) from each row's blocks of 32 input columns."""
    M, N = W.shape
    if N % MX_BLOCK:
        raise ValueError(f"MXFP4 needs the input dimension to be a multiple of {MX_BLOCK}, got {N}")
    amax = W.detach().float().reshape(M, N // MX_BLOCK, MX_BLOCK).abs().amax(dim=2)
    return MXGrid(scale=mx_scale(amax))


# ---- dynamic (per-token) quantization of activations and the KV cache


@dataclass(frozen=True)
class DynamicSpec:
    """Run-time fake quantization along the last dimension: one scale per token (or per group of it)."""

    bits: int = 16  # 16 = off
    format: str = "int"  # int | mxfp4
    sym: bool = False
    group_size: int = -1  # -1: the whole last dimension (per token / per head vector); mxfp4: always 32
    clip_ratio: float = 1.0  # multiplies each token's range before its scale is taken

    @property
    def enabled(self) -> bool:
        return self.bits < 16


def quantize_dynamic(x: Tensor, spec: DynamicSpec) -> Tensor:
    """Fake-quantize x along its last dimension with scales taken from x itself (computed in float32)."""
    if not spec.enabled:
        return x
    if spec.format == "mxfp4":
        return mx_quantize(x)
    shape = x.shape
    g = shape[-1] if spec.group_size in (-1, None) else spec.group_size
    xg = x.float().reshape(*shape[:-1], shape[-1] // g, g)
    qmin, qmax = integer_range(spec.bits, spec.sym)
    xmin, xmax = torch.aminmax(xg, dim=-1, keepdim=True)
    xmin, xmax = xmin.clamp(max=0) * spec.clip_ratio, xmax.clamp(min=0) * spec.clip_ratio
    scale, zero = _range_to_grid(xmin, xmax, qmin, qmax, spec.sym)
    out = (torch.clamp(torch.round(xg / scale + zero), qmin, qmax) - zero) * scale
    return out.reshape(shape).to(x.dtype)


def spec_from_config(quant) -> GridSpec:
    """The weight GridSpec of a `quant` config group."""
    return GridSpec(bits=float(quant.w_bits), sym=bool(quant.w_sym), group_size=int(quant.w_group_size),
                    scale=str(quant.w_scale), shrink=float(quant.w_shrink), format=str(quant.w_format))


def activation_spec(quant) -> DynamicSpec:
    """The DynamicSpec for the inputs of the Linears inside the decoder blocks."""
    return DynamicSpec(bits=int(quant.a_bits), format=str(quant.a_format), sym=bool(quant.a_sym),
                       group_size=int(quant.a_group_size), clip_ratio=float(quant.a_clip_ratio))


def kv_spec(quant) -> DynamicSpec:
    """The DynamicSpec for keys and values, one scale per token and head (or group within a head)."""
    return DynamicSpec(bits=int(quant.kv_bits), format="int", sym=bool(quant.kv_sym),
                       group_size=int(quant.kv_group_size), clip_ratio=float(quant.kv_clip_ratio))
