"""Every grid: levels, round trips, grouping, symmetry, the ternary grid, values already on the grid."""

import itertools
import math

import pytest
import torch

from qbench.quantizers import (
    E2M1_LEVELS,
    DynamicSpec,
    GridSpec,
    MXGrid,
    build_grid,
    build_mx_grid,
    integer_range,
    mx_quantize,
    mx_scale,
    quantize_dynamic,
    round_to_e2m1,
)


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


# ---- MXFP4 and dynamic (per-token) quantization



def _e2m1_reference(v: float) -> float:
    """Slow definition: the nearest E2M1 magnitude, ties to the even mantissa (even index), saturating."""
    a = min(abs(v), 6.0)
    best = min(range(len(E2M1_LEVELS)), key=lambda i: (abs(E2M1_LEVELS[i] - a), i % 2))
    return math.copysign(E2M1_LEVELS[best], v)


def test_every_e2m1_value_is_kept_and_ties_go_to_the_even_mantissa():
    values = torch.tensor([s * v for v in E2M1_LEVELS for s in (1.0, -1.0)])
    assert torch.equal(round_to_e2m1(values), values)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert round_to_e2m1(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert round_to_e2m1(-ties).tolist() == [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]
    assert round_to_e2m1(torch.tensor([6.5, 7.9, 1e6, -1e6])).tolist() == [6.0, 6.0, 6.0, -6.0]  # saturation
    x = torch.linspace(-8, 8, 2001)
    assert round_to_e2m1(x).tolist() == [_e2m1_reference(v) for v in x.tolist()]


def test_mx_scale_is_the_power_of_two_that_puts_the_block_max_in_4_to_8():
    amax = torch.tensor([6.0, 8.0, 7.9, 0.3, 1.0, 0.0, 2.0 ** -130])
    scale = mx_scale(amax)
    assert scale.tolist()[:6] == [1.0, 2.0, 1.0, 2.0 ** -4, 0.25, 1.0]  # 0-block: scale 1
    assert scale[6] == 2.0 ** -127  # E8M0 has no smaller exponent
    assert torch.all(torch.log2(scale) == torch.round(torch.log2(scale)))


def test_mx_quantize_matches_its_definition_block_by_block():
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 96)
    out = mx_quantize(x)
    for r in range(3):
        for b in range(3):
            block = x[r, 32 * b:32 * (b + 1)].tolist()
            scale = 2.0 ** (math.floor(math.log2(max(abs(v) for v in block))) - 2)
            expected = [_e2m1_reference(v / scale) * scale for v in block]
            assert out[r, 32 * b:32 * (b + 1)].tolist() == expected


def test_mx_weight_grid_quantizes_columns_like_the_rows_of_mx_quantize():
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    grid = build_mx_grid(W)
    assert grid.scale.shape == (8, 2)
    torch.testing.assert_close(grid.quantize(W), mx_quantize(W), rtol=0, atol=0)
    for j in (0, 31, 32, 63):  # the solvers' one-column calls agree with the whole-matrix call
        assert torch.equal(grid(W[:, j], j), mx_quantize(W)[:, j])
    with pytest.raises(ValueError, match="multiple of 32"):
        build_mx_grid(torch.randn(4, 48))


def test_mx_grid_through_a_gridspec(rng):
    W = torch.randn(4, 64, generator=rng)
    grid = build_grid(W, GridSpec(bits=4, format="mxfp4"))
    assert isinstance(grid, MXGrid)
    stacked = MXGrid.cat([grid, build_mx_grid(2 * W)])
    assert torch.equal(stacked.quantize(torch.cat([W, 2 * W])), torch.cat([mx_quantize(W), mx_quantize(2 * W)]))


def _per_token_reference(x: torch.Tensor, bits: int, sym: bool, clip: float) -> torch.Tensor:
    """One scale (and zero point) per row, from that row alone."""
    out = torch.empty_like(x)
    for t, row in enumerate(x):
        lo, hi = min(float(row.min()), 0.0) * clip, max(float(row.max()), 0.0) * clip
        if sym:
            qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            scale, zero = max(hi, -lo) / qmax, 0.0
        else:
            qmin, qmax = 0, 2 ** bits - 1
            scale = (hi - lo) / (qmax - qmin)
            zero = round(qmin - lo / scale)
        code = torch.clamp(torch.round(row / scale) + zero, qmin, qmax)
        out[t] = (code - zero) * scale
    return out


@pytest.mark.parametrize("bits,sym,clip", [(4, False, 1.0), (4, True, 1.0), (8, False, 1.0), (4, False, 0.9)])
def test_per_token_quantization_has_one_scale_per_token(bits, sym, clip):
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(2)) * torch.tensor([[0.01], [0.1], [1], [10], [3], [7]])
    out = quantize_dynamic(x, DynamicSpec(bits=bits, sym=sym, clip_ratio=clip))
    torch.testing.assert_close(out, _per_token_reference(x, bits, sym, clip), rtol=1e-6, atol=1e-7)
    for t in range(6):  # at most 2^bits distinct values per token
        assert out[t].unique().numel() <= 2 ** bits
    # per token: scaling one token scales only its own output
    y = x.clone()
    y[0] *= 16
    out_y = quantize_dynamic(y, DynamicSpec(bits=bits, sym=sym, clip_ratio=clip))
    torch.testing.assert_close(out_y[0], 16 * out[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(out_y[1:], out[1:])


def test_dynamic_groups_and_16_bits():
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(3))
    assert quantize_dynamic(x, DynamicSpec(bits=16)) is x
    grouped = quantize_dynamic(x, DynamicSpec(bits=4, group_size=16))
    by_hand = torch.cat([quantize_dynamic(x[..., i:i + 16], DynamicSpec(bits=4)) for i in range(0, 64, 16)], dim=-1)
    assert torch.equal(grouped, by_hand)
    assert torch.equal(quantize_dynamic(x, DynamicSpec(bits=4, format="mxfp4")), mx_quantize(x))
    half = quantize_dynamic(x.bfloat16(), DynamicSpec(bits=4))
    assert half.dtype == torch.bfloat16


@pytest.mark.parametrize("spec", [GridSpec(bits=4), GridSpec(bits=3, group_size=8), GridSpec(bits=1.58, sym=True)])
def test_grid_into_is_the_grid_call(spec):
    """The solvers' in-place column quantization gives exactly grid(w, j)."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(12, 32, generator=g)
    grid = build_grid(W, spec)
    V = W + 0.3 * torch.randn(12, 32, generator=g)  # updated columns reach past the float range
    out = torch.empty(12)
    for j in range(32):
        assert torch.equal(grid.into(V[:, j].contiguous(), j, out), grid(V[:, j], j))
