"""Which setting gives which size and fidelity, from one decomposition.

`analyze(src)` decomposes every layer once (the same engine and parallel loop as `resize`), keeps only each
layer's singular values, shape and scale, and then evaluates a sweep of settings on those numbers alone: for each,
the exact size of the file `resize` would write (header, metadata and hashes included), its parameter count and
its fidelity. It also plans the budget policies (--target-size, --target-fro) that `resize` runs.

Fidelity is the Frobenius norm of each layer's update that the resized layer keeps,
fro_i = sqrt(sum_{j<k} S_ij^2 / sum_j S_ij^2), summarised over the layers in the output as
- `fro_weighted`: the size-weighted mean, each layer weighted by out_i * in_i (in_i = in_channels * kh * kw): the
  number of model weights its update touches, so a 1280x1280 projection counts 64 times a 160x160 one;
- `fro_mean`: the plain mean (sd-scripts' "Average Frobenius norm retention");
- `fro_global`: all layers as one update, scale-aware: sqrt(sum_i (a_i/r_i)^2 sum_{j<k} S_ij^2 /
  sum_i (a_i/r_i)^2 sum_j S_ij^2) - what --target-fro targets and --target-size maximises;
- `fro_min` and the worst layer's name.
Zero layers (no singular value above 0) have no fidelity and are left out of these; dropped layers are not in the
output and are left out too.
"""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ._version import __version__
from .budget import BudgetLayer, allocate_fro, allocate_size, kept_energy, next_units
from .errors import OptionsError
from .formats import Layout, LowRankLayer, detect
from .metadata import OUR_KEY, our_record, sd_scripts_fields, updated
from .options import PRECISIONS, ResizeOptions
from .schedule import Progress, through_engine
from .pipeline import layer_kind, local_path, module_unit, new_alpha, precision_of, resolve_input, retention
from .policies import ZERO_SV, get_policy
from .result import LayerResult
from .rules import choose_layer_rank, is_dropped, layer_cap, rule_hits, rule_notes
from .tensorfile import TensorInfo, open_tensor_file
from .writer import header_bytes, ordered



DEFAULT_SWEEP: dict[str, tuple] = {
    "sv_ratio": (2, 3, 4, 5, 8, 16, 32, 64, 96, 128),
    "sv_fro": (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99),
    "sv_cumulative": (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99),
    "fixed": (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256),
    "target_fro": (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99),
    "target_size": ("auto",),  # 1-2-5 sizes between the smallest and the largest file the caps allow
}
DEFAULT_PICK = dict(method="sv_fro", param=0.9)  # shown in the report when no setting is chosen
HASH_PLACEHOLDERS = ("0" * 64, "0" * 8)  # sshs_model_hash (sha256 hex) and sshs_legacy_hash (8 hex)


# ----------------------------------------------------------------------------------------------------------------
# What is kept of each layer


_BLOCK_PATTERNS = [
    (re.compile(r"(?:^|_)(?:down_blocks|input_blocks)_(\d+)"), "down {}"),
    (re.compile(r"(?:^|_)(?:mid_block|middle_block)"), "mid"),
    (re.compile(r"(?:^|_)(?:up_blocks|output_blocks)_(\d+)"), "up {}"),
    (re.compile(r"(?:^|_)double_blocks_(\d+)"), "double"),
    (re.compile(r"(?:^|_)single_blocks_(\d+)"), "single"),
    (re.compile(r"^(?:lora_)?te(\d?)_|^text_encoders?(?:_(\d))?_|^(?:lora_)?text_encoder(?:_(\d))?_"), "te"),
]


def block_of(name: str) -> str:
    """A display group for the rank map: 'down 0'..'down N', 'mid', 'up 0'..'up N' (UNet), 'double'/'single'
    (Flux), 'text encoder' (1, 2, ...), else 'other'."""
    n = name.replace(".", "_")
    for rx, label in _BLOCK_PATTERNS:
        m = rx.search(n)
        if not m:
            continue
        if label == "te":
            digit = next((g for g in m.groups() if g), "")
            return f"text encoder {digit}".strip()
        return label.format(*m.groups()) if m.groups() else label
    return "other"


