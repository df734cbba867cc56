"""The decomposition engine: singular values and factors of up @ down equal a dense float64 SVD of the product."""
from __future__ import annotations

import pytest
import torch

import lora_resize
from lora_resize import decompose

from helpers import best_rank_k, decaying_spectrum, factors_with_spectrum, rel_err

SV_RTOL = 1e-6  # relative to the largest singular value


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_factors(out: int, n: int, r: int, seed: int, dtype=torch.float32):
    g = _gen(seed)
    return (torch.randn(out, r, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(r, n, generator=g, dtype=torch.float64).to(dtype))


def _rank_deficient(out: int, n: int, r: int, true_rank: int, seed: int):
    """Factors of width r whose product has rank true_rank < r (up's columns are combinations of a few)."""
    g = _gen(seed)
    base = torch.randn(out, true_rank, generator=g, dtype=torch.float64)
    up = base @ torch.randn(true_rank, r, generator=g, dtype=torch.float64)
    down = torch.randn(r, n, generator=g, dtype=torch.float64)
    return up.float(), down.float()


def _ill_conditioned(out: int, n: int, r: int, seed: int):
    """up with column scales spanning 1e-6..1 (condition number ~1e6: past the Cholesky-QR limit)."""
    g = _gen(seed)
    q = torch.linalg.qr(torch.randn(out, r, generator=g, dtype=torch.float64))[0]
    scales = torch.logspace(0, -6, r, dtype=torch.float64)
    up = q * scales
    down = torch.randn(r, n, generator=g, dtype=torch.float64)
    return up, down


CASES = {
    "tall": lambda: _random_factors(150, 40, 12, 1),
    "wide": lambda: _random_factors(30, 180, 16, 2),
    "square": lambda: _random_factors(64, 64, 32, 3),
    "rank_above_out": lambda: _random_factors(6, 40, 16, 4),
    "rank_above_in": lambda: _random_factors(50, 9, 16, 5),
    "rank_deficient": lambda: _rank_deficient(80, 60, 16, 5, 6),
    "ill_conditioned": lambda: _ill_conditioned(120, 70, 10, 7),
    "fp16_factors": lambda: _random_factors(90, 45, 8, 8, torch.float16),
    "bf16_factors": lambda: _random_factors(45, 90, 8, 9, torch.bfloat16),
    "rank_one": lambda: _random_factors(33, 17, 1, 10),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_singular_values_match_dense_svd(case):
    up, down = CASES[case]()
    dense = up.double() @ down.double()
    ref = torch.linalg.svdvals(dense)
    dec = decompose(up, down)
    S = torch.as_tensor(dec.S, dtype=torch.float64)
    assert dec.shape == tuple(dense.shape)
    assert S.ndim == 1 and 1 <= len(S) <= len(ref)
    assert len(S) == min(up.shape[0], up.shape[1], down.shape[1])
    assert bool((S[:-1] >= S[1:]).all()), "singular values must be descending"
    assert bool((S >= 0).all())
    tol = SV_RTOL * float(ref[0])
    assert torch.allclose(S, ref[: len(S)], rtol=0, atol=tol), (S - ref[: len(S)]).abs().max()
    # whatever the engine does not return must be zero in the dense SVD too
    tail = ref[len(S):]
    assert tail.numel() == 0 or float(tail.abs().max()) <= tol


def test_rank_deficient_reports_zero_tail():
    up, down = _rank_deficient(80, 60, 16, 5, 11)
    dec = decompose(up, down)
    ref = torch.linalg.svdvals(up.double() @ down.double())
    assert dec.S[4] > 0.0
    assert float(abs(dec.S[5:]).max()) <= SV_RTOL * float(ref[0])


@pytest.mark.parametrize("shape", [(25, 25, 4), (70, 50, 12), (12, 90, 20), (6, 40, 16)])
def test_zero_product(shape):
    out, n, r = shape
    g = _gen(12)
    up = torch.zeros(out, r)
    down = torch.randn(r, n, generator=g)
    dec = decompose(up, down)
    assert len(dec.S) == min(out, n, r)
    assert float(abs(dec.S).max()) == 0.0
    U, S, Vh = dec.factors(1)
    assert bool(torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all())
    assert float(((U * S) @ Vh).abs().max()) == 0.0


def _product(U, S, Vh):
    return (U * S) @ Vh


@pytest.mark.parametrize("case", ["tall", "wide", "square", "rank_above_out", "rank_above_in", "fp16_factors"])
@pytest.mark.parametrize("which_k", ["one", "middle", "full"])
def test_factors_give_best_rank_k(case, which_k):
    # factors built with a well separated spectrum, so the best rank-k approximation is unique
    up, down = CASES[case]()
    out, n, r = up.shape[0], down.shape[1], up.shape[1]
    p = min(out, n, r)
    g = _gen(100 + p)
    up, down = factors_with_spectrum(out, n, r, decaying_spectrum(p), g)
    dense = up @ down
    k = {"one": 1, "middle": max(1, p // 2), "full": p}[which_k]
    dec = decompose(up, down)
    U, S, Vh = dec.factors(k)
    assert U.shape == (out, k) and S.shape == (k,) and Vh.shape == (k, n)
    assert U.dtype == S.dtype == Vh.dtype == torch.float64
    assert rel_err(_product(U, S, Vh), best_rank_k(dense, k)) < 1e-8
    # orthonormal singular vectors, descending S equal to the dense ones
    eye = torch.eye(k, dtype=torch.float64)
    assert torch.allclose(U.T @ U, eye, atol=1e-8)
    assert torch.allclose(Vh @ Vh.T, eye, atol=1e-8)
    ref = torch.linalg.svdvals(dense)[:k]
    assert torch.allclose(S, ref, rtol=0, atol=SV_RTOL * float(ref[0]))


def test_factors_of_random_factors_give_best_rank_k():
    # plain Gaussian factors (no constructed spectrum): still the best rank-k approximation
    up, down = _random_factors(120, 80, 24, 21)
    dense = up.double() @ down.double()
    ref = torch.linalg.svdvals(dense)
    for k in (1, 5, 12, 23, 24):
        if k < 24:  # the truncation is only unique with a gap
            assert float(ref[k - 1] - ref[k]) > 1e-6 * float(ref[0])
        U, S, Vh = decompose(up, down).factors(k)
        assert rel_err(_product(U, S, Vh), best_rank_k(dense, k)) < 1e-8, k


def test_factors_ill_conditioned_up():
    up, down = _ill_conditioned(120, 70, 10, 22)
    dense = up @ down
    for k in (1, 3, 10):
        U, S, Vh = decompose(up, down).factors(k)
        assert rel_err(_product(U, S, Vh), best_rank_k(dense, k)) < 1e-8, k


def test_factors_above_rank_pad_with_zeros():
    up, down = _random_factors(6, 40, 16, 23)
    dense = up.double() @ down.double()
    dec = decompose(up, down)
    U, S, Vh = dec.factors(10)  # the product has only 6 singular values
    assert U.shape == (6, 10) and S.shape == (10,) and Vh.shape == (10, 40)
    assert bool(torch.isfinite(U).all() and torch.isfinite(Vh).all())
    assert float(S[6:].abs().max()) == 0.0
    assert rel_err(_product(U, S, Vh), dense) < 1e-10


def test_rank_deficient_factors_past_numerical_rank_are_zero():
    up, down = _rank_deficient(50, 40, 12, 3, 24)
    dense = up.double() @ down.double()
    U, S, Vh = decompose(up, down).factors(8)
    assert bool(torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all())
    assert rel_err(_product(U, S, Vh), dense) < 1e-7


def test_factors_that_do_not_chain_are_rejected():
    # the public API raises the package's own errors (LoraStructureError is a LoraResizeError)
    with pytest.raises(lora_resize.LoraStructureError, match="do not chain"):
        decompose(torch.randn(10, 4), torch.randn(5, 12))
    with pytest.raises(lora_resize.LoraResizeError):
        decompose(torch.randn(10, 4, 1, 1), torch.randn(4, 12))


def test_public_api_exports_decompose():
    assert lora_resize.decompose is decompose
    assert lora_resize.Decomposition is type(decompose(torch.randn(3, 2), torch.randn(2, 3)))


# ---- many layers at once: layers of one shape go through the engine as one batch ----

def _same_shape_mix(seed: int):
    """Four layers of one shape that take every path of the engine: well conditioned (Cholesky QR), rank deficient
    and ill conditioned (Householder fallback), and a zero layer, plus one far from 1 (power-of-two rescale)."""
    g = _gen(seed)  # out < in: the engine's left side is `up`, where the trouble is
    ok = factors_with_spectrum(70, 120, 10, decaying_spectrum(10), g)
    deficient = _rank_deficient(70, 120, 10, 3, seed + 1)
    ill = _ill_conditioned(70, 120, 10, seed + 2)
    zero = (torch.zeros(70, 10), torch.randn(10, 120, generator=g))
    huge = (ok[0] * 2.0 ** 200, ok[1] * 2.0 ** 190)
    return [ok, deficient, ill, zero, huge]


def _transposed(pair):
    up, down = pair
    return down.T, up.T


def test_decompose_many_equals_decompose_layer_by_layer_and_the_dense_svd():
    from lora_resize.core.decompose import decompose_many
    pairs = _same_shape_mix(31) + [CASES["tall"](), CASES["fp16_factors"](), CASES["rank_above_out"](),
                                   _random_factors(70, 120, 10, 32), _transposed(_ill_conditioned(120, 70, 10, 33))]
    decs = decompose_many(pairs)
    assert len(decs) == len(pairs)
    for i, ((up, down), dec) in enumerate(zip(pairs, decs)):
        single = decompose(up, down)
        assert dec.shape == single.shape and dec.S.shape == single.S.shape, i
        assert torch.allclose(torch.as_tensor(dec.S), torch.as_tensor(single.S), rtol=1e-12, atol=0), i
        dense = up.double() @ down.double()
        ref = torch.linalg.svdvals(dense)
        assert torch.allclose(torch.as_tensor(dec.S), ref[:len(dec.S)], rtol=0, atol=SV_RTOL * float(ref[0])), i
        for k in (1, 3):
            U, S, Vh = dec.factors(k)
            want = best_rank_k(dense, k)
            assert rel_err(_product(U, S, Vh), want) < 1e-8 or float(ref[0]) == 0.0, (i, k)
            if float(ref[0]) == 0.0:
                assert float(_product(U, S, Vh).abs().max()) == 0.0


def test_decompose_many_names_the_first_damaged_layer():
    from lora_resize.core.decompose import NonFiniteFactors, decompose_many
    pairs = [_random_factors(40, 30, 4, s) for s in range(5)] + [_random_factors(20, 50, 4, 9)]
    bad_up = pairs[3][0].clone()
    bad_up[2, 1] = float("nan")
    pairs[3] = (bad_up, pairs[3][1])
    bad_down = pairs[5][1].clone()
    bad_down[0, 0] = float("inf")
    pairs[5] = (pairs[5][0], bad_down)
    with pytest.raises(NonFiniteFactors) as e:
        decompose_many(pairs)
    assert e.value.index == 3
    with pytest.raises(NonFiniteFactors) as e:
        decompose_many(pairs[4:])
    assert e.value.index == 1
