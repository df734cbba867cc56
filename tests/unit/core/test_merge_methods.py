"""The merge methods (core.core_space, registered in core.merging) on small layers, against the dense judges of
lora_resize.testing.dense_merge (each method from its paper's definition on dense float64 updates): tsv and iso
equal their dense definition; ties, dare and magnitude_prune equal the dense method applied to the canonical cores
(U^T tau_i V with U, V from the dense updates' SVDs); the invariances (factorization, weights), seeded DARE, zeros,
and the measured relation of the core-space elementwise methods to the papers' methods on the weights."""
from __future__ import annotations

import pytest
import torch

from lora_resize.core.core_space import core_bases, cores, stacked
from lora_resize.core.layer import LowRankLayer
from lora_resize.core.merging import MERGE_METHODS, MergeSettings, merged_layer
from lora_resize.errors import OptionsError
from lora_resize.testing.dense_merge import dense_core_bases, dense_merge

ELEMENTWISE = ("ties", "dare", "magnitude_prune")
EXACT = ("tsv", "iso")
NAME = "lora_unet_blocks_0_attn_to_q"


def layer(m: int, n: int, r: int, seed: int, alpha: float | None = None, kernel: tuple[int, int] | None = None,
          in_channels: int | None = None) -> LowRankLayer:
    """A float64 LoRA layer up (m x r) @ down (r x n) with random factors (conv: n = in_channels * kh * kw)."""
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(m, r, generator=g, dtype=torch.float64)
    down = torch.randn(r, n, generator=g, dtype=torch.float64) / n ** 0.5
    return LowRankLayer.with_alpha(up, down, alpha, kernel=kernel, in_channels=in_channels)


# (name, parts): 2-4 inputs, linear and conv 3x3, ranks 2-8, with alphas and signed weights
CASES = {
    "linear2": [(0.8, layer(40, 30, 4, 1, alpha=2.0)), (-0.5, layer(40, 30, 6, 2))],
    "linear3": [(1.0, layer(24, 56, 8, 3, alpha=4.0)), (0.7, layer(24, 56, 3, 4, alpha=3.0)),
                (1.3, layer(24, 56, 2, 5))],
    "conv4": [(w, layer(32, 6 * 9, r, 10 + i, alpha=r / 2, kernel=(3, 3), in_channels=6))
              for i, (w, r) in enumerate([(0.6, 4), (0.9, 2), (-0.4, 5), (1.1, 3)])],
    # the ranks sum past out: U spans the whole output space
    "wide3": [(0.9, layer(12, 40, 6, 20, alpha=3.0)), (0.8, layer(12, 40, 5, 21)), (-1.2, layer(12, 40, 4, 22))],
}


def taus(parts: list[tuple[float, LowRankLayer]]) -> list[torch.Tensor]:
    return [w * lay.scale * lay.up @ lay.down for w, lay in parts]


def dense(lay: LowRankLayer) -> torch.Tensor:
    return lay.scale * lay.up @ lay.down


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b)) / float(torch.linalg.norm(b))


def in_core_space(method: str, ts: list[torch.Tensor], **params) -> torch.Tensor:
    """The judge of an elementwise method: U @ dense_merge(method, [U^T tau_i V]) @ V^T (U, V: dense_core_bases)."""
    u, v = dense_core_bases(ts)
    return u @ dense_merge(method, [u.T @ t @ v for t in ts], name=NAME, **params) @ v.T


def ours(method: str, parts, **params) -> torch.Tensor:
    return dense(merged_layer(NAME, parts, MergeSettings(method, **params)))


def test_every_method_is_a_registration():
    assert list(MERGE_METHODS) == ["sum", *ELEMENTWISE, *EXACT]
    assert [m for m in MERGE_METHODS if not MERGE_METHODS[m].basis_invariant] == list(ELEMENTWISE)


@pytest.mark.parametrize("case", CASES)
def test_sum_is_the_stacked_path_bit_for_bit(case):
    parts = CASES[case]
    want = stacked(NAME, parts)
    for got in (merged_layer(NAME, parts), merged_layer(NAME, parts, MergeSettings("sum")),
                MERGE_METHODS["sum"].combine(NAME, parts, MergeSettings())):
        assert torch.equal(got.up, want.up) and torch.equal(got.down, want.down) and got.scale == want.scale == 1
        assert (got.kernel, got.in_channels) == (parts[0][1].kernel, parts[0][1].in_channels)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method, params", [("iso", {}), ("tsv", {}), ("tsv", {"density": 0.05}),
                                            ("tsv", {"density": 0.1}), ("tsv", {"density": 1.0})])