@dataclass
class LayerSpectrum:
    """One layer as the analysis keeps it: singular values of up @ down (unscaled, descending), shape, alpha."""
    name: str
    kind: str
    out_features: int
    in_features: int
    old_rank: int
    alpha: float | None
    kernel: tuple[int, int] | None
    in_channels: int
    S: np.ndarray = field(repr=False)
    emit: Callable = field(repr=False, default=None)

    def __post_init__(self) -> None:
        S = np.asarray(self.S, dtype=np.float64)
        self.S = S
        self._cs = np.concatenate([[0.0], np.cumsum(S)])  # kept sum(S) for each rank k (index k)
        self._cs2 = np.concatenate([[0.0], np.cumsum(S * S)])  # kept sum(S^2)

    def kept(self, k: int) -> tuple[float, float]:
        """(sum of the k leading singular values, sum of their squares)."""
        j = min(int(k), len(self.S))
        return float(self._cs[j]), float(self._cs2[j])

    @property
    def conv(self) -> bool:
        return self.kernel is not None

    @property
    def block(self) -> str:
        return block_of(self.name)

    @property
    def full_size(self) -> int:
        return min(self.out_features, self.in_features)

    @property
    def true_scale(self) -> float:
        """alpha / rank: the strength the model applies (1 without alpha)."""
        return self.alpha / self.old_rank if self.alpha is not None else 1.0

    def new_alpha(self, k: int) -> float:
        """alpha of the resized layer as resize writes it: (alpha / rank in float32) * k, or k without alpha."""
        return new_alpha(self.name, self.alpha, self.old_rank, k)

    @property
    def energy(self) -> float:
        """Squared Frobenius norm of the scaled update dW = (alpha/rank) up @ down."""
        return float(self._cs2[-1]) * self.true_scale ** 2

    def as_dict(self) -> dict:
        return {"name": self.name, "block": self.block, "kind": self.kind, "out_features": self.out_features,
                "in_features": self.in_features, "old_rank": self.old_rank, "alpha": self.alpha,
                "scale": self.true_scale, "fro_norm": math.sqrt(self.energy),
                "numerical_rank": int(np.count_nonzero(self.S))}


