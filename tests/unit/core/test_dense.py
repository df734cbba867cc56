"""core.dense: the exact route against numpy's float64 SVD, the fast route's certificate against the measured
excess over the best rank-k error (numpy's float64 SVD as the judge), and the hostile and degenerate inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_resize.core.dense import TOLERANCE, decompose_dense
from lora_resize.errors import NumericalError


def matrix(m: int, n: int, S: np.ndarray, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """U diag(S) V^T (random orthonormal U, V) plus Gaussian noise of that entry size, float64."""
    g = torch.Generator().manual_seed(seed)
    r = len(S)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    return (U * torch.as_tensor(S)) @ V.T + noise * torch.randn(m, n, generator=g, dtype=torch.float64)


def power_law(r: int, a: float) -> np.ndarray:
    return (1.0 + np.arange(r)) ** -a


def reference(W: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    U, S, Vh = np.linalg.svd(W.double().numpy(), full_matrices=False)
    return U, S, Vh


def error(W: torch.Tensor, dec, k: int) -> float:
    U, S, Vh = dec.factors(k)
    return float(((W.double() - (U * S) @ Vh) ** 2).sum())


def best(S_ref: np.ndarray, k: int) -> float:
    return float((S_ref[k:] ** 2).sum())


# ---------------------------------------------------------------------------------------------------- exact route

@pytest.mark.parametrize("m,n", [(40, 70), (70, 40), (50, 50), (16, 8 * 9)])  # wide, tall, square, conv (out, in*kh*kw)
def test_exact_route_matches_numpy_float64_svd(m, n):
    S_true = np.geomspace(3.0, 3e-3, min(m, n))
    W = matrix(m, n, S_true, seed=m + n)
    dec = decompose_dense(W)
    U_ref, S_ref, Vh_ref = reference(W)
    assert dec.complete and not dec.fallback and dec.excess == 0.0 and dec.tail_energy == 0.0
    assert dec.shape == (m, n) and len(dec.S) == min(m, n)
    assert np.abs(dec.S - S_ref).max() <= 1e-12 * S_ref[0]
    for k in (1, 5, min(m, n) // 2, min(m, n)):
        U, S, Vh = dec.factors(k)
        assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n)
        assert abs(error(W, dec, k) - best(S_ref, k)) <= 1e-12 * float(S_ref @ S_ref)
        # the same subspaces: the projectors agree (the spectrum has no ties)
        P, P_ref = U @ U.T, U_ref[:, :k] @ U_ref[:, :k].T
        assert float(torch.linalg.matrix_norm(P - torch.as_tensor(P_ref), 2)) <= 1e-9
        Q, Q_ref = Vh.T @ Vh, Vh_ref[:k].T @ Vh_ref[:k]
        assert float(torch.linalg.matrix_norm(Q - torch.as_tensor(Q_ref), 2)) <= 1e-9


def test_exact_route_rank_deficient_and_padding():
    W = matrix(60, 90, np.array([4.0, 2.0, 1.0, 0.5, 0.25]))
    dec = decompose_dense(W)
    assert np.count_nonzero(dec.S) == 5
    U, S, Vh = dec.factors(8)  # past the rank: zero directions, as core.decompose.Decomposition.factors
    assert torch.all(S[5:] == 0) and torch.all(U[:, 5:] == 0) and torch.all(Vh[5:] == 0)
    assert error(W, dec, 8) <= 1e-24 * float((W * W).sum())
    U, S, Vh = dec.factors(70)  # past min(m, n)
    assert U.shape == (60, 70) and Vh.shape == (70, 90)


def test_zero_matrix():
    dec = decompose_dense(torch.zeros(30, 20), need=4)
    assert dec.complete and np.all(dec.S == 0) and dec.tail_energy == 0.0 and dec.excess == 0.0
    U, S, Vh = dec.factors(3)
    assert torch.all(U == 0) and torch.all(S == 0) and torch.all(Vh == 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_one_line_numerical_error(bad):
    W = matrix(20, 30, power_law(20, 1.0)).float()
    W[3, 7] = bad
    with pytest.raises(NumericalError) as e:
        decompose_dense(W, need=4)
    assert "\n" not in str(e.value) and "NaN or Inf" in str(e.value) and "re-export" in str(e.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_precision_input_is_decomposed_as_its_values(dtype):
    W = matrix(150, 220, power_law(150, 1.0), noise=1e-4).to(dtype)
    _, S_ref, _ = reference(W.double())
    for need in (None, 8):
        dec = decompose_dense(W, need=need)
        K = len(dec.S) if need is None else need + 1
        assert np.all(dec.S[:K] <= S_ref[:K] * (1 + 1e-12) + 1e-15)
        assert np.all(dec.S_upper[:K] >= S_ref[:K] * (1 - 1e-12))
        assert error(W, dec, 8) <= (1 + dec.excess) * best(S_ref, 8) * (1 + 1e-9)


# ----------------------------------------------------------------------------------------------------- fast route

CASES = {  # name: (singular values, noise entry size): fast, slow and noisy decay
    "fast decay": (power_law(150, 2.0), 1e-6),
    "slow decay": (power_law(150, 0.7), 1e-5),
    "decay + noise": (power_law(150, 1.0), 3e-4),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("transposed", [False, True])
def test_fast_route_certificate_bounds_the_measured_excess(case, transposed):
    S_true, noise = CASES[case]
    W = matrix(150, 260, S_true, noise=noise, seed=7)
    W = W.T.contiguous() if transposed else W
    _, S_ref, _ = reference(W)
    need = 8
    dec = decompose_dense(W, need=need)
    assert not dec.fallback and not dec.complete, "these spectra decay past rank 9: the fast route certifies them"
    assert len(dec.S) == need + 1 and 0 <= dec.excess <= TOLERANCE
    assert dec.tail_energy == pytest.approx(float((W * W).sum()) - float((dec.S ** 2).sum()), rel=1e-12)
    # each value certified: S <= s_i <= S_upper
    assert np.all(dec.S <= S_ref[:need + 1] * (1 + 1e-12))
    assert np.all(dec.S_upper >= S_ref[:need + 1] * (1 - 1e-12))
    for k in range(1, need + 2):
        measured = error(W, dec, k) / best(S_ref, k) - 1
        assert measured <= dec.excess + 1e-9, (k, measured, dec.excess)
    with pytest.raises(ValueError, match="need=20"):
        dec.factors(20)


def test_fast_route_is_seeded():
    W = matrix(150, 260, power_law(150, 1.0), noise=1e-4)
    a, b = decompose_dense(W, need=8), decompose_dense(W, need=8)
    assert not a.complete
    assert np.array_equal(a.S, b.S) and all(torch.equal(x, y) for x, y in zip(a.factors(8), b.factors(8)))


def test_flat_spectrum_falls_back_to_the_exact_route():
    W = torch.randn(150, 260, generator=torch.Generator().manual_seed(3), dtype=torch.float64)  # pure noise
    dec = decompose_dense(W, need=8)
    _, S_ref, _ = reference(W)
    assert dec.fallback and dec.complete and dec.excess == 0.0 and dec.tail_energy == 0.0
    assert np.abs(dec.S - S_ref).max() <= 1e-12 * S_ref[0]


def test_tie_at_k_is_still_certified_or_exact():
    S_true = power_law(150, 1.0)
    S_true[8] = S_true[9] = S_true[7] * 0.7  # s_9 == s_10: the rank-9 subspace is not unique, its error is
    W = matrix(150, 260, np.sort(S_true)[::-1].copy(), noise=1e-6, seed=11)
    _, S_ref, _ = reference(W)
    dec = decompose_dense(W, need=8)
    for k in range(1, 10):
        assert error(W, dec, k) <= (1 + dec.excess) * best(S_ref, k) * (1 + 1e-9)


def test_rank_deficient_fast_route():
    W = matrix(150, 260, np.array([5.0, 3.0, 2.0, 1.0, 0.5]))
    dec = decompose_dense(W, need=8)
    assert np.count_nonzero(dec.S) == 5
    U, S, Vh = dec.factors(9)
    assert torch.all(S[5:] == 0) and torch.all(U[:, 5:] == 0)
    assert error(W, dec, 9) <= 1e-24 * float((W * W).sum())


def test_small_layer_takes_the_exact_route_without_fallback():
    W = matrix(30, 40, power_law(30, 1.0))
    dec = decompose_dense(W, need=8)  # the sketch would be most of W
    assert dec.complete and not dec.fallback


def test_near_tie_in_a_decision_goes_exact():
    """A value within the certified error of sv_ratio's threshold: the decision cannot be trusted on the fast
    route's values, so the exact route runs and the rank is the full spectrum's."""
    S_true = power_law(150, 1.0)
    W = matrix(150, 260, S_true, noise=1e-4, seed=5)
    _, S_ref, _ = reference(W)
    ratio = S_ref[0] / S_ref[4]  # S_4 sits exactly at S_0 / ratio

    def decide(S, tail):  # count of values >= S_0 / ratio (sv_ratio's exact rule), capped at 8
        return min(int(np.count_nonzero(S >= S[0] / ratio)), 8)

    dec = decompose_dense(W, need=8, decide=decide)
    assert dec.near_tie and dec.fallback and dec.complete
    easy = decompose_dense(W, need=8, decide=lambda S, tail: min(int(np.count_nonzero(S >= S[0] / 3.5)), 8))
    assert not easy.fallback and not easy.near_tie
