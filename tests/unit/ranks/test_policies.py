"""Rank policies: the kohya rule against an independent float32 re-implementation of sd-scripts v0.10.1's choice
(networks/resize_lora.py `rank_resize`), and the exact rule checked for minimality directly from its definition."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lora_resize.errors import OptionsError
from lora_resize.ranks.policies import POLICIES, choose_rank, get_policy

from helpers import boundary_margin, kohya_reference

METHODS = ("sv_ratio", "sv_cumulative", "sv_fro")


# ----------------------------------------------------------------------------------------------------------------
# The independent sd-scripts reference (kohya_reference) lives in helpers.py; the CLI tests use it too.


def random_spectrum(g: torch.Generator) -> torch.Tensor:
    """A random trained-like spectrum in float32: flat head, power-law tail, optional tiny tail (like the float32
    SVD of a rank-r product padded to min(out, in))."""
    n = int(torch.randint(2, 65, (), generator=g))
    s0 = float(torch.empty(()).uniform_(0.05, 20.0, generator=g))
    p = float(torch.empty(()).uniform_(0.3, 2.5, generator=g))
    i = torch.arange(n, dtype=torch.float64)
    S = s0 * ((i + 3) / 3) ** -p * torch.exp(0.05 * torch.randn(n, generator=g, dtype=torch.float64))
    S, _ = torch.sort(S, descending=True)
    if n > 4 and bool(torch.rand((), generator=g) < 0.3):
        live = int(torch.randint(1, n, (), generator=g))
        S[live:] = S[live:] * 1e-7  # round-off level tail past the LoRA rank
    return S.float()


def random_param(method: str, g: torch.Generator) -> float:
    if method == "sv_ratio":
        return float(torch.empty(()).uniform_(1.0, 200.0, generator=g))
    return float(torch.empty(()).uniform_(0.05, 1.0, generator=g))


def _cases(count: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < count:
        S32 = random_spectrum(g)
        method = METHODS[len(out) % 3]
        param = random_param(method, g)
        if boundary_margin(S32, method, param) < 1e-5:
            continue  # avoid exact ties at a boundary (float32 vs float64 could round either way)
        c = int(torch.randint(0, len(S32) + 1, (), generator=g))
        cap = None if c == 0 else c
        out.append((S32, method, param, cap))
    return out


KOHYA_CASES = _cases(600, 20240601)


def test_kohya_rule_matches_sd_scripts_reference():
    mismatches = []
    for S32, method, param, cap in KOHYA_CASES:
        n = len(S32)
        want = kohya_reference(S32, method, param, cap)
        got = choose_rank(S32.double().numpy(), n, get_policy(method), param, cap, "kohya")
        if got.rank != want:
            mismatches.append((method, param, cap, n, want, got.rank))
        assert 1 <= got.rank <= n
    assert not mismatches, f"{len(mismatches)} of {len(KOHYA_CASES)} differ, e.g. {mismatches[:5]}"


def test_kohya_cases_cover_every_branch():
    # the comparison above is only meaningful if it exercised caps, the n-1 clamp and the floor of 2
    seen = {"capped": 0, "floor2": 0, "top_clamp": 0, "free": 0}
    for S32, method, param, cap in KOHYA_CASES:
        uncapped = kohya_reference(S32, method, param, None)
        if cap is not None and uncapped > cap:
            seen["capped"] += 1
        elif uncapped == 2:
            seen["floor2"] += 1
        elif uncapped == len(S32):
            seen["top_clamp"] += 1
        else:
            seen["free"] += 1
    assert all(v >= 10 for v in seen.values()), seen


@pytest.mark.parametrize("method", METHODS)
def test_kohya_rule_keeps_one_more_than_the_criterion(method):
    # the documented off-by-one: index = count of values above the ratio threshold, new rank = index + 1
    S = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625])
    param = {"sv_ratio": 3.0, "sv_cumulative": 0.6, "sv_fro": 0.9}[method]
    exact = choose_rank(S, len(S), get_policy(method), param, None, "exact").rank
    kohya = choose_rank(S, len(S), get_policy(method), param, None, "kohya").rank
    assert kohya == kohya_reference(torch.tensor(S, dtype=torch.float32), method, param, None)
    assert kohya == exact + 1


@pytest.mark.parametrize("method", METHODS)
def test_kohya_zero_layer_is_rank_one(method):
    S = np.array([5e-7, 1e-7, 0.0, 0.0])  # below sd-scripts' MIN_SV: treated as a zero matrix
    param = 2.0 if method == "sv_ratio" else 0.5
    got = choose_rank(S, 4, get_policy(method), param, 3, "kohya")
    assert got.rank == 1 == kohya_reference(torch.tensor(S, dtype=torch.float32), method, param, 3)
    assert got.zero_layer
    fixed = choose_rank(S, 4, get_policy(None), None, 3, "kohya")
    assert fixed.rank == 1 and fixed.zero_layer


def test_kohya_fixed_rank_within_size():
    S = np.linspace(3, 1, 12)
    for cap in (1, 4, 12):
        got = choose_rank(S, 12, get_policy(None), None, cap, "kohya")
        assert got.rank == cap == kohya_reference(torch.tensor(S, dtype=torch.float32), None, None, cap)
        assert not got.clamped_to_size


# ----------------------------------------------------------------------------------------------------------------
# The exact rule, checked from its definition.


def meets(S: np.ndarray, method: str, param: float, k: int) -> bool:
    """Does keeping the k largest singular values meet the method's criterion? (float64, from the definition)"""
    S = np.asarray(S, dtype=np.float64)
    if method == "sv_ratio":
        # every value at or above s_max / param is kept
        return bool(np.all(S[k:] < S[0] / param)) and bool(np.all(S[:k] >= S[0] / param) or k == 1)
    if method == "sv_cumulative":
        return float(S[:k].sum()) / float(S.sum()) >= param
    return math.sqrt(float((S[:k] ** 2).sum()) / float((S ** 2).sum())) >= param