class _Stub:
    """Shape and dtype of a tensor, enough for writer.header_bytes (no data)."""
    __slots__ = ("shape", "dtype", "_n", "_size")

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype):
        self.shape, self.dtype = tuple(shape), dtype
        self._n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        self._size = dtype.itemsize

    def numel(self) -> int:
        return self._n

    def element_size(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        return self._n * self._size


# ----------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class SettingRow:
    """One setting of the sweep (or the chosen one) and what `resize` would make of it."""
    label: str
    method: str  # sv_ratio | sv_fro | sv_cumulative | fixed | target_size | target_fro
    param: float | None
    args: str  # the resize flags that give this file
    output_bytes: int
    params: int  # elements of every tensor in the output (factors, alphas, copied tensors)
    fro_weighted: float
    fro_mean: float
    fro_global: float
    fro_min: float
    worst_layer: str | None
    ranks: np.ndarray = field(repr=False)
    options: ResizeOptions = field(repr=False, default=None)
    chosen: bool = False
    note: str | None = None

    def as_dict(self) -> dict:
        r = self.ranks
        return {"label": self.label, "method": self.method, "param": self.param, "args": self.args,
                "output_bytes": self.output_bytes, "params": self.params, "fro_weighted": self.fro_weighted,
                "fro_mean": self.fro_mean, "fro_global": self.fro_global, "fro_min": self.fro_min,
                "worst_layer": self.worst_layer, "rank_min": int(r.min()) if r.size else None,
                "rank_max": int(r.max()) if r.size else None, "rank_mean": float(r.mean()) if r.size else None,
                "chosen": self.chosen, "note": self.note}


@dataclass
class _Context:
    """What sizes the output besides the layers: the input's metadata, the key family, the copied tensors."""
    metadata: dict[str, str]
    layout: Layout
    passthrough: dict[str, _Stub]
    precision: str
    source_name: str


@dataclass
class Analysis:
    """Every kept layer's spectrum, a sweep of settings evaluated on it, and the chosen setting (if any)."""
    src: Path
    format: str
    precision: str
    base: ResizeOptions  # rule, caps, precision and block rules shared by every setting
    input_bytes: int
    layers: list[LayerSpectrum]
    dropped: list[str]
    rows: list[SettingRow]
    chosen: SettingRow | None
    seconds: float
    decompose_seconds: float
    notes: list[str]
    rule_hits: dict[str, int]
    _ctx: _Context = field(repr=False, default=None)
    _emit_cache: dict = field(repr=False, default_factory=dict)

    # -- sizes --------------------------------------------------------------------------------------------------
    def _emitted(self, i: int, k: int) -> dict[str, _Stub]:
        key = (i, k)
        got = self._emit_cache.get(key)
        if got is None:
            L = self.layers[i]
            dtype = PRECISIONS[self._ctx.precision]
            meta = torch.device("meta")
            old = LowRankLayer(up=torch.empty(L.out_features, L.old_rank, device=meta),
                               down=torch.empty(L.old_rank, L.in_features, device=meta), alpha=L.alpha,
                               kernel=L.kernel, in_channels=L.in_channels)
            alpha = torch.tensor(L.new_alpha(k), dtype=torch.float32).to(dtype)  # real: a family may read it
            out = L.emit(old, torch.empty(L.out_features, k, dtype=dtype, device=meta),
                         torch.empty(k, L.in_features, dtype=dtype, device=meta), alpha)
            got = {name: _Stub(tuple(t.shape), t.dtype) for name, t in out.items()}
            self._emit_cache[key] = got
        return got

    def layer_bytes(self, i: int, k: int) -> int:
        return sum(t.nbytes for t in self._emitted(i, k).values())

    def _rows_for(self, ranks: Sequence[int]) -> list[LayerResult]:
        rows = []
        for L, k in zip(self.layers, ranks):
            k = int(k)
            sum_kept, fro_kept, max_ratio = retention(L.S, k)
            rows.append(LayerResult(
                name=L.name, kind=L.kind, out_features=L.out_features, in_features=L.in_features,
                old_rank=L.old_rank, new_rank=k, old_alpha=L.alpha, new_alpha=L.new_alpha(k),
                sum_retained=sum_kept, fro_retained=fro_kept, max_ratio=max_ratio, singular_values=None))
        return rows

    def metadata_for(self, ranks: Sequence[int], opts: ResizeOptions) -> dict[str, str]:
        """The metadata `resize` writes for these ranks (hashes as placeholders of their exact length)."""
        ctx = self._ctx
        rows = self._rows_for(ranks)
        old_dim = max(r.old_rank for r in rows)
        meta = updated(ctx.metadata, sd_scripts_fields(opts, old_dim, rows[-1].new_alpha,
                                                        ctx.metadata.get("ss_training_comment", "")))
        meta[OUR_KEY] = our_record(__version__, opts, ctx.precision, ctx.source_name, self.format, rows)
        ctx.layout.finish_metadata(meta, rows)
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = HASH_PLACEHOLDERS
        return meta

    def file_size(self, ranks: Sequence[int], opts: ResizeOptions) -> tuple[int, int, int]:
        """(file bytes, header bytes, parameters) of the .safetensors file resize writes with these ranks."""
        tensors: dict[str, _Stub] = {}
        for i, k in enumerate(ranks):
            tensors.update(self._emitted(i, int(k)))
        for key, stub in self._ctx.passthrough.items():
            tensors.setdefault(key, stub)
        head = header_bytes(tensors, ordered(tensors), self.metadata_for(ranks, opts))
        data = sum(t.nbytes for t in tensors.values())
        return len(head) + data, len(head), sum(t.numel() for t in tensors.values())

    # -- ranks --------------------------------------------------------------------------------------------------
    def ranks_for(self, opts: ResizeOptions) -> tuple[np.ndarray, str | None]:
        """Each kept layer's rank under `opts` (a budget is planned), and a note (or None)."""
        if opts.has_target and not (opts.ranks and all(L.name in opts.ranks for L in self.layers)):
            return self.plan(opts)
        policy = get_policy(opts.method)
        return np.array([choose_layer_rank(L.name, L.S, L.full_size, L.conv, opts, policy).rank
                         for L in self.layers], dtype=np.int64), None

    def _budget_layers(self, opts: ResizeOptions) -> list[BudgetLayer]:
        out = []
        for i, L in enumerate(self.layers):
            what, cap = layer_cap(L.name, L.conv, opts)
            if opts.ranks and L.name in opts.ranks:
                what, cap = "rank", opts.ranks[L.name]
            S = L.S
            if opts.rule == "kohya":
                zero = not (S.size and S[0] > ZERO_SV)
                limit = max(1, L.full_size)
            else:
                zero = not (S.size and S[0] > 0)
                limit = int(np.count_nonzero(S))
            cost = self.layer_bytes(i, 2) - self.layer_bytes(i, 1)
            if zero:
                lo = hi = 1
            elif what == "rank":
                lo = hi = max(1, min(cap, limit))
            else:
                hi = limit if cap is None else max(1, min(cap, limit))
                lo = min(2, hi) if opts.rule == "kohya" else 1
            gains = np.zeros(max(hi, len(S)))
            gains[:len(S)] = (S * L.true_scale) ** 2
            out.append(BudgetLayer(lo, hi, cost, gains))
        return out

    def plan(self, opts: ResizeOptions) -> tuple[np.ndarray, str | None]:
        """Ranks for a budget policy (see budget.py and the README's allocation rule), and a note (or None).

        Raises OptionsError when --target-size is below the smallest file the options allow."""
        layers = self._budget_layers(opts)
        if opts.target_fro is not None:
            total = sum(L.energy for L in self.layers)
            ranks, reached = allocate_fro(layers, opts.target_fro, total)
            if reached:
                return ranks, None
            best = math.sqrt(kept_energy(layers, ranks) / total) if total > 0 else float("nan")
            return ranks, (f"--target-fro {opts.target_fro} is not reachable under the caps and rules; "
                           f"the best is {best:.4f} (every layer at its highest allowed rank)")
        target = opts.target_size
        lo = np.array([L.lo for L in layers])
        smallest = self.file_size(lo, opts)[0]
        if smallest > target:
            raise OptionsError(
                f"--target-size {target} bytes is below the smallest file these options allow: {smallest} bytes "
                f"(every layer at rank {'2' if opts.rule == 'kohya' else '1'}); raise the target, save in fp16/bf16, "
                "or leave modules out with --rule 'PATTERN=drop'")
        hi = np.array([L.hi for L in layers])
        costs = np.array([L.cost for L in layers], dtype=np.float64)
        # file = constant bytes (alphas, copied tensors) + header + sum(cost * rank); the header grows with the
        # ranks (longer numbers), so its size at the highest ranks is a safe first guess, refined below
        size_lo, head_lo, _ = self.file_size(lo, opts)
        constant = size_lo - head_lo - float(np.dot(costs, lo))
        head_guess = self.file_size(hi, opts)[1]
        best = lo
        for _ in range(4):  # keep the best allocation that fits
            plan = allocate_size(layers, target - constant - head_guess)
            if plan is None:
                break
            size, head, _ = self.file_size(plan.ranks, opts)
            if size <= target:
                best = plan.ranks
                if head == head_guess:
                    break
                head_guess = head
            else:
                head_guess += size - target
        ranks = best.copy()
        # fill: raise single layers while the exact size still fits (best gain per byte first)
        size = self.file_size(ranks, opts)[0]
        while True:
            slack = target - size
            grew = False
            for i in next_units(layers, ranks):
                if layers[i].cost > slack:
                    continue
                ranks[i] += 1
                s2 = self.file_size(ranks, opts)[0]
                if s2 <= target:
                    size, slack, grew = s2, target - s2, True
                else:
                    ranks[i] -= 1
            if not grew:
                break
        return ranks, None

    # -- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, opts: ResizeOptions, label: str | None = None, method: str | None = None,
                 param: float | None = None) -> SettingRow:
        """Size and fidelity of the file `resize` would write with `opts` (which must share this analysis's rank
        rule, precision and block rules)."""
        ranks, note = self.ranks_for(opts)
        size, _, params = self.file_size(ranks, opts)
        fro = np.full(len(self.layers), np.nan)
        w = np.zeros(len(self.layers))
        kept_e = tot_e = 0.0
        for i, (L, k) in enumerate(zip(self.layers, ranks)):
            t = float(L._cs2[-1])
            kk = L.kept(k)[1]
            if t > 0:
                fro[i] = math.sqrt(kk / t)
                w[i] = L.out_features * L.in_features
            s2 = L.true_scale ** 2
            kept_e += kk * s2
            tot_e += t * s2
        live = ~np.isnan(fro)
        if live.any():
            worst = int(np.nanargmin(fro))
            stats = (float(np.sum(fro[live] * w[live]) / np.sum(w[live])), float(np.mean(fro[live])),
                     math.sqrt(kept_e / tot_e) if tot_e > 0 else float("nan"), float(fro[worst]),
                     self.layers[worst].name)
        else:
            stats = (float("nan"),) * 4 + (None,)
        if method is None:
            method = ("target_size" if opts.target_size is not None else "target_fro" if opts.target_fro is not None
                      else opts.method or "fixed")
            param = (opts.target_size if opts.target_size is not None else opts.target_fro
                     if opts.target_fro is not None else opts.param if opts.method else opts.rank)
        return SettingRow(label or describe(opts), method, param, resize_args(opts), size, params, *stats,
                          ranks=ranks, options=opts, note=note)

    # -- output -------------------------------------------------------------------------------------------------
    def pick(self) -> SettingRow:
        """The chosen setting, else the default pick (sv_fro 0.9 under the caps) for the report's rank map."""
        if self.chosen is not None:
            return self.chosen
        return self.evaluate(replace(self.base, **DEFAULT_PICK), label=describe(replace(self.base, **DEFAULT_PICK))
                             + " (default pick)")

    def as_dict(self) -> dict:
        pick = self.chosen
        return {
            "src": str(self.src), "format": self.format, "precision": self.precision, "rule": self.base.rule,
            "rank_cap": self.base.rank, "conv_rank_cap": self.base.conv_rank,
            "block_rules": [str(r) for r in self.base.block_rules], "rule_hits": self.rule_hits,
            "input_bytes": self.input_bytes, "seconds": self.seconds, "decompose_seconds": self.decompose_seconds,
            "fidelity": {"fro_weighted": "mean of per-layer Frobenius retained, weighted by out*in",
                         "fro_mean": "plain mean of per-layer Frobenius retained",
                         "fro_global": "Frobenius retained of all layers together, scaled by alpha/rank",
                         "fro_min": "the lowest per-layer Frobenius retained"},
            "dropped": self.dropped, "notes": self.notes,
            "settings": [r.as_dict() for r in self.rows],
            "chosen": pick.as_dict() if pick else None,
            "chosen_ranks": {L.name: int(k) for L, k in zip(self.layers, pick.ranks)} if pick else None,
            "layers": [L.as_dict() for L in self.layers],
        }


