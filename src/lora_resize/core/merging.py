"""Merge methods: how the weighted updates tau_i = w_i * scale_i * up_i @ down_i of several LoRAs' layer become one
update. One registry (MERGE_METHODS), like the rank policies': each method is one registration, and the CLI's
choices (`merge --merge-method`), its parameters' flags, the page, the ComfyUI nodes and the docs follow from it.

`sum` (the default) is the weighted sum: exact, with the weighted factors stacked side by side
(up = [w1 s1 up1 | w2 s2 up2 | ...], down = [down1; down2; ...]), so the resize engine reduces it without ever
forming the dense update. The other methods work in the core space of the stacked factors (Panariello et al.,
"Accurate and Efficient Low-Rank Model Merging in Core Space", NeurIPS 2025, arXiv 2509.17786): with orthonormal
bases U of the stacked ups' columns and V of the stacked downs' rows, each input is a small core matrix
M_i = U^T tau_i V (at most (sum of ranks)^2 entries), tau_i = U M_i V^T exactly, and the merged update is
U merge(M_1, ..., M_n) V^T, a low-rank layer of rank <= the sum of the inputs' ranks.

This module is the registry and imports no torch (the command line builds its flags from it and starts without
torch); the maths is in core/core_space.py, each method's function named in its registration and imported on
first use (`maths`)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

from typing import TYPE_CHECKING

from ..errors import OptionsError
from ..registry import Registry

if TYPE_CHECKING:
    from .layer import LowRankLayer


@dataclass(frozen=True)
class MergeParam:
    """A parameter some merge methods read: its MergeSettings field and keyword (`name`), its CLI flag, type and
    help, and `check(value) -> why it is invalid, or ''`."""
    name: str
    flag: str
    type: type
    metavar: str
    help: str
    check: Callable[[object], str]


def _density_problem(v) -> str:
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= 1
    return "" if ok else f"must be a number in (0, 1], got {v!r}"


def _seed_problem(v) -> str:
    ok = isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0
    return "" if ok else f"must be a whole number >= 0, got {v!r}"


# every parameter any method reads, declared once: the CLI's flags, the page's and the nodes' inputs follow
MERGE_PARAMS: dict[str, MergeParam] = {p.name: p for p in (
    MergeParam("density", "--density", float, "X", "the fraction of each input's entries (or directions) a method "
               "keeps, in (0, 1]; default: the method's", _density_problem),
    MergeParam("seed", "--seed", int, "N", "the seed of a method's random drops (reproducible: the same seed gives "
               "the same file on every machine); default 0", _seed_problem),
)}


@dataclass(frozen=True)
class MergeMethod:
    """A merge method. `combine(name, parts, settings, positions) -> LowRankLayer` merges one layer's weighted
    inputs (positions: each part's 0-based place among the merge's given inputs, or None for 0, 1, ...: what seeds a
    random method per input; parts:
    [(weight, layer)], shapes already checked equal; settings: the MergeSettings, whose `value(p)` gives each
    parameter) into a layer of scale 1. `params`: the MERGE_PARAMS it reads (any other, given, is refused);
    `defaults`: their values when not given (None: the method decides, e.g. from the number of inputs).
    `basis_invariant`: the method commutes with orthogonal changes of basis, so the core-space result is the method
    applied to the dense updates (to rounding); False for elementwise methods, whose core-space version is the
    method applied to the cores' entries (README: Merge methods). `help`: one line for the CLI, page and docs."""
    name: str
    help: str
    combine: Callable[[str, list[tuple[float, LowRankLayer]], "MergeSettings", "list[int] | None"], LowRankLayer]
    params: tuple[str, ...] = ()
    defaults: dict = field(default_factory=dict)
    basis_invariant: bool = True


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method")


def maths(function: str) -> Callable:
    """core.core_space.<function>, imported on its first call (so registering a method imports no torch)."""
    def call(*args):
        from . import core_space
        return getattr(core_space, function)(*args)
    call.__name__ = call.__qualname__ = function
    return call


def register(method: MergeMethod) -> MergeMethod:
    """Add a merge method to the registry. Raises ValueError when the name is taken or it reads an undeclared
    parameter."""
    unknown = [p for p in method.params if p not in MERGE_PARAMS]
    if unknown:
        raise ValueError(f"merge method {method.name!r} reads undeclared parameter(s) {unknown}")
    return MERGE_METHODS.add(method.name, method)


def merge_methods() -> list[str]:
    """The registered merge methods' names, in registration order (the CLI's choices)."""
    return list(MERGE_METHODS)


def _shown(value) -> str:
    """A parameter's value as printed and as a CLI word: a whole number exactly (a seed of 20 digits stays 20
    digits), a float shortest (0.3)."""
    return str(value) if isinstance(value, numbers.Integral) else f"{value:g}"


