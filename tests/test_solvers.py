"""The OPTQ, GPFQ and Qronos solvers against their slow per-step definitions (design.md §4).

The slow definitions below are written from X, X̃ and W directly (explicit loops over t, linear solves
and least squares on the data), independently of qbench.algorithms' helpers.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from qbench.algorithms import _linalg, gpfq, optq, qronos

SOLVERS = {"optq": optq.quantize, "gpfq": gpfq.quantize, "qronos": qronos.quantize}
NO_DAMPING = {"optq": {"percdamp": 0.0}, "gpfq": {}, "qronos": {"alpha": 0.0}}


# ---------------------------------------------------------------- fixtures: data and test grids


def make_layer(M=12, N=24, m=96, noise=0.15, seed=0, dtype=torch.float64):
    """W [M, N], correlated float inputs X = A·Z [N, m] and mismatched X̃ = X + noise."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(N, N, generator=g, dtype=dtype) / math.sqrt(N) + 0.5 * torch.eye(N, dtype=dtype)
    Z = torch.randn(N, m, generator=g, dtype=dtype)
    X = A @ Z
    Xt = X + noise * torch.randn(N, m, generator=g, dtype=dtype)
    W = torch.randn(M, N, generator=g, dtype=dtype)
    return W, X, Xt


def stats(X, Xt):
    """H = X̃X̃ᵀ/m, G = XX̃ᵀ/m."""
    m = X.shape[1]
    return Xt @ Xt.T / m, X @ Xt.T / m


