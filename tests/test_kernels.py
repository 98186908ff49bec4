"""The compiled column loops (qbench.algorithms._kernels) against the torch loops they replace.

The torch loops are what tests/test_solvers.py checks against the slow per-step definitions; the
kernels must give the same Q and the same refitted V, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from qbench.algorithms import _kernels, _linalg, gpfq, optq, qronos
from qbench.quantizers import GridSpec, build_grid

pytestmark = pytest.mark.skipif(_kernels.numba is None, reason="numba is not installed")

SOLVERS = {"optq": optq.quantize, "gpfq": gpfq.quantize, "qronos": qronos.quantize}


def layer(M, N, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(M, N, generator=g, dtype=dtype)
    X = torch.randn(N, 3 * N, generator=g, dtype=dtype) + 0.5 * torch.randn(N, 1, generator=g, dtype=dtype)
    Xt = X + 0.2 * torch.randn(N, 3 * N, generator=g, dtype=dtype)
    m = X.shape[1]
    return W, Xt @ Xt.T / m, X @ Xt.T / m


def torch_loop(monkeypatch):
    """Make every sweep take the torch loop (as for a non-Grid quantizer or a GPU tensor)."""
    monkeypatch.setattr(_kernels, "numba", None)


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spec,act_order", [(GridSpec(bits=4), False), (GridSpec(bits=3, group_size=8), True),
                                            (GridSpec(bits=4, sym=True, group_size=16), False),
                                            (GridSpec(bits=2), True)])
def test_kernels_give_the_torch_loops_q_bit_for_bit(name, dtype, spec, act_order, monkeypatch):
    W, H, G = layer(24, 48, dtype, seed=10 * list(SOLVERS).index(name) + int(spec.bits))
    H[5, :] = H[:, 5] = 0  # a dead input
    G[:, 5] = 0
    grid = build_grid(W, spec)
    assert _kernels.fused_grid(grid, W.T.contiguous(), range(48)) is not None
    kw = {"act_order": act_order} if name == "gpfq" else {"act_order": act_order, "block_size": 5}
    fused = SOLVERS[name](W, H, G, grid, **kw)
    with monkeypatch.context() as patch:
        torch_loop(patch)
        reference = SOLVERS[name](W, H, G, grid, **kw)
    assert torch.equal(fused, reference)
    assert torch.equal(grid.quantize(fused), fused)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_optq_sweep_leaves_the_same_refitted_columns(dtype, monkeypatch):
    W, H, _ = layer(16, 40, dtype, seed=3)
    grid = build_grid(W, GridSpec(bits=3))
    U, _, _ = _linalg.upper_inverse_cholesky(H, 1e-2)
    Q_fused, V_fused = optq.sweep(W, U, grid, list(range(40)), 6)
    torch_loop(monkeypatch)
    Q_loop, V_loop = optq.sweep(W, U, grid, list(range(40)), 6)
    assert torch.equal(Q_fused, Q_loop)
    assert torch.equal(V_fused, V_loop)  # the in-block updates fuse multiply-add as torch's addr_ does


def test_qronos_trailing_factor_view_is_accepted():
    """Qronos sweeps with U[1:, 1:], a strided view: the kernel must read it through its strides."""
    W, H, _ = layer(8, 20, torch.float32, seed=4)
    grid = build_grid(W, GridSpec(bits=4))
    U, _, _ = _linalg.upper_inverse_cholesky(H, 1e-2)
    Ut = U[1:, 1:]
    assert not Ut.is_contiguous()
    Q_view, _ = optq.sweep(W[:, 1:], Ut, grid, list(range(1, 20)), 4)
    Q_copy, _ = optq.sweep(W[:, 1:], Ut.contiguous(), grid, list(range(1, 20)), 4)
    assert torch.equal(Q_view, Q_copy)


def test_kernels_run_only_what_they_implement():
    W = torch.randn(4, 64)
    WT = W.T.contiguous()
    assert _kernels.fused_grid(build_grid(W, GridSpec(bits=4)), WT, range(64)) is not None
    assert _kernels.fused_grid(build_grid(W, GridSpec(bits=4, format="mxfp4")), WT, range(64)) is None
    assert _kernels.fused_grid(lambda w, j: w.round(), WT, range(64)) is None
    assert _kernels.fused_grid(build_grid(W, GridSpec(bits=4)), WT.bfloat16(), range(64)) is None


def test_flop_counting_sees_the_torch_loop():
    """The benchmark counts FLOPs under FlopCounterMode: the sweep must then issue torch ops it can see."""
    from torch.utils.flop_counter import FlopCounterMode

    from qbench.meter import extra_flop_formulas

    W, H, _ = layer(8, 32, torch.float32, seed=5)
    grid = build_grid(W, GridSpec(bits=4))
    counter = FlopCounterMode(display=False, custom_mapping=extra_flop_formulas())
    with counter:
        assert _kernels.fused_grid(grid, W.T.contiguous(), range(32)) is None
        optq.quantize(W, H, None, grid, block_size=8)
    addr = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "addr" in str(op))
    assert addr == sum(2 * 8 * (7 - k) for k in range(8)) * 4  # in-block rank-1 updates of 4 blocks of 8
