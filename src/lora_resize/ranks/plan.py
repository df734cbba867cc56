"""The one planning step that resize, merge and analyze share: each kept layer's new rank under the options.

For one layer, in order of precedence: an explicit rank (`ResizeOptions.ranks`, e.g. a budget's plan), then a
`PATTERN=RANK` or `PATTERN=cap:RANK` block rule, then the method (policy) with the --rank/--conv-rank cap. A budget
(--target-size, --target-fro) plans every layer together from all their spectra (budgets.py), after which the
layers' ranks are explicit. Every path goes through policies.choose_rank, so the rank rule, zero layers and the
layer's size are handled alike. (`drop` rules are applied before planning: ranks.rules.apply_rules.)"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..core.spectrum import Spectrum
from ..errors import OptionsError
from .budgets import BudgetLayer, Sizer
from .policies import ZERO_SV, RankChoice, choose_rank, get_policy
from .rules import first_match

FIXED = get_policy(None)


def layer_rank(sp: Spectrum, opts) -> RankChoice:
    """The rank of one kept layer under `opts` (a ResizeOptions) without a budget, or with the budget's plan in
    `opts.ranks`. Raises OptionsError when a fixed-rank setting gives the layer no rank."""
    if opts.ranks and sp.name in opts.ranks:  # a plan's or a conversion's: above the layer's rank keeps all of it
        choice = choose_rank(sp.S, sp.full_size, FIXED, None, int(opts.ranks[sp.name]), "exact")
        return RankChoice(choice.rank, False, choice.zero_layer)
    rule = first_match(opts.block_rules, sp.name) if opts.block_rules else None
    if rule is not None and rule.action == "rank":
        return choose_rank(sp.S, sp.full_size, FIXED, None, rule.value, opts.rank_rule)
    cap = rule.value if rule is not None and rule.action == "cap" else opts.cap_for(sp.conv)
    policy = get_policy(opts.method)
    if not policy.needs_param and cap is None:
        raise OptionsError(f"layer {sp.name} has no rank: give --rank N (or a rule or a target that covers it)")
    return choose_rank(base_relative(sp, opts.method) if policy.base else sp.S, sp.full_size, policy, opts.param, cap,
                       opts.rank_rule)


def base_relative(sp: Spectrum, what: str) -> np.ndarray:
    """The layer's singular values relative to its base weight (for a base-relative method or budget); OptionsError
    for a layer whose weight the base does not have."""
    if sp.base is None:
        raise OptionsError(f"layer {sp.name} has no weight in --base, so {what} cannot choose its rank: give it one "
                           f"with --rule '{sp.name}=N', or leave it out with --rule '{sp.name}=drop'")
    return sp.base_weighted_S()


def budget_layers(spectra: Sequence[Spectrum], opts, sizer: Sizer) -> list[BudgetLayer]:
    """Each layer's choice for a budget: its lowest and highest allowed rank (rank rule, caps, block rules,
    explicit ranks), the bytes one more rank costs in the output and the scaled energy of each singular value."""
    out = []
    budget = opts.budget[0] if opts.budget is not None else None
    weighted = budget is not None and budget.base_weighted and opts.base is not None
    for i, sp in enumerate(spectra):
        rule = first_match(opts.block_rules, sp.name) if opts.block_rules else None
        pinned = (opts.ranks or {}).get(sp.name, rule.value if rule is not None and rule.action == "rank" else None)
        cap = rule.value if rule is not None and rule.action == "cap" else opts.cap_for(sp.conv)
        S = sp.S
        if opts.rank_rule == "kohya":
            zero = not (S.size and S[0] > ZERO_SV)
            limit = max(1, sp.full_size)
        else:
            zero = not (S.size and S[0] > 0)
            limit = int(np.count_nonzero(S))
        cost = sizer.layer_bytes(i, 2) - sizer.layer_bytes(i, 1)
        if zero:
            lo = hi = 1
        elif pinned is not None:
            lo = hi = max(1, min(pinned, limit))
        else:
            hi = limit if cap is None else max(1, min(cap, limit))
            lo = min(2, hi) if opts.rank_rule == "kohya" else 1
        gains = np.zeros(max(hi, len(S)))
        gains[:len(S)] = base_relative(sp, budget.flag) ** 2 if weighted else (S * sp.scale) ** 2
        if budget is not None and budget.needs_base and sp.base is None:
            base_relative(sp, budget.flag)  # refused: the layer has no base weight
        out.append(BudgetLayer(lo, hi, cost, gains, sp.base.fro ** 2 if sp.base is not None else 0.0))
    return out


def plan(spectra: Sequence[Spectrum], opts, sizer: Sizer | None = None) -> tuple[np.ndarray, list[str]]:
    """Every layer's rank under `opts`, and notes for the user. A budget needs `sizer` (the exact output size
    for given ranks). Raises OptionsError (a layer without a rank; a --target-size below the smallest file)."""
    budget = opts.budget
    if budget is None or (opts.ranks and all(sp.name in opts.ranks for sp in spectra)):
        return np.array([layer_rank(sp, opts).rank for sp in spectra], dtype=np.int64), []
    if sizer is None:
        raise ValueError("a budget needs the output's sizer")
    b, value = budget
    layers = budget_layers(spectra, opts, sizer)
    total = float(sum(L.gains.sum() for L in layers)) if b.base_weighted and opts.base is not None else \
        sum(sp.energy for sp in spectra)
    ranks, note = b.plan(layers, value, total, sizer)
    return np.asarray(ranks, dtype=np.int64), [note] if note else []