class MinMaxGrid:
    """Per-row (or per-row-and-group) asymmetric min-max grid fixed from W; records the j's it sees."""

    def __init__(self, W, bits=3, group_size=None):
        M, N = W.shape
        self.gs = group_size or N
        Wg = W.reshape(M, N // self.gs, self.gs)
        lo, hi = Wg.amin(2).clamp(max=0), Wg.amax(2).clamp(min=0)
        self.maxq = 2**bits - 1
        self.scale = (hi - lo) / self.maxq
        self.zero = torch.round(-lo / self.scale)
        self.calls: list[int] = []

    def project(self, w, j):
        g = j // self.gs
        s, z = self.scale[:, g].to(w.dtype), self.zero[:, g].to(w.dtype)
        return (torch.clamp(torch.round(w / s) + z, 0, self.maxq) - z) * s

    def __call__(self, w, j):
        if isinstance(j, torch.Tensor):
            assert j.dtype == torch.long and w.shape == (self.scale.shape[0], j.numel())
            self.calls.extend(j.tolist())
        else:
            assert isinstance(j, int) and w.shape == (self.scale.shape[0],)
            self.calls.append(j)
        return self.project(w, j)

    def on_grid(self, Q):
        return torch.equal(self.project(Q, torch.arange(Q.shape[1])), Q)


def objective(W, Q, X, Xt):
    """‖XᵀWᵀ − X̃ᵀQᵀ‖ (Frobenius)."""
    return float(torch.linalg.norm(X.T @ W.T - Xt.T @ Q.T))


# ---------------------------------------------------------------- slow per-step definitions


def slow_optq(W, X, Xt, quant, cols):
    """q_t = Q(v_t); v_{>t} += (v_t − q_t)·H_{>t,>t}⁻¹H_{>t,t} with H = X̃X̃ᵀ."""
    M, N = W.shape
    H = Xt @ Xt.T
    V, Q = W.clone(), torch.zeros_like(W)
    for t in range(N):
        Q[:, t] = quant(V[:, t].clone(), cols[t])
        if t + 1 < N:
            step = torch.linalg.solve(H[t + 1:, t + 1:], H[t + 1:, t])
            V[:, t + 1:] += (V[:, t] - Q[:, t])[:, None] * step[None, :]
    return Q


def slow_gpfq(W, X, Xt, quant, cols):
    """q_t = Q(⟨X̃_t, Σ_{j≤t} w_j X_j − Σ_{j<t} q_j X̃_j⟩ / ‖X̃_t‖²), all rows at once."""
    M, N = W.shape
    Q = torch.zeros_like(W)
    for t in range(N):
        r = W[:, : t + 1] @ X[: t + 1] - Q[:, :t] @ Xt[:t]
        Q[:, t] = quant(r @ Xt[t] / (Xt[t] @ Xt[t]), cols[t])
    return Q


def slow_qronos(W, X, Xt, quant, cols):
    """q_t = Q(⟨X̃_t, XᵀW − Σ_{j<t} q_jX̃_j − Σ_{j>t} v_jX̃_j⟩/‖X̃_t‖²); v_{>t} = lstsq refit to XᵀW."""
    M, N = W.shape
    T = W @ X  # float target, one row per output channel
    V, Q = W.clone(), torch.zeros_like(W)
    for t in range(N):
        r = T - Q[:, :t] @ Xt[:t] - V[:, t + 1:] @ Xt[t + 1:]
        Q[:, t] = quant(r @ Xt[t] / (Xt[t] @ Xt[t]), cols[t])
        if t + 1 < N:
            R = T - Q[:, : t + 1] @ Xt[: t + 1]
            V[:, t + 1:] = torch.linalg.lstsq(Xt[t + 1:].T, R.T).solution.T
    return Q


SLOW = {"optq": slow_optq, "gpfq": slow_gpfq, "qronos": slow_qronos}


def assert_same(Q, Q_ref, W, X, Xt):
    same = (Q == Q_ref).double().mean().item()
    assert same >= 0.999, f"only {same:.4f} of the entries match"
    f, f_ref = objective(W, Q, X, Xt), objective(W, Q_ref, X, Xt)
    assert abs(f - f_ref) <= 1e-9 * f_ref


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("group_size", [None, 4])
@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("shape", [(8, 12, 40), (16, 32, 96)])
def test_matches_slow_definition(name, group_size, shape, monkeypatch):
    M, N, m = shape
    monkeypatch.setattr(gpfq, "BLOCK", 5)  # several lazy blocks, the last one partial
    W, X, Xt = make_layer(M, N, m, seed=N + (group_size or 0))
    H, G = stats(X, Xt)
    grid = MinMaxGrid(W, group_size=group_size)
    kw = dict(NO_DAMPING[name], act_order=False)
    if name != "gpfq":
        kw["block_size"] = 5  # several lazy blocks, the last one partial
    Q = SOLVERS[name](W, H, G, grid, **kw)
    assert Q.dtype == W.dtype and Q.shape == W.shape and grid.on_grid(Q)
    assert sorted(grid.calls) == list(range(N))
    assert_same(Q, SLOW[name](W, X, Xt, MinMaxGrid(W, group_size=group_size), list(range(N))), W, X, Xt)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_act_order_uses_original_indices(name, monkeypatch):
    M, N, m = 10, 20, 80
    monkeypatch.setattr(gpfq, "BLOCK", 6)
    W, X, Xt = make_layer(M, N, m, seed=7)
    H, G = stats(X, Xt)
    grid = MinMaxGrid(W, group_size=4)
    info = {}
    kw = {} if name == "gpfq" else {"block_size": 6}
    Q = SOLVERS[name](W, H, G, grid, info=info, **NO_DAMPING[name], act_order=True, **kw)
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    assert not torch.equal(perm, torch.arange(N))
    # each original column quantized exactly once, in act order, with its own group's grid
    assert grid.calls == perm.tolist()
    assert grid.on_grid(Q)
    # equals the slow definition run on the permuted problem with the original indices
    Qp = SLOW[name](W[:, perm], X[perm], Xt[perm], MinMaxGrid(W, group_size=4), perm.tolist())
    Q_ref = torch.empty_like(Qp)
    Q_ref[:, perm] = Qp
    assert_same(Q, Q_ref, W, X, Xt)
    assert info["cholesky_retries"] == 0 and info["dead_inputs"] == 0


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 1e-3, 1e-1])

def test_qronos_equals_optq_when_G_equals_H(alpha, act_order):
    from qbench.algorithms._linalg import sigma_max

    W, X, _ = make_layer(12, 24, 96, seed=3)
    H, _ = stats(X, X)
    grid = MinMaxGrid(W, group_size=4)
    i_q, i_o = {}, {}
    Q_q = qronos.quantize(W, H, H, grid, info=i_q, alpha=alpha, act_order=act_order, block_size=4)
    percdamp = alpha * sigma_max(H) / float(torch.diagonal(H).mean())  # the same λ as Qronos
    Q_o = optq.quantize(W, H, None, grid, info=i_o, percdamp=percdamp, act_order=act_order, block_size=4)
    assert i_q["damping"] == pytest.approx(i_o["damping"], rel=1e-12)
    assert_same(Q_q, Q_o, W, X, X)