def describe(opts: ResizeOptions) -> str:
    """Short label of a setting: 'sv_ratio 8, cap 128', 'rank 32 (conv 16)', 'target_size 50.0 MB'."""
    from .report import human_bytes
    if opts.target_size is not None:
        s = f"target_size {human_bytes(opts.target_size)}"
    elif opts.target_fro is not None:
        s = f"target_fro {opts.target_fro:g}"
    elif opts.method:
        s = f"{opts.method} {opts.param:g}"
    else:
        s = f"rank {opts.rank}"
        if opts.conv_rank != opts.rank:
            s += f" (conv {opts.conv_rank})"
        return s
    if opts.rank is not None:
        s += f", cap {opts.rank}" + (f"/{opts.conv_rank}" if opts.conv_rank != opts.rank else "")
    elif opts.conv_rank is not None:
        s += f", conv cap {opts.conv_rank}"
    return s


def resize_args(opts: ResizeOptions) -> str:
    """The `lora-resize resize` flags that give this setting."""
    a = []
    if opts.target_size is not None:
        a.append(f"--target-size {opts.target_size}")
    elif opts.target_fro is not None:
        a.append(f"--target-fro {opts.target_fro:g}")
    elif opts.method:
        a.append(f"--method {opts.method} --param {opts.param:g}")
    if opts.rank is not None:
        a.append(f"--rank {opts.rank}")
    if opts.conv_rank is not None and opts.conv_rank != opts.rank:
        a.append(f"--conv-rank {opts.conv_rank}")
    if opts.rule != "exact":
        a.append(f"--rank-rule {opts.rule}")
    if opts.precision:
        a.append(f"--precision {opts.precision}")
    a += [f"--rule '{r}'" for r in opts.block_rules]
    return " ".join(a)


