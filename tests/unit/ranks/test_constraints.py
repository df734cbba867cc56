"""Rank constraints as plug-ins (ranks/constraints.py) and the budgets' steps between accepted ranks: rounding up
to a multiple / the next allowed rank, at most the layer's size; a budget's plan never takes a narrower later step
of a layer whose earlier step did not fit (its optimality over the steps: test_budget.py; the registry:
tests/unit/test_registries.py)."""
from __future__ import annotations

import numpy as np
import pytest

from lora_resize import ResizeOptions
from lora_resize.ranks.budgets import BudgetLayer, allocate_fro, allocate_size, kept_energy, one_rank
from lora_resize.ranks.constraints import accepted_levels, round_rank


@pytest.mark.parametrize("opts,cases", [
    (dict(rank_multiple=16), [(1, 320, 16), (16, 320, 16), (17, 320, 32), (310, 320, 320), (33, 40, 40),
                              (5, 6, 6), (40, None, 48)]),
    (dict(allowed_ranks=(8, 16, 32, 64)), [(1, 320, 8), (8, 320, 8), (9, 320, 16), (33, 320, 64), (100, 320, 64),
                                           (20, 24, 24), (5, 6, 6), (100, None, 64)]),
    (dict(uniform_rank=True), [(7, 320, 7)]),
])
def test_rounding_up_at_most_the_layer_size(opts, cases):
    o = ResizeOptions(method="sv_fro", param=0.9, **opts)
    for k, size, want in cases:
        assert round_rank(o, k, size) == want, (k, size)
    ks = np.arange(1, 50)  # the same, vectorised (what a budget's levels use)
    assert list(round_rank(o, ks, 40)) == [round_rank(o, int(k), 40) for k in ks]


def test_levels_are_the_accepted_ranks_between_lo_and_hi():
    o = ResizeOptions(method="sv_fro", param=0.9, rank_multiple=4)
    assert list(accepted_levels(o, 4, 10, 10)) == [4, 8, 10]
    o = ResizeOptions(method="sv_fro", param=0.9, allowed_ranks="8,2,4")
    assert list(accepted_levels(o, 2, 8, 6)) == [2, 4, 6]
    assert accepted_levels(ResizeOptions(method="sv_fro", param=0.9), 1, 5, 8) is None


def test_a_step_that_does_not_fit_blocks_the_narrower_steps_after_it():
    """Layer 0 (levels 4, 8, 10): its step 4->8 does not fit once layer 1 took its unit; its last step 8->10 is
    narrower and would fit, but taking it without 4->8 would write rank 6, which is not accepted."""
    a = BudgetLayer(lo=4, hi=10, cost=10, gains=np.array([9.0] * 4 + [1.0] * 4 + [0.9] * 2),
                    levels=np.array([4, 8, 10]))
    b = BudgetLayer(lo=1, hi=2, cost=10, gains=np.array([5.0, 4.9]))
    plan = allocate_size([a, b], 4 * 10 + 1 * 10 + 10 + 25)  # room for b's step (10) and 25 bytes more
    assert list(plan.ranks) == [4, 2]
    ranks, reached = allocate_fro([a, b], 1.0, kept_energy([a, b], np.array([10, 2])))
    assert reached and list(ranks) == [10, 2]


def test_one_rank_is_the_whole_file_as_one_layer():
    a = BudgetLayer(lo=1, hi=3, cost=2, gains=np.array([4.0, 1.0, 0.5]))
    b = BudgetLayer(lo=1, hi=5, cost=3, gains=np.array([3.0, 2.0, 1.0, 0.5, 0.25]))
    one = one_rank([a, b], lambda k: -(-np.asarray(k) // 2) * 2)  # multiples of 2, no size limit
    assert (one.lo, one.hi, one.cost) == (2, 6, 5) and list(one.levels) == [2, 4, 6]
    assert list(one.gains) == [7.0, 3.0, 1.5, 0.5, 0.25, 0.0]  # past a layer's own rank: zero (padding)
