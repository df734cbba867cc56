"""The one decomposition engine: the exact SVD of dW = up @ down without ever forming dW.

With up = A (m x r) and down = B (r x n), write A = Q_A R_A (thin QR). Then dW dW^T = Q_A (R_A G_B R_A^T) Q_A^T with
G_B = B B^T, so the singular values of dW are the square roots of the eigenvalues of the small core
K = R_A G_B R_A^T, the left singular vectors are Q_A times its eigenvectors, and the right ones follow as
V_k = dW^T U_k / S_k = B^T (A^T U_k) / S_k. R_A comes from a Cholesky QR of A in float64 (the Gram matrix A^T A,
then its Cholesky factor), falling back to Householder QR when A is rank deficient or ill-conditioned. The engine
works on whichever side (dW or dW^T) gives the smaller core, and rescales factors far from 1 by an exact power of
two so nothing overflows. Everything is O((m + n) r^2 + r^3), against O(m n min(m, n)) for the SVD of dW; all arithmetic is float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

CHOLESKY_MAX_CONDITION = 1e4  # past this estimate of cond(A), Cholesky QR loses orthogonality: use Householder
ZERO_RELATIVE = 1e-7  # eigenvalue noise of the core is ~1e-16 * S0^2, so S below 1e-7 * S0 is zero, not signal
SAFE_EXPONENT = 60  # factors within 2**+-60 need no rescaling: the core's entries stay within float64's range
NAN_MESSAGE = "holds NaN or Inf values; the LoRA is damaged (diverged training?) - use an earlier checkpoint"


class NonFiniteFactors(ValueError):
    """The factors hold NaN or Inf, or their product is beyond float64's range (the message says which)."""


@dataclass
class Decomposition:
    """Singular values of up @ down (descending, float64, without any alpha/rank scale) and a way to get the
    leading singular vectors on demand."""
    S: np.ndarray
    shape: tuple[int, int]
    _A: torch.Tensor  # the side whose range holds the left vectors of the (possibly transposed) problem
    _B: torch.Tensor
    _apply_left: Callable[[torch.Tensor], torch.Tensor]
    _W: torch.Tensor  # eigenvectors of the core, columns in descending order of S
    _transposed: bool
    _exp: int = 0  # _A and _B are the factors times 2**-_exp (together): S = 2**_exp * S(_A @ _B)

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_k, S_k, Vh_k) of the best rank-k approximation, float64 on the compute device. Directions past the
        numerical rank (S == 0) come back as zero columns/rows, so a k above the rank is still a valid request."""
        kk = min(k, self._W.shape[1])
        L = self._apply_left(self._W[:, :kk])
        S = torch.as_tensor(self.S[:kk].copy(), dtype=torch.float64, device=L.device)
        s_unit = torch.as_tensor(np.ldexp(self.S[:kk], -self._exp), dtype=torch.float64, device=L.device)
        live = S > 0
        R = self._B.T @ (self._A.T @ L)
        R = torch.where(live, R / torch.where(live, s_unit, torch.ones_like(s_unit)), torch.zeros_like(R))
        L = torch.where(live, L, torch.zeros_like(L))
        U, V = (R, L) if self._transposed else (L, R)
        if k > kk:  # pad with exact zeros past the core's size
            m, n = self.shape
            U = torch.cat([U, U.new_zeros(m, k - kk)], dim=1)
            V = torch.cat([V, V.new_zeros(n, k - kk)], dim=1)
            S = torch.cat([S, S.new_zeros(k - kk)])
        return U, S, V.T


def _left_basis(A: torch.Tensor, gram: torch.Tensor | None
                ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """R and x -> Q @ x for a thin QR of A (m x r) with Gram matrix A^T A. A wide or square A is its own R."""
    if gram is None:
        return A, lambda x: x
    L, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        d = torch.diagonal(L)
        dmin = float(d.min())
        if dmin > 0 and float(d.max()) / dmin < CHOLESKY_MAX_CONDITION:
            R = L.T
            return R, lambda x: A @ torch.linalg.solve_triangular(R, x, upper=True)
    Q, R = torch.linalg.qr(A)
    return R, lambda x: Q @ x


def decompose(up: torch.Tensor, down: torch.Tensor, device: str | torch.device = "cpu") -> Decomposition:
    """Exact SVD of `up @ down` (up: m x r, down: r x n, any float dtype), computed from the factors alone.

    Raises NonFiniteFactors when a factor holds NaN or Inf (seen for free on the Gram matrices' diagonals)."""
    if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
        raise ValueError(f"factors do not chain: up {tuple(up.shape)} @ down {tuple(down.shape)}")
    m, r = up.shape
    n = down.shape[1]
    transposed = n < m  # work on dW^T = down^T up^T, whose core is smaller
    A = (down.T if transposed else up).to(device=device, dtype=torch.float64)
    B = (up.T if transposed else down).to(device=device, dtype=torch.float64)
    A, ea = _unit_scale(A)
    B, eb = _unit_scale(B)
    GB = B @ B.T
    GA = A.T @ A if A.shape[0] > r else None  # a wide A is its own R: no Gram needed
    R, apply_left = _left_basis(A, GA)
    K = R @ GB @ R.T
    K = (K + K.T) * 0.5
    w, W = torch.linalg.eigh(K)
    p = min(m, n, r)
    w, W = w.flip(0)[:p], W.flip(1)[:, :p]
    S = torch.sqrt(torch.clamp(w, min=0)).cpu().numpy()
    if S.size and S[0] > 0:
        S[S < S[0] * ZERO_RELATIVE] = 0.0
    with np.errstate(over="ignore"):
        S = np.ldexp(S, ea + eb)
    if S.size and not math.isfinite(S[0]):
        raise NonFiniteFactors("has an update beyond float64's range (singular values over 1e308); the file is "
                               "damaged - re-export it")
    return Decomposition(S=S, shape=(m, n), _A=A, _B=B, _apply_left=apply_left, _W=W, _transposed=transposed,
                         _exp=ea + eb)


def _unit_scale(X: torch.Tensor) -> tuple[torch.Tensor, int]:
    """X, or X times an exact power of two when its largest entry is far from 1, and that exponent: no float64
    overflow or underflow in the Gram matrices and the core (entries to the 4th power) whatever the factors'
    magnitude, and no copy for ordinary ones. Raises NonFiniteFactors on NaN/Inf."""
    if not X.numel():
        return X, 0
    lo, hi = torch.aminmax(X)
    top = max(abs(float(lo)), abs(float(hi)))
    if not math.isfinite(top):
        raise NonFiniteFactors(NAN_MESSAGE)
    e = math.frexp(top)[1] if top else 0
    if -SAFE_EXPONENT <= e <= SAFE_EXPONENT:
        return X, 0
    return torch.ldexp(X, torch.tensor(-e, dtype=X.dtype, device=X.device)), e
