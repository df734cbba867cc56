"""The SVD of a dense matrix W (a full weight difference W_tuned - W_base): exact, or fast and certified.

A dense W has no factors to exploit (core.decompose works from up and down), so its spectrum costs what W's size
costs. Two routes:

**Exact** (`need=None`, or when the fast route is not worth it or not certified): the Gram matrix X X^T of W's short
side X (s x L, s = min(m, n)) in float64 (`sym_gram`), its eigendecomposition (torch.linalg.eigh), S = sqrt of the
eigenvalues, and the rank-k factors U_k, S_k, Vh_k = U_k^T X / S_k: an exact orthogonal projection of W, so the
written rank-k error is ||W||_F^2 - sum(S_k^2) whatever the rounding of S. Measured on 2 CPU cores against
torch.linalg.svd in float64 (full_matrices=False), W with vectors: 320x320 0.013 s vs 0.019 s, 1280x1280 0.33 s vs
0.69 s, 1280x5120 1.2 s vs 11.7 s, 320x2880 0.035 s vs 0.13 s: the Gram route wins at every shape, so it is the
exact route. Its values are exact to about eps * S_0^2 / S_i (1e-16 relative for the leading values, 1e-8 of S_0
for values at the zero threshold, which is why values below `ZERO_RELATIVE` * S_0 count as zero, as in
core.decompose).

**Fast and certified** (`need=k` with the sketch much smaller than s): the randomized range finder with subspace
(power) iteration of Halko, Martinsson & Tropp, "Finding structure with randomness" (SIAM Review 2011,
arXiv:0909.4061, Algorithm 4.4), all in float64 and seeded (a torch.Generator with `SEED`): Q (s x l, l = k + 1 +
oversampling) an orthonormal basis of (X X^T)^q X Omega, then the SVD of the small Q^T X = U' S' V^T. The written
rank-k factors (Q U'_k, S'_k, V_k^T) are the exact projection of W onto span(Q U'_k), so their squared error is
computable: E'_k = ||W||_F^2 - sum_{i<=k} S'_i^2 (||W||_F^2 summed exactly in float64). The S'_i are lower bounds
of the true s_i (Cauchy interlacing: Q^T X X^T Q is a compression of X X^T).

The certificate bounds the best rank-k error from below. In the basis [Q U', Q_perp], X X^T = [[diag(S'^2), E],
[E^T, D]] with E = U'^T Q^T X X^T Q_perp. Split the Ritz block after c >= k directions (E = [E_c; E_r]) and let
delta >= ||D|| = ||(I - Q Q^T) X||_2^2. For any k orthonormal directions, their energy exceeds sum_{i<=k} S'_i^2 by
at most (Ky Fan's maximum principle and |tr(A^T E B)| <= ||E||_2 ||A||_F ||B||_F on the blocks)

    Delta_k <= k ||E_c||^2 / (g2 - ||E_r||^2 / g1),   g1 = S'_k^2 - S'_{c+1}^2,  g2 = S'_k^2 - delta

(c = l: no E_r term), minimised over a few cuts c. So the best rank-k error is at least E'_k - Delta_k, the written
factors' excess is at most Delta_k / (E'_k - Delta_k) for every k <= K (`excess`: the largest), and each value is
certified in [S'_i, sqrt(S'_i^2 + Delta_i)] (`S_upper`). ||E|| is exact (E^T = (I - QQ^T) X X^T Q U' is one more
product with X); delta is the one probabilistic part: with r Gaussian vectors w_j and B = (R R^T)^t R, R =
(I - QQ^T) X, ||R||^(2t+1) = ||B|| <= a sqrt(2/pi) max_j ||B w_j|| except with probability a^-r (HMT 2011,
Lemma 4.1), with a^-r = `NORM_FAILURE` (1e-10). Rounding is covered by a slack of a few eps * ||W||_F^2.

When the certified excess is above `TOLERANCE` (a flat spectrum: no gap between the k-th value and the rest), the
sketch grows and more power steps run once; then the exact route runs instead (`fallback=True`).

**Near-ties.** A caller that plans the rank from a partial spectrum passes `decide(S, tail_energy) -> rank`: the
planning it will run on these values. The rank must be the same for every spectrum the certificate allows; the
policies that plan on partial spectra (ranks.plan.values_needed) are monotone in the values (a count of values
above a fraction of S_0, a fraction of cumulative energy), so it is enough that `decide` agrees on the corners
(all lower bounds, all upper bounds, S_0 low and the rest high, S_0 high and the rest low). Where they disagree the
decision sits within the certified error of a threshold and the exact route runs (`fallback=True`,
`near_tie=True`). This keeps the choice of route in one place, here, and the planning in ranks.

Memory: W in float64 (one copy of the layer), the sketch (s x l, L x l) and its products; no s x s or L x L matrix
on the fast route.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..errors import NumericalError
from .decompose import CHOLESKY_MAX_CONDITION, ZERO_RELATIVE, sym_gram

TOLERANCE = 1e-3  # the certified excess (squared error over the best rank-k one, minus 1) the fast route may have
SEED = 0x5EED  # the sketches' seed: the same W gives the same factors
POWER_STEPS = (3, 5)  # subspace iterations q: the first try, the retry
OVERSAMPLE = (10, 2.0)  # l = need + 1 + max(10, 2 * need) on the first try; the retry doubles the oversampling
FAST_SHARE = 0.25  # the fast route only when the sketch has at most this share of min(m, n) columns
NORM_FAILURE = 1e-10  # the probability that the randomized bound on ||(I - QQ^T) X||_2 does not hold
NORM_VECTORS, NORM_STEPS = 32, 6  # r test vectors, t power steps for that bound (factor (a*sqrt(2/pi))^(1/(2t+1)))
DENSE_NAN_MESSAGE = ("the dense update holds NaN or Inf values: the file it comes from is damaged "
                     "(re-download or re-export it)")
Decide = Callable[[np.ndarray, float], int]


@dataclass
class DenseDecomposition:
    """The leading singular values of a dense W (m x n) and its best rank-k factors on demand.

    S: leading singular values, descending, float64 (all of them when `complete`); on the fast route certified
    lower bounds, with `S_upper` the certified upper bounds (equal to S on the exact route). tail_energy:
    ||W||_F^2 - sum(S**2) >= 0 (0.0 when complete). excess: for every k <= len(S) the rank-k factors' squared error
    is at most (1 + excess) x the best rank-k squared error (0.0 on the exact route; errors at float64 rounding
    level count as zero). fallback: the fast route was asked for but its certificate failed (or `near_tie`: a
    decision sat within the certified error), so the exact route ran."""
    S: np.ndarray
    shape: tuple[int, int]
    tail_energy: float
    complete: bool
    excess: float
    fallback: bool
    S_upper: np.ndarray = field(default=None, repr=False)
    near_tie: bool = False
    _left: torch.Tensor = field(default=None, repr=False)  # s x p: left vectors of X (the short side's)
    _X: torch.Tensor | None = field(default=None, repr=False)  # exact route: X, to make right vectors on demand
    _right: torch.Tensor | None = field(default=None, repr=False)  # fast route: p x L right vectors of X
    _transposed: bool = False  # X = W^T

    def __post_init__(self) -> None:
        if self.S_upper is None:
            self.S_upper = self.S

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_k m x k, S_k (k,), Vh_k k x n) float64 on the compute device: the same contract as
        core.decompose.Decomposition.factors (directions past the numerical rank, S == 0, and past min(m, n) are
        zero columns/rows). Raises ValueError for k above the vectors a fast decomposition holds (len(S))."""
        have = self._left.shape[1]
        if not self.complete and k > have:
            raise ValueError(f"this decomposition was made for rank <= {have}; decompose again with need={k}")
        kk = min(k, have)
        live = torch.as_tensor(self.S[:kk] > 0, device=self._left.device)
        S = torch.as_tensor(self.S[:kk].copy(), dtype=torch.float64, device=self._left.device)
        L = self._left[:, :kk] * live
        if self._right is not None:
            R = self._right[:kk] * live[:, None]
        else:
            R = (L.mT @ self._X) / torch.where(live, S, torch.ones_like(S))[:, None]
        if k > kk:
            L = torch.cat([L, L.new_zeros(L.shape[0], k - kk)], dim=1)
            R = torch.cat([R, R.new_zeros(k - kk, R.shape[1])])
            S = torch.cat([S, S.new_zeros(k - kk)])
        return (R.mT, S, L.mT) if self._transposed else (L, S, R)