@dataclass(frozen=True)
class MergeSettings:
    """How a merge combines its inputs: the method's name and its parameters (None: not given, the method's
    default). Raises OptionsError for an unknown method, a parameter the method does not read, or a bad value."""
    method: str = "sum"
    density: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.method not in MERGE_METHODS:
            raise OptionsError(f"merge method must be one of {', '.join(MERGE_METHODS)}, got {self.method!r}")
        m = MERGE_METHODS[self.method]
        for p in MERGE_PARAMS.values():
            v = getattr(self, p.name)
            if v is None:
                continue
            if p.name not in m.params:
                readers = [n for n, x in MERGE_METHODS.items() if p.name in x.params]
                raise OptionsError(f"{p.flag} is not read by --merge-method {m.name}"
                                   + (f" (it is by {', '.join(readers)})" if readers else "") + f": drop {p.flag}")
            why = p.check(v)
            if why:
                raise OptionsError(f"{p.flag} {why}")

    def value(self, name: str):
        """A parameter's value: given, else the method's default (None: the method decides)."""
        v = getattr(self, name)
        return MERGE_METHODS[self.method].defaults.get(name) if v is None else v

    def as_dict(self) -> dict:
        """The method and the parameters it reads, with their values (defaults filled in where fixed)."""
        return {"merge_method": self.method,
                **{p: self.value(p) for p in MERGE_METHODS[self.method].params}}

    def label(self) -> str:
        """The method and the values of the parameters it reads, for a summary: 'ties, density 0.3', 'sum'."""
        values = [(p, self.value(p)) for p in MERGE_METHODS[self.method].params]
        return ", ".join([self.method] + [f"{p} {_shown(v)}" for p, v in values if v is not None])

    def flags(self) -> list[str]:
        """The settings as CLI words (none for the default sum)."""
        if self.method == "sum":
            return []
        words = ["--merge-method", self.method]
        for p in MERGE_METHODS[self.method].params:
            if getattr(self, p) is not None:
                words += [MERGE_PARAMS[p].flag, _shown(getattr(self, p))]
        return words

    @classmethod
    def given(cls, method: str, values: dict) -> "MergeSettings":
        """The settings of a form that shows every parameter's box whatever the method (the page's merge tab, the
        ComfyUI Merge node): `values` maps MERGE_PARAMS names to values, None for an empty box (the method's
        default); a parameter `method` does not read is ignored, not refused as on the command line. Raises
        OptionsError for an unknown method or a bad value, ValueError for a name that is no parameter."""
        unknown = sorted(set(values) - set(MERGE_PARAMS))
        if unknown:
            raise ValueError(f"no merge parameter {unknown[0]!r} (parameters: {', '.join(MERGE_PARAMS)})")
        reads = cls(method).as_dict()  # the method (checked) and the parameters it reads
        return cls(method, **{p: v for p, v in values.items() if p in reads and v is not None})


def merged_layer(name: str, parts: list[tuple[float, LowRankLayer]], settings: MergeSettings | None = None,
                 cancelled: list[str] | None = None, positions: list[int] | None = None,
                 files: list[str] | None = None) -> LowRankLayer:
    """One layer's merged update under `settings` (None: the sum), a layer of scale 1; `positions`: each part's
    0-based place among the merge's given inputs (None: 0, 1, ...; DARE seeds its masks by it); `files`: each part's
    file name, for the errors. Raises LoraStructureError when the inputs' shapes differ, NumericalError naming the
    layer (and file) when an input's factors hold NaN or Inf, for every method, before any decomposition. A merge
    of nonzero inputs that comes out zero (a sum whose inputs cancel out; any method whose merged update is zero or
    rounding noise next to its inputs') is exact zeros, its name appended to `cancelled`."""
    from .core_space import check_shapes, finite_inputs, stacked

    settings = settings or MergeSettings()
    check_shapes(name, parts)
    finite_inputs(name, parts, files)
    if settings.method == "sum":
        return stacked(name, parts, cancelled)
    out = MERGE_METHODS[settings.method].combine(name, parts, settings, positions)
    if cancelled is not None and not bool(out.up.any()) and any(bool(lay.up.any()) and bool(lay.down.any())
                                                               for _, lay in parts):
        cancelled.append(name)  # nonzero inputs, a zero merge (they cancel, or everything was dropped)
    return out


register(MergeMethod("sum", "the weighted sum of the updates, exact (the default)",
                     maths("summed")))
register(MergeMethod("ties", "TIES-Merging (Yadav et al., arXiv 2306.01708): trim each input to its largest --density "
                     "fraction, elect signs, disjoint mean; in the core space (default density 0.2)",
                     maths("ties"), params=("density",), defaults={"density": 0.2}, basis_invariant=False))
register(MergeMethod("dare", "DARE (Yu et al., arXiv 2311.03099): keep each entry with probability --density, rescale "
                     "by 1/density, sum; seeded by --seed, in the core space (defaults 0.5, 0)",
                     maths("dare"), params=("density", "seed"), defaults={"density": 0.5, "seed": 0},
                     basis_invariant=False))
register(MergeMethod("magnitude_prune", "PEFT's magnitude_prune: trim each input to its largest --density fraction, "
                     "then sum; in the core space (default density 0.5)",
                     maths("magnitude_prune"), params=("density",), defaults={"density": 0.5}, basis_invariant=False))
register(MergeMethod("tsv", "TSV-Merge (Gargiulo et al., arXiv 2412.00081): each input's leading --density fraction "
                     "of singular directions (default 1/number of inputs), decorrelated; exact",
                     maths("tsv"), params=("density",), defaults={"density": None}))
register(MergeMethod("iso", "Iso-C (Marczak et al., arXiv 2502.04959): the sum with its singular values flattened to "
                     "their mean; exact", maths("iso")))
