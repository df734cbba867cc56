"""What the jobs return, as plain data that the CLI and the reports render: a resize or merge (`ResizeResult`, one
`LayerResult` per layer) and an analysis (`Analysis`, one `SettingRow` per setting of its sweep)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np


@dataclass(frozen=True)
class BaseNorms:
    """The base-model weight a module patches (`key`: its key(s), with [start:stop] rows where it is part of a
    fused weight) and its norms: Frobenius ||W||_F and spectral ||W||_2 (W flattened to out x in*kernel)."""
    key: str
    fro: float
    spectral: float


@dataclass
class LayerResult:
    """One resized layer. Retained fractions are of sum(S) and of the Frobenius norm of dW."""
    name: str
    kind: str  # "linear" or "conv<kh>x<kw>"
    out_features: int
    in_features: int  # in_channels * kh * kw
    old_rank: int
    new_rank: int
    old_alpha: float | None
    new_alpha: float
    sum_retained: float
    fro_retained: float
    max_ratio: float
    clamped: bool = False
    zero: bool = False
    underflow: bool = False  # non-zero layer whose saved factors are all zeros (too small for the save dtype)
    scale: float = 1.0  # the strength the model applied to the input layer: alpha / rank, a config's scale, or 1
    conversion: str | None = None  # a converted layer kept whole: "exact" (factors copied), else why re-rounded
    singular_values: np.ndarray | None = field(default=None, repr=False)
    # with --base (None without it, or for a module whose weight the base does not have), relative to the base
    # weight W the module patches: the LoRA's strength ||dW||_F / ||W||_F and spectral ratio ||dW||_2 / ||W||_2,
    # and the loss of this resize ||dW - dW_k|| / ||W|| in both norms
    base: BaseNorms | None = None
    strength: float | None = None
    spectral_ratio: float | None = None
    base_loss_fro: float | None = None
    base_loss_spectral: float | None = None
    # a merge's inputs, in input order (core.contributions): each one's share of the written layer W,
    # <tau_i, W>_F / ||W||_F^2 (they add up to 1 for the weighted sum), and the fraction of its energy ||tau_i||_F^2
    # inside W's column and row spaces, and that energy (what weighs kept over layers); an input without the layer:
    # share 0, kept NaN, energy 0. None outside a merge.
    input_shares: tuple[float, ...] | None = None
    input_kept: tuple[float, ...] | None = None
    input_energy: tuple[float, ...] | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("singular_values")
        return d


@dataclass
class ResizeResult:
    """The outcome of `resize` or `merge`: per-layer rows, sizes, timing, and the tensors copied beside the
    factors (`passthrough`, in file order; `copied`: each one's kind, e.g. 'bias diff', 'DoRA magnitude', 'other';
    `cast`: those an explicit precision cast to it - the others are copied bit for bit; `summed`: those a merge
    wrote as the weighted sum of its inputs', as loaders add them)."""
    src: Path
    dst: Path | None  # None: made in memory (ops.resize.resized)
    format: str
    precision: str
    options: dict
    layers: list[LayerResult]
    passthrough: list[str]
    input_bytes: int
    output_bytes: int
    seconds: float
    metadata: dict[str, str]
    notes: list[str] = field(default_factory=list)
    copied: dict[str, str] = field(default_factory=dict)
    cast: list[str] = field(default_factory=list)
    summed: list[str] = field(default_factory=list)

    def _kinds(self, keys) -> dict[str, int]:
        out: dict[str, int] = {}
        for k in keys:
            kind = self.copied.get(k, "other")
            out[kind] = out.get(kind, 0) + 1
        return out

    @property
    def copied_kinds(self) -> dict[str, int]:
        """How many tensors of each kind were copied (unchanged or cast)."""
        return self._kinds(self.passthrough)

    @property
    def unchanged_kinds(self) -> dict[str, int]:
        """How many tensors of each kind were copied bit for bit."""
        changed = {*self.cast, *self.summed}
        return self._kinds(k for k in self.passthrough if k not in changed)

    @property
    def summed_kinds(self) -> dict[str, int]:
        """How many tensors of each kind a merge wrote as the weighted sum of its inputs' (and did not cast)."""
        cast = set(self.cast)
        return self._kinds(k for k in self.summed if k not in cast)

    @property
    def cast_kinds(self) -> dict[str, int]:
        """How many copied tensors of each kind were cast to the precision asked for."""
        return self._kinds(self.cast)

    @property
    def zero_layers(self) -> list[str]:
        """Layers whose update is zero (untrained modules): kept as rank-1 zeros."""
        return [x.name for x in self.layers if x.zero]

    @property
    def mean_fro(self) -> float:
        """Plain mean of per-layer Frobenius retention (sd-scripts' 'Average Frobenius norm retention')."""
        v = [x.fro_retained for x in self.layers if x.fro_retained == x.fro_retained]
        return float(np.mean(v)) if v else float("nan")

    @property
    def fidelity(self) -> dict:
        """The MEASURES (w-mean, mean, global, min) and the worst layer's name, as for an analyze row."""
        def energies(x: LayerResult) -> tuple[float, float]:
            if x.singular_values is None:
                return float("nan"), float("nan")
            cs2 = np.cumsum(np.asarray(x.singular_values, dtype=np.float64) ** 2)
            if not cs2.size:
                return 0.0, 0.0
            return float(cs2[min(x.new_rank, cs2.size) - 1]) * x.scale ** 2, float(cs2[-1]) * x.scale ** 2
        return fidelity((x.name, x.fro_retained, x.out_features * x.in_features, *energies(x)) for x in self.layers)

    @property
    def std_fro(self) -> float:
        v = [x.fro_retained for x in self.layers if x.fro_retained == x.fro_retained]
        return float(np.std(v)) if v else float("nan")

    @property
    def min_fro(self) -> LayerResult | None:
        """The layer that keeps least of its Frobenius norm."""
        v = [x for x in self.layers if x.fro_retained == x.fro_retained]
        return min(v, key=lambda x: x.fro_retained) if v else None

    @property
    def clamped(self) -> list[LayerResult]:
        return [x for x in self.layers if x.clamped]

    def as_dict(self) -> dict:
        worst = self.min_fro
        return {
            "src": str(self.src), "dst": str(self.dst), "format": self.format, "precision": self.precision,
            "options": self.options, "input_bytes": self.input_bytes, "output_bytes": self.output_bytes,
            "seconds": self.seconds, **self.fidelity, "fidelity": {k: FIDELITY[k] for k in MEASURES},
            "mean_fro_retained": self.mean_fro,
            "min_fro_retained": worst.fro_retained if worst else None, "min_fro_layer": worst.name if worst else None,
            "passthrough": self.passthrough, "copied": self.copied_kinds,
            "cast": self.cast_kinds, "summed": self.summed_kinds, "zero_layers": self.zero_layers,
            "notes": self.notes, "layers": [x.as_dict() for x in self.layers],
        }


@dataclass
class SettingRow:
    """One setting of an analysis sweep (or the chosen one) and what `resize` would make of it. Fidelity measures
    are described in ops/analyze.py."""
    label: str
    method: str  # a policy (sv_ratio, sv_fro, sv_cumulative, fixed) or a budget (target_size, target_fro)
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
    options: object = field(repr=False, default=None)  # the ResizeOptions of this setting
    header_bytes: int = 0  # of output_bytes, the safetensors header (metadata included)
    # with --base: the loss relative to the base, all layers with a base weight together (sqrt(sum ||dW - dW_k||_F^2
    # / sum ||W||_F^2)), and the largest layer's ||dW - dW_k||_F / ||W||_F with its name
    base_loss: float | None = None
    base_loss_max: float | None = None
    base_worst: str | None = None
    chosen: bool = False
    note: str | None = None
    # with --base MODEL --effect: how much of the change the LoRA makes to the model's output this setting loses,
    # mean over probes of ||eps_setting - eps_original|| / ||eps_original - eps_base||; None: not measured
    effect_error: float | None = None
    precision: str | None = None  # the save precision of the file this row sizes (fp16, bf16, float)
    # in Analysis.at_precisions' rows: what rounding the factors to `precision` loses, ||dW_k,written - dW_k||_F /
    # ||dW||_F over the sampled layers (inf: resize refuses that precision, `note` says why); None: not measured
    rounding_error: float | None = None

    def as_dict(self) -> dict:
        r = self.ranks
        return {"label": self.label, "method": self.method, "param": self.param, "args": self.args,
                "output_bytes": self.output_bytes, "header_bytes": self.header_bytes, "params": self.params, "fro_weighted": self.fro_weighted,
                "fro_mean": self.fro_mean, "fro_global": self.fro_global, "fro_min": self.fro_min,
                "worst_layer": self.worst_layer, "rank_min": int(r.min()) if r.size else None,
                "rank_max": int(r.max()) if r.size else None, "rank_mean": float(r.mean()) if r.size else None,
                "chosen": self.chosen, "note": self.note, "base_loss": self.base_loss,
                "base_loss_max": self.base_loss_max, "base_worst": self.base_worst,
                "effect_error": self.effect_error, "precision": self.precision,
                "rounding_error": self.rounding_error}


# The recommendation's rules (ops.analyze.recommend; here, where the CLI's help reads them without the jobs). With
# effect errors measured (analyze --base MODEL --effect): the smallest file that loses at most this share of the
# LoRA's change to the model's output (--max-effect-error).
DEFAULT_MAX_EFFECT_ERROR = 0.05
# Without them, a rule on the weights alone: the smallest file in which every layer keeps at least this share of
# its update's Frobenius norm (the rule of `--method sv_fro --param 0.9`, applied to every setting of the sweep).
WEIGHT_SPACE_MIN_FRO = 0.90
# How the base model is probed and rendered (analyze --effect, preview; here so the CLI's help states them without
# importing the jobs): the seed of the probes' and pictures' initial noise, the denoiser calls recorded per prompt
# (spread over the sampling schedule) and the sampling steps of a picture.
DEFAULT_SEED = 0
DEFAULT_PROBE_STEPS = 4
DEFAULT_RENDER_STEPS = 20
# The bounds every probing and rendering option is checked against (ops.effect: Probing, check_steps): a step count
# beyond the sampling schedules' length makes no sense (diffusers' schedulers index past their 1000 training
# timesteps) and this many already takes minutes a picture; a side beyond MAX_SIDE pixels would allocate tens of
# GB; a seed is what torch.Generator.manual_seed takes as a non-negative 64-bit signed integer.
MAX_STEPS = 200
MAX_SIDE = 2048
MAX_SEED = 2 ** 63 - 1

# The fidelity measures of a resize and of every sweep row, by field: (the name every printout, report and page
# shows, what it is). Each layer's fidelity is fro_i = sqrt(kept sum S_i^2 / sum S_i^2), the Frobenius norm of
# its update that the resized layer keeps; zero layers have none and are left out.
MEASURES = {
    "fro_weighted": ("w-mean", "the layers' mean, each weighted by out*in"),
    "fro_mean": ("mean", "the layers' plain mean (sd-scripts' average)"),
    "fro_global": ("global", "all layers as one alpha/rank-scaled update"),
    "fro_min": ("min", "the worst layer"),
}
FIDELITY = {**{k: f"Frobenius retained: {v[1]}" for k, v in MEASURES.items()},
            "base_loss": "with --base: sqrt(sum over layers of ||dW - dW_k||_F^2 / sum of their base weights' "
                         "||W||_F^2)",
            "base_loss_max": "with --base: the largest layer's ||dW - dW_k||_F / ||W||_F",
            "effect_error": "with --base MODEL --effect: the mean over probes of ||eps_setting - eps_original|| / "
                            "||eps_original - eps_base||, the share of the LoRA's change to the model's output "
                            "that the setting loses"}


def fidelity(layers: Iterable[tuple[str, float, float, float, float]]) -> dict:
    """The MEASURES of layers given as (name, fro_i, weight out_i*in_i, kept energy, total energy), energies
    scaled (s_i^2 sum S^2, s_i = alpha_i/r_i), plus `worst_layer`: the name of the layer with fro_min. fro_i NaN
    marks a zero layer (left out; all NaN: every measure NaN, worst None). One definition for `resize` and
    `analyze` (ResizeResult.fidelity, the analyze sweep's rows)."""
    rows = list(layers)
    fro = np.array([r[1] for r in rows], dtype=float)
    w = np.array([r[2] for r in rows], dtype=float)
    kept, total = sum(r[3] for r in rows), sum(r[4] for r in rows)
    live = ~np.isnan(fro)
    if not live.any():
        return dict(fro_weighted=float("nan"), fro_mean=float("nan"), fro_global=float("nan"),
                    fro_min=float("nan"), worst_layer=None)
    worst = int(np.nanargmin(fro))
    return dict(fro_weighted=float(np.sum(fro[live] * w[live]) / np.sum(w[live])), fro_mean=float(np.mean(fro[live])),
                fro_global=math.sqrt(kept / total) if total > 0 else float("nan"), fro_min=float(fro[worst]),
                worst_layer=rows[worst][0])


@dataclass
class Analysis:
    """Every kept layer's spectrum (core.spectrum.Spectrum), its display block, a sweep of settings evaluated on
    them, the chosen setting (if any: a setting the caller named, never the cap alone), and `recommended`: the
    sweep row `ops.analyze.recommend` names, with `recommended_reason` saying by which rule and why.
    `shared`: the options every setting shares (rank rule, caps, precision, block rules, output format)."""
    src: Path
    format: str
    precision: str
    shared: object
    input_bytes: int
    layers: list
    blocks: list[str]
    dropped: list[str]
    rows: list[SettingRow]
    chosen: SettingRow | None
    recommended: SettingRow | None
    recommended_reason: str
    seconds: float
    decompose_seconds: float
    notes: list[str]
    rule_hits: dict[str, int]
    command: str | None = None  # what writes a row's file, before its flags (None: `lora-resize resize SRC -o OUT`)
    _evaluate: Callable | None = field(default=None, repr=False)
    _at_precisions: Callable | None = field(default=None, repr=False)
    _precision_rows: dict = field(default_factory=dict, repr=False)

    def evaluate(self, options, label: str | None = None) -> SettingRow:
        """Size and fidelity of the file resize writes with any other ResizeOptions, from the same spectra: its
        rank rule, precision (None: the input's) and rules are honoured, drop rules included where they leave out
        modules the analysis kept. Raises OptionsError for what needs the file read again: another output
        format, architecture or base, or a module this analysis dropped."""
        return self._evaluate(options, label)

    def at_precisions(self, row: SettingRow | None = None) -> tuple[list[SettingRow], str]:
        """`row` (default: `shown`, the chosen else the recommended setting) saved at fp16, bf16 and float, from
        the same decomposition: exact sizes, fidelity, and each precision's measured `rounding_error`, with a
        sentence saying what the rounding was measured on (ops.analyze.at_precisions; computed once per row).
        ([], why) without a row."""
        row = row or self.shown
        if row is None or self._at_precisions is None:
            return [], "no setting to show"
        if id(row) not in self._precision_rows:
            self._precision_rows[id(row)] = (row, *self._at_precisions(row))
        return self._precision_rows[id(row)][1:]

    @property
    def shown(self) -> SettingRow | None:
        """The setting the per-layer views show: the chosen one, else the recommended one."""
        return self.chosen or self.recommended

    def _precisions_dict(self) -> dict | None:
        rows, note = self.at_precisions()
        return {"setting": self.shown.label, "rows": [r.as_dict() for r in rows], "note": note} if rows else None

    def as_dict(self) -> dict:
        pick = self.chosen
        rec = self.recommended
        b = self.shared
        return {
            "src": str(self.src), "format": self.format, "precision": self.precision, "rank_rule": b.rank_rule,
            "rank_cap": b.rank, "conv_rank_cap": b.conv_rank,
            "block_rules": [str(r) for r in b.block_rules], "block_weights": b.block_weights,
            "rule_hits": self.rule_hits,
            "input_bytes": self.input_bytes, "seconds": self.seconds, "decompose_seconds": self.decompose_seconds,
            "fidelity": dict(FIDELITY), "dropped": self.dropped, "notes": self.notes,
            "settings": [r.as_dict() for r in self.rows],
            "chosen": pick.as_dict() if pick else None,
            "chosen_ranks": {L.name: int(k) for L, k in zip(self.layers, pick.ranks)} if pick else None,
            "recommended": {**rec.as_dict(), "reason": self.recommended_reason} if rec else None,
            "precisions": self._precisions_dict(),
            "layers": [{"name": L.name, "block": blk, **L.as_dict()} for L, blk in zip(self.layers, self.blocks)],
        }
