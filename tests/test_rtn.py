"""RTN on tiny tensors: every weight goes to its nearest level; H and G are ignored."""

import torch

from qbench.algorithms import REGISTRY
from qbench.quantizers import GridSpec, build_grid


def test_rtn_is_elementwise_nearest_level():
    W = torch.randn(4, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = build_grid(W, GridSpec(bits=3, sym=False, group_size=4))
    info = {}
    Q = REGISTRY["rtn"].quantize(W, None, None, grid, info=info)
    assert Q.shape == W.shape and Q.dtype == W.dtype
    for i in range(4):
        for j in range(12):
            g = j // 4
            s, z = grid.scale[i, g].item(), grid.zero[i, g].item()
            levels = [(c - z) * s for c in range(grid.qmin, grid.qmax + 1)]
            nearest = min(levels, key=lambda v: abs(v - W[i, j].item()))
            assert abs(Q[i, j].item() - nearest) < 1e-12
    assert info["damping"] == 0.0


def test_rtn_ignores_statistics():
    W = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    grid = build_grid(W, GridSpec(bits=4))
    H = torch.eye(8)
    assert torch.equal(REGISTRY["rtn"].quantize(W, H, H, grid), REGISTRY["rtn"].quantize(W, None, None, grid))