def decompose_dense(W: torch.Tensor, need: int | None = None, device: str | torch.device = "cpu",
                    decide: Decide | None = None) -> DenseDecomposition:
    """The singular values and best rank-k factors of a dense W.

    Args:
        W: (m, n), any float dtype (a conv weight flattened to (out, in*kh*kw) by the caller).
        need: None for the whole spectrum, exact; k for at least the k+1 leading values and their vectors
            (the fast route: exactly min(k + 1, min(m, n)) of them, certified, module docstring; the exact route,
            when the fast one is not worth it or its certificate fails: all of them).
        device: where the arithmetic runs (float64 throughout).
        decide: optional; the rank the caller's planning gives for (leading values, tail_energy). With it the
            fast route is kept only when that rank is the same at every spectrum the certificate allows.

    Returns: a DenseDecomposition.

    Raises: NumericalError (one line) when W holds NaN or Inf; ValueError when W is not 2-D or need < 0.
    """
    if W.ndim != 2:
        raise ValueError(f"decompose_dense takes a 2-D matrix (flatten a conv weight first), got {tuple(W.shape)}")
    if need is not None and need < 0:
        raise ValueError(f"need must be >= 0, got {need}")
    m, n = W.shape
    transposed = n < m
    X = (W.T if transposed else W).to(device=device).to(dtype=torch.float64)  # s x L, s <= L
    total = float(torch.linalg.vector_norm(X)) ** 2 if X.numel() else 0.0  # ||W||_F^2 in float64, no temporary
    if not math.isfinite(total):
        raise NumericalError(DENSE_NAN_MESSAGE)
    s = X.shape[0]
    if need is None or total == 0.0 or s == 0:
        return _exact(X, total, transposed, fallback=False)
    K = min(need + 1, s)
    tried = False
    for attempt, q in enumerate(POWER_STEPS):
        ell = K + max(OVERSAMPLE[0], math.ceil(OVERSAMPLE[1] * need)) * (attempt + 1)
        if ell > FAST_SHARE * s:
            break  # the sketch is not much smaller than W: the exact route costs about the same
        tried = True
        dec, decays = _fast(X, total, K, ell, q, transposed)
        if dec is not None and dec.excess <= TOLERANCE:
            if decide is not None and not _agrees(dec, total, decide):
                return _exact(X, total, transposed, fallback=True, near_tie=True)
            return dec
        if not decays:
            break  # flat past the K-th value: a larger sketch would not certify either
    return _exact(X, total, transposed, fallback=tried)


