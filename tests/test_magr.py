"""MagR: the ℓ1-ball projection and the ℓ∞ prox against their definitions, the proximal-gradient solve (monotone
objective, smaller row maxima, small output change), Brevitas's conventions, and `apply_magr` on a tiny Llama."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import TINY_LLAMA

from qbench.models import tiny_model
from qbench.pipeline import apply_magr
from qbench.transforms.magr import (
    magr,
    magr_objective,
    magr_step_sizes,
    power_iteration,
    project_l1_ball,
    prox_linf,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(M=24, N=32, m=256, seed=0, rank=8, dtype=torch.float64):
    """A random layer W [M, N] and H = XXᵀ/m of an input like an LLM's: low effective rank, a few outlier
    channels."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, rank, generator=g, dtype=dtype) @ torch.randn(rank, m, generator=g, dtype=dtype) / rank ** 0.5
    X += 0.1 * torch.randn(N, m, generator=g, dtype=dtype)
    X[:3] *= 6.0
    W = torch.randn(M, N, generator=g, dtype=dtype) * 0.05
    return W, X @ X.T / m


def _rel_output_change(W, Wp, H):
    D = W - Wp
    return float((torch.einsum("ij,jk,ik->", D, H, D) / torch.einsum("ij,jk,ik->", W, H, W)).sqrt())


def test_project_l1_ball_definition():
    g = torch.Generator().manual_seed(0)
    for n, r in [(1, 0.3), (2, 0.5), (3, 1.0), (5, 0.2), (8, 2.0)]:
        x = torch.randn(40, n, generator=g, dtype=torch.float64)
        p = project_l1_ball(x, r)
        norms = x.abs().sum(1)
        assert (p.abs().sum(1) <= r + 1e-12).all()  # in the ball
        inside = norms <= r
        assert torch.equal(p[inside], x[inside])  # unchanged when inside
        torch.testing.assert_close(p.abs().sum(1)[~inside], torch.full_like(norms[~inside], r))  # on the boundary
        # variational inequality of a projection onto a convex set: <x − p, y − p> ≤ 0 for all y in the ball;
        # it is linear in y, so checking the ball's vertices ±r·e_i suffices
        vertices = torch.cat([torch.eye(n), -torch.eye(n)]).double() * r
        assert (torch.einsum("bn,vbn->bv", x - p, vertices[:, None, :] - p[None]) <= 1e-12).all()


def test_project_l1_ball_matches_brevitas():
    brevitas_magr = pytest.importorskip("brevitas.graph.magr")
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for r in (0.1, 1.0, 100.0):
        torch.testing.assert_close(project_l1_ball(x, r), brevitas_magr._project_onto_l1_ball(x, r))


def test_prox_linf_definition():
    """prox_{r‖·‖∞}(v) = argmin_x ½‖x − v‖² + r‖x‖∞, against a brute-force grid search and random perturbations."""
    g = torch.Generator().manual_seed(2)

    def F(x, v, r):
        return 0.5 * ((x - v) ** 2).sum(-1) + r * x.abs().amax(-1)

    v = torch.randn(6, 2, generator=g, dtype=torch.float64)
    r = 0.4
    p = prox_linf(v, r)
    torch.testing.assert_close(p, v - project_l1_ball(v, r))  # Moreau decomposition
    grid = torch.linspace(-3, 3, 601, dtype=torch.float64)
    pts = torch.cartesian_prod(grid, grid)  # step 0.01
    for row in range(v.shape[0]):
        brute = pts[F(pts, v[row], r).argmin()]
        assert (brute - p[row]).abs().max() <= 0.01 + 1e-12
        assert F(p[row], v[row], r) <= F(brute, v[row], r) + 1e-12
    for n in (3, 7):
        v = torch.randn(20, n, generator=g, dtype=torch.float64)
        for r in (0.05, 0.5, 5.0):
            p = prox_linf(v, r)
            trials = p[None] + 1e-3 * torch.randn(200, *p.shape, generator=g, dtype=torch.float64)
            assert (F(p, v, r)[None] <= F(trials, v, r) + 1e-15).all()
    # rows inside the ball go to 0; the partial sort agrees with the full sort whatever k
    v = torch.randn(64, 40, generator=g, dtype=torch.float64)
    v[:4] *= 1e-3
    for k, r in itertools.product((1, 3, 40), (0.05, 1.0, 10.0)):
        torch.testing.assert_close(prox_linf(v, r, k=k), v - project_l1_ball(v, r), rtol=0, atol=1e-15)
    assert (prox_linf(v, 0.05)[:4] == 0).all()


