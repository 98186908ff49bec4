"""Numerics shared by the data-driven solvers (design.md §4): input checks, dead inputs, act-order
permutations and the damped inverse-Cholesky factor that OPTQ and Qronos sweep with.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)

MAX_CHOLESKY_RETRIES = 40  # ×10 per retry: from eps·mean(diag H) this passes any finite PSD H


def compute_dtype(W: Tensor) -> torch.dtype:
    """Solve in W's dtype when it is float32/float64; lower precisions are solved in float32."""
    return W.dtype if W.dtype in (torch.float32, torch.float64) else torch.float32


def working_copies(W: Tensor, H: Tensor, G: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Validated clones of W [M, N], H [N, N] (and G [N, N]) in the solve dtype, on W's device."""
    if W.ndim != 2:
        raise ValueError(f"W must be [M, N], got shape {tuple(W.shape)}")
    N = W.shape[1]
    dtype = compute_dtype(W)
    out = []
    for name, A in (("W", W), ("H", H), ("G", G)):
        if A is None:
            if name == "G":
                out.append(None)
                continue
            raise ValueError(f"{name} is required")
        if name != "W" and tuple(A.shape) != (N, N):
            raise ValueError(f"{name} must be [{N}, {N}] for W of shape {tuple(W.shape)}, got {tuple(A.shape)}")
        A = A.detach().to(device=W.device, dtype=dtype, copy=True)
        if not all_finite(A):
            raise ValueError(f"{name} holds NaN or Inf")
        out.append(A)
    return out[0], out[1], out[2]


def default_block_size(N: int, block_size: Optional[int]) -> int:
    """Lazy-batch width: the given int, or ceil(N/100) columns as in the paper's configs."""
    if block_size is None:
        return max(1, math.ceil(N / 100))
    if isinstance(block_size, bool) or int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive integer or None")
    return int(block_size)


def check_nonnegative(name: str, value: float) -> float:
    """A damping coefficient must be a finite number >= 0."""
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value} must be a finite number >= 0")
    return value


def dead_mask(H: Tensor) -> Tensor:
    """Inputs that never fire in X̃: diag(H) == 0 (bool [N])."""
    return torch.diagonal(H) == 0


def isolate_dead(H: Tensor, dead: Tensor) -> Tensor:
    """H with dead rows/columns cleared and H[i, i] = 1 (GPTQ's convention), so H stays invertible."""
    if not bool(dead.any()):
        return H
    H = H.clone()
    H[dead, :] = 0
    H[:, dead] = 0
    idx = torch.nonzero(dead).flatten()
    H[idx, idx] = 1
    return H


def act_order_perm(H: Tensor, act_order: bool) -> Optional[Tensor]:
    """Column order: descending diag(H) under act_order (stable, so ties keep their order); None is the
    identity, which the helpers below skip instead of gathering every matrix through it."""
    if not act_order:
        return None
    return torch.argsort(torch.diagonal(H), descending=True, stable=True)


def solve_order(perm: Optional[Tensor], N: int) -> list[int]:
    """The original column index of each solve step (what the grid is called with)."""
    return list(range(N)) if perm is None else perm.tolist()


def permute_cols(A: Tensor, perm: Optional[Tensor]) -> Tensor:
    """A[:, perm]: the columns of W (or a mask) in the solve order."""
    return A if perm is None else A[..., perm]


def permute_sym(A: Tensor, perm: Optional[Tensor]) -> Tensor:
    """A[perm][:, perm]: rows and columns of a statistics matrix in the solve order."""
    return A if perm is None else A[perm][:, perm]


def unpermute_cols(Q: Tensor, perm: Optional[Tensor]) -> Tensor:
    """Q (columns in the solve order) back in the original column order, contiguous."""
    if perm is None:
        return Q.contiguous()
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return Q[:, inv]


def sigma_max(H: Tensor, steps: int = 64, tol: float = 1e-7) -> float:
    """Largest eigenvalue of the symmetric PSD matrix H (= σ_max) by Lanczos with full reorthogonalisation.

    The damping λ = alpha·σ_max needs only its scale, and a few dozen matrix-vector products cost far less
    than a full eigendecomposition (eigvalsh took ~0.14 s at N = 1536 on this CPU, per layer). Lanczos
    converges where power iteration crawls (close top eigenvalues, as in many H): it stops once the top
    Ritz value moves by less than tol (relative), or the Krylov space is exhausted.
    """
    N = H.shape[0]
    if N == 0:
        return 0.0
    k = min(steps, N)
    V = torch.zeros(k, N, dtype=H.dtype, device=H.device)
    v = torch.linspace(1.0, 2.0, N, dtype=H.dtype, device=H.device)  # deterministic, not ⟂ to the top vector
    v /= v.norm()
    alphas: list[float] = []
    betas: list[float] = []
    estimate = 0.0
    for j in range(k):
        V[j] = v
        w = H @ v
        alphas.append(float(v @ w))
        for _ in range(2):  # full reorthogonalisation, twice: one classical Gram-Schmidt pass lets the
            w -= V[:j + 1].T @ (V[:j + 1] @ w)  # error grow by |Hv|/|w| per step; two keep it at rounding level
        beta = float(w.norm())
        if not math.isfinite(beta) or not math.isfinite(alphas[-1]):
            return float(H.abs().sum(dim=1).max())  # Gershgorin bound: finite H never gets here
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        top = float(torch.linalg.eigvalsh(T)[-1])
        scale = float(torch.diagonal(H).abs().max())
        if beta <= 1e-12 * max(scale, 1e-300) or abs(top - estimate) <= tol * abs(top):
            return max(top, 0.0)
        estimate = top
        betas.append(beta)
        v = w / beta
    return max(estimate, 0.0)


