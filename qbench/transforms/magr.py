"""MagR: weight magnitude reduction (Zhang, Saab et al., "MagR: Weight Magnitude Reduction for Enhancing
Post-Training Quantization", NeurIPS 2024, arXiv 2406.00800).

Per layer, with W [M, N] (rows = output channels) and H = XXᵀ/m [N, N] of the layer input,

    min over W'   F(W') = ½·tr((W' − W) H (W' − W)ᵀ) + λ·Σ_rows ‖W'_row‖_∞

solved by proximal gradient descent from W' = W:

    W' ← prox_{ηλ‖·‖∞}(W' − η (W' − W) H),     η = 1/σ_max(H),

row by row, where by Moreau decomposition prox_{r‖·‖∞}(v) = v − Π_{‖·‖₁ ≤ r}(v): the projection onto the ℓ1 ball
of radius r (Duchi et al. 2008's sort-based algorithm, vectorized over rows). Equivalently the prox clips
the row to [−θ, θ], θ the threshold of that projection, so it only ever shrinks a row's largest entries.
MagR is not exact: it trades a small change of the layer output for smaller max |w| per output channel.
Rows are independent given H, so Linears sharing one input (q/k/v, gate/up) can be stacked.

Conventions matched to Brevitas 0.13.4 (`brevitas/graph/magr.py::MagR.single_layer_update`, itself adapted
from the authors' code github.com/AozhongZhang/MagR), so that the paper's `alpha = 0.01` means the same:
- σ_max(H) by 30 steps of power iteration (`brevitas.graph.utils.power_iteration`: uniform random start from
  a generator seeded 42, H normalized by its absmax, Rayleigh quotient), η = 1/σ_max;
- the ℓ1-ball radius of the prox (the threshold ηλ above) is `alpha / (η · ‖H‖₁)` = alpha·σ_max(H)/‖H‖₁,
  ‖H‖₁ = torch.linalg.norm(H, ord=1), the max absolute column sum; i.e. λ = alpha·σ_max(H)²/‖H‖₁ in F. This is
  invariant to the scale of H (Brevitas accumulates H = 2XXᵀ/m, qbench XXᵀ/m: same W');
- 200 gradient steps (`brevitas_examples.llm.llm_quant.gpxq.apply_magr(num_steps=200)`, the LLM entry point;
  `magr_mode` alone defaults to 10), alpha 0.01 (`--magr-alpha` default);
- the update is computed in float32 for float32 weights (Brevitas's buffer dtype) and the original W is the
  anchor of the data term.
Brevitas's LLM entry point collects every layer's H from one forward of the float model; qbench's
`pipeline.apply_magr` is true-sequential instead (see there).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_ITERS",
    "POWER_STEPS",
    "magr",
    "magr_objective",
    "magr_step_sizes",
    "power_iteration",
    "project_l1_ball",
    "prox_linf",
]

DEFAULT_ALPHA = 0.01  # the paper's and Brevitas's setting at 2 and 1.58 bits
DEFAULT_ITERS = 200  # Brevitas LLM example
POWER_STEPS = 30  # Brevitas


def project_l1_ball(x: Tensor, radius: float | Tensor) -> Tensor:
    """Euclidean projection of every row of x [M, N] onto {y : ‖y‖₁ ≤ radius} (sort-based, Duchi et al. 2008).

    Rows already inside the ball are returned unchanged; otherwise y = sign(x)·(|x| − θ)₊ with
    θ = (Σ_{j≤ρ} μ_j − radius)/ρ, μ the sorted |x| and ρ = max{j : μ_j > (Σ_{i≤j} μ_i − radius)/j}.
    """
    x2 = x.reshape(-1, x.shape[-1])
    radius = torch.as_tensor(radius, dtype=x.dtype, device=x.device)
    a = x2.abs()
    mu, _ = torch.sort(a, dim=1, descending=True)
    theta = _threshold(mu, radius)
    inside = a.sum(dim=1) <= radius
    y = torch.sign(x2) * (a - theta[:, None]).clamp(min=0)
    return torch.where(inside[:, None], x2, y).reshape(x.shape)


def _threshold(mu: Tensor, radius: Tensor) -> Tensor:
    """θ per row from the (partially) sorted magnitudes mu [M, k], descending; valid where ρ < k or k = N."""
    cumsum = mu.cumsum(dim=1)
    j = torch.arange(1, mu.shape[1] + 1, device=mu.device, dtype=mu.dtype)
    rho = ((mu * j > cumsum - radius) * j).amax(dim=1).clamp(min=1)  # holds on a prefix 1..ρ
    picked = cumsum.gather(1, (rho.long() - 1)[:, None])[:, 0]
    return ((picked - radius) / rho).clamp(min=0)


def prox_linf(v: Tensor, radius: float | Tensor, k: int = 16) -> Tensor:
    """prox_{radius·‖·‖∞}(row) = row − Π_{‖·‖₁ ≤ radius}(row) for every row of v [M, N].

    Computed as the clip of the row to [−θ, θ] (0 for rows inside the ball), θ from a partial sort: the top-k
    magnitudes decide θ unless all k of them are above it, and only those rows are retried with 4k (up to a full
    sort). Same result as `v - project_l1_ball(v, radius)`, several times faster for small radii.
    """
    v2 = v.reshape(-1, v.shape[-1])
    M, N = v2.shape
    radius = torch.as_tensor(radius, dtype=v.dtype, device=v.device)
    a = v2.abs()
    inside = a.sum(dim=1) <= radius  # prox = 0 there
    theta = torch.zeros(M, dtype=v.dtype, device=v.device)
    rows = torch.arange(M, device=v.device) if not inside.any() else (~inside).nonzero()[:, 0]
    k = max(1, min(k, N))
    while rows.numel():
        sub = a if rows.numel() == M else a.index_select(0, rows)
        mu = torch.topk(sub, k, dim=1, sorted=True).values if k < N else torch.sort(sub, dim=1, descending=True).values
        t = _threshold(mu, radius)
        if k == N:
            theta[rows] = t
            break
        # ρ = k would mean the threshold may lie below the k-th magnitude: retry those rows with more
        undecided = mu[:, -1] * k > mu.sum(dim=1) - radius
        theta[rows[~undecided]] = t[~undecided]
        rows = rows[undecided]
        k = min(4 * k, N)
    return torch.minimum(torch.maximum(v2, -theta[:, None]), theta[:, None]).reshape(v.shape)


def power_iteration(H: Tensor, steps: int = POWER_STEPS, seed: int = 42) -> Tensor:
    """σ_max of the symmetric PSD H by power iteration, as Brevitas does it (uniform start from a generator
    seeded `seed`, on H / max(H), Rayleigh quotient at the end)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    b = torch.rand(H.shape[1], generator=g, dtype=H.dtype).to(H.device)
    c = H.max().abs()
    if c == 0:
        return c
    Hn = H / c
    for _ in range(steps):
        b1 = Hn @ b
        b = b1 / (b1.norm() + 1e-12)
    return torch.dot(b, Hn @ b) * c