def _exact(X: torch.Tensor, total: float, transposed: bool, fallback: bool, near_tie: bool = False
           ) -> DenseDecomposition:
    """The whole spectrum of X (s x L, s <= L) from the eigendecomposition of X X^T."""
    s = X.shape[0]
    if s == 0 or total == 0.0:
        return DenseDecomposition(np.zeros(s), _shape(X, transposed), 0.0, True, 0.0, fallback, near_tie=near_tie,
                                  _left=X.new_zeros(s, s), _X=X, _transposed=transposed)
    w, V = torch.linalg.eigh(sym_gram(X))
    S = np.sqrt(np.clip(w.flip(0).cpu().numpy(), 0.0, None))
    S[S < S[0] * ZERO_RELATIVE] = 0.0
    return DenseDecomposition(S, _shape(X, transposed), 0.0, True, 0.0, fallback, near_tie=near_tie,
                              _left=V.flip(1), _X=X, _transposed=transposed)


def _shape(X: torch.Tensor, transposed: bool) -> tuple[int, int]:
    s, L = X.shape
    return (L, s) if transposed else (s, L)


def _fast(X: torch.Tensor, total: float, K: int, ell: int, q: int, transposed: bool
          ) -> tuple[DenseDecomposition | None, bool]:
    """The randomized route with l = `ell` sketch columns and q power steps, certified for the K leading values
    (`excess` inf where no gap separates the k-th value from the residual; None when a value straddles the zero
    threshold), and whether the sketch's values decay past the K-th (a larger sketch may then certify)."""
    s, L = X.shape
    g = torch.Generator(device=X.device).manual_seed(SEED + ell)
    Q = _orth(X @ torch.randn(L, ell, generator=g, dtype=X.dtype, device=X.device))
    for _ in range(q):
        Q = _orth(X @ _orth(X.mT @ Q))
    B = Q.mT @ X  # l x L
    w, Ub = torch.linalg.eigh(B @ B.mT)  # the small SVD through its Gram matrix (torch.linalg.svd of B: 5x slower)
    w, Ub = w.flip(0), Ub.flip(1)
    Sh = np.sqrt(np.clip(w.cpu().numpy(), 0.0, None))
    Vhb = (Ub[:, :K].mT @ B) / torch.as_tensor(np.where(Sh[:K] > 0, Sh[:K], 1.0), device=X.device)[:, None]
    # E^T in the Ritz basis: (I - QQ^T) X X^T Q U' (s x l), and the residual's spectral norm bound
    F = X @ (B.mT @ Ub)
    F = F - Q @ (Q.mT @ F)
    slack = 8 * np.finfo(np.float64).eps * math.sqrt(L) * total  # rounding of the products with X
    delta = _residual_norm_bound(X, Q, g) ** 2 + slack
    bounds = _gap_bounds(Sh, F, K, delta, slack) + np.arange(1, K + 1) * ell * np.finfo(np.float64).eps * Sh[0] ** 2
    written = np.maximum(total - np.cumsum(Sh[:K] ** 2), 0.0)  # E'_k, k = 1..K
    floor = 64 * np.finfo(np.float64).eps * total  # rounding level: such an error counts as zero
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        excess = np.where(written <= floor, 0.0, np.where(written > bounds, bounds / (written - bounds), np.inf))
        # s_i^2 <= the best rank-(i-1) error <= E'_(i-1): an upper bound even where the gap bound has none
        upper = np.minimum(np.sqrt(Sh[:K] ** 2 + bounds), np.sqrt(np.concatenate([[total], written[:-1]])))
    S = Sh[:K].copy()
    upper = np.minimum.accumulate(np.maximum(upper, S))
    live, dead = S >= upper[0] * ZERO_RELATIVE, upper < S[0] * ZERO_RELATIVE
    if not np.all(live | dead):
        return None, False  # a value straddles the zero threshold: the exact route decides it
    S[dead] = 0.0
    upper[dead] = 0.0
    tail = max(total - float(np.sum(S ** 2)), 0.0)
    decays = bool(Sh[-1] ** 2 < 0.5 * Sh[K - 1] ** 2)
    return DenseDecomposition(S, _shape(X, transposed), tail, K == s, float(excess.max()), False, S_upper=upper,
                              _left=Q @ Ub[:, :K], _right=Vhb, _transposed=transposed), decays