# ----------------------------------------------------------------------------------------------------------------
# The decomposition pass


def spectra(units: list, device: torch.device, threads: int | None = None, progress: Progress | None = None
            ) -> list[LayerSpectrum]:
    """Decompose every unit (pipeline.Unit: name, load, emit); keep only what the sweep needs."""
    def start(unit, layer, dec) -> LayerSpectrum:
        out_f, in_f = dec.shape
        return LayerSpectrum(unit.name, layer_kind(layer), out_f, in_f, layer.rank, layer.alpha, layer.kernel,
                             layer.in_channels, np.array(dec.S, dtype=np.float64), unit.emit)

    return list(through_engine(units, device, start, lambda s: s, threads, progress))


def _base_options(options: ResizeOptions | None, fields: dict) -> tuple[ResizeOptions, ResizeOptions | None]:
    """(base, chosen): the shared settings (rule, caps, precision, rules, device, threads), and the chosen
    setting when the options name one (a rank, a method or a budget)."""
    shared = ("rank", "conv_rank", "rule", "precision", "block_rules", "device", "threads")
    if options is not None:
        if fields:
            raise OptionsError("pass either options=ResizeOptions(...) or option fields, not both")
        chosen = options
        src = {k: getattr(options, k) for k in shared}
    else:
        setting = any(fields.get(k) is not None for k in ("rank", "method", "target_size", "target_fro", "ranks"))
        chosen = ResizeOptions(**fields) if setting else None
        src = {k: fields[k] for k in shared if k in fields}
        unknown = set(fields) - set(shared) - {"method", "param", "target_size", "target_fro", "ranks"}
        if unknown:
            raise OptionsError(f"unknown option(s) for analyze: {', '.join(sorted(unknown))}")
    base = ResizeOptions(method="sv_fro", param=1.0, **src)  # validates and normalises the shared fields
    base.method = base.param = None  # a carrier of the shared fields; every setting is a validated copy
    return base, chosen


