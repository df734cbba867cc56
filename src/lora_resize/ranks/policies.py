"""Rank policies: given a layer's singular values, how many to keep. One registry; each policy is one registration,
which also gives its label and colour (report legends), the values `analyze` sweeps, and the CLI's --method choices.

Two rank rules turn a policy's criterion into a rank:
- ``exact``: the smallest k that meets the criterion, at least 1, at most the layer's numerical rank.
- ``kohya``: sd-scripts v0.10.1's choice, its off-by-one included (dynamic methods keep one more singular value
  than the criterion needs, and never fewer than 2), so old recipes give the same ranks (sd-scripts v0.10.1
  networks/resize_lora.py: `index_sv_ratio`, `index_sv_cumulative`, `index_sv_fro` and `rank_resize`).
The rank flag (``--rank``/``--conv-rank``) caps every policy; no rule ever returns more than min(out, in*kh*kw).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import OptionsError
from ..registry import Registry

ZERO_SV = 1e-6  # sd-scripts' MIN_SV: a layer whose largest singular value is at most this is treated as zero
RANK_RULES = ("exact", "kohya")
FIXED = "fixed"


@dataclass(frozen=True)
class Policy:
    """A rank policy. `exact(S, param)` and `kohya(S, param)` return an uncapped rank for descending S;
    `check_param(param)` says what is wrong with a parameter (None when it is fine), `nearest(param)` gives the
    nearest valid one (what sd-scripts' formulas do with one outside the range). `sweep`: the parameters `analyze`
    evaluates by default (for `fixed`: the ranks)."""
    name: str
    label: str
    colour: str
    sweep: tuple
    check_param: Callable[[float], str | None]
    exact: Callable[[np.ndarray, float], int]
    kohya: Callable[[np.ndarray, float], int]
    needs_param: bool = True
    nearest: Callable[[float], float] = float
    base: bool = False  # ranks by the loss relative to the base weight (Spectrum.base_weighted_S): needs --base


def _first_reaching(fraction: np.ndarray, target: float) -> int:
    """1 + the first index where a non-decreasing `fraction` reaches `target` (len if never)."""
    return int(np.searchsorted(fraction, target - 1e-12, side="left")) + 1


def _kohya_index(raw: int, n: int) -> int:
    return max(1, min(raw, n - 1)) + 1


def _ratio_exact(S, p):
    return int(np.count_nonzero(S >= S[0] / p))


def _ratio_kohya(S, p):
    return _kohya_index(int(np.count_nonzero(S > S[0] / p)), len(S))


def _cumulative_exact(S, p):
    return _first_reaching(np.cumsum(S) / S.sum(), p)


def _cumulative_kohya(S, p):
    c = (np.cumsum(S) / S.sum()).astype(np.float32)
    return _kohya_index(int(np.searchsorted(c, np.float32(p), side="left")) + 1, len(S))


def _fro_exact(S, p):
    S2 = S * S
    return _first_reaching(np.sqrt(np.cumsum(S2) / S2.sum()), p)


def _fro_kohya(S, p):
    S2 = (S * S)
    c = (np.cumsum(S2) / S2.sum()).astype(np.float32)
    return _kohya_index(int(np.searchsorted(c, np.float32(p) ** 2, side="left")) + 1, len(S))


def _unit_interval(p: float) -> str | None:
    return None if 0 < p <= 1 else "must be in (0, 1]"


def _at_least_one(p: float) -> str | None:
    return None if p >= 1 else "must be >= 1 (2 or more is typical)"


def _into_unit_interval(p: float) -> float:
    return min(max(p, 1e-9), 1.0)


def _base_fro(S, p):
    """The smallest k whose dropped part, sqrt(sum_{i>=k} S_i^2), is at most p (S already base-relative)."""
    S2 = S * S
    tail = np.maximum(S2.sum() - np.cumsum(S2), 0.0)  # tail[j]: dropped energy when j + 1 are kept
    return int(np.searchsorted(-np.sqrt(tail), -p * (1 + 1e-12), side="left")) + 1


def _positive(p: float) -> str | None:
    return None if p > 0 else "must be > 0 (e.g. 0.01: each layer's loss at most 1% of its base weight's norm)"


def _whole(S, p):
    return len(S)


FRACTIONS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)  # the sweep of every fraction-valued setting
POLICIES: Registry[Policy] = Registry("policy")


def register(policy: Policy) -> Policy:
    """Add a policy to the registry. Raises ValueError when the name is taken."""
    return POLICIES.add(policy.name, policy)


register(Policy("sv_ratio", "sv_ratio", "#1f77b4", (2, 3, 4, 5, 8, 16, 32, 64, 96, 128), _at_least_one,
                _ratio_exact, _ratio_kohya, nearest=lambda p: max(p, 1.0)))
register(Policy("sv_fro", "sv_fro", "#ff7f0e", FRACTIONS, _unit_interval, _fro_exact, _fro_kohya,
                nearest=_into_unit_interval))
register(Policy("sv_cumulative", "sv_cumulative", "#2ca02c", FRACTIONS, _unit_interval, _cumulative_exact,
                _cumulative_kohya, nearest=_into_unit_interval))
register(Policy("base_fro", "base_fro", "#17becf", (0.001, 0.002, 0.005, 0.01, 0.02, 0.05), _positive, _base_fro,
                _base_fro, nearest=lambda p: max(p, 1e-12), base=True))
register(Policy(FIXED, "fixed rank", "#d62728", (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256), lambda p: None,
                _whole, _whole, needs_param=False))


def dynamic_methods() -> list[str]:
    """The policies a --method flag can name (all but fixed)."""
    return [name for name, p in POLICIES.items() if p.needs_param]


def get_policy(name: str | None) -> Policy:
    """The registered policy called `name` (None means fixed). Raises OptionsError for an unknown name."""
    name = name or FIXED
    try:
        return POLICIES[name]
    except KeyError:
        raise OptionsError(f"unknown method {name!r}; choose one of {', '.join(POLICIES)}") from None


@dataclass(frozen=True)
class RankChoice:
    """A layer's new rank; `clamped_to_size`: the rank asked for was above the layer's size; `zero_layer`: the
    layer has no singular value above zero (sd-scripts' MIN_SV under the kohya rule)."""
    rank: int
    clamped_to_size: bool
    zero_layer: bool


def choose_rank(S: np.ndarray, full_size: int, policy: Policy, param: float | None, cap: int | None,
                rank_rule: str) -> RankChoice:
    """Rank for a layer with descending singular values S (zero-padded or not) and min(out, in*k*k) = full_size.

    `cap` None means no cap. Fixed policy: the cap is the rank asked for."""
    n = max(1, full_size)
    s = np.zeros(n)
    s[:min(n, len(S))] = S[:n]
    if rank_rule == "kohya":
        if s[0] <= ZERO_SV:
            return RankChoice(1, False, True)
        limit = n
        criterion = policy.kohya(s, param) if policy.needs_param else n
    else:
        if s[0] <= 0:
            return RankChoice(1, False, True)
        limit = int(np.count_nonzero(s))
        criterion = min(policy.exact(s, param), limit) if policy.needs_param else limit
    requested = criterion if cap is None else (cap if not policy.needs_param else min(criterion, cap))
    return RankChoice(max(1, min(requested, limit)), requested > limit, False)