def test_tsv_and_iso_equal_their_dense_definition(case, method, params):
    parts = CASES[case]
    got = merged_layer(NAME, parts, MergeSettings(method, **params))
    assert got.scale == 1 and got.kernel == parts[0][1].kernel and got.in_channels == parts[0][1].in_channels
    assert rel(dense(got), dense_merge(method, taus(parts), **params)) < 1e-10


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method, params", [("ties", {}), ("ties", {"density": 0.5}), ("ties", {"density": 1.0}),
                                            ("dare", {}), ("dare", {"density": 0.3, "seed": 7}),
                                            ("magnitude_prune", {}), ("magnitude_prune", {"density": 0.1})])
def test_elementwise_methods_are_the_dense_method_on_the_canonical_cores(case, method, params):
    parts = CASES[case]
    assert rel(ours(method, parts, **params), in_core_space(method, taus(parts), **params)) < 1e-10


@pytest.mark.parametrize("case", CASES)
def test_the_bases_and_cores_from_the_factors_are_the_dense_ones(case):
    parts = CASES[case]
    u, v = core_bases(parts)
    du, dv = dense_core_bases(taus(parts))
    assert u.shape == du.shape and v.shape == dv.shape
    assert rel(u, du) < 1e-10 and rel(v, dv) < 1e-10  # the sign convention makes them one choice
    for m, t in zip(cores(parts, u, v), taus(parts)):
        assert rel(u @ m @ v.T, t) < 1e-12  # tau_i = U M_i V^T exactly


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", ["dare", "magnitude_prune"])
def test_density_one_makes_dare_and_magnitude_prune_the_exact_sum(case, method):
    parts = CASES[case]
    assert rel(ours(method, parts, density=1.0), sum(taus(parts))) < 1e-12


def refactored(parts, c: float, seed: int):
    """The same updates stored otherwise: up * c, down / c, and the rank mixed by an orthogonal matrix."""
    out = []
    for i, (w, lay) in enumerate(parts):
        q = torch.linalg.qr(torch.randn(lay.factor_size, lay.factor_size, dtype=torch.float64,
                                        generator=torch.Generator().manual_seed(seed + i)))[0]
        out.append((w, LowRankLayer(lay.up @ q * c, q.T @ lay.down / c, lay.rank, lay.alpha, lay.scale, lay.kernel,
                                    lay.in_channels)))
    return out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", [*ELEMENTWISE, *EXACT])
def test_the_result_does_not_depend_on_how_the_inputs_are_factored(case, method):
    parts = CASES[case]
    want = ours(method, parts)
    for c in (3.7, 0.01):
        assert rel(ours(method, refactored(parts, c, seed=int(c * 100))), want) < 1e-10, c


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", [*ELEMENTWISE, *EXACT])
def test_scaling_every_weight_scales_the_result(case, method):
    parts = CASES[case]
    want = ours(method, parts)
    for lam in (2.5, -0.5):
        assert rel(ours(method, [(lam * w, lay) for w, lay in parts]), lam * want) < 1e-10, lam


