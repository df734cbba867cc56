"""Planning on a partial spectrum (leading values + tail energy, as core.dense gives them): whenever
ranks.plan.values_needed says k values decide a layer, the plan on S[:k+1] with the rest as tail_energy is the plan
on the whole spectrum - for every policy, both rank rules, caps and block rules."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lora_resize.core.spectrum import Spectrum
from lora_resize.options import ResizeOptions
from lora_resize.ranks.plan import layer_rank, rank_decider, values_needed
from lora_resize.ranks.policies import POLICIES
from lora_resize.results import BaseNorms


def spectrum(S: np.ndarray, name: str = "lora_unet_x", tail: float = 0.0, out: int = 300, inp: int = 400,
             scale: float = 0.5) -> Spectrum:
    return Spectrum(name, "lora", out, inp, 64, 32.0, scale, None, inp, S, tail_energy=tail)


def random_full(g: np.random.Generator, n: int) -> np.ndarray:
    """A fine-tune-like spectrum: power-law head, noise floor, sometimes rank deficient."""
    i = np.arange(n)
    S = g.uniform(0.1, 5) * (1 + i) ** -g.uniform(0.3, 2.0) + g.uniform(0, 0.01)
    S *= np.exp(0.05 * g.standard_normal(n))
    S = np.sort(S)[::-1]
    if g.random() < 0.2:
        S[g.integers(1, n):] = 0.0
    return S


def settings(g: np.random.Generator):
    for rule in ("exact", "kohya"):
        yield ResizeOptions(rank=int(g.integers(1, 90)), rank_rule=rule)
        for name, policy in POLICIES.items():
            if policy.needs_param and not policy.base:
                yield ResizeOptions(method=name, param=float(g.choice(policy.sweep)), rank=int(g.integers(1, 90)),
                                    rank_rule=rule)
                yield ResizeOptions(method=name, param=float(g.choice(policy.sweep)), rank_rule=rule)  # no cap
        yield ResizeOptions(method="sv_fro", param=0.9, rank=16, block_rules=["lora_unet_x=40"], rank_rule=rule)
        yield ResizeOptions(method="sv_ratio", param=8, rank=16, block_rules=["lora_unet_*=cap:50"], rank_rule=rule)


def test_partial_plan_equals_full_plan_whenever_values_needed_says_so():
    g = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        full = random_full(g, 300)
        for opts in settings(g):
            k = values_needed(opts, conv=False, name="lora_unet_x")
            if k is None:
                continue
            assert k <= values_needed(opts, conv=False)  # the any-layer count covers this layer's
            lead = full[:k + 1]
            partial = spectrum(lead, tail=float(np.sum(full[k + 1:] ** 2)))
            whole = spectrum(full)
            assert layer_rank(partial, opts) == layer_rank(whole, opts), (opts.label(), k)
            assert partial.energy == pytest.approx(whole.energy, rel=1e-12)
            assert partial.fro_retained(k) == pytest.approx(whole.fro_retained(k), rel=1e-12, nan_ok=True)
            checked += 1
    assert checked > 1000


def test_values_needed_refuses_what_the_leading_values_cannot_decide():
    assert values_needed(ResizeOptions(method="sv_cumulative", param=0.9, rank=32), conv=False) is None
    assert values_needed(ResizeOptions(method="sv_fro", param=0.9), conv=False) is None  # no cap
    assert values_needed(ResizeOptions(target_size="5MB", rank=32), conv=False) is None  # a budget
    assert values_needed(ResizeOptions(rank=32, conv_rank=8), conv=False) == 32
    assert values_needed(ResizeOptions(rank=32, conv_rank=8), conv=True) == 8
    opts = ResizeOptions(method="sv_ratio", param=4, rank=32, block_rules=["*attn*=64", "*ff*=cap:48"])
    assert values_needed(opts, conv=False) == 64
    assert values_needed(opts, conv=False, name="a_attn_q") == 64
    assert values_needed(opts, conv=False, name="a_ff_1") == 48
    assert values_needed(opts, conv=False, name="a_proj") == 32
    cumulative = ResizeOptions(method="sv_cumulative", param=0.9, rank=32, block_rules=["*attn*=64"])
    assert values_needed(cumulative, conv=False, name="a_attn_q") == 64  # pinned: the method does not run
    assert values_needed(cumulative, conv=False, name="a_proj") is None


def test_base_losses_and_energy_count_the_tail():
    full = np.array([4.0, 2.0, 1.0, 0.5, 0.25, 0.1])
    tail = float(np.sum(full[3:] ** 2))
    part, whole = spectrum(full[:3], tail=tail), spectrum(full)
    assert part.energy == pytest.approx(whole.energy)
    assert part.kept(2) == whole.kept(2)
    assert math.isclose(part.fro_retained(2), whole.fro_retained(2))
    vals = part.with_tail()
    assert len(vals) == part.full_size and float(np.sum(vals ** 2)) == pytest.approx(float(np.sum(full ** 2)))
    assert np.all(np.diff(vals) <= 0)
    base = BaseNorms("w", 10.0, 3.0)
    part.base, whole.base = base, base
    assert np.allclose(part.base_losses(2), whole.base_losses(2), rtol=1e-12)
    assert np.allclose(part.base_strength(), whole.base_strength(), rtol=1e-12)


def test_rank_decider_is_layer_rank_on_other_values():
    opts = ResizeOptions(method="sv_ratio", param=4, rank=32)
    full = (1.0 + np.arange(300)) ** -1.0
    sp = spectrum(full[:33], tail=float(np.sum(full[33:] ** 2)))
    decide = rank_decider(sp, opts)
    assert decide(sp.S, sp.tail_energy) == layer_rank(sp, opts).rank == 4
    assert decide(sp.S * np.r_[1.0, np.full(32, 2.0)], sp.tail_energy) == 8


@pytest.mark.parametrize("opts", [ResizeOptions(rank=8), ResizeOptions(rank=8, rank_rule="kohya"),
                                  ResizeOptions(method="sv_ratio", param=5, rank=8),
                                  ResizeOptions(method="sv_fro", param=0.6, rank=8),
                                  ResizeOptions(method="sv_fro", param=0.6, rank=8, rank_rule="kohya")])
def test_dense_partial_spectrum_plans_the_exact_rank(opts):
    """The seam end to end: decompose_dense(W, need=values_needed(...), decide=rank_decider(...)) and the plan on
    its partial Spectrum give the rank the exact whole spectrum gives."""
    import torch

    from lora_resize.core.dense import decompose_dense

    g = torch.Generator().manual_seed(2)
    m, n = 150, 260
    U = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64)).Q
    W = (U * (1.0 + torch.arange(m, dtype=torch.float64)) ** -1.2) @ V.T
    need = values_needed(opts, conv=False, name="lora_unet_x")
    exact = decompose_dense(W)
    whole = spectrum(exact.S, out=m, inp=n)
    template = spectrum(np.zeros(need + 1), out=m, inp=n)
    dec = decompose_dense(W, need=need, decide=rank_decider(template, opts))
    assert not dec.complete  # the fast route held
    partial = spectrum(dec.S, tail=dec.tail_energy, out=m, inp=n)
    assert layer_rank(partial, opts) == layer_rank(whole, opts)