EXACT_CASES = _cases(600, 777)


def test_exact_rule_is_the_smallest_rank_meeting_the_criterion():
    checked = 0
    for S32, method, param, _ in EXACT_CASES:
        S = S32.double().numpy()
        n = len(S)
        numerical_rank = int(np.count_nonzero(S))
        got = choose_rank(S, n, get_policy(method), param, None, "exact")
        k = got.rank
        assert 1 <= k <= numerical_rank
        assert meets(S, method, param, k), (method, param, k, S)
        if k > 1:
            assert not meets(S, method, param, k - 1), (method, param, k, S)
        assert not got.clamped_to_size and not got.zero_layer
        checked += 1
    assert checked == len(EXACT_CASES)


def test_exact_rule_with_cap_is_min_of_criterion_and_cap():
    n_capped = 0
    for S32, method, param, cap in EXACT_CASES:
        S = S32.double().numpy()
        free = choose_rank(S, len(S), get_policy(method), param, None, "exact").rank
        got = choose_rank(S, len(S), get_policy(method), param, cap, "exact").rank
        assert got == (free if cap is None else min(free, cap))
        n_capped += cap is not None and cap < free
    assert n_capped >= 20


@pytest.mark.parametrize("method", ["sv_cumulative", "sv_fro"])
def test_exact_rule_param_one_keeps_the_numerical_rank(method):
    S = np.array([3.0, 2.0, 1.5, 0.7, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0])
    got = choose_rank(S, len(S), get_policy(method), 1.0, None, "exact")
    assert got.rank == int(np.count_nonzero(S))


def test_exact_rule_never_exceeds_numerical_rank():
    S = np.array([3.0, 2.0, 1.0, 0.0, 0.0, 0.0])
    for method, param in (("sv_ratio", 1e9), ("sv_cumulative", 1.0), ("sv_fro", 1.0)):
        got = choose_rank(S, 6, get_policy(method), param, 6, "exact")
        assert got.rank == 3, method
    fixed = choose_rank(S, 6, get_policy(None), None, 5, "exact")
    assert fixed.rank == 3 and fixed.clamped_to_size


def test_exact_ratio_keeps_values_equal_to_threshold():
    S = np.array([8.0, 4.0, 2.0, 1.0])
    assert choose_rank(S, 4, get_policy("sv_ratio"), 4.0, None, "exact").rank == 3  # 2.0 >= 8/4 is kept
    assert choose_rank(S, 4, get_policy("sv_ratio"), 1.0, None, "exact").rank == 1


def test_exact_zero_layer():
    S = np.zeros(7)
    for method in (None,) + METHODS:
        param = None if method is None else (2.0 if method == "sv_ratio" else 0.9)
        got = choose_rank(S, 7, get_policy(method), param, 4, "exact")
        assert got.rank == 1 and got.zero_layer, method


def test_padded_spectrum_is_accepted():
    # a decomposition returns min(out, in, r) values; the layer's size may be larger
    S = np.array([5.0, 3.0, 1.0])
    got = choose_rank(S, 40, get_policy("sv_fro"), 1.0, None, "kohya")
    ref = kohya_reference(torch.tensor(np.concatenate([S, np.zeros(37)]), dtype=torch.float32), "sv_fro", 1.0, None)
    assert got.rank == ref


# ----------------------------------------------------------------------------------------------------------------
# Fixed rank above the layer size


@pytest.mark.parametrize("rule", ["exact", "kohya"])
def test_fixed_rank_above_size_is_clamped(rule):
    S = np.array([4.0, 3.0, 2.0, 1.0, 0.5, 0.25])  # a layer with min(out, in) = 6
    got = choose_rank(S, 6, get_policy(None), None, 16, rule)
    assert got.rank == 6
    assert got.clamped_to_size


@pytest.mark.parametrize("rule", ["exact", "kohya"])
@pytest.mark.parametrize("method", METHODS)
def test_dynamic_never_exceeds_layer_size(rule, method):
    S = np.array([4.0, 3.9, 3.8, 3.7])
    param = 1e6 if method == "sv_ratio" else 1.0
    got = choose_rank(S, 4, get_policy(method), param, 100, rule)
    assert got.rank <= 4


def test_one_by_n_layer_is_rank_one():
    S = np.array([2.5])
    for rule in ("exact", "kohya"):
        for method in METHODS:
            param = 4.0 if method == "sv_ratio" else 0.9
            assert choose_rank(S, 1, get_policy(method), param, 8, rule).rank == 1


# ----------------------------------------------------------------------------------------------------------------
# Registry and parameter checks


def test_registry_and_unknown_method():
    assert set(METHODS) <= set(POLICIES)
    assert get_policy(None).name == "fixed"
    with pytest.raises(OptionsError):
        get_policy("sv_magic")


@pytest.mark.parametrize("method,good,bad", [
    ("sv_ratio", [1.0, 2.0, 1000.0], [0.5, 0.0, -3.0]),
    ("sv_cumulative", [1.0, 0.5, 1e-6], [0.0, 1.5, -0.1]),
    ("sv_fro", [1.0, 0.9, 1e-6], [0.0, 1.0001, -0.1]),
])
def test_param_ranges(method, good, bad):
    pol = get_policy(method)
    assert pol.needs_param
    for p in good:
        assert pol.check_param(p) is None, p
    for p in bad:
        assert isinstance(pol.check_param(p), str), p