def test_dare_is_reproducible_per_seed_and_thread_count():
    parts = CASES["linear3"]
    first = merged_layer(NAME, parts, MergeSettings("dare", seed=3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if threads == 1 else 1)
        again = merged_layer(NAME, parts, MergeSettings("dare", seed=3))
    finally:
        torch.set_num_threads(threads)
    assert first.up.numpy().tobytes() == again.up.numpy().tobytes()
    assert first.down.numpy().tobytes() == again.down.numpy().tobytes()
    other = merged_layer(NAME, parts, MergeSettings("dare", seed=4))
    assert rel(dense(other), dense(first)) > 0.05
    # another layer name draws other masks
    assert rel(dense(merged_layer(NAME + "_k", parts, MergeSettings("dare", seed=3))), dense(first)) > 0.05


def test_dare_averaged_over_seeds_tends_to_the_sum():
    parts, n = CASES["linear2"], 200
    want = sum(taus(parts))
    draws = [ours("dare", parts, density=0.5, seed=s) for s in range(n)]
    single = sum(rel(d, want) for d in draws) / n
    mean = rel(sum(draws) / n, want)
    # unbiased: the mean of n draws errs ~ 1/sqrt(n) of one draw (fixed seeds: deterministic)
    assert single > 0.3 and mean < 3 * single / n ** 0.5


@pytest.mark.parametrize("method", [*ELEMENTWISE, *EXACT])
def test_zero_inputs_give_a_zero_layer_and_so_do_cancelling_ones_where_the_method_cancels(method):
    a = layer(20, 30, 4, 1, alpha=2.0)
    zero = LowRankLayer.with_alpha(torch.zeros(20, 3, dtype=torch.float64), torch.zeros(3, 30, dtype=torch.float64),
                                   None)
    cases = [[(1.0, zero), (2.0, zero)]]
    if method in ("ties", "magnitude_prune", "iso"):  # a LoRA and its negative: the cores cancel entry by entry
        cases.append([(1.0, a), (-1.0, a)])
    for parts in cases:
        cancelled: list[str] = []
        got = merged_layer(NAME, parts, MergeSettings(method), cancelled)
        assert (got.up.shape[0], got.down.shape[1], got.scale) == (20, 30, 1)
        assert not bool((got.up @ got.down).any()), method
        assert cancelled == ([] if parts[0][1] is zero else [NAME])  # a zero layer is no cancellation


@pytest.mark.parametrize("method", ["magnitude_prune", "iso"])
def test_inputs_that_cancel_to_rounding_noise_give_exact_zeros(method):
    """(ties does not cancel here, by its definition: the sign elected from the noise keeps the agreeing inputs'
    mean; dare's independent masks do not cancel either.)"""
    a, b = layer(20, 30, 4, 1, alpha=2.0), layer(20, 30, 3, 2)
    for parts in ([(0.1, a), (0.2, a), (-0.3, a)], [(0.5, a), (1.0, b), (0.5, a), (-1.0, a), (-1.0, b)]):
        assert float(torch.linalg.norm(sum(taus(parts)))) > 0  # rounding noise, not zeros
        cancelled: list[str] = []
        got = merged_layer(NAME, parts, MergeSettings(method), cancelled)
        assert not bool(got.up.any()) and cancelled == [NAME], method


@pytest.mark.parametrize("method", ELEMENTWISE)
def test_the_elementwise_methods_in_the_core_space_differ_from_the_papers_on_the_weights(method):
    """The documented fact (README: Merge methods): an elementwise method on the cores is not the paper's method
    on the dense weights (another basis; the cores are dense and small), except where both are the sum (dare and
    magnitude_prune at density 1). The relative Frobenius difference is tens of percent at the default density."""
    for case, parts in CASES.items():
        ts = taus(parts)
        core, weights = ours(method, parts), dense_merge(method, ts, name=NAME)
        assert rel(core, weights) > 0.05, case
        if method != "ties":
            assert rel(ours(method, parts, density=1.0), dense_merge(method, ts, density=1.0)) < 1e-12


def test_settings_refuse_what_a_method_does_not_read_or_a_bad_value():
    for bad in (dict(method="sum", density=0.3), dict(method="iso", density=0.5), dict(method="ties", seed=1),
                dict(method="ties", density=0), dict(method="dare", density=1.5), dict(method="dare", seed=-1),
                dict(method="nope")):
        with pytest.raises(OptionsError):
            MergeSettings(**bad)
    s = MergeSettings("ties", density=0.3)
    assert s.as_dict() == {"merge_method": "ties", "density": 0.3} and s.label() == "ties, density 0.3"
    assert MergeSettings("dare").as_dict() == {"merge_method": "dare", "density": 0.5, "seed": 0}
    assert MergeSettings("tsv").label() == "tsv" and MergeSettings("iso").as_dict() == {"merge_method": "iso"}


@pytest.mark.parametrize("weights", [(1.0, 0.5), (1.0, 0.5, -0.25), (0.8, 0.8)])
def test_tsv_of_inputs_sharing_their_directions_is_the_mean_of_their_weighted_updates_as_the_judge_says(weights):
    a, c = layer(40, 30, 4, 1, alpha=2.0), layer(40, 30, 3, 7)
    refactored = LowRankLayer.with_alpha(a.up * 3, a.down / 3, a.alpha)  # the same update, factored otherwise
    parts = [(w, a if i % 2 == 0 else refactored) for i, w in enumerate(weights)]
    got = dense(merged_layer(NAME, parts, MergeSettings("tsv")))
    want = sum(taus(parts)) / len(parts)
    assert rel(got, want) < 1e-10
    assert rel(dense_merge("tsv", taus(parts), name=NAME), want) < 1e-10
    mixed = parts + [(0.7, c)]  # shared and independent directions: ours is the judge's
    ours = dense(merged_layer(NAME, mixed, MergeSettings("tsv")))
    assert rel(ours, dense_merge("tsv", taus(mixed), name=NAME)) < 1e-9
