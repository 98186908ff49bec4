"""Hadamard constructions and the fast transform: exact orthogonality, fast == dense, rotation invariance."""

from __future__ import annotations

import math

import pytest
import torch

from qbench.transforms.hadamard import (
    FACTORS,
    HadamardError,
    factorize,
    hadamard_factor,
    hadamard_matrix,
    hadamard_transform,
    is_supported,
    orthonormal_hadamard,
    random_signs,
)

MAX_N = 16384
DENSE_MAX = 4096  # H Hᵀ = nI checked with a dense GEMM up to here (1.2 s at 4096 on one core)
SUPPORTED = sorted({K << k for K in FACTORS for k in range(MAX_N.bit_length()) if K << k <= MAX_N})
LLAMA_SIZES = [64, 128, 576, 1536, 2048, 3072, 4096, 8192, 11008, 14336]


pytestmark = pytest.mark.usefixtures("one_thread")


def _dense_ref(x: torch.Tensor, signs: torch.Tensor | None) -> torch.Tensor:
    """The definition: x @ (H_n diag(s)).T / √n, in float64."""
    n = x.shape[-1]
    H = hadamard_matrix(n)
    if signs is not None:
        H = H * signs.double()
    return x.double() @ H.T / math.sqrt(n)


def _columns(n: int, cols: torch.Tensor) -> torch.Tensor:
    """Columns of H_K ⊗ H_P by formula: H[i, j] = H_K[i // P, j // P] · (-1)^popcount((i % P) & (j % P))."""
    K, P = factorize(n)
    i = torch.arange(n)[:, None]
    j = cols[None, :]
    both = (i % P) & (j % P)
    parity = sum((both >> b) & 1 for b in range(max(P.bit_length(), 1))) % 2
    return hadamard_factor(K)[i // P, j // P] * (1 - 2 * parity)


@pytest.mark.parametrize("K", FACTORS)
def test_factor_is_hadamard(K):
    H = hadamard_factor(K)
    assert H.shape == (K, K) and H.dtype == torch.float64
    assert torch.all(H.abs() == 1)
    assert torch.equal(H @ H.T, K * torch.eye(K, dtype=torch.float64))


def test_factor_returns_copies_and_dtype():
    H = hadamard_factor(12)
    H.zero_()
    assert torch.all(hadamard_factor(12).abs() == 1)
    assert hadamard_factor(20, torch.float32).dtype == torch.float32


@pytest.mark.parametrize("K", [k for k in FACTORS if k in (12, 20, 28, 44, 60, 108, 140, 344)])
def test_paley1_factors_are_skew(K):
    # Paley I gives H = I + S with S skew: a sanity check of GF(q) arithmetic (q = 27, 343 are prime powers).
    H = hadamard_factor(K)
    assert torch.equal(H + H.T, 2 * torch.eye(K, dtype=H.dtype))


@pytest.mark.parametrize("q", [11, 13, 25, 27, 49, 343])
def test_jacobsthal_matrix(q):
    from qbench.transforms.hadamard import _jacobsthal

    Q = _jacobsthal(q)
    assert torch.equal(Q @ Q.T, q * torch.eye(q, dtype=Q.dtype) - 1)
    assert torch.equal(Q.sum(1), torch.zeros(q, dtype=Q.dtype))
    assert torch.equal(Q.T, Q if q % 4 == 1 else -Q)  # χ(-1) = (-1)^((q-1)/2)


@pytest.mark.parametrize(
    "n, expected",
    [(1, (1, 1)), (2, (1, 2)), (64, (1, 64)), (128, (1, 128)), (12, (12, 1)), (40, (20, 2)), (344, (172, 2)),
     (576, (36, 16)), (1536, (12, 128)), (3072, (12, 256)), (8192, (1, 8192)), (11008, (172, 64)),
     (14336, (28, 512)), (4992, (156, 32))],
)
def test_factorize(n, expected):
    assert factorize(n) == expected
    assert is_supported(n)


@pytest.mark.parametrize("n", [1000, 7 * 2, 0, -8, 3, 6, 10, 4 * 17, 4 * 23 * 8, 2.5, "12"])
def test_unsupported_sizes_raise_one_line(n):
    assert not is_supported(n)
    with pytest.raises(HadamardError) as err:
        factorize(n)
    msg = str(err.value)
    assert "\n" not in msg and f"n={n!r}" in msg and "K in {1, 12, 20" in msg
    if isinstance(n, int) and n > 0:
        with pytest.raises(HadamardError):
            hadamard_matrix(n)
        with pytest.raises(HadamardError):
            hadamard_transform(torch.zeros(2, n))
    assert isinstance(err.value, ValueError)


def test_unknown_factor_raises():
    for K in (7, 24, 156 * 2):
        with pytest.raises(HadamardError, match=f"K={K} "):
            hadamard_factor(K)


def test_supported_sizes_cover_llama_dims():
    assert set(LLAMA_SIZES) <= set(SUPPORTED)
    assert len(SUPPORTED) > 100


@pytest.mark.parametrize("n", [n for n in SUPPORTED if n <= DENSE_MAX])
def test_dense_orthogonality(n):
    H = hadamard_matrix(n, torch.float32)  # ±1 and integer sums < 2^24: float32 products are exact
    assert torch.all(H.abs() == 1)
    assert torch.equal(H @ H.T, n * torch.eye(n))


@pytest.mark.parametrize("n", [96, 576, 1536, 2752, 3584])
def test_kronecker_structure(n):
    K, P = factorize(n)
    H = hadamard_matrix(n)
    assert torch.equal(H, torch.kron(hadamard_factor(K), hadamard_matrix(P)))
    cols = torch.tensor([0, 1, n // 3, n - 1])
    assert torch.equal(_columns(n, cols), H[:, cols])


@pytest.mark.parametrize("n", SUPPORTED)
def test_every_size_sampled(n):
    # H_K HᵀK = KI (test_factor_is_hadamard) and Sylvester orthogonality imply H_n Hᵀn = nI for the Kronecker
    # product; here each size is also checked directly on a sample through the fast transform.
    K, P = factorize(n)
    assert K * P == n and K in FACTORS
    g = torch.Generator().manual_seed(n)
    x = torch.randn(8, n, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    y = hadamard_transform(x)
    torch.testing.assert_close(y @ y.T, x @ x.T, rtol=0, atol=1e-12)  # norms and angles preserved
    cols = torch.unique(torch.tensor([0, n - 1, *torch.randint(0, n, (3,), generator=g).tolist()]))
    basis = torch.zeros(len(cols), n, dtype=torch.float64)
    basis[torch.arange(len(cols)), cols] = 1
    got = hadamard_transform(basis, normalize=False).T  # e_j @ Hᵀ = column j of H_n
    assert torch.equal(got, _columns(n, cols).double())
    assert torch.equal(got.T @ got, n * torch.eye(len(cols), dtype=torch.float64))


FAST_SIZES = [1, 2, 4, 64, 128, 12, 20, 24, 28, 36, 40, 44, 52, 60, 108, 140, 156, 172, 344, 312, 688,
              576, 1536, 2048, 3072]


@pytest.mark.parametrize("n", FAST_SIZES)
@pytest.mark.parametrize("shape", [(3,), (2, 5)])
@pytest.mark.parametrize("with_signs", [False, True])
def test_fast_equals_dense(n, shape, with_signs):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(*shape, n, generator=g, dtype=torch.float64)
    s = random_signs(n, seed=n + 1) if with_signs else None
    ref = _dense_ref(x, s)
    y = hadamard_transform(x, s)
    assert y.shape == x.shape and y.dtype == torch.float64
    assert (y - ref).abs().max() <= 1e-12 * ref.abs().max()
    raw = hadamard_transform(x, s, normalize=False)
    assert (raw - ref * math.sqrt(n)).abs().max() <= 1e-12 * raw.abs().max()
    y32 = hadamard_transform(x.float(), s.float() if s is not None else None)
    assert y32.dtype == torch.float32
    assert (y32.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_transform_input_handling():
    x = torch.randn(4, 1, dtype=torch.float64)
    y = hadamard_transform(x, normalize=False)
    y.add_(1)
    assert not torch.equal(x, y)
    with pytest.raises(ValueError, match="signs"):
        hadamard_transform(torch.zeros(2, 12), torch.ones(24))
    with pytest.raises(TypeError, match="floating"):
        hadamard_transform(torch.zeros(2, 12, dtype=torch.int64))
    xt = torch.randn(576, 3, dtype=torch.float64).T  # non-contiguous input
    assert torch.equal(hadamard_transform(xt), hadamard_transform(xt.contiguous()))


@pytest.mark.parametrize("n", [12, 64, 172, 576, 1536])
def test_rotation_invariance(n):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(7, n, generator=g, dtype=torch.float64)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    R = orthonormal_hadamard(n, seed=3)
    torch.testing.assert_close(R @ R.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    ref = W @ x
    tol = 1e-12 * ref.abs().max()
    assert ((W @ R.T) @ (R @ x) - ref).abs().max() <= tol
    s = random_signs(n, seed=3)
    torch.testing.assert_close(hadamard_transform(x.T, s), (R @ x).T, rtol=0, atol=1e-13)
    assert (hadamard_transform(W, s) @ hadamard_transform(x.T, s).T - ref).abs().max() <= tol


def test_orthonormal_hadamard_without_seed():
    R = orthonormal_hadamard(576, dtype=torch.float32)
    assert R.dtype == torch.float32
    torch.testing.assert_close(R * math.sqrt(576), hadamard_matrix(576, torch.float32))


def test_random_signs():
    s = random_signs(1536, seed=7)
    assert s.dtype == torch.float64 and s.shape == (1536,) and torch.all(s.abs() == 1)
    assert torch.equal(s, random_signs(1536, seed=7))
    assert not torch.equal(s, random_signs(1536, seed=8))
    g = torch.Generator().manual_seed(7)
    assert torch.equal(s, 1 - 2 * torch.randint(0, 2, (1536,), generator=g).double())
    assert 600 < (s > 0).sum() < 936
    assert random_signs(12, 0, torch.float32).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    for n in (576, 1536, 11008):
        x = torch.randn(4, n, dtype=torch.float64)
        s = random_signs(n, 0)
        y = hadamard_transform(x.cuda(), s.cuda()).cpu()
        torch.testing.assert_close(y, hadamard_transform(x, s), rtol=0, atol=1e-12)
        y32 = hadamard_transform(x.float().cuda(), s.float().cuda()).cpu()
        assert (y32.double() - hadamard_transform(x, s)).abs().max() <= 1e-5 * y.abs().max()