def magr_step_sizes(H: Tensor, alpha: float, power_steps: int = POWER_STEPS) -> tuple[float, float, float]:
    """(η, r, λ): step 1/σ_max(H), the ℓ1-ball radius r = alpha/(η‖H‖₁) of the prox (Brevitas's scaling), and
    the objective's penalty weight λ = r/η."""
    sigma = float(power_iteration(H, power_steps))
    if not sigma > 0:
        return 0.0, 0.0, 0.0
    eta = 1.0 / sigma
    radius = alpha / (eta * float(torch.linalg.norm(H, ord=1)))
    return eta, radius, radius / eta


def magr_objective(Wp: Tensor, W: Tensor, H: Tensor, lam: float) -> float:
    """F(W') = ½·tr((W' − W) H (W' − W)ᵀ) + λ·Σ_rows ‖W'_row‖_∞."""
    D = Wp - W
    return float(0.5 * torch.einsum("ij,jk,ik->", D, H, D) + lam * Wp.abs().amax(dim=1).sum())


@torch.no_grad()
def magr(W: Tensor, H: Tensor, alpha: float = DEFAULT_ALPHA, iters: int = DEFAULT_ITERS,
         power_steps: int = POWER_STEPS, info: dict | None = None) -> Tensor:
    """MagR of one layer: W [M, N], H = XXᵀ/m [N, N] -> W' [M, N] with smaller max |w| per row.

    Computed in W's dtype (float32 or float64; other dtypes in float32 and cast back). `info`, if given,
    receives eta, radius, lam and `objective`: F after each iteration (costs one extra product per step; only
    filled when info contains the key "objective" on entry, e.g. info={"objective": []}).
    """
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"W must be [M, N] and H [N, N]; got {tuple(W.shape)} and {tuple(H.shape)}")
    if alpha < 0:
        raise ValueError(f"MagR alpha must be ≥ 0, got {alpha}")
    if alpha == 0 or iters <= 0:
        return W.clone()
    dtype = W.dtype if W.dtype in (torch.float32, torch.float64) else torch.float32
    W0 = W.to(dtype)
    Hd = H.to(device=W.device, dtype=dtype)
    eta, radius, lam = magr_step_sizes(Hd, alpha, power_steps)
    track = info is not None and "objective" in info
    if info is not None:
        info.update(eta=eta, radius=radius, lam=lam)
    if eta == 0.0:  # H = 0: the data term is void; nothing to trade against
        return W.clone()
    W0H = W0 @ Hd
    Wk = W0.clone()
    for _ in range(iters):
        # W' − η (W' − W) H, the argument of the prox
        V = Wk - eta * (Wk @ Hd - W0H)
        Wk = prox_linf(V, radius)
        if track:
            info["objective"].append(magr_objective(Wk, W0, Hd, lam))
    if not torch.isfinite(Wk).all():
        raise FloatingPointError("MagR produced NaN/Inf")
    return Wk.to(W.dtype)