@pytest.mark.parametrize("name", ["optq", "qronos"])
def test_lazy_block_size_does_not_change_result(name):
    W, X, Xt = make_layer(8, 30, 90, seed=11)
    H, G = stats(X, Xt)
    grid = MinMaxGrid(W)
    Qs = [SOLVERS[name](W, H, G, grid, act_order=True, block_size=b) for b in (1, 7, 30, None)]
    for Q in Qs[1:]:
        assert_same(Q, Qs[0], W, X, Xt)


def test_gpfq_lazy_block_does_not_change_result(monkeypatch):
    W, X, Xt = make_layer(8, 30, 90, seed=12)
    H, G = stats(X, Xt)
    grid, Qs = MinMaxGrid(W), []
    for b in (1, 7, 30):
        monkeypatch.setattr(gpfq, "BLOCK", b)
        Qs.append(gpfq.quantize(W, H, G, grid, act_order=True))
    for Q in Qs[1:]:
        assert_same(Q, Qs[0], W, X, Xt)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("damped", [False, True])
@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("m", [60, 10])  # more tokens than features, and fewer
def test_singular_H_dead_inputs(name, m, damped, act_order):
    M, N = 8, 16
    W, X, Xt = make_layer(M, N, m, seed=5)
    dead = [0, 5, 6]  # inputs silent in the quantized model, alive in the float one
    Xt[dead] = 0
    H, G = stats(X, Xt)
    grid = MinMaxGrid(W, group_size=4)
    kw = {} if damped else dict(NO_DAMPING[name])
    info = {}
    Q = SOLVERS[name](W, H, G, grid, info=info, act_order=act_order, **kw)
    assert torch.isfinite(Q).all() and grid.on_grid(Q)
    assert sorted(grid.calls) == list(range(N))
    assert (Q[:, dead] == 0).all()  # X̃_i = 0: q_i = Q(0), as GPTQ does
    assert info["dead_inputs"] == len(dead)
    assert math.isfinite(info["damping"]) and info["damping"] >= 0


@pytest.mark.parametrize("name", ["optq", "qronos"])
def test_cholesky_failure_raises_damping(name, caplog):
    W, X, Xt = make_layer(8, 16, 6, seed=9)  # rank 6 < 16
    H, G = stats(X, Xt)
    H = H - 1e-6 * torch.eye(16, dtype=H.dtype)  # slightly indefinite, as roundoff can make it
    grid = MinMaxGrid(W)
    info = {}
    with caplog.at_level(logging.WARNING):
        Q = SOLVERS[name](W, H, G, grid, info=info, **NO_DAMPING[name])
    assert info["cholesky_retries"] > 0 and info["damping"] > 1e-6
    assert any("Cholesky" in r.getMessage() for r in caplog.records)
    assert torch.isfinite(Q).all() and grid.on_grid(Q)


@pytest.mark.parametrize("name", ["optq", "qronos"])
def test_overflowing_sweep_is_redone_with_more_damping(name, monkeypatch, caplog):
    W, X, Xt = make_layer(8, 16, 60, seed=8)
    H, G = stats(X, Xt)
    real, calls = _linalg.upper_inverse_cholesky, []

    def faulty(H, damp):  # fault injection: the first factor makes the sweep overflow
        U, damp, retries = real(H, damp)
        calls.append(damp)
        if len(calls) == 1:
            U = U.clone()
            U[2, -1] = float("inf")
        return U, damp, retries

    monkeypatch.setattr(_linalg, "upper_inverse_cholesky", faulty)
    grid, info = MinMaxGrid(W), {}
    with caplog.at_level(logging.WARNING):
        Q = SOLVERS[name](W, H, G, grid, info=info, **NO_DAMPING[name])
    assert len(calls) == 2 and calls[1] > 0 and info["damping"] == calls[1]
    assert info["cholesky_retries"] == 1 and any("overflow" in r.getMessage() for r in caplog.records)
    assert torch.isfinite(Q).all() and grid.on_grid(Q)


def test_all_dead():
    W, X, Xt = make_layer(4, 8, 20)
    H, G = stats(X, torch.zeros_like(Xt))
    for name, solve in SOLVERS.items():
        Q = solve(W, H, G, MinMaxGrid(W))
        assert (Q == 0).all(), name


