"""Wall time and matmul FLOPs per phase of a calibration run (forward passes, statistics, solves).

The pipelines wrap their phases in `meter.phase(name)`; the default `NULL_METER` does nothing, so a
normal run pays one no-op context per batch. The benchmark passes a `Meter`: with `count_flops`, each
phase runs under its own torch FlopCounterMode (which slows it down: time and FLOPs come from separate
runs), and on CUDA every phase boundary synchronizes so that its time is the device's.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from typing import Iterator, Optional

import torch


def extra_flop_formulas() -> dict:
    """Matmul-like ops that FlopCounterMode does not count by itself but the calibration relies on: the
    in-place updates (H += X̃ᵀX̃ is `addmm_`, the solvers' rank-1 steps `addr_`), matrix-vector products,
    Cholesky and triangular solves, and the CPU's fused attention. Multiply-add = 2 FLOPs, as torch counts."""
    aten = torch.ops.aten

    def addmm(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    def addr(self_shape, u_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * u_shape[0] * v_shape[0]

    def mv(a_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1]

    def addmv(self_shape, a_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1]

    def cholesky(a_shape, *args, out_shape=None, **kwargs) -> int:
        n = a_shape[-1]
        return math.prod(a_shape[:-2]) * n**3 // 3

    def solve_triangular(a_shape, b_shape, *args, out_shape=None, left=True, **kwargs) -> int:
        n = a_shape[-1]
        rhs = b_shape[-1] if left else b_shape[-2]
        return math.prod(b_shape[:-2]) * n * n * rhs

    def sdpa(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        *batch, s_q, d = q_shape  # [b, heads, s_q, d] (keys may have fewer heads: grouped-query)
        return 2 * math.prod(batch) * s_q * k_shape[-2] * (d + v_shape[-1])

    return {aten.addmm_: addmm, aten.addr_: addr, aten.addr: addr, aten.mv: mv, aten.addmv: addmv,
            aten.addmv_: addmv, aten.linalg_cholesky_ex: cholesky, aten.linalg_solve_triangular: solve_triangular,
            aten._scaled_dot_product_flash_attention_for_cpu: sdpa}


class Meter:
    """Accumulates seconds (and FLOPs when counting) by phase name."""

    def __init__(self, count_flops: bool = False, device: Optional[torch.device] = None) -> None:
        self.count_flops = count_flops
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.flops: dict[str, int] = defaultdict(int)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        if self.count_flops:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False, custom_mapping=extra_flop_formulas())
            try:
                with counter:
                    yield
            finally:
                self.flops[name] += counter.get_total_flops()
        else:
            yield
        self._sync()
        self.seconds[name] += time.perf_counter() - start


class _NullMeter:
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield


NULL_METER = _NullMeter()
