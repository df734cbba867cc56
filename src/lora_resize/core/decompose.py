"""The one decomposition engine: the exact SVD of dW = up @ down without ever forming dW.

With up = A (m x r) and down = B (r x n), write A = Q_A R_A (thin QR). Then dW dW^T = Q_A (R_A G_B R_A^T) Q_A^T with
G_B = B B^T, so the singular values of dW are the square roots of the eigenvalues of the small core
K = R_A G_B R_A^T, the left singular vectors are Q_A times its eigenvectors, and the right ones follow as
V_k = dW^T U_k / S_k = B^T (A^T U_k) / S_k = B^T R_A^T W_k / S_k. R_A comes from a Cholesky QR of A in float64 (the Gram matrix A^T A,
then its Cholesky factor), falling back to Householder QR when A is rank deficient or ill-conditioned. The engine
works on whichever side (dW or dW^T) gives the smaller core, and rescales factors far from 1 by an exact power of
two so nothing overflows. Everything is O((m + n) r^2 + r^3), against O(m n min(m, n)) for the SVD of dW; all arithmetic is float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import LoraStructureError, NumericalError

CHOLESKY_MAX_CONDITION = 1e4  # past this estimate of cond(A), Cholesky QR loses orthogonality: use Householder
ZERO_RELATIVE = 1e-7  # eigenvalue noise of the core is ~1e-16 * S0^2, so S below 1e-7 * S0 is zero, not signal
SAFE_EXPONENT = 60  # factors within 2**+-60 need no rescaling: the core's entries stay within float64's range
SYM_BLOCK = 64  # sym_gram's smallest block (measured: 64-128 rows give the full saving, smaller ones lose it)
NAN_MESSAGE = "holds NaN or Inf values; the LoRA is damaged (diverged training?) - use an earlier checkpoint"


class NonFiniteFactors(NumericalError):
    """The factors hold NaN or Inf, or their product is beyond float64's range (the message says which).
    `index`: which layer of a `decompose_many` call."""

    def __init__(self, message: str, index: int = 0):
        super().__init__(message)
        self.index = index


@dataclass
class Decomposition:
    """Singular values of up @ down (descending, float64, without any alpha/rank scale) and a way to get the
    leading singular vectors on demand."""
    S: np.ndarray
    shape: tuple[int, int]
    _B: torch.Tensor
    _apply_left: Callable[[torch.Tensor], torch.Tensor]
    _R: torch.Tensor  # the triangular factor of A = Q R, A the side whose range holds the left vectors of the
    #                   (possibly transposed) problem (a wide or square A: A itself), so A^T Q = R^T
    _W: torch.Tensor | None  # eigenvectors of the core, columns in descending order of S (None: values only)
    _transposed: bool
    _exp: int = 0  # A and _B are the factors times 2**-_exp (together): S = 2**_exp * S(A @ _B)

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_k, S_k, Vh_k) of the best rank-k approximation, float64 on the compute device. Directions past the
        numerical rank (S == 0) come back as zero columns/rows, so a k above the rank is still a valid request.
        Raises ValueError for a decomposition made without vectors."""
        if self._W is None:
            raise ValueError("this decomposition holds singular values only (decompose_many(..., vectors=False))")
        kk = min(k, self._W.shape[1])
        Wk = self._W[:, :kk]
        L = self._apply_left(Wk)
        S = torch.as_tensor(self.S[:kk].copy(), dtype=torch.float64, device=L.device)
        live = self.S[:kk] > 0
        s_unit = np.ldexp(self.S[:kk], -self._exp)
        # V_k = dW^T U_k / S_k = B^T (A^T Q W_k) / S_k, and A^T Q = R^T: no product with the long side of A
        R = _times(self._B.mT, self._R.mT @ Wk)
        if live.all():
            R = R / torch.as_tensor(s_unit, dtype=torch.float64, device=L.device)
        else:
            inv = torch.as_tensor(np.where(live, 1.0 / np.where(live, s_unit, 1.0), 0.0), dtype=torch.float64,
                                  device=L.device)
            R = R * inv
            L = L * torch.as_tensor(live, dtype=torch.float64, device=L.device)
        U, V = (R, L) if self._transposed else (L, R)
        if k > kk:  # pad with exact zeros past the core's size
            m, n = self.shape
            U = torch.cat([U, U.new_zeros(m, k - kk)], dim=1)
            V = torch.cat([V, V.new_zeros(n, k - kk)], dim=1)
            S = torch.cat([S, S.new_zeros(k - kk)])
        return U, S, V.T