# ----------------------------------------------------------------------------------------------------------------
# The sweep


def _sizes_125(lo: int, hi: int) -> list[int]:
    out = []
    e = 10 ** max(0, int(math.floor(math.log10(max(lo, 1)))))
    while e <= hi * 10:
        for m in (1, 2, 5):
            v = m * e
            if lo < v < hi:
                out.append(v)
        e *= 10
    return out


def sweep_options(base: ResizeOptions, sweep: Mapping[str, Sequence], analysis: Analysis) -> list[ResizeOptions]:
    """The ResizeOptions of every setting in `sweep` (fixed ranks above the cap are left out)."""
    out = []
    for method, values in sweep.items():
        for v in values:
            if method == "fixed":
                if base.rank is not None and v > base.rank:
                    continue
                conv = v if base.conv_rank is None else min(v, base.conv_rank)
                out.append(replace(base, method=None, param=None, rank=int(v), conv_rank=int(conv)))
            elif method == "target_fro":
                out.append(replace(base, method=None, param=None, target_fro=float(v)))
            elif method == "target_size":
                if v == "auto":
                    probe = replace(base, method=None, param=None, target_size=1)
                    layers = analysis._budget_layers(probe)
                    lo = analysis.file_size(np.array([L.lo for L in layers]), probe)[0]
                    hi = analysis.file_size(np.array([L.hi for L in layers]), probe)[0]
                    out += [replace(base, method=None, param=None, target_size=s) for s in _sizes_125(lo, hi)]
                else:
                    out.append(replace(base, method=None, param=None, target_size=v))
            else:
                get_policy(method)
                out.append(replace(base, method=method, param=float(v)))
    return out


