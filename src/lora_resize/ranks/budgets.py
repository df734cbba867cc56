"""Budgets: choose every layer's rank together, for a file size (--target-size) or a global Frobenius retention
(--target-fro). A small registry (BUDGETS): each budget is one registration that gives its option, flag, label,
colour, the values `analyze` sweeps and its planner. Pure numpy on the singular values; no tensors.

The unit of choice is one singular value of one layer. Keeping the j-th singular value of layer i (all before it
being kept) adds energy g_ij = (scale_i * S_ij)^2 to the update (scale_i = alpha_i / rank_i: the energy the model
actually sees) and costs c_i bytes (the bytes of one more row of down and column of up). Because S is descending,
each layer's gains are non-increasing, so a layer's ranks grow in order when units are taken by gain per byte.

- Size: start every layer at its lowest allowed rank, then take units in decreasing g/c; a unit that does not fit
  the remaining bytes is skipped (and so is the rest of its layer: they cost the same), and smaller units after it
  are still tried. The kept energy is within g* of the best any allocation could keep in the same bytes, where g*
  is the gain of the first unit skipped (the fractional-knapsack bound); no single layer's rank can be raised
  within the budget (so no single-layer change improves the result at all).
- Fro: take units in the same order until sqrt(kept / total) reaches the target (total: every singular value of
  every kept layer, scaled). The result keeps at most one unit (of any layer) more than a byte-minimal choice.
- Error (with --base): the same prefix, until the dropped energy is at most X^2 times the base weights' summed
  ||W||_F^2 (the global loss relative to the base); the same guarantee.
- With --base, Size ranks units by base-relative gain per byte, g_ij / ||W_i||_F^2: it keeps the least summed
  squared loss relative to each layer's base weight that fits the bytes (the same knapsack bound, in those units).

Under a rank constraint (ranks/constraints.py) a layer may take only some ranks (`BudgetLayer.levels`): a unit is
then one step between two consecutive allowed ranks a < b, with gain sum(g_i[a:b]) and cost (b - a) * c_i, its
true cost in bytes and energy. The steps' gains per byte are block means of a non-increasing sequence, so they are
non-increasing too and a layer's steps are still taken in order; a step that does not fit blocks the rest of its
layer (a later, narrower step - the last one, up to the layer's size - is never taken without it). Every rank
(--uniform-rank) is one layer whose units are the whole file's (`one_rank`, `OneRankSizer`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from ..errors import OptionsError
from ..registry import Registry
from ..units import format_size, parse_size
from .policies import FRACTIONS


@dataclass
class BudgetLayer:
    """One layer's choice: ranks lo..hi, `cost` bytes per rank, `gains[j]` the energy of the (j+1)-th singular
    value (scaled, zero past the numerical rank), at least `hi` long."""
    lo: int
    hi: int
    cost: int
    gains: np.ndarray
    base_energy: float = 0.0  # ||W||_F^2 of the base weight the layer patches (--base), else 0
    levels: np.ndarray | None = None  # the ranks it may take, ascending, lo and hi included (None: every one)

    def next_rank(self, k: int) -> int | None:
        """The next rank the layer may take above k (None at its highest)."""
        if k >= self.hi:
            return None
        if self.levels is None:
            return k + 1
        return int(self.levels[np.searchsorted(self.levels, k, side="right")])

    def steps(self) -> tuple[np.ndarray, np.ndarray]:
        """(start rank, width) of every step from lo to hi."""
        if self.levels is None:
            return np.arange(self.lo, self.hi, dtype=np.int64), np.ones(max(0, self.hi - self.lo), dtype=np.int64)
        b = np.asarray(self.levels, dtype=np.int64)
        return b[:-1], np.diff(b)


@dataclass
class Units:
    """Every optional unit (a step of one layer with positive gain) in the order the greedy takes them: its
    layer, gain, cost in bytes, the rank it starts from and its width in ranks."""
    idx: np.ndarray
    gain: np.ndarray
    cost: np.ndarray
    start: np.ndarray
    width: np.ndarray


def _units(layers: list[BudgetLayer]) -> Units:
    """The units of `layers`, by decreasing gain per byte, ties by layer then by position (so a layer's units stay
    in order)."""
    idx, gain, cost, start, width = [], [], [], [], []
    for i, L in enumerate(layers):
        if L.hi > L.lo:
            a, w = L.steps()
            if L.levels is None:
                g = np.asarray(L.gains[L.lo:L.hi], dtype=np.float64)
            else:
                cg = np.concatenate([[0.0], np.cumsum(np.asarray(L.gains, dtype=np.float64))])
                g = cg[np.minimum(a + w, len(cg) - 1)] - cg[np.minimum(a, len(cg) - 1)]
            keep = g > 0  # S is descending: the positive gains are a prefix (zeros past the numerical rank)
            idx.append(np.full(int(keep.sum()), i, dtype=np.int64))
            gain.append(g[keep])
            cost.append(w[keep] * float(L.cost))
            start.append(a[keep])
            width.append(w[keep])
    if not idx:
        e, z = np.zeros(0), np.zeros(0, dtype=np.int64)
        return Units(z, e, e, z, z)
    idx, gain, cost = np.concatenate(idx), np.concatenate(gain), np.concatenate(cost)
    ratio = gain / np.maximum(cost, 1e-300)
    order = np.lexsort((np.arange(len(idx)), -ratio))  # stable: ties keep layer/position order
    return Units(idx[order], gain[order], cost[order], np.concatenate(start)[order], np.concatenate(width)[order])


def base_ranks(layers: list[BudgetLayer]) -> np.ndarray:
    """Every layer at its lowest allowed rank."""
    return np.array([L.lo for L in layers], dtype=np.int64)


def kept_energy(layers: list[BudgetLayer], ranks: np.ndarray) -> float:
    """Scaled energy kept by `ranks` (sum of the kept gains)."""
    return float(sum(float(np.sum(L.gains[:k])) for L, k in zip(layers, ranks)))


@dataclass
class SizePlan:
    """A greedy allocation: the ranks, the bytes their factors take, the gain of the first unit that did not fit."""
    ranks: np.ndarray
    bytes_used: int  # sum of cost * rank over the layers
    skipped_gain: float  # g*: the gain of the first unit that did not fit (0 when nothing was skipped)


def allocate_size(layers: list[BudgetLayer], budget: float) -> SizePlan | None:
    """Ranks with sum(cost * rank) <= budget, greedily by gain per byte (see the module docstring); None when
    even the lowest ranks do not fit."""
    ranks = base_ranks(layers)
    costs = np.array([L.cost for L in layers], dtype=np.float64)
    used = float(np.dot(costs, ranks))
    if used > budget:
        return None
    u = _units(layers)
    idx, gain, cost = u.idx, u.gain, u.cost
    slack = budget - used
    cum = np.cumsum(cost)
    n = int(np.searchsorted(cum, slack, side="right"))  # the prefix that fits as a whole
    np.add.at(ranks, idx[:n], u.width[:n])
    slack -= float(cum[n - 1]) if n else 0.0
    skipped = float(gain[n]) if n < len(idx) else 0.0
    rest = np.nonzero(cost[n:] <= slack)[0] + n
    for j in rest:  # units after the first that did not fit: take those that still fit, in order, each only
        c = cost[j]  # where its layer took every step before it (a skipped step blocks the rest of its layer)
        if c <= slack and ranks[idx[j]] == u.start[j]:
            ranks[idx[j]] += u.width[j]
            slack -= c
    return SizePlan(ranks, int(round(float(np.dot(costs, ranks)))), skipped)


def next_units(layers: list[BudgetLayer], ranks: np.ndarray) -> list[int]:
    """Layers whose next step (to their next allowed rank) has positive gain, best gain per byte first."""
    per_byte = {}
    for i, (L, k) in enumerate(zip(layers, ranks)):
        nxt = L.next_rank(int(k))
        if nxt is not None:
            g = float(L.gains[k]) if nxt == k + 1 else float(np.sum(L.gains[k:nxt]))
            if g > 0:
                per_byte[i] = g / max(L.cost * (nxt - k), 1e-300)
    return sorted(per_byte, key=lambda i: (-per_byte[i], i))


def allocate_fro(layers: list[BudgetLayer], target: float, total_energy: float) -> tuple[np.ndarray, bool]:
    """(ranks, reached): the greedy prefix whose kept energy first reaches target^2 * total_energy; all layers at
    their highest allowed rank (reached False) when the caps make the target unreachable."""
    ranks = base_ranks(layers)
    need = target * target * total_energy * (1 - 1e-12)
    have = kept_energy(layers, ranks)
    if have >= need:
        return ranks, True
    u = _units(layers)
    cum = have + np.cumsum(u.gain)
    n = int(np.searchsorted(cum, need, side="left"))
    if n >= len(u.idx):
        np.add.at(ranks, u.idx, u.width)
        return ranks, False
    np.add.at(ranks, u.idx[:n + 1], u.width[:n + 1])
    return ranks, True


# ----------------------------------------------------------------------------------------------------------------
# Planners on the exact file size


class Sizer(Protocol):
    """The exact size of the output for per-layer ranks (io.sizing.OutputSizer)."""

    def layer_bytes(self, i: int, k: int) -> int: ...

    def file_size(self, ranks) -> tuple[int, int, int]: ...  # (file bytes, header bytes, parameters)

    # the factors' save dtype (a torch.dtype; OutputSizer.dtype), for what a refusal may advise
    dtype: object


class OneRankSizer:
    """A sizer of the whole file as one layer (every layer at one rank, --uniform-rank): layer 0 at rank k is every
    layer at rank k."""

    def __init__(self, sizer: Sizer, n: int):
        self.sizer, self.n = sizer, n
        self.dtype = getattr(sizer, "dtype", None)

    def layer_bytes(self, i: int, k: int) -> int:
        return sum(self.sizer.layer_bytes(j, k) for j in range(self.n))

    def file_size(self, ranks) -> tuple[int, int, int]:
        return self.sizer.file_size(np.full(self.n, int(np.asarray(ranks)[0]), dtype=np.int64))


def one_rank(layers: list[BudgetLayer], round_up: Callable[[np.ndarray], np.ndarray]) -> BudgetLayer:
    """`layers` as one layer whose rank is every layer's (--uniform-rank): at least the highest of their lowest
    ranks, at most the highest of their highest (a layer of lower rank is padded with zero directions), each rank
    the sum of the layers' gains and costs; `round_up` (ranks -> the accepted ranks at or above them, with no size
    limit) gives the ranks it may take."""
    lo = int(round_up(np.array([max(L.lo for L in layers)]))[0])
    hi = max(lo, int(round_up(np.array([max(L.hi for L in layers)]))[0]))
    gains = np.zeros(hi)
    for L in layers:
        g = np.asarray(L.gains[:hi], dtype=np.float64)
        gains[:len(g)] += g
    levels = np.unique(np.asarray(round_up(np.arange(lo, hi + 1)), dtype=np.int64))
    return BudgetLayer(lo, hi, sum(L.cost for L in layers), gains, sum(L.base_energy for L in layers), levels)


def plan_size(layers: list[BudgetLayer], target: int, total_energy: float, sizer: Sizer
              ) -> tuple[np.ndarray, str | None]:
    """Ranks whose file is at most `target` bytes, keeping the most scaled energy (the greedy of `allocate_size` on
    the tensor bytes, then corrected on the exact file size: header, metadata and copied tensors included; then
    single layers raised while the file still fits). Raises OptionsError when even the lowest ranks do not fit."""
    lo = base_ranks(layers)
    size_lo, head_lo, _ = sizer.file_size(lo)
    if size_lo > target:
        lowest = {L.lo for L in layers}
        wide = getattr(getattr(sizer, "dtype", None), "itemsize", 4) > 2  # fp16/bf16 would halve the factors
        raise OptionsError(
            f"--target-size {target} bytes is below the smallest file these options allow: {size_lo} bytes (every "
            f"layer at rank {min(lowest) if len(lowest) == 1 else 'its lowest'}); raise the target"
            + (", save in fp16/bf16," if wide else "") + " or leave modules out with --rule 'PATTERN=drop'")
    hi = np.array([L.hi for L in layers])
    costs = np.array([L.cost for L in layers], dtype=np.float64)
    # file = constant bytes (alphas, copied tensors) + header + sum(cost * rank); the header grows with the ranks
    # (longer numbers), so its size at the highest ranks is a safe first guess, refined below
    constant = size_lo - head_lo - float(np.dot(costs, lo))
    head_guess = sizer.file_size(hi)[1]
    best = lo
    for _ in range(4):  # keep the best allocation that fits
        plan = allocate_size(layers, target - constant - head_guess)
        if plan is None:
            break
        size, head, _ = sizer.file_size(plan.ranks)
        if size <= target:
            best = plan.ranks
            if head == head_guess:
                break
            head_guess = head
        else:
            head_guess += size - target
    ranks = best.copy()
    # fill: raise single layers while the exact size still fits (best gain per byte first)
    size = sizer.file_size(ranks)[0]
    while True:
        slack = target - size
        grew = False
        for i in next_units(layers, ranks):
            k = int(ranks[i])
            nxt = layers[i].next_rank(k)
            if layers[i].cost * (nxt - k) > slack:
                continue
            ranks[i] = nxt
            s2 = sizer.file_size(ranks)[0]
            if s2 <= target:
                size, slack, grew = s2, target - s2, True
            else:
                ranks[i] = k
        if not grew:
            break
    return ranks, None


def plan_fro(layers: list[BudgetLayer], target: float, total_energy: float, sizer: Sizer
             ) -> tuple[np.ndarray, str | None]:
    """The smallest greedy prefix whose global Frobenius retention reaches `target`; a note when the caps and
    rules make it unreachable (every layer then at its highest allowed rank)."""
    ranks, reached = allocate_fro(layers, target, total_energy)
    if reached:
        return ranks, None
    best = math.sqrt(kept_energy(layers, ranks) / total_energy) if total_energy > 0 else float("nan")
    return ranks, (f"--target-fro {target} is not reachable under the caps and rules; the best is {best:.4f} "
                   "(every layer at its highest allowed rank)")


def plan_error(layers: list[BudgetLayer], target: float, total_energy: float, sizer: Sizer
               ) -> tuple[np.ndarray, str | None]:
    """The smallest greedy prefix whose loss relative to the base, sqrt(dropped energy / sum of the base weights'
    ||W||_F^2), is at most `target`: plan_fro with the kept share that leaves exactly that loss."""
    base = sum(L.base_energy for L in layers)
    allowed = target * target * base
    if total_energy <= 0 or allowed >= total_energy:
        return base_ranks(layers), None
    share = math.sqrt(1 - allowed / total_energy)
    ranks, reached = allocate_fro(layers, share, total_energy)
    if reached:
        return ranks, None
    loss = math.sqrt(max(0.0, total_energy - kept_energy(layers, ranks)) / base) if base > 0 else float("nan")
    return ranks, (f"--target-error {target} is not reachable under the caps and rules; the best is {loss:.4g} "
                   "(every layer at its highest allowed rank)")


def _parse_error(value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise OptionsError(f"--target-error must be a number > 0, got {value!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise OptionsError(f"--target-error must be > 0 (e.g. 0.002: the LoRA's loss 0.2% of its base weights), "
                           f"got {v}")
    return v


# ----------------------------------------------------------------------------------------------------------------
# The registry


def _parse_fro(value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise OptionsError(f"--target-fro must be a number in (0, 1], got {value!r}") from None
    if not 0 < v <= 1:
        raise OptionsError(f"--target-fro must be in (0, 1] (e.g. 0.95), got {v}")
    return v


@dataclass(frozen=True)
class Budget:
    """A budget policy. `name` is its ResizeOptions field; `parse` normalises a value (OptionsError when bad);
    `describe` labels a value in a sweep, `summary` in a job's summary, `flag_value` writes it for the flag;
    `sweep`: the values `analyze` evaluates by default ('auto': chosen from the file);
    `plan(layers, value, total_energy, sizer)`."""
    name: str
    flag: str
    label: str
    colour: str
    sweep: tuple
    parse: Callable[[object], object]
    describe: Callable[[object], str]
    summary: Callable[[object], str]
    flag_value: Callable[[object], str]
    plan: Callable[[list[BudgetLayer], object, float, Sizer], tuple[np.ndarray, str | None]]
    base_weighted: bool = False  # with --base, its gains are base-relative: (S * scale / ||W||_F)^2 per layer
    needs_base: bool = False


BUDGETS: Registry[Budget] = Registry("budget")


def register(budget: Budget) -> Budget:
    """Add a budget to the registry. Raises ValueError when the name is taken."""
    return BUDGETS.add(budget.name, budget)


register(Budget("target_fro", "--target-fro", "target_fro (budget)", "#9467bd", FRACTIONS, _parse_fro, lambda v: f"target_fro {v:g}",
                lambda v: f"target fro {v} (global, alpha/rank-scaled)", repr, plan_fro))
register(Budget("target_size", "--target-size", "target_size (budget)", "#8c564b", ("auto",),
                lambda v: parse_size(v, "--target-size"), lambda v: f"target_size {format_size(v)}",
                lambda v: f"target size {format_size(v)} ({v} bytes)", str, plan_size, base_weighted=True))
register(Budget("target_error", "--target-error", "target_error (budget)", "#bcbd22",
                (0.0005, 0.001, 0.002, 0.005, 0.01), _parse_error, lambda v: f"target_error {v:g}",
                lambda v: f"target error {v:g} (global, relative to the base)", repr, plan_error,
                needs_base=True))