def decompose(up: torch.Tensor, down: torch.Tensor, device: str | torch.device = "cpu", vectors: bool = True
              ) -> Decomposition:
    """Exact SVD of `up @ down` (up: m x r, down: r x n, any float dtype), computed from the factors alone;
    `vectors` False: the singular values only (about half the core's cost; `factors` then raises).

    Raises NonFiniteFactors (a NumericalError) when a factor holds NaN or Inf (seen for free on the Gram matrices'
    diagonals), LoraStructureError when the factors do not chain."""
    return decompose_many([(up, down)], device, vectors)[0]


def decompose_many(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], device: str | torch.device = "cpu",
                   vectors: bool = True) -> list[Decomposition]:
    """`decompose` for many layers at once: layers of one shape are stacked and go through every step as one
    batch (one kernel per step and a handful of device synchronisations per shape, instead of per layer), which
    is what keeps a GPU busy on LoRAs of many small layers. Results are those of `decompose`, one per pair.

    Raises NonFiniteFactors for the first failing pair in order, with its position as `.index`."""
    groups: dict[tuple, list[int]] = {}
    for i, (up, down) in enumerate(pairs):
        if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoraStructureError(f"factors do not chain: up {tuple(up.shape)} @ down {tuple(down.shape)}")
        groups.setdefault((tuple(up.shape), tuple(down.shape)), []).append(i)
    out: list[Decomposition | None] = [None] * len(pairs)
    failures: list[NonFiniteFactors] = []
    for idx in groups.values():
        try:
            decs = _decompose_stack([pairs[i] for i in idx], device, vectors)
        except NonFiniteFactors as e:
            e.index = idx[e.index]
            failures.append(e)
            continue
        for i, dec in zip(idx, decs):
            out[i] = dec
    if failures:
        raise min(failures, key=lambda e: e.index)
    return out


def _decompose_stack(pairs: list[tuple[torch.Tensor, torch.Tensor]], device: str | torch.device,
                     vectors: bool = True) -> list[Decomposition]:
    """The engine on b layers of one shape, as batched tensor operations."""
    m, r = pairs[0][0].shape
    n = pairs[0][1].shape[1]
    transposed = n < m  # work on dW^T = down^T up^T, whose core is smaller
    A = _stacked([down.T if transposed else up for up, down in pairs], device)
    B = _stacked([up.T if transposed else down for up, down in pairs], device)
    GA, GB = _grams(A, B)
    ea = eb = [0] * len(pairs)
    if not _grams_in_range(A, GA, GB):  # rare: NaN/Inf, zero, or far from 1: look closer
        (A, ea, bad_a), (B, eb, bad_b) = _unit_scale(A), _unit_scale(B)
        if bad_a or bad_b:
            raise NonFiniteFactors(NAN_MESSAGE, index=min(bad_a + bad_b))
        if any(ea) or any(eb):
            GA, GB = _grams(A, B)
    R, apply_left = _left_basis(A, GA)
    K = R @ GB @ R.mT
    K = (K + K.mT) * 0.5
    p = min(m, n, r)
    if vectors:
        w, W = torch.linalg.eigh(K)
        w, W = w.flip(-1)[:, :p], W.flip(-1)[:, :, :p]
    else:
        w, W = torch.linalg.eigvalsh(K).flip(-1)[:, :p], None
    S_all = torch.sqrt(torch.clamp(w, min=0)).cpu().numpy()
    decs = []
    for i, S in enumerate(S_all):
        if S.size and S[0] > 0:
            S[S < S[0] * ZERO_RELATIVE] = 0.0
        e = int(ea[i] + eb[i])
        with np.errstate(over="ignore"):
            S = np.ldexp(S, e)
        if S.size and not math.isfinite(S[0]):
            raise NonFiniteFactors("has an update beyond float64's range (singular values over 1e308); the file is "
                                   "damaged - re-export it", index=i)
        decs.append(Decomposition(S=S, shape=(m, n), _B=B[i], _apply_left=apply_left[i], _R=R[i],
                                  _W=W[i] if W is not None else None, _transposed=transposed, _exp=e))
    return decs


def _stacked(xs: list[torch.Tensor], device: str | torch.device) -> torch.Tensor:
    """xs as one float64 (b, ...) tensor on `device`: stacked in their own dtype (a small copy), moved, then
    widened, so a half-precision file crosses to a GPU at half the bytes. One tensor is not copied at all."""
    X = xs[0].unsqueeze(0) if len(xs) == 1 else torch.stack(xs)
    return X.to(device=device).to(dtype=torch.float64)