def analyze(src: str | os.PathLike, options: ResizeOptions | None = None, *, progress: Progress | None = None,
            sweep: Mapping[str, Sequence] | None = None, **option_fields) -> Analysis:
    """Decompose the LoRA at `src` once and evaluate a sweep of settings (DEFAULT_SWEEP unless given) on it.

    Option fields: rank / conv_rank (the cap of every dynamic and budget setting, as in resize), rule
    ('exact'|'kohya'), precision (default: the input's), block_rules, device, threads; and optionally the chosen
    setting (method + param, rank, target_size or target_fro), evaluated as `Analysis.chosen`.

    Raises: OptionsError, InputFileError, LoraStructureError, NumericalError."""
    t0 = time.perf_counter()
    base, chosen = _base_options(options, option_fields)
    src = resolve_input(local_path(src, "input"))
    device = base.resolve_device()
    reader = open_tensor_file(src)
    try:
        layout = detect(reader.infos(), reader.metadata, src)
        precision = precision_of(layout, reader, base.precision)
        names = [m.name for m in layout.modules]
        hits = rule_hits(base.block_rules, names)
        notes = rule_notes(base.block_rules, names)
        kept = [m for m in layout.modules if not is_dropped(base.block_rules, m.name)]
        if not kept:
            raise OptionsError("every module is dropped by the rules; nothing would be left to write")
        t1 = time.perf_counter()
        layers = spectra([module_unit(m, reader) for m in kept], device, base.threads, progress)
        t_dec = time.perf_counter() - t1
        ctx = _context(reader, layout, precision, src)
    finally:
        reader.close()
    base.precision = precision
    a = Analysis(src=src, format=layout.format, precision=precision, base=base,
                 input_bytes=src.stat().st_size, layers=layers, dropped=[n for n in names if is_dropped(
                     base.block_rules, n)], rows=[], chosen=None, seconds=0.0, decompose_seconds=t_dec,
                 notes=notes + list(layout.notes), rule_hits=hits, _ctx=ctx)
    for opts in sweep_options(a.base, DEFAULT_SWEEP if sweep is None else sweep, a):
        a.rows.append(a.evaluate(opts))
    if chosen is not None:
        a.chosen = a.evaluate(replace(chosen, precision=precision))
        a.chosen.chosen = True
        if a.chosen.note:
            a.notes.append(a.chosen.note)
    a.seconds = time.perf_counter() - t0
    return a


