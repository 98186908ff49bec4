"""Hadamard matrices of order n = 2^k·K and a fast orthonormal Hadamard transform (QuaRot-style rotations).

H_n = H_K ⊗ H_{2^k}: H_{2^k} is Sylvester's, and every K-order factor is *constructed* here (no stored ±1
tables) by one of
  Sylvester (1867)        H_{2m} = [[H_m, H_m], [H_m, -H_m]];
  Paley I (1933)          q ≡ 3 (mod 4) a prime power: H_{q+1} = I + [[0, 1ᵀ], [-1, Q]];
  Paley II (1933)         q ≡ 1 (mod 4) a prime power, C = [[0, 1ᵀ], [1, Q]] the symmetric conference matrix:
                          H_{2(q+1)} = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]];
  Goethals–Seidel (1967)  four ±1 circulants A, B, C, D of odd order m with ΣXXᵀ = 4m·I give H_{4m}; the
                          circulants are found by a short deterministic search over unions of orbits of a
                          multiplier group on Z_m (the orbit method used by Đoković for Williamson-type matrices).
Q is the Jacobsthal matrix Q[a, b] = χ(a - b) of GF(q), χ the quadratic character; GF(p^r) is built here from
an irreducible polynomial found by search.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator

import torch
from torch import Tensor

__all__ = [
    "FACTORS",
    "HadamardError",
    "factorize",
    "hadamard_factor",
    "hadamard_matrix",
    "hadamard_transform",
    "is_supported",
    "orthonormal_hadamard",
    "random_signs",
]

# K -> (construction, parameter). Sizes Llama-family models need: 12 (1536, 3072), 36 (576), 28 (14336),
# 172 (11008), ... 156 = 4·39 and 172 = 4·43 have no Paley construction (155, 77, 171, 85 are not prime powers).
_CONSTRUCTIONS: dict[int, tuple[str, int]] = {
    1: ("sylvester", 1),
    12: ("paley1", 11),
    20: ("paley1", 19),
    28: ("paley1", 27),  # GF(3^3)
    36: ("paley2", 17),
    40: ("double", 20),  # H_20 ⊗ H_2 (no Paley: 39 is not a prime power, 19 ≡ 3 mod 4)
    44: ("paley1", 43),
    52: ("paley2", 25),  # GF(5^2)
    60: ("paley1", 59),
    108: ("paley1", 107),
    140: ("paley1", 139),
    156: ("goethals_seidel", 39),
    172: ("goethals_seidel", 43),
    344: ("paley1", 343),  # GF(7^3); an independent route to 11008 = 344·32
}
FACTORS: tuple[int, ...] = tuple(sorted(_CONSTRUCTIONS))
_POW2_BLOCK = 128  # largest Sylvester block applied as one GEMM in the fast transform
_MAX_ORBITS = 12  # Goethals–Seidel search: at most 2^12 orbit sign patterns per circulant


class HadamardError(ValueError):
    """No Hadamard matrix of the requested order can be constructed here (message: one line)."""


def _factor_list() -> str:
    return "{" + ", ".join(map(str, FACTORS)) + "}"


def _unsupported(n: object) -> str:
    """One-line reason n is not 2^k·K with a constructible K."""
    hint = ""
    if isinstance(n, int) and n > 0:
        two = (n & -n).bit_length() - 1
        hint = f" ({n} = 2^{two}·{n >> two})"
    return f"n={n!r} has no Hadamard construction here: n must be 2^k·K with K in {_factor_list()}{hint}"


def factorize(n: int) -> tuple[int, int]:
    """(K, 2^k) with n = K·2^k and K constructible, preferring the largest power of two (cheapest transform)."""
    try:
        n = operator.index(n)
    except TypeError:
        raise HadamardError(_unsupported(n)) from None
    if n < 1:
        raise HadamardError(_unsupported(n))
    p = n & -n
    while p >= 1:
        if n // p in _CONSTRUCTIONS:
            return n // p, p
        p //= 2
    raise HadamardError(_unsupported(n))


def is_supported(n: int) -> bool:
    """Whether hadamard_matrix(n) / hadamard_transform on a last dim of n can be built."""
    try:
        factorize(n)
    except HadamardError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------
# GF(p^r): elements are the integers 0..q-1 whose base-p digits are the coefficients of a polynomial of
# degree < r (lowest first), arithmetic modulo a monic irreducible polynomial of degree r.


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, r) with q = p^r, p prime, or None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    r = 0
    while q % p == 0:
        q //= p
        r += 1
    return (p, r) if q == 1 else None


def _poly_rem(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p) (coefficient lists, lowest first; f monic)."""
    a = [c % p for c in a]
    d = len(f) - 1
    for i in range(len(a) - 1, d - 1, -1):
        c = a[i]
        if c:
            for j in range(d + 1):
                a[i - d + j] = (a[i - d + j] - c * f[j]) % p
    return a[:d] if len(a) >= d else a + [0] * (d - len(a))


