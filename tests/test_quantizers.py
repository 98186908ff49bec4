"""Every grid: levels, round trips, grouping, symmetry, the ternary grid, values already on the grid."""

import itertools

import pytest
import torch

from qbench.quantizers import GridSpec, build_grid, integer_range


def brute_force(W, grid):
    """Nearest level by exhaustive search over every integer code of each (row, group)."""
    codes = torch.arange(grid.qmin, grid.qmax + 1, dtype=W.dtype)
    g = torch.arange(W.shape[1]) // grid.group_size
    s, z = grid.scale[:, g].to(W.dtype), grid.zero[:, g].to(W.dtype)
    levels = (codes[None, None, :] - z[..., None]) * s[..., None]  # [M, N, L]
    idx = (W[..., None] - levels).abs().argmin(dim=-1)
    return torch.gather(levels, 2, idx[..., None])[..., 0]


@pytest.mark.parametrize("bits,sym,group", itertools.product([2, 3, 4, 8], [False, True], [-1, 4]))
def test_grid_is_nearest_level_and_idempotent(bits, sym, group):
    W = torch.randn(6, 16, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    grid = build_grid(W, GridSpec(bits=bits, sym=sym, group_size=group))
    Q = grid.quantize(W)
    # nearest grid point (ties are measure-zero for random data)
    torch.testing.assert_close(Q, brute_force(W, grid), rtol=0, atol=1e-12)
    # round trip: values on the grid stay put, and their codes are integers inside the range
    torch.testing.assert_close(grid.quantize(Q), Q, rtol=0, atol=0)
    codes = grid.codes(Q)
    assert torch.allclose(codes, codes.round(), atol=1e-9)
    assert codes.min() >= grid.qmin and codes.max() <= grid.qmax
    # number of levels used per (row, group) never exceeds 2^bits
    size = grid.group_size
    assert max(len(torch.unique(Q[r, c:c + size])) for r in range(6) for c in range(0, 16, size)) <= 2**bits


def test_integer_ranges():
    assert integer_range(4, sym=False) == (0, 15)
    assert integer_range(4, sym=True) == (-8, 7)
    assert integer_range(2, sym=False) == (0, 3)
    assert integer_range(1.58, sym=True) == (-1, 1)
    with pytest.raises(ValueError):
        integer_range(1, sym=False)
    with pytest.raises(ValueError):
        integer_range(9, sym=False)


def test_minmax_range_is_covered_exactly():
    W = torch.tensor([[-1.0, 0.5, 3.0, 2.0]], dtype=torch.float64)
    grid = build_grid(W, GridSpec(bits=4, sym=False))
    assert grid.scale.item() == pytest.approx(4.0 / 15)
    Q = grid.quantize(W)
    assert Q.max().item() == pytest.approx(3.0, abs=grid.scale.item() / 2)
    assert 0.0 in grid.quantize(torch.zeros(1, 4, dtype=torch.float64))  # zero is a level


def test_ternary_levels():
    W = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    grid = build_grid(W, GridSpec(bits=1.58, sym=True))
    Q = grid.quantize(W)
    codes = grid.codes(Q)
    assert set(codes.unique().tolist()) <= {-1.0, 0.0, 1.0}
    # the largest magnitude of every row maps to ±scale
    torch.testing.assert_close(Q.abs().amax(dim=1), W.abs().amax(dim=1))
    assert len(torch.unique(Q[0])) == 3


def test_per_group_scales_are_independent():
    W = torch.ones(2, 8)
    W[:, 4:] *= 100.0  # second group is 100x larger
    grid = build_grid(W, GridSpec(bits=4, sym=True, group_size=4))
    assert grid.scale.shape == (2, 2)
    assert torch.allclose(grid.scale[:, 1], 100 * grid.scale[:, 0])
    torch.testing.assert_close(grid.quantize(W), W)  # maxima are levels


def test_column_call_uses_original_index_for_its_group():
    W = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    grid = build_grid(W, GridSpec(bits=3, group_size=4))
    full = grid.quantize(W)
    for j in range(8):
        torch.testing.assert_close(grid(W[:, j], j), full[:, j])
    idx = torch.tensor([7, 0, 5])
    torch.testing.assert_close(grid(W[:, idx], idx), full[:, idx])


def test_collapsed_group_and_shrink():
    W = torch.zeros(2, 4)
    grid = build_grid(W, GridSpec(bits=4))
    assert torch.isfinite(grid.scale).all()
    torch.testing.assert_close(grid.quantize(W), W)
    V = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    wide, narrow = build_grid(V, GridSpec(bits=2)), build_grid(V, GridSpec(bits=2, shrink=0.8))
    torch.testing.assert_close(narrow.scale, 0.8 * wide.scale)


def test_mse_scale_search_never_worse_than_minmax():
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    W[:, 0] *= 8  # outliers make min-max wasteful
    minmax = build_grid(W, GridSpec(bits=3, sym=True))
    mse = build_grid(W, GridSpec(bits=3, sym=True, scale="mse"))
    err = lambda g: (g.quantize(W) - W).pow(2).sum(dim=1)  # noqa: E731
    assert (err(mse) <= err(minmax) + 1e-6).all()
    assert err(mse).sum() < err(minmax).sum()


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        build_grid(torch.randn(2, 10), GridSpec(bits=4, group_size=4))