def next_damping(H: Tensor, damp: float, retries: int, why: str) -> float:
    """The damping after a failure: λ·10, or eps·mean(diag H) when λ = 0; gives up after the cap."""
    if retries >= MAX_CHOLESKY_RETRIES:
        raise RuntimeError(f"{why}: still failing at λ = {damp:.3e} after {retries} retries")
    if damp > 0:
        return damp * 10.0
    scale = float(torch.diagonal(H).abs().mean()) if H.numel() else 1.0
    return torch.finfo(H.dtype).eps * (scale if scale > 0 else 1.0)


def upper_inverse_cholesky(H: Tensor, damp: float) -> tuple[Tensor, float, int]:
    """U upper triangular with UᵀU = (H + λI)⁻¹; returns (U, λ actually used, retries).

    This is the factor GPTQ sweeps with (its row t holds the OPTQ update of step t), computed from a
    single Cholesky of the reversed matrix: P(H+λI)P = L Lᵀ with P the reversal, then U = P L⁻¹ P.
    If the factorisation fails or U is not finite, λ grows ×10 (from eps·mean(diag H) when λ = 0).
    """
    N = H.shape[0]
    eye = torch.eye(N, dtype=H.dtype, device=H.device)
    Hr = torch.flip(H, (0, 1))  # P H P
    lam, retries = float(damp), 0
    while True:
        L, status = torch.linalg.cholesky_ex(Hr + lam * eye)
        if int(status) == 0:
            U = torch.flip(torch.linalg.solve_triangular(L, eye, upper=False), (0, 1))
            if all_finite(U):
                break
        lam = next_damping(H, lam, retries, "Cholesky of H + λI")
        retries += 1
    if retries:
        log.warning("Cholesky of H + λI failed at λ = %.3e; succeeded after %d retries at λ = %.3e",
                    damp, retries, lam)
    return U, lam, retries


def solve_until_finite(H: Tensor, damp: float, attempt: Callable[[Tensor], tuple[Tensor, ...]],
                       why: str) -> tuple[tuple[Tensor, ...], float, int]:
    """Run attempt(U) with U from H + λI; while its outputs hold NaN/Inf, raise λ ×10 and redo it.

    Returns (attempt's outputs, λ actually used, retries). Never lets a non-finite result through.
    """
    retries = 0
    while True:
        U, damp, r = upper_inverse_cholesky(H, damp)
        retries += r
        outputs = attempt(U)
        if all_finite(*outputs):
            return outputs, damp, retries
        damp = next_damping(H, damp, retries, why)
        retries += 1
        log.warning("%s overflowed; retrying at λ = %.3e", why, damp)


def all_finite(*tensors: Tensor) -> bool:
    """True when no tensor holds NaN or Inf (one device sync).

    NaN and ±Inf propagate through a sum, so a finite sum proves every element finite; that costs a
    fraction of an element-wise isfinite (about 1/15 on this CPU). Only a sum that overflows is
    rechecked element by element.
    """
    sums = torch.stack([T.sum(dtype=torch.float64 if T.dtype == torch.float64 else torch.float32)
                        for T in tensors])
    if bool(torch.isfinite(sums).all()):
        return True
    return all(bool(torch.isfinite(T).all()) for T in tensors)


def quantize_column(quantizer: Callable, w: Tensor, j: int, out: Tensor) -> Tensor:
    """out = quantizer(w, j): in place when the quantizer offers `into` (qbench's grids), else a copy."""
    into = getattr(quantizer, "into", None)
    if into is not None and w.dtype == out.dtype:
        return into(w, j, out)
    return out.copy_(quantizer(w, j))


def write_info(info: Optional[dict], damp: float, retries: int, dead: int, **extra) -> None:
    """Record what the solve actually did (design.md §4 contract) into the caller's dict."""
    if info is not None:
        info.update(damping=float(damp), cholesky_retries=int(retries), dead_inputs=int(dead), **extra)
