"""OPTQ (GPTQ; Frantar et al. 2023): quantize one input column at a time and refit the remaining
columns by least squares on X̃, i.e. on H = X̃X̃ᵀ/m (design.md §4).

Step t:  q_t = Q(v_t);  v_{>t} += (v_t − q_t)·(H_{>t,>t} + λI)⁻¹ H_{>t,t}.
With U upper triangular, UᵀU = (H + λI)⁻¹, that update is −(v_t − q_t)/U[t,t] · U[t,>t]; updates are
applied lazily, block_size columns at a time, as in IST-DASLab's gptq.py.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import _kernels, _linalg


def sweep(W: Tensor, U: Tensor, quantizer: Callable, cols: Sequence[int], block_size: int) -> tuple[Tensor, Tensor]:
    """Lazy-batch OPTQ over the columns of W (solve order) with factor U; cols are original indices.

    Returns (Q, V) of W's shape: Q on the grid, and V whose column t is v_t, the refitted value that was
    quantized; W itself is left alone. The sweep refits a transposed copy of W in place, so that every
    column is one contiguous row: the per-column work is then a handful of vector ops on contiguous memory.
    """
    M, N = W.shape
    WT = W.T.contiguous()  # [N, M]: row t is column t of W
    QT = torch.empty_like(WT)
    d = torch.diagonal(U).tolist()
    fused = _kernels.fused_grid(quantizer, WT, cols)  # a compiled loop per block where it can run
    for i1 in range(0, N, block_size):
        i2 = min(i1 + block_size, N)
        ET = torch.empty(i2 - i1, M, dtype=W.dtype, device=W.device)  # scaled errors (v_t − q_t)/U[t,t]
        if fused is not None:
            _kernels.optq_block(WT, QT, ET, U, fused, i1, i2)
        else:
            for t in range(i1, i2):
                w, q = WT[t], QT[t]
                _linalg.quantize_column(quantizer, w, cols[t], q)
                e = ET[t - i1]
                torch.sub(w, q, out=e).div_(d[t])
                if t + 1 < i2:  # v_{>t} update inside the block: v_j −= e·U[t, j]
                    WT[t + 1:i2].addr_(U[t, t + 1:i2], e, alpha=-1)
        if i2 < N:  # the same update for all later columns, once per block
            WT[i2:].addmm_(U[i1:i2, i2:].T, ET, alpha=-1)
    return QT.T, WT.T


def quantize(W: Tensor, H: Tensor, G: Optional[Tensor], quantizer: Callable, *, info: Optional[dict] = None,
             percdamp: float = 0.01, act_order: bool = False, block_size: Optional[int] = None) -> Tensor:
    """OPTQ: Q on the grid minimising ‖X̃ᵀ(W − Q)ᵀ‖ column by column; G is ignored.

    λ = percdamp·mean(diag H) (raised ×10 if the Cholesky fails); act_order sorts by descending diag(H).
    """
    percdamp = _linalg.check_nonnegative("percdamp", percdamp)
    dtype = W.dtype
    W, H, _ = _linalg.working_copies(W, H)
    M, N = W.shape
    B = _linalg.default_block_size(N, block_size)

    dead = _linalg.dead_mask(H)
    H = _linalg.isolate_dead(H, dead)  # dead inputs: H[i,i] = 1 ...
    W[:, dead] = 0  # ... and w_i = 0, as GPTQ does

    perm = _linalg.act_order_perm(H, act_order)
    W = _linalg.permute_cols(W, perm)
    H = _linalg.permute_sym(H, perm)

    damp = percdamp * float(torch.diagonal(H).mean()) if N else 0.0
    cols = _linalg.solve_order(perm, N)

    (Q, _), damp, retries = _linalg.solve_until_finite(
        H, damp, lambda U: sweep(W, U, quantizer, cols, B), "OPTQ sweep")
    _linalg.write_info(info, damp, retries, int(dead.sum()))
    return _linalg.unpermute_cols(Q, perm).to(dtype)
