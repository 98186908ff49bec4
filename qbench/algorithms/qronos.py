"""Qronos (Zhang, Zhang, Colbert, Saab, ICLR 2026): correct the past, shape the future (design.md §4).

Efficient form, all M rows at once, D = G − H. Step 1 picks q_1 against the float target XᵀW (C) and
refits columns 2..N by damped least squares against that same target (R). One Cholesky of H + λI
serves both: its inverse factor U (UᵀU = (H+λI)⁻¹) has (H_{>1,>1} + λI)⁻¹ = U_{>1,>1}ᵀU_{>1,>1}
(Schur complement). After (R) the residual is orthogonal to X̃_{>1}, so steps 2..N are plain lazy-batch
OPTQ on H with the trailing block of U (O). With G = H (X̃ = X), D = 0 and this is OPTQ exactly.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import _linalg
from .optq import sweep


def quantize(W: Tensor, H: Tensor, G: Tensor, quantizer: Callable, *, info: Optional[dict] = None,
             alpha: float = 1e-6, act_order: bool = False, block_size: Optional[int] = None) -> Tensor:
    """Qronos: Q on the grid for min ‖XᵀWᵀ − X̃ᵀQᵀ‖, with λ = alpha·σ_max(H) (×10 on Cholesky failure)."""
    alpha = _linalg.check_nonnegative("alpha", alpha)
    dtype = W.dtype
    W, H, G = _linalg.working_copies(W, H, G)
    if G is None:
        raise ValueError("Qronos needs G = XX̃ᵀ/m")
    M, N = W.shape
    B = _linalg.default_block_size(N, block_size)
    damp = alpha * _linalg.sigma_max(H)

    # dead inputs (X̃_i = 0): H[i,i] = 1, G[:,i] = 0 and q_i = Q(0) as in GPTQ; the float target
    # W·G keeps every input's signal, so W enters D's product before its dead columns are zeroed
    dead = _linalg.dead_mask(H)
    H = _linalg.isolate_dead(H, dead)
    G[:, dead] = 0
    D = G - H
    D[:, dead] = 0

    perm = _linalg.act_order_perm(H, act_order)
    W = _linalg.permute_cols(W, perm)
    H = _linalg.permute_sym(H, perm)
    D = _linalg.permute_sym(D, perm)
    WD = W @ D  # (W(G − H))[:, t] = ⟨X̃_t, XᵀW_row − X̃ᵀW_row⟩/m per row
    W[:, _linalg.permute_cols(dead, perm)] = 0
    cols = _linalg.solve_order(perm, N)

    (Q, _), damp, retries = _linalg.solve_until_finite(
        H, damp, lambda U: _solve(W, WD, H, U, quantizer, cols, B), "Qronos solve")
    _linalg.write_info(info, damp, retries, int(dead.sum()))
    return _linalg.unpermute_cols(Q, perm).to(dtype)


def _solve(W: Tensor, WD: Tensor, H: Tensor, U: Tensor, quantizer: Callable, cols: list[int],
           B: int) -> tuple[Tensor, Tensor]:
    """Steps (C), (R), (O) in solve order; returns Q and V (v_t as quantized, column t)."""
    Q = torch.empty_like(W)
    V = W.clone()
    # (C) q_1 = Q((Σ_j w_j G[j,1] − Σ_{j>1} w_j H[j,1]) / H[1,1]) = Q(w_1 + (WD)[:,1] / H[1,1])
    V[:, 0] = W[:, 0] + WD[:, 0] / H[0, 0]
    q1 = quantizer(V[:, 0].clone(), cols[0]).to(W.dtype)
    Q[:, 0] = q1
    if W.shape[1] > 1:
        # (R) v_{>1} = argmin_u ‖XᵀW − q_1X̃_1 − X̃_{>1}ᵀu‖²/m + λ‖u − w_{>1}‖², i.e.
        #     (H_{>1,>1} + λI)(v_{>1} − w_{>1}) = (WD)_{>1} + (w_1 − q_1)H_{1,>1};
        #     the (w_1 − q_1) term is OPTQ's step-1 update −(w_1 − q_1)/U[1,1]·U[1,>1]
        Ut = U[1:, 1:]
        e = (W[:, 0] - q1) / U[0, 0]
        V[:, 1:] += (WD[:, 1:] @ Ut.T) @ Ut - e[:, None] * U[0, 1:][None, :]
        # (O) steps 2..N: q_t = Q(v_t) and the OPTQ refit, lazily in blocks
        Q[:, 1:], V[:, 1:] = sweep(V[:, 1:], Ut, quantizer, cols[1:], B)
    return Q, V
