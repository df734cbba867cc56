"""Rank constraints: the ranks a server, loader or compiled runtime accepts, applied to whatever chose the ranks
(a fixed rank, a method, a budget, block rules). One registry (CONSTRAINTS), like the policies': each constraint is
one registration that gives its ResizeOptions field, flag, parser, rounding and label.

- ``--rank-multiple N``: each chosen rank rounded UP to a multiple of N (kernels that tile the rank, e.g. 16), at most
  the layer's size min(out, in*kh*kw): a layer whose size is not a multiple of N keeps its size.
- ``--allowed-ranks 8,16,32,64``: each chosen rank rounded up to the next allowed value; a rank above the largest
  becomes the largest (so the list is also a cap); at most the layer's size, as above.
- ``--uniform-rank``: every layer at one rank (torch.compile without recompiles, diffusers' LoRA hotswap, vLLM's
  `max_lora_rank`): the largest rank any layer chose (rounded by the other constraint where one is given), or with
  a budget the best single rank under it. A layer whose numerical rank (or size) is lower is padded with zero
  directions: the padded factors' product is the layer's own truncation, exactly.

Rounding up only ever keeps more singular values than the choice (the written factors are still the best rank-k
factors, with exact zeros past the numerical rank), so every fidelity criterion a method or budget meets still
holds. Budgets plan within the constraint: a layer's steps move between the ranks it accepts (ranks/budgets.py).
Pure: no tensors, no options import (the options object is read as it is given)."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..errors import OptionsError
from ..registry import Registry


@dataclass(frozen=True)
class Constraint:
    """A rank constraint. `name` is its ResizeOptions field (a value that is None/False: not given); `parse`
    normalises a value (OptionsError naming the fix); `round_up(value, k, size)`: the smallest rank the constraint
    accepts that is >= k (numpy arrays of k accepted), at most `size` (None: no size limit); `accepts(value, k)`:
    whether the constraint accepts rank k at all (to check a --rank, --conv-rank or rule against it); `describe`
    labels a value (ResizeOptions.label); `words` writes it as flags. `whole_file`: it relates the layers to each
    other (planned from every layer's spectrum, ranks.plan.plan) rather than rounding each one."""
    name: str
    flag: str
    parse: Callable[[object], object]
    round_up: Callable[[object, "int | np.ndarray", "int | None"], "int | np.ndarray"]
    accepts: Callable[[object, int], bool]
    describe: Callable[[object], str]
    words: Callable[[object], list[str]]
    whole_file: bool = False


CONSTRAINTS: Registry[Constraint] = Registry("rank constraint")


def register(constraint: Constraint) -> Constraint:
    """Add a constraint to the registry. Raises ValueError when the name is taken."""
    return CONSTRAINTS.add(constraint.name, constraint)


def _whole(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _parse_multiple(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _whole(value) or value < 1:
        raise OptionsError(f"--rank-multiple must be a whole number >= 1 (e.g. 16: every rank a multiple of 16), "
                           f"got {value!r}")
    return int(value)


def _parse_allowed(value) -> tuple[int, ...] | None:
    """'8,16,32,64' or a sequence of whole numbers >= 1 -> sorted tuple without duplicates."""
    if value is None:
        return None
    items = [x for x in value.replace(" ", "").split(",") if x] if isinstance(value, str) else value
    if isinstance(items, (numbers.Number, bytes)) or not isinstance(items, (Sequence, set, frozenset)):
        raise OptionsError(f"--allowed-ranks must be a list of ranks such as 8,16,32,64, got {value!r}")
    out = []
    for x in items:
        if isinstance(x, str) and x.isdigit():
            x = int(x)
        if isinstance(x, float) and x.is_integer():
            x = int(x)
        if not _whole(x) or x < 1:
            raise OptionsError(f"--allowed-ranks takes whole numbers >= 1 separated by commas (e.g. 8,16,32,64); "
                               f"{x!r} is not one")
        out.append(int(x))
    if not out:
        raise OptionsError("--allowed-ranks needs at least one rank (e.g. 8,16,32,64)")
    return tuple(sorted(set(out)))


def _parse_uniform(value) -> bool:
    if value is None:
        return False
    if not isinstance(value, (bool, np.bool_)):
        raise OptionsError(f"uniform_rank must be True or False, got {value!r}")
    return bool(value)


def _within(r, size):
    return r if size is None else np.minimum(r, size)


def _multiple_up(n: int, k, size):
    """ceil(k / n) * n, at most `size`."""
    return _within(-(-np.asarray(k) // n) * n, size)


def _allowed_up(allowed: tuple[int, ...], k, size):
    """The first allowed rank >= k (the largest above them all), at most `size`."""
    a = np.asarray(allowed)
    return _within(a[np.minimum(np.searchsorted(a, np.asarray(k), side="left"), len(a) - 1)], size)


def _as_int(f):
    def g(value, k, size):
        r = f(value, k, size)
        return int(r) if np.ndim(r) == 0 else r
    return g


register(Constraint("rank_multiple", "--rank-multiple", _parse_multiple, _as_int(_multiple_up),
                    lambda n, k: k % n == 0, lambda n: f"ranks multiple of {n}",
                    lambda n: ["--rank-multiple", str(n)]))
register(Constraint("allowed_ranks", "--allowed-ranks", _parse_allowed, _as_int(_allowed_up),
                    lambda a, k: k in a, lambda a: f"ranks in {{{','.join(map(str, a))}}}",
                    lambda a: ["--allowed-ranks", ",".join(map(str, a))]))
register(Constraint("uniform_rank", "--uniform-rank", _parse_uniform, _as_int(lambda v, k, size: _within(k, size)),
                    lambda v, k: True, lambda v: "uniform rank", lambda v: ["--uniform-rank"], whole_file=True))


# ----------------------------------------------------------------------------------------------------------------
# The constraints of an options object


def active_constraints(opts) -> list[tuple[Constraint, object]]:
    """The constraints `opts` sets, with their values, in registration order."""
    return [(c, getattr(opts, c.name)) for c in CONSTRAINTS.values() if getattr(opts, c.name, None)]


def per_layer(opts) -> tuple[Constraint, object] | None:
    """The constraint that rounds each layer's rank (--rank-multiple or --allowed-ranks), or None."""
    return next(((c, v) for c, v in active_constraints(opts) if not c.whole_file), None)


def uniform_rank_set(opts) -> bool:
    """Every layer at one rank (--uniform-rank)."""
    return any(c.whole_file for c, _ in active_constraints(opts))


def round_rank(opts, k, size: int | None):
    """Rank(s) k rounded up by `opts`' per-layer constraint, at most `size` (None: no limit); k unchanged without
    one."""
    c = per_layer(opts)
    return k if c is None else c[0].round_up(c[1], k, size)


def accepts_rank(opts, k: int) -> bool:
    """Whether `opts`' per-layer constraint accepts rank k (True without one)."""
    c = per_layer(opts)
    return c is None or c[0].accepts(c[1], int(k))


def refusal(opts) -> str | None:
    """What is wrong with `opts`' constraints given its other settings (None when they fit together): two
    per-layer constraints; a --rank, --conv-rank or rule rank the constraint does not accept (it would be rounded
    past what was asked, or past the cap); with --uniform-rank, rank rules or a --conv-rank of its own (layers
    would get different ranks) and explicit ranks that differ."""
    cs = active_constraints(opts)
    both = [c.flag for c, _ in cs if not c.whole_file]
    if len(both) > 1:
        return (f"give one of {' or '.join(both)}: both restrict each rank (list the multiples you want with "
                "--allowed-ranks)")
    c = per_layer(opts)
    if c is not None:
        what, value = c
        for flag, k in (("--rank", opts.rank), ("--conv-rank", opts.conv_rank)):
            if k is not None and not what.accepts(value, k):
                return (f"{flag} {k} is not a rank {what.flag} {' '.join(what.words(value)[1:])} accepts: give "
                        f"{flag} {nearest_accepted(what, value, k)}")
        for r in opts.block_rules:
            if r.action in ("rank", "cap") and not what.accepts(value, r.value):
                return (f"rule {r} gives a rank {what.flag} {' '.join(what.words(value)[1:])} does not accept: "
                        f"use {nearest_accepted(what, value, r.value)}")
    if uniform_rank_set(opts):
        ranked = [r for r in opts.block_rules if r.action in ("rank", "cap")]  # drop and scale rules still apply
        if ranked:
            return (f"rule {ranked[0]} gives its modules a rank of their own, but --uniform-rank writes every layer "
                    "at one rank: cap them all with --rank N, or leave modules out with 'PATTERN=drop'")
        if opts.conv_rank != opts.rank:
            return ("--uniform-rank writes every layer at one rank: give one cap with --rank N, not a --conv-rank "
                    "of its own")
        if opts.ranks and len(set(opts.ranks.values())) > 1:
            return "--uniform-rank writes every layer at one rank: the explicit ranks differ"
    return None


def nearest_accepted(c: Constraint, value, k: int) -> str:
    """The accepted ranks next to k, as text: 'A or B', or the one there is."""
    up = int(c.round_up(value, k, None))
    down = next((j for j in range(k - 1, 0, -1) if c.accepts(value, j)), None)
    return f"{down} or {up}" if down is not None and up > k else str(up)


def accepted_levels(opts, lo: int, hi: int, size: int) -> np.ndarray | None:
    """The ranks a layer of `size` may take between lo and hi (both accepted) under the per-layer constraint,
    ascending - what a budget's steps move between; None without one (every rank)."""
    if per_layer(opts) is None:
        return None
    return np.unique(np.asarray(round_rank(opts, np.arange(lo, hi + 1), size), dtype=np.int64))


def constraint_notes(opts, rows: Sequence) -> list[str]:
    """What the constraints did to a job's layers (`rows`: LayerResults with `singular_values`), for the summary:
    the uniform rank and the layers padded with zero directions to reach it, and the layers that keep their size
    because no accepted rank fits them."""
    notes = []
    c = per_layer(opts)
    if c is not None:
        what, value = c
        odd = [r for r in rows if not what.accepts(value, r.new_rank)]
        if odd:
            notes.append(f"{what.flag} {' '.join(what.words(value)[1:])}: {len(odd)} layer(s) have no accepted "
                         f"rank between their choice and their size, and keep their size (e.g. {odd[0].name}: "
                         f"{odd[0].new_rank})")
    padded = [r for r in rows if r.singular_values is not None and not r.zero  # (zero layers: stated apart)
              and r.new_rank > int(np.count_nonzero(np.asarray(r.singular_values)))]
    if uniform_rank_set(opts) and rows:
        k = rows[0].new_rank
        notes.append(f"--uniform-rank: every layer is written at rank {k}" + (
            f"; {len(padded)} layer(s) whose numerical rank is lower are padded with zero directions (their "
            f"update is unchanged; e.g. {padded[0].name}: {int(np.count_nonzero(padded[0].singular_values))})"
            if padded else ""))
    elif c is not None and padded:
        notes.append(f"{c[0].flag}: {len(padded)} layer(s) rounded up past their numerical rank are padded with "
                     f"zero directions (their update is unchanged; e.g. {padded[0].name})")
    return notes


__all__ = ["Constraint", "CONSTRAINTS", "register", "active_constraints", "per_layer", "uniform_rank_set",
           "round_rank", "accepts_rank", "refusal", "accepted_levels", "constraint_notes"]