def _orth(Y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of Y's columns (tall Y): Cholesky QR twice (orthogonal to rounding when cond(Y) is
    below CHOLESKY_MAX_CONDITION; measured 7x faster than Householder QR on 5120 x 43), Householder QR otherwise
    (power iterations make Y ill-conditioned on fast-decaying or rank-deficient W)."""
    for _ in range(2):
        L, info = torch.linalg.cholesky_ex(Y.mT @ Y)
        d = torch.diagonal(L)
        lo, hi = float(d.min()), float(d.max())
        if int(info) != 0 or not lo > 0 or hi / lo >= CHOLESKY_MAX_CONDITION:
            return torch.linalg.qr(Y).Q
        Y = torch.linalg.solve_triangular(L, Y.mT, upper=False).mT
    return Y


def _residual_norm_bound(X: torch.Tensor, Q: torch.Tensor, g: torch.Generator) -> float:
    """An upper bound of ||R||_2, R = (I - QQ^T) X, holding except with probability NORM_FAILURE: HMT 2011 Lemma 4.1
    on B = (R R^T)^t R, whose norm is ||R||^(2t+1), from r Gaussian vectors (each its own power sequence, rescaled
    every step with the scale kept in logarithms)."""
    r, t = NORM_VECTORS, NORM_STEPS
    a = NORM_FAILURE ** (-1.0 / r)
    Z = torch.randn(X.shape[1], r, generator=g, dtype=X.dtype, device=X.device)
    logn = torch.zeros(r, dtype=X.dtype, device=X.device)
    Y = X @ Z
    Y = Y - Q @ (Q.mT @ Y)
    for _ in range(t):
        nrm = torch.linalg.vector_norm(Y, dim=0).clamp_min(1e-300)
        logn = logn + torch.log(nrm)
        Y = X @ (X.mT @ (Y / nrm))
        Y = Y - Q @ (Q.mT @ Y)
    logn = logn + torch.log(torch.linalg.vector_norm(Y, dim=0).clamp_min(1e-300))
    top = float(logn.max())
    return math.exp((math.log(a * math.sqrt(2 / math.pi)) + top) / (2 * t + 1))


def _gap_bounds(Sh: np.ndarray, F: torch.Tensor, K: int, delta: float, slack: float) -> np.ndarray:
    """Delta_k for k = 1..K (module docstring): the most that k orthonormal directions can hold beyond
    sum_{i<=k} S'_i^2, minimised over cuts c of the Ritz block; inf where no cut gives a bound."""
    ell = len(Sh)
    G = F.mT @ F
    G = ((G + G.mT) * 0.5).cpu()
    S2 = Sh ** 2
    cuts = sorted({int(c) for c in np.linspace(K, ell, 5)})
    best = np.full(K, np.inf)
    k = np.arange(1, K + 1)
    for c in cuts:
        ec = math.sqrt(max(float(torch.linalg.eigvalsh(G[:c, :c])[-1]), 0.0)) + slack
        er = math.sqrt(max(float(torch.linalg.eigvalsh(G[c:, c:])[-1]), 0.0)) + slack if c < ell else 0.0
        g2 = S2[:K] - delta
        if c < ell:
            g1 = S2[:K] - S2[c]
            with np.errstate(divide="ignore", invalid="ignore"):
                den = np.where(g1 > 0, g2 - er * er / np.where(g1 > 0, g1, 1.0), -np.inf)
        else:
            den = g2
        with np.errstate(divide="ignore"):
            bound = np.where(den > 0, k * ec * ec / np.where(den > 0, den, 1.0), np.inf)
        best = np.minimum(best, bound)
    return best


def _agrees(dec: DenseDecomposition, total: float, decide: Decide) -> bool:
    """`decide` gives one rank at the corners of the certified values (module docstring: near-ties)."""
    lo, hi = dec.S, dec.S_upper
    mixed_up = np.minimum(np.concatenate([lo[:1], hi[1:]]), lo[0])  # S_0 low, the rest high (still descending)
    mixed_down = np.concatenate([hi[:1], lo[1:]])
    ranks = {decide(c, max(total - float(np.sum(c ** 2)), 0.0)) for c in (lo, hi, mixed_up, mixed_down)}
    return len(ranks) == 1
