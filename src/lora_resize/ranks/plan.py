"""The one planning step that resize, merge and analyze share: each kept layer's new rank under the options.

For one layer, in order of precedence: an explicit rank (`ResizeOptions.ranks`, e.g. a budget's plan), then a
`PATTERN=RANK` or `PATTERN=cap:RANK` block rule, then the method (policy) with the --rank/--conv-rank cap. A budget
(--target-size, --target-fro) plans every layer together from all their spectra (budgets.py), after which the
layers' ranks are explicit. Every path goes through policies.choose_rank, so the rank rule, zero layers and the
layer's size are handled alike. (`drop` rules are applied before planning: ranks.rules.apply_rules.)

Rank constraints (ranks/constraints.py) come last: a per-layer one (--rank-multiple, --allowed-ranks) rounds each
layer's rank up (`layer_rank`; a budget's steps move between the ranks it accepts, `budget_layers`); --uniform-rank
plans every layer together (`plan`: the largest rank any layer chose, or the best one rank under a budget) and the
layers are then written at that rank, padded with zero directions past their numerical rank."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import numpy as np

from ..core.spectrum import Spectrum
from ..errors import OptionsError
from .budgets import BudgetLayer, OneRankSizer, Sizer, one_rank
from .constraints import accepted_levels, round_rank, uniform_rank_set
from .policies import ZERO_SV, RankChoice, choose_rank, get_policy
from .rules import first_match

FIXED_POLICY = get_policy(None)  # the policy object; ranks.policies.FIXED is its name


def decided(sp: Spectrum, opts) -> tuple[int | None, int | None]:
    """(pinned, cap) of one kept layer under `opts`, in order of precedence: an explicit rank (`opts.ranks`, e.g.
    a budget's plan) or a `PATTERN=RANK` rule pins it; else a `PATTERN=cap:RANK` rule or --rank/--conv-rank caps
    it (None: no cap). The one reading of ranks, rules and caps that every planning path shares."""
    return decided_for(sp.name, sp.conv, opts)


def decided_for(name: str, conv: bool, opts) -> tuple[int | None, int | None]:
    """`decided` for the layer called `name` (a conv layer or not), before its spectrum is known."""
    rule = first_match(opts.block_rules, name) if opts.block_rules else None
    pinned = (opts.ranks or {}).get(name, rule.value if rule is not None and rule.action == "rank" else None)
    cap = rule.value if rule is not None and rule.action == "cap" else opts.cap_for(conv)
    return (int(pinned) if pinned is not None else None), cap


def pinned_rank(sp: Spectrum, k: int, rank_rule: str) -> RankChoice:
    """A pinned rank k as it is written under the rank rule: 1 for a zero layer; else k, at most the layer's
    numerical rank (exact) or its size (kohya: sd-scripts keeps a fixed rank above the numerical one)."""
    return choose_rank(sp.S, sp.full_size, FIXED_POLICY, None, k, rank_rule)


def unranked(sp: Spectrum, opts) -> bool:
    """No rank setting covers the layer (no explicit rank, rule, cap or method): it keeps all of its rank (with
    `opts.keep_unranked`: a conversion copies its factors as they are) or has none (an error, layer_rank)."""
    pinned, cap = decided(sp, opts)
    return pinned is None and cap is None and not get_policy(opts.method).needs_param


def layer_rank(sp: Spectrum, opts) -> RankChoice:
    """The rank of one kept layer under `opts` (a ResizeOptions) without a budget, or with the budget's plan in
    `opts.ranks`. A layer nothing gives a rank keeps its numerical rank with `opts.keep_unranked`; else it raises
    OptionsError. The rank is then rounded up by a per-layer rank constraint (at most the layer's size); under
    --uniform-rank the plan's one rank (in `opts.ranks`) is the rank, whatever the layer's own (zero-padded)."""
    pinned, cap = decided(sp, opts)
    if pinned is not None and uniform_rank_set(opts) and sp.name in (opts.ranks or {}):  # the plan's one rank:
        return RankChoice(pinned, False, pinned_rank(sp, pinned, opts.rank_rule).zero_layer)  # as it is, zero-padded
    choice = unconstrained_rank(sp, opts, pinned, cap)
    k = round_rank(opts, choice.rank, sp.full_size)
    return choice if k == choice.rank else RankChoice(k, choice.clamped_to_size, choice.zero_layer)


def unconstrained_rank(sp: Spectrum, opts, pinned: int | None, cap: int | None) -> RankChoice:
    """layer_rank before the rank constraints round it."""
    if pinned is not None:
        choice = pinned_rank(sp, pinned, opts.rank_rule)
        explicit = sp.name in (opts.ranks or {})  # a plan's: its ranks are within the layer's by construction
        return RankChoice(choice.rank, choice.clamped_to_size and not explicit, choice.zero_layer)
    policy = get_policy(opts.method)
    if unranked(sp, opts):
        if not opts.keep_unranked:
            raise OptionsError(f"layer {sp.name} has no rank: give --rank N (or a rule or a target that covers it)")
        return choose_rank(sp.S, sp.full_size, FIXED_POLICY, None, None, "exact")  # all of it: its numerical rank
    S = base_relative(sp, f"--method {opts.method}") if policy.base else sp.with_tail()
    return choose_rank(S, sp.full_size, policy, opts.param, cap, opts.rank_rule)


def base_relative(sp: Spectrum, what: str) -> np.ndarray:
    """The layer's singular values relative to its base weight (for a base-relative method or budget); OptionsError
    for a layer whose weight the base does not have."""
    if sp.base is None:
        raise OptionsError(f"layer {sp.name} has no weight in --base, so {what} cannot choose its rank: give it one "
                           f"with --rule '{sp.name}=N', or leave it out with --rule '{sp.name}=drop'")
    return sp.base_weighted_S()


def budget_layers(spectra: Sequence[Spectrum], opts, sizer: Sizer) -> list[BudgetLayer]:
    """Each layer's choice for a budget: its lowest and highest allowed rank (rank rule, caps, block rules,
    explicit ranks; rounded by a per-layer rank constraint, with the ranks it accepts in between as `levels`), the
    bytes one more rank costs in the output and the scaled energy of each singular value."""
    out = []
    budget = opts.budget[0] if opts.budget is not None else None
    weighted = based(spectra, opts)
    for i, sp in enumerate(spectra):
        pinned, cap = decided(sp, opts)
        cost = sizer.layer_bytes(i, 2) - sizer.layer_bytes(i, 1)
        if pinned is not None:
            lo = hi = pinned_rank(sp, pinned, opts.rank_rule).rank
        else:
            top = pinned_rank(sp, cap if cap is not None else sp.full_size, opts.rank_rule)
            hi = top.rank
            lo = 1 if top.zero_layer or opts.rank_rule != "kohya" else min(2, hi)
        lo, hi = round_rank(opts, lo, sp.full_size), round_rank(opts, hi, sp.full_size)
        S = sp.S
        gains = np.zeros(max(hi, len(S)))
        gains[:len(S)] = base_relative(sp, budget.flag) ** 2 if weighted else (S * sp.scale) ** 2
        if budget is not None and budget.needs_base and sp.base is None:
            base_relative(sp, budget.flag)  # refused: the layer has no base weight
        out.append(BudgetLayer(lo, hi, cost, gains, sp.base.fro ** 2 if sp.base is not None else 0.0,
                               accepted_levels(opts, lo, hi, sp.full_size)))
    return out


def plan(spectra: Sequence[Spectrum], opts, sizer: Sizer | None = None) -> tuple[np.ndarray, list[str]]:
    """Every layer's rank under `opts`, and notes for the user. A budget needs `sizer` (the exact output size
    for given ranks). With --uniform-rank every layer gets one rank: the given explicit ranks' (all equal), else
    the largest any layer chose, rounded up by a per-layer constraint (no size limit: the smaller layers are
    padded), or with a budget the best one rank under it (the budget planned on the file as one layer whose steps
    are the accepted ranks). Raises OptionsError (a layer without a rank; a --target-size below the smallest
    file)."""
    budget = opts.budget
    one = uniform_rank_set(opts) and bool(spectra)
    if (budget is None and not one) or (opts.ranks and all(sp.name in opts.ranks for sp in spectra)):
        return np.array([layer_rank(sp, opts).rank for sp in spectra], dtype=np.int64), []
    if one and (budget is None or opts.ranks):
        r = next(iter(opts.ranks.values())) if opts.ranks else max(layer_rank(sp, opts).rank for sp in spectra)
        return np.full(len(spectra), round_rank(opts, int(r), None), dtype=np.int64), []
    if sizer is None:
        raise ValueError("a budget needs the output's sizer")
    b, value = budget
    layers = budget_layers(spectra, opts, sizer)
    total = float(sum(L.gains.sum() for L in layers)) if based(spectra, opts) else sum(sp.energy for sp in spectra)
    if one:
        ranks, note = b.plan([one_rank(layers, lambda k: round_rank(opts, k, None))], value, total,
                             OneRankSizer(sizer, len(spectra)))
        ranks = np.full(len(spectra), int(ranks[0]), dtype=np.int64)
    else:
        ranks, note = b.plan(layers, value, total, sizer)
    notes = [note] if note else []
    missing = [sp.name for sp in spectra if sp.base is None]
    if b.base_weighted and not b.needs_base and opts.base is not None and missing:
        notes.append(f"{b.flag} ranks by each update's own energy per byte, not relative to the base: "
                     f"{len(missing)} layer(s) have no weight in --base (e.g. {missing[0]})")
    return np.asarray(ranks, dtype=np.int64), notes


def budget_bounds(spectra: Sequence[Spectrum], opts, sizer: Sizer) -> tuple[np.ndarray, np.ndarray]:
    """The ranks of the smallest and of the largest file a budget can plan under `opts` (with --uniform-rank: one
    rank for every layer, as `plan` gives)."""
    layers = budget_layers(spectra, opts, sizer)
    if uniform_rank_set(opts) and layers:
        one = one_rank(layers, lambda k: round_rank(opts, k, None))
        return np.full(len(layers), one.lo, dtype=np.int64), np.full(len(layers), one.hi, dtype=np.int64)
    return (np.array([L.lo for L in layers], dtype=np.int64), np.array([L.hi for L in layers], dtype=np.int64))


def whole_file(opts) -> bool:
    """The ranks need every layer's spectrum first (a budget, --uniform-rank): a planning pass before the writing
    one (ops.job.with_budget_plan)."""
    return opts.budget is not None or uniform_rank_set(opts)


def based(spectra: Sequence[Spectrum], opts) -> bool:
    """Whether `opts`' budget ranks by base-relative gains: one that does with --base (Budget.base_weighted), when
    every layer has its base weight - a budget that only weights by the base (--target-size) ranks a LoRA with a
    module the base lacks by the updates' own energy, as without --base (one unit for all layers); one that needs
    the base (--target-error) refuses it (base_relative)."""
    budget = opts.budget[0] if opts.budget is not None else None
    return (budget is not None and budget.base_weighted and opts.base is not None
            and (budget.needs_base or all(sp.base is not None for sp in spectra)))


PARTIAL_POLICIES = ("fixed", "sv_ratio", "sv_fro")  # decided by the leading values and the total energy


def values_needed(opts, conv: bool, name: str | None = None) -> int | None:
    """How many leading singular values decide a layer's rank under `opts` exactly as its whole spectrum would,
    or None when the decision needs the whole spectrum. With `name`, for that layer (its rules and explicit rank);
    without, for any linear (conv False) or conv layer: the largest such count.

    A pinned rank k (--rank with the fixed method, a `PATTERN=RANK` rule, an explicit rank) needs k: the exact rule
    counts the nonzero values among the first k, the kohya rule only S_0. A cap k with sv_ratio (the count of
    values >= S_0 / ratio, capped at k) or sv_fro (the first k whose cumulative share of the total energy reaches
    the fraction: the total is known exactly, Spectrum.tail_energy) needs k. sv_cumulative (its total is sum(S),
    not known from the leading values), base-relative methods, budgets (all layers' spectra together) and a layer
    without a cap need the whole spectrum. core.dense.decompose_dense(W, need=k) gives k + 1 values (the next one
    for the spectral loss) and the k leading vectors; planning on its partial Spectrum (`layer_rank`, through
    Spectrum.with_tail) then gives the rank the full spectrum gives, and `rank_decider` lets it check near-ties."""
    if opts.budget is not None or uniform_rank_set(opts):  # a uniform rank is every layer's choice together
        return None
    k = _leading(opts, conv, name)
    return None if k is None else int(round_rank(opts, k, None))  # a per-layer constraint rounds the rank up: its
    #                                                               vectors are needed (the decision is within k)


def _leading(opts, conv: bool, name: str | None) -> int | None:
    """values_needed before a rank constraint rounds it."""
    policy = get_policy(opts.method)
    if name is not None:
        pinned, cap = decided_for(name, conv, opts)
        if pinned is not None:
            return pinned
        return cap if policy.name in PARTIAL_POLICIES else None
    if policy.name not in PARTIAL_POLICIES or opts.cap_for(conv) is None:
        return None
    rules = [r.value for r in opts.block_rules if r.action in ("rank", "cap")]
    return max([opts.cap_for(conv), *rules, *(opts.ranks or {}).values()])


def rank_decider(sp: Spectrum, opts) -> Callable[[np.ndarray, float], int]:
    """(leading values, tail energy) -> the rank `layer_rank` gives the layer `sp` under `opts` with those values:
    what core.dense.decompose_dense(..., decide=) checks at the corners of its certified values."""
    return lambda S, tail: layer_rank(replace(sp, S=S, tail_energy=tail), opts).rank