@pytest.mark.parametrize("name", list(SOLVERS))
def test_float32(name):
    W, X, Xt = make_layer(16, 32, 128, seed=2)
    H, G = stats(X, Xt)
    grid = MinMaxGrid(W)
    Q64 = SOLVERS[name](W, H, G, grid, act_order=True)
    W32, H32, G32 = W.float(), H.float(), G.float()
    grid32 = MinMaxGrid(W32)
    Q32 = SOLVERS[name](W32, H32, G32, grid32, act_order=True)
    assert Q32.dtype == torch.float32 and torch.isfinite(Q32).all() and grid32.on_grid(Q32)
    f32, f64 = objective(W, Q32.double(), X, Xt), objective(W, Q64, X, Xt)
    assert f32 <= 1.05 * f64


@pytest.mark.parametrize("name", list(SOLVERS))
def test_pure_function_contract(name):
    W, X, Xt = make_layer(6, 12, 40)
    H, G = stats(X, Xt)
    W0, H0, G0 = W.clone(), H.clone(), G.clone()
    info = {}
    SOLVERS[name](W, H, G, MinMaxGrid(W), info=info, act_order=True)
    assert torch.equal(W, W0) and torch.equal(H, H0) and torch.equal(G, G0)
    assert {"damping", "cholesky_retries", "dead_inputs"} <= info.keys()
    with pytest.raises(TypeError):
        SOLVERS[name](W, H, G, MinMaxGrid(W), not_an_option=1)


def test_solvers_beat_rtn_on_mismatched_objective():
    W, X, Xt = make_layer(16, 32, 128, seed=4, noise=0.3)
    H, G = stats(X, Xt)
    grid = MinMaxGrid(W)
    rtn = objective(W, grid.project(W, torch.arange(32)), X, Xt)
    for name, solve in SOLVERS.items():
        assert objective(W, solve(W, H, G, grid, act_order=True), X, Xt) < rtn, name


def test_sigma_max_matches_eigvalsh():
    from qbench.algorithms._linalg import sigma_max

    g = torch.Generator().manual_seed(5)
    for n, m in [(16, 100), (96, 400), (64, 20)]:
        X = torch.randn(n, n, generator=g, dtype=torch.float64) @ torch.randn(n, m, generator=g, dtype=torch.float64)
        H = X @ X.T / m
        exact = float(torch.linalg.eigvalsh(H)[-1])
        assert abs(sigma_max(H) - exact) <= 1e-4 * exact
    # a flat top of the spectrum (white inputs, float32): 64 power iterations stay ~1% low here
    X = torch.randn(512, 2048, generator=g)
    H = X @ X.T / 2048
    exact = float(torch.linalg.eigvalsh(H.double())[-1])
    assert abs(sigma_max(H) - exact) <= 1e-4 * exact
    assert sigma_max(torch.zeros(4, 4)) == 0.0


@pytest.mark.parametrize("name", list(SOLVERS))
def test_mxfp4_grid_matches_slow_definition(name):
    """The MXFP4 weight grid follows the same contract: fixed power-of-two scales per 32 columns."""
    from qbench.quantizers import build_mx_grid

    M, N, m = 6, 64, 160
    W, X, Xt = make_layer(M, N, m, seed=7)
    H, G = stats(X, Xt)
    grid = build_mx_grid(W)
    kw = dict(NO_DAMPING[name], act_order=False)
    Q = SOLVERS[name](W, H, G, grid, **kw)
    assert torch.equal(grid.quantize(Q), Q)
    assert_same(Q, SLOW[name](W, X, Xt, grid, list(range(N))), W, X, Xt)


def test_all_finite_is_exact_even_when_the_sum_overflows():
    big = torch.full((8, 8), 3e38)  # every element finite, the float32 sum is +Inf
    assert torch.isinf(big.sum())
    assert _linalg.all_finite(big, torch.zeros(3))
    for bad in (float("nan"), float("inf"), -float("inf")):
        A = torch.randn(5, 7)
        A[2, 3] = bad
        assert not _linalg.all_finite(torch.ones(2), A), bad
        assert not _linalg.all_finite(A.double()), bad
    cancelling = torch.tensor([float("inf"), -float("inf"), 1.0])  # sums to NaN
    assert not _linalg.all_finite(cancelling)
