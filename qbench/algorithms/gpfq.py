"""GPFQ (Lybrand & Saab 2021; Zhang & Saab 2023): greedy path following. Each q_t cancels the running
error between the float path (X, W) and the quantized path (X̃, Q); nothing is refit (design.md §4):

    q_t = Q((Σ_{j≤t} w_j G[j,t] − Σ_{j<t} q_j H[j,t]) / H[t,t]),   H = X̃X̃ᵀ/m, G = XX̃ᵀ/m.

All M rows at once: A = W·triu(G) is formed once (transposed, so each column is a contiguous row),
and the correction Σ_{j<t} q_j H[j,t] is subtracted from it lazily, block by block, so nearly all of
the O(MN²) work is in blocked matmuls.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import _kernels, _linalg

BLOCK = 128  # lazy-batch width; any value gives the same Q up to rounding


def quantize(W: Tensor, H: Tensor, G: Tensor, quantizer: Callable, *, info: Optional[dict] = None,
             act_order: bool = False) -> Tensor:
    """GPFQ: Q on the grid, chosen greedily against the float target XᵀWᵀ; act_order sorts by diag(H)."""
    dtype = W.dtype
    W, H, G = _linalg.working_copies(W, H, G)
    if G is None:
        raise ValueError("GPFQ needs G = XX̃ᵀ/m")
    M, N = W.shape

    # dead inputs (X̃_t = 0): X̃_t carries nothing, so H[t,t] = 1 and G[:,t] = 0 give q_t = Q(0);
    # w_t is kept, since its float signal X_t still enters later targets through G[t, >t]
    dead = _linalg.dead_mask(H)
    H = _linalg.isolate_dead(H, dead)
    G[:, dead] = 0

    perm = _linalg.act_order_perm(H, act_order)
    W = _linalg.permute_cols(W, perm)
    H = _linalg.permute_sym(H, perm)
    G = _linalg.permute_sym(G, perm)
    cols = _linalg.solve_order(perm, N)

    # Aᵀ[t] = Σ_{j≤t} w_j G[j,t] for every row at once; kept transposed so column t is a contiguous row
    AT = torch.triu(G).T @ W.T
    diag = torch.diagonal(H).contiguous()
    d = diag.tolist()
    QT = torch.empty_like(AT)
    fused = _kernels.fused_grid(quantizer, AT, cols)  # a compiled loop per block where it can run
    for i1 in range(0, N, BLOCK):
        i2 = min(i1 + BLOCK, N)
        if fused is not None:
            _kernels.gpfq_block(AT, QT, H, diag, fused, i1, i2)
        else:
            for t in range(i1, i2):  # AT[t] holds A − Σ_{j<t} q_j H[j,t] once column t is reached
                q = _linalg.quantize_column(quantizer, AT[t].div_(d[t]), cols[t], QT[t])
                if t + 1 < i2:  # correction inside the block
                    AT[t + 1:i2].addr_(H[t, t + 1:i2], q, alpha=-1)
        if i2 < N:  # and for all later columns, once per block
            AT[i2:].addmm_(H[i1:i2, i2:].T, QT[i1:i2], alpha=-1)
    Q = QT.T

    _linalg.write_info(info, 0.0, 0, int(dead.sum()))
    return _linalg.unpermute_cols(Q, perm).to(dtype)