def _grams(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(A^T A, or None when A is wide or square and is its own R; B B^T), per layer."""
    return (sym_gram(A.mT) if A.shape[1] > A.shape[2] else None), sym_gram(B)


def sym_gram(X: torch.Tensor, block: int = SYM_BLOCK) -> torch.Tensor:
    """X X^T for X (..., r, n), each off-diagonal block computed once (recursive halves down to `block` rows):
    about 2/3 of the flops of the full product for r = 512, the same float64 sums up to rounding."""
    r = X.shape[-2]
    if r <= block:
        return X @ X.mT
    h = r // 2
    X1, X2 = X[..., :h, :], X[..., h:, :]
    G = X.new_empty(*X.shape[:-2], r, r)
    G[..., :h, :h] = sym_gram(X1, block)
    G[..., h:, h:] = sym_gram(X2, block)
    off = X2 @ X1.mT
    G[..., h:, :h] = off
    G[..., :h, h:] = off.mT
    return G


def _grams_in_range(A: torch.Tensor, GA: torch.Tensor | None, GB: torch.Tensor) -> bool:
    """Every layer's factors are finite, nonzero and near 1 in size, read off the Gram matrices' diagonals (column
    and row sums of squares: a NaN or Inf anywhere shows there): no rescaling is needed, and nothing overflows or
    underflows further on. One synchronisation for the whole batch."""
    ga = torch.diagonal(GA, dim1=-2, dim2=-1) if GA is not None else (A * A).sum(-2)
    tops = torch.stack([ga.amax(-1), torch.diagonal(GB, dim1=-2, dim2=-1).amax(-1)]).cpu().numpy()
    lo, hi = 2.0 ** (-2 * SAFE_EXPONENT), 2.0 ** (2 * SAFE_EXPONENT)
    return bool(np.all(np.isfinite(tops)) and np.all(tops >= lo) and np.all(tops <= hi))


def _left_basis(A: torch.Tensor, GA: torch.Tensor | None
                ) -> tuple[torch.Tensor, list[Callable[[torch.Tensor], torch.Tensor]]]:
    """R (b x r x r) and, per layer, x -> Q @ x for thin QRs of the b layers of A (b x m x r) given their Gram
    matrices A^T A: Cholesky QR where it is well conditioned, Householder QR for the rest. A wide or square A
    (GA None) is its own R."""
    b, _, r = A.shape
    if GA is None:
        return A, [lambda x: x] * b
    L, info = torch.linalg.cholesky_ex(GA)
    d = torch.diagonal(L, dim1=-2, dim2=-1)
    info, dmin, dmax = torch.stack([info.to(d.dtype), d.amin(-1), d.amax(-1)]).cpu().tolist()
    good = [f == 0 and lo > 0 and hi / lo < CHOLESKY_MAX_CONDITION for f, lo, hi in zip(info, dmin, dmax)]
    R = L.mT
    apply = [partial(_solve_left, A[i], R[i]) for i in range(b)]
    bad = [i for i in range(b) if not good[i]]
    if bad:
        Q, Rq = torch.linalg.qr(A[bad])
        R = R.clone()
        R[bad] = Rq
        for j, i in enumerate(bad):
            apply[i] = partial(torch.matmul, Q[j])
    return R, apply


def _solve_left(A: torch.Tensor, R: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _times(A, torch.linalg.solve_triangular(R, x, upper=True))


def _times(M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """M @ X for a long M (p x r) and a thin X (r x k), in the orientation that reads M along its contiguous rows:
    a transposed view (the factor as stored, e.g. B^T for B = down) as (X^T M^T)^T. The same products and sums;
    measured with MKL on one thread, 2-4x faster for k <= 128 than handing it the transposed view."""
    if M.stride(-2) == 1 and M.stride(-1) != 1:
        return (X.mT @ M.mT).mT
    return M @ X


def _unit_scale(X: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
    """X (b x ...), each layer times an exact power of two when its largest entry is far from 1, those exponents,
    and which layers hold NaN or Inf: no float64 overflow or underflow in the Gram matrices and the core (entries
    to the 4th power) whatever the factors' magnitude, and no copy for ordinary ones."""
    b = X.shape[0]
    if not X.numel():
        return X, [0] * b, []
    lo, hi = torch.aminmax(X.reshape(b, -1), dim=1)
    top = torch.maximum(-lo, hi).cpu().numpy()
    bad = np.flatnonzero(~np.isfinite(top)).tolist()
    e = np.where(np.isfinite(top), np.frexp(top)[1], 0).astype(np.int64)
    if bad or np.all(np.abs(e) <= SAFE_EXPONENT):
        return X, [0] * b, bad
    e = np.where(np.abs(e) <= SAFE_EXPONENT, 0, e)
    shift = torch.as_tensor(-e, device=X.device).reshape(b, *([1] * (X.ndim - 1)))
    return torch.ldexp(X, shift.to(X.dtype)), e.tolist(), bad