def test_power_iteration():
    _, H = _layer()
    top = torch.linalg.eigvalsh(H)[-1]
    sigma = power_iteration(H)  # 30 steps, a Rayleigh quotient: a lower bound, here converged
    assert sigma <= top * (1 + 1e-12)
    torch.testing.assert_close(sigma, top, rtol=1e-6, atol=0)


def test_magr_objective_decreases_and_row_maxima_shrink():
    W, H = _layer()
    info = {"objective": []}
    Wp = magr(W, H, alpha=0.01, iters=100, info=info)
    obj = torch.tensor([magr_objective(W, W, H, info["lam"])] + info["objective"], dtype=torch.float64)
    steps = obj[1:] - obj[:-1]
    assert (steps <= 1e-12 * obj[0]).all(), "MagR objective must not increase"
    assert obj[-1] < 0.9 * obj[0]
    assert (Wp.abs().amax(1) < W.abs().amax(1)).all()  # every row's max |w| strictly smaller
    rel_out = _rel_output_change(W, Wp, H)
    assert rel_out < 0.15, rel_out  # while the row maxima drop by ~60% on average
    assert float((Wp.abs().amax(1) / W.abs().amax(1)).mean()) < 0.6
    # a weaker penalty trades less: smaller output change, smaller reduction
    Wp_weak = magr(W, H, alpha=0.001, iters=100)
    assert _rel_output_change(W, Wp_weak, H) < rel_out / 2
    assert (Wp.abs().amax(1) <= Wp_weak.abs().amax(1)).all() and (Wp_weak.abs().amax(1) < W.abs().amax(1)).all()
    eta, radius, _ = magr_step_sizes(H, 0.01)
    assert info["eta"] == eta and info["radius"] == radius
    # Brevitas's scaling: radius = alpha·σ_max(H)/‖H‖₁ ≤ alpha, invariant to the scale of H
    assert radius == pytest.approx(0.01 * float(torch.linalg.eigvalsh(H)[-1] / torch.linalg.norm(H, ord=1)), rel=1e-6)
    torch.testing.assert_close(magr(W, 2.0 * H, 0.01, iters=100), Wp)


def test_magr_alpha_zero_is_identity():
    W, H = _layer()
    assert torch.equal(magr(W, H, 0.0), W)
    assert torch.equal(magr(W.float(), H.float(), 0.0), W.float())


def test_magr_dtype_and_float32_agree():
    W, H = _layer()
    W64 = magr(W, H, 0.01, iters=50)
    W32 = magr(W.float(), H.float(), 0.01, iters=50)
    assert W32.dtype == torch.float32 and W64.dtype == torch.float64
    torch.testing.assert_close(W32.double(), W64, rtol=0, atol=1e-5)


def test_magr_matches_brevitas_loop():
    """Same W' as Brevitas 0.13.4's MagR.single_layer_update loop (its H is 2XXᵀ/m)."""
    brevitas_magr = pytest.importorskip("brevitas.graph.magr")
    from brevitas.graph.utils import power_iteration as brevitas_power_iteration

    W, H = _layer(M=12, N=20)
    Hb = 2.0 * H
    eta = 1.0 / brevitas_power_iteration(Hb, steps=30)
    alpha = 0.01 / (eta * torch.linalg.norm(Hb, ord=1))
    wk = W.clone()
    for _ in range(200):
        vk = wk - eta * (wk - W).matmul(Hb)
        wk = vk - alpha * brevitas_magr._project_onto_l1_ball(vk / alpha)
    torch.testing.assert_close(magr(W, H, 0.01, iters=200), wk, rtol=0, atol=1e-12)


def test_apply_magr_tiny_llama():
    model = tiny_model(TINY_LLAMA, seed=0)
    ids = torch.randint(2, TINY_LLAMA["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    reports = apply_magr(model, ids, alpha=0.01, batch_size=2)
    with torch.no_grad():
        out = model(ids).logits
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert [(r["block"], r["name"]) for r in reports] == [
        (b, n) for b in range(TINY_LLAMA["num_hidden_layers"]) for n in names]
    for r in reports:
        assert {"rel_output_change", "max_abs_before", "max_abs_after"} <= set(r)
        assert r["max_abs_after"] < r["max_abs_before"]
        assert 0 < r["rel_output_change"] < 0.2
    rel = float((out - ref).norm() / ref.norm())
    rel_max = float((out - ref).abs().max() / ref.abs().max())
    print(f"\nMagR alpha=0.01 on the tiny Llama: logits change {rel:.3f} (Frobenius), {rel_max:.3f} (max abs)")
    assert 0 < rel < 0.2
    assert all(p.dtype == torch.float32 for p in model.parameters())