def _irreducible(p: int, r: int) -> list[int]:
    """The first monic degree-r polynomial over GF(p) (lexicographic search) with no monic factor of degree ≤ r/2."""
    for low in itertools.product(range(p), repeat=r):
        f = list(low) + [1]
        if f[0] == 0 and r > 1:
            continue  # divisible by x
        divisors = (list(g) + [1] for d in range(1, r // 2 + 1) for g in itertools.product(range(p), repeat=d))
        if all(any(_poly_rem(f, g, p)) for g in divisors):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {r} over GF({p})")  # cannot happen


def _jacobsthal(q: int) -> Tensor:
    """Q[a, b] = χ(a - b) over GF(q), χ the quadratic character (0 at 0, +1 on nonzero squares, -1 otherwise)."""
    p, r = _prime_power(q)  # type: ignore[misc]
    f = _irreducible(p, r)
    digits = [[(x // p**i) % p for i in range(r)] for x in range(q)]

    def square(x: int) -> int:
        a = digits[x]
        prod = [0] * (2 * r - 1)
        for i, j in itertools.product(range(r), repeat=2):
            prod[i + j] += a[i] * a[j]
        return sum(c * p**i for i, c in enumerate(_poly_rem(prod, f, p)))

    squares = {square(x) for x in range(1, q)}
    assert len(squares) == (q - 1) // 2, "GF(q) construction failed"  # half the units are squares in a field
    chi = torch.tensor([0] + [1 if x in squares else -1 for x in range(1, q)], dtype=torch.int64)
    d = torch.tensor(digits, dtype=torch.int64)  # [q, r]
    diff = (d[:, None, :] - d[None, :, :]) % p  # digit-wise subtraction = subtraction in GF(p^r)
    code = (diff * (p ** torch.arange(r))).sum(-1)
    return chi[code]


def _paley1(q: int) -> Tensor:
    """Paley I, q ≡ 3 (mod 4): S = [[0, 1ᵀ], [-1, Q]] is skew with SSᵀ = qI, so H = I + S has HHᵀ = (q+1)I."""
    Q = _jacobsthal(q)
    S = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, Q
    return torch.eye(q + 1, dtype=torch.int64) + S


def _paley2(q: int) -> Tensor:
    """Paley II, q ≡ 1 (mod 4): symmetric conference C (C² = qI) expanded by 2x2 blocks to order 2(q+1)."""
    C = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, _jacobsthal(q)
    off_diagonal = torch.tensor([[1, 1], [1, -1]])  # replaces each ±1 of C
    on_diagonal = torch.tensor([[1, -1], [-1, -1]])  # replaces each 0 (the diagonal) of C
    return torch.kron(C, off_diagonal) + torch.kron(torch.eye(q + 1, dtype=torch.int64), on_diagonal)


def _sylvester(p: int, dtype: torch.dtype = torch.int64) -> Tensor:
    """Sylvester H_p, p = 2^k: H[i, j] = (-1)^popcount(i & j)."""
    H = torch.ones(1, 1, dtype=dtype)
    while H.shape[0] < p:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def _odd_square_sums(total: int) -> list[tuple[int, int, int, int]]:
    """All a ≥ b ≥ c ≥ d > 0 odd with a² + b² + c² + d² = total (possible row sums of the four circulants)."""
    odd = range(1, math.isqrt(total) + 1, 2)
    return [t for t in itertools.combinations_with_replacement(odd[::-1], 4) if sum(x * x for x in t) == total]


def _orbit_search(m: int, orbits: list[list[int]]) -> list[list[int]] | None:
    """Four ±1 sequences of length m, constant on the given multiplier orbits, whose periodic autocorrelations
    sum to 0 at every nonzero shift; meet-in-the-middle over pairs (A, B) vs (C, D), or None."""
    r = len(orbits)
    label = torch.empty(m, dtype=torch.int64)
    for i, orbit in enumerate(orbits):
        label[orbit] = i
    patterns = 1 - 2 * ((torch.arange(2**r)[:, None] >> torch.arange(r)) & 1)  # [2^r, r] in ±1
    X = patterns[:, label]  # [2^r, m]
    # Invariant sequences have invariant autocorrelations: checking one shift per orbit suffices.
    shifts = [o[0] for o in orbits if o[0] != 0]
    paf = torch.stack([(X * X.roll(-s, 1)).sum(1) for s in shifts], 1).tolist()
    # Σ|DFT|² = 4m at every frequency, so each |DFT(X)|² ≤ 4m (cheap filter).
    ok = (torch.fft.fft(X.double(), dim=1).abs() ** 2 <= 4 * m + 1e-6).all(1)
    rowsum = X.sum(1)
    for sums in _odd_square_sums(4 * m):
        groups = [torch.nonzero(ok & (rowsum == s)).flatten().tolist() for s in sums]
        left: dict[tuple[int, ...], tuple[int, int]] = {}
        for a, b in itertools.product(groups[0], groups[1]):
            left.setdefault(tuple(u + v for u, v in zip(paf[a], paf[b])), (a, b))
        for c, d in itertools.product(groups[2], groups[3]):
            hit = left.get(tuple(-u - v for u, v in zip(paf[c], paf[d])))
            if hit is not None:
                return [X[i].tolist() for i in (*hit, c, d)]
    return None


def _goethals_seidel(m: int) -> Tensor:
    """Goethals–Seidel array of order 4m from four ±1 circulants with AAᵀ + BBᵀ + CCᵀ + DDᵀ = 4mI.

    The circulants are searched among sequences constant on the orbits of a cyclic multiplier group
    H = <u> ≤ (Z/m)^*, trying groups from largest (fewest orbits) down; the first hit is taken."""
    groups: dict[frozenset[int], int] = {}
    for u in range(2, m):
        if math.gcd(u, m) == 1:
            groups.setdefault(frozenset(pow(u, e, m) for e in range(m)), u)
    for H, _u in sorted(groups.items(), key=lambda t: (-len(t[0]), t[1])):
        orbits = []
        for j in range(m):
            if not any(j in o for o in orbits):
                orbits.append(sorted({j * h % m for h in H}))
        if len(orbits) > _MAX_ORBITS:
            continue
        seqs = _orbit_search(m, orbits)
        if seqs is not None:
            break
    else:
        raise HadamardError(f"K={4 * m}: no Goethals–Seidel circulants found by the orbit search")
    idx = (torch.arange(m)[None, :] - torch.arange(m)[:, None]) % m
    A, B, C, D = (torch.tensor(s)[idx] for s in seqs)  # circulant X[i, j] = x[(j - i) mod m]
    # R = back-identity: for circulants X, Y, XR is symmetric and XRYᵀ = YRXᵀ, so the off-diagonal blocks cancel.
    R = torch.eye(m, dtype=torch.int64).flip(1)
    return torch.cat([
        torch.cat([A, B @ R, C @ R, D @ R], 1),
        torch.cat([-B @ R, A, D.T @ R, -C.T @ R], 1),
        torch.cat([-C @ R, -D.T @ R, A, B.T @ R], 1),
        torch.cat([-D @ R, C.T @ R, -B.T @ R, A], 1),
    ], 0)


@functools.lru_cache(maxsize=32)
def _factor_base(K: int) -> Tensor:
    """The K×K factor in float64, built once and verified (HHᵀ = KI exactly)."""
    kind, param = _CONSTRUCTIONS[K]
    if kind == "sylvester":
        H = _sylvester(param)
    elif kind == "paley1":
        H = _paley1(param)
    elif kind == "paley2":
        H = _paley2(param)
    elif kind == "double":
        H = torch.kron(_factor_base(param).long(), _sylvester(K // param))
    else:
        H = _goethals_seidel(param)
    if H.shape != (K, K) or not torch.equal(H @ H.T, K * torch.eye(K, dtype=torch.int64)):
        raise AssertionError(f"construction of the order-{K} Hadamard factor failed")  # a bug, not a user error
    return H.double()


def hadamard_factor(K: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The constructed K×K ±1 Hadamard matrix (HHᵀ = KI) for K in FACTORS; a fresh copy each call."""
    if K not in _CONSTRUCTIONS:
        raise HadamardError(f"K={K!r} is not a constructible Hadamard factor here: K must be one of {_factor_list()}")
    return _factor_base(K).to(dtype=dtype, copy=True)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Dense n×n ±1 matrix H_n = H_K ⊗ H_{2^k} ((K, 2^k) = factorize(n)), with H_n H_nᵀ = nI."""
    K, p = factorize(n)
    H = _sylvester(p, dtype)
    return H if K == 1 else torch.kron(_factor_base(K).to(dtype), H)


@functools.lru_cache(maxsize=64)
def _block(size: int, kind: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Cached transposed factor (K-part or Sylvester block) on the transform's dtype/device."""
    H = _factor_base(size) if kind == "K" else _sylvester(size, torch.float64)
    return H.T.contiguous().to(dtype=dtype, device=device)


def hadamard_transform(x: Tensor, signs: Tensor | None = None, normalize: bool = True) -> Tensor:
    """y = x @ (H_n diag(s)).T / √n = (x ⊙ s) H_nᵀ / √n along the last dim, n = x.shape[-1] (no /√n if not normalize).

    With s = random_signs(n, seed) this is x @ R.T, R = orthonormal_hadamard(n, seed), so W x = (W Rᵀ)(R x) =
    hadamard_transform(W, s) @ hadamard_transform(x, s)ᵀ. Fast: H_n = H_K ⊗ H_{b1} ⊗ H_{b2} ⊗ … (Sylvester
    blocks b ≤ 128) applied by one small GEMM per factor on a reshaped view: O(n·(K + Σb)) work, not O(n²)."""
    n = x.shape[-1]
    K, p = factorize(n)
    if not x.is_floating_point():
        raise TypeError(f"hadamard_transform needs a floating-point x, got {x.dtype}")
    if signs is not None:
        if signs.shape != (n,):
            raise ValueError(f"signs must have shape ({n},), got {tuple(signs.shape)}")
        x = x * signs.to(dtype=x.dtype, device=x.device)
    shape = x.shape
    y = x.reshape(-1, n)
    # Sylvester H_p = H_{b1} ⊗ H_{b2} ⊗ ..., blocks as equal as possible (fewest GEMMs of size ≤ _POW2_BLOCK).
    k = p.bit_length() - 1
    parts = -(-k // (_POW2_BLOCK.bit_length() - 1)) if k else 0
    blocks = [(1 << (k // parts + (i < k % parts)), "P") for i in range(parts)]
    factors = ([(K, "K")] if K > 1 else []) + blocks
    inner = n
    for i, (size, kind) in enumerate(factors):  # factor i acts on axis i of the [B, f_0, f_1, ...] view
        inner //= size
        Ht = _block(size, kind, y.dtype, y.device)
        if i == 0 and normalize:
            Ht = Ht * (1.0 / math.sqrt(n))  # fold 1/√n into the first (small) factor: saves a pass over y
        # inner axis: one GEMM [B·n/size, size] @ Hᵀ; outer axes: batched H @ [size, inner] blocks
        y = y.reshape(-1, size) @ Ht if inner == 1 else Ht.T @ y.reshape(-1, size, inner)
    if not factors:  # n = 1: H_1 = [1]; still return a new tensor, never a view of x
        y = y * (1.0 / math.sqrt(n) if normalize else 1.0)
    return y.reshape(shape)


def random_signs(n: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """n random ±1 from a CPU torch.Generator seeded with `seed` (same seed, same signs, on every run)."""
    g = torch.Generator().manual_seed(seed)
    return (1 - 2 * torch.randint(0, 2, (n,), generator=g)).to(dtype)


def orthonormal_hadamard(n: int, seed: int | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """Dense orthonormal R = H_n diag(s)/√n, s = random_signs(n, seed) (ones if seed is None), to fold into weights."""
    H = hadamard_matrix(n, torch.float64)
    if seed is not None:
        H = H * random_signs(n, seed)  # scales column j by s_j
    return (H / math.sqrt(n)).to(dtype)