def _context(reader, layout: Layout, precision: str, src: Path) -> _Context:
    dtype = PRECISIONS[precision]
    infos: Mapping[str, TensorInfo] = reader.infos()
    passthrough = {k: _Stub(infos[k].shape, dtype if infos[k].dtype.is_floating_point else infos[k].dtype)
                   for k in layout.passthrough}
    return _Context(dict(reader.metadata), layout, passthrough, precision, src.name)


def plan_ranks(units: list, reader, layout: Layout, precision: str, src: Path, opts: ResizeOptions,
               device: torch.device, progress: Progress | None = None) -> tuple[dict[str, int], list[str]]:
    """For `resize`: the per-layer ranks of a budget policy (decomposition pass + plan); ({name: rank}, notes)."""
    layers = spectra(units, device, opts.threads, progress)
    a = Analysis(src=src, format=layout.format, precision=precision, base=opts, input_bytes=0, layers=layers,
                 dropped=[], rows=[], chosen=None, seconds=0.0, decompose_seconds=0.0, notes=[], rule_hits={},
                 _ctx=_context(reader, layout, precision, src))
    ranks, note = a.plan(opts)
    return {L.name: int(k) for L, k in zip(layers, ranks)}, [note] if note else []


def analysis_from_result(result, sweep: Mapping[str, Sequence] | None = None) -> Analysis:
    """An Analysis built from a finished resize (its rows hold every layer's singular values): the sweep around
    it without decomposing again, with the resize's own setting as the chosen row."""
    from dataclasses import fields as dc_fields
    t0 = time.perf_counter()
    names = {f.name for f in dc_fields(ResizeOptions)}
    chosen = ResizeOptions(**{k: v for k, v in result.options.items() if k in names})
    base, _ = _base_options(replace(chosen), {})
    base.precision = result.precision
    reader = open_tensor_file(result.src)
    try:
        layout = detect(reader.infos(), reader.metadata, result.src)
        modules = {m.name: m for m in layout.modules}
        layers = []
        for row in result.layers:
            kernel = None
            m = re.fullmatch(r"conv(\d+)x(\d+)", row.kind)
            if m:
                kernel = (int(m.group(1)), int(m.group(2)))
            in_ch = row.in_features // (kernel[0] * kernel[1]) if kernel else row.in_features
            layers.append(LayerSpectrum(row.name, row.kind, row.out_features, row.in_features, row.old_rank,
                                        row.old_alpha, kernel, in_ch, row.singular_values, modules[row.name].emit))
        ctx = _context(reader, layout, result.precision, result.src)
        names_all = [m.name for m in layout.modules]
    finally:
        reader.close()
    a = Analysis(src=result.src, format=result.format, precision=result.precision, base=base,
                 input_bytes=result.input_bytes, layers=layers,
                 dropped=[n for n in names_all if is_dropped(base.block_rules, n)], rows=[], chosen=None,
                 seconds=0.0, decompose_seconds=0.0, notes=[], rule_hits=result.options.get("rule_hits") or {},
                 _ctx=ctx)
    for opts in sweep_options(a.base, DEFAULT_SWEEP if sweep is None else sweep, a):
        a.rows.append(a.evaluate(opts))
    a.chosen = a.evaluate(chosen, label=describe(chosen) + " (this resize)")
    a.chosen.chosen = True
    if result.dst.suffix.lower() == ".safetensors" and a.chosen.output_bytes != result.output_bytes:
        a.notes.append(f"predicted {a.chosen.output_bytes} bytes, the file has {result.output_bytes}")
    a.seconds = time.perf_counter() - t0
    return a
