"""Which setting gives which size and fidelity, from one decomposition.

`analyze(src)` decomposes every layer once (the same engine as `resize`), keeps only each layer's spectrum, and
then evaluates a sweep of settings on those numbers alone: for each, the ranks `resize` would choose (the same
planning step, ranks/plan.py), the exact size of the file it would write (io/sizing.py: header, metadata and
hashes included), its parameter count and its fidelity. The sweep's settings come from the registries: every
policy's and budget's own sweep values.

Fidelity is the Frobenius norm of each layer's update that the resized layer keeps,
fro_i = sqrt(sum_{j<k} S_ij^2 / sum_j S_ij^2), summarised over the layers in the output as
- `fro_weighted`: the size-weighted mean, each layer weighted by out_i * in_i (in_i = in_channels * kh * kw): the
  number of model weights its update touches, so a 1280x1280 projection counts 64 times a 160x160 one;
- `fro_mean`: the plain mean (sd-scripts' "Average Frobenius norm retention");
- `fro_global`: all layers as one update, scale-aware: sqrt(sum_i s_i^2 sum_{j<k} S_ij^2 / sum_i s_i^2 sum_j S_ij^2)
  with s_i the layer's scale (alpha_i / r_i) - what --target-fro targets and --target-size maximises;
- `fro_min` and the worst layer's name.
Zero layers (no singular value above 0) have no fidelity and are left out of these; dropped layers are not in the
output and are left out too.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import time
from dataclasses import fields, replace
from functools import partial
from typing import Callable, ContextManager, Iterator, Mapping, Sequence

import torch

from ..core.schedule import Progress, compute_device, decompositions
from ..core.spectrum import Spectrum
from ..core.truncate import SAVE_DTYPES, on_host
from ..errors import NumericalError, OptionsError
from ..formats import read_layout
from ..formats.blocks import block_of
from ..formats.convert import copied_sources
from ..io.metadata import InputRecord
from ..io.paths import local_path, resolve_input
from ..io.reader import open_tensor_file
from ..io.sizing import OutputSizer
from ..options import SETTING_FIELDS as SWEPT
from ..options import ResizeOptions, option_fields
from ..ranks.budgets import BUDGETS
from ..ranks.constraints import accepts_rank
from ..ranks.plan import budget_bounds, plan
from ..ranks.policies import FIXED, POLICIES
from ..ranks.rules import RuleOutcome, apply_rules
from ..results import DEFAULT_MAX_EFFECT_ERROR, WEIGHT_SPACE_MIN_FRO, Analysis, SettingRow, fidelity
from ..units import format_size
from .diffs import full_diffs_as_pairs, ruled_jobs
from .effect import Probing
from .job import (LayerJob, Output, alpha_rule, metadata_for, output_scale, precision_of, rules_outcome, sizer_for,
                  spectra, start_layer, strengthened_companions, with_base)

# what names a chosen setting: what a sweep's settings replace (a method and its parameter - `method="fixed"` with
# a rank names that fixed rank -, a budget, explicit ranks); every other user-facing option is shared by all the
# settings of the sweep, `rank`/`conv_rank` included: alone they are the cap of every setting, not a setting
CHOSEN_FIELDS = SWEPT
SHARED_FIELDS = tuple(f.name for f in option_fields() if f.name not in SWEPT)
# a setting that makes the shared options valid when none is named; never evaluated (every row replaces it)
_PLACEHOLDER = dict(method="sv_ratio", param=1.0)


def check_max_effect_error(x) -> float:
    """`x` as a threshold on the effect error: a number >= 0 (a share, 0.05 = 5%); OptionsError otherwise."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not x >= 0 or math.isinf(x):
        raise OptionsError(f"--max-effect-error must be a number >= 0 (the share of the LoRA's effect on the "
                           f"output a setting may lose, e.g. {DEFAULT_MAX_EFFECT_ERROR}), got {x!r}")
    return float(x)


EFFECT_HINT = "; measure the model's output with --base MODEL --effect"


def recommend(rows: Sequence[SettingRow], max_effect_error: float = DEFAULT_MAX_EFFECT_ERROR,
              input_bytes: int | None = None, hint: str = EFFECT_HINT) -> tuple[SettingRow | None, str]:
    """`recommendation` (the row and why; `hint`: how to measure the output instead), and when the row's file
    would be no smaller than the input (`input_bytes`), the reason says so: the input itself is then at least as
    good a choice."""
    row, reason = recommendation(rows, max_effect_error, hint)
    if row is not None and input_bytes is not None and row.output_bytes >= input_bytes:
        reason += (f"; it is no smaller than the input ({format_size(row.output_bytes)} vs "
                   f"{format_size(input_bytes)}): keeping the input loses nothing")
    return row, reason


def recommendation(rows: Sequence[SettingRow], max_effect_error: float = DEFAULT_MAX_EFFECT_ERROR,
                   hint: str = EFFECT_HINT) -> tuple[SettingRow | None, str]:
    """The setting to recommend among `rows` and why, as (row, reason); (None, reason) only for no rows. A pure
    function of the rows' fields:
    - with effect errors measured (some `row.effect_error` not None; only those rows compete): the smallest file
      whose effect error is <= `max_effect_error`; if none is, the row with the smallest effect error, saying so;
    - else the weight-space rule, labelled as such: the smallest file whose worst layer keeps >=
      WEIGHT_SPACE_MIN_FRO of its update's Frobenius norm (`fro_min`); if none does (caps too low, or a layer a
      --rule pins low sets every row's minimum), the smallest file whose size-weighted mean (`fro_weighted`) keeps
      that much, else the row that keeps the most (`fro_min`, then `fro_weighted`), saying so. With --base the
      base-relative losses are shown but not used: how far a weight moves says nothing of how far the output
      does, so no threshold on them holds across models.
    Ties on size go to the better measure, then to the earlier row. Raises OptionsError for a threshold that is
    not a number >= 0."""
    check_max_effect_error(max_effect_error)
    measured = [r for r in rows if r.effect_error is not None and r.effect_error == r.effect_error]
    if measured:
        under = [r for r in measured if r.effect_error <= max_effect_error]
        if under:
            best = min(under, key=lambda r: (r.output_bytes, r.effect_error))
            return best, (f"the smallest file whose effect error (the share of the LoRA's change to the model's "
                          f"output it loses) is at most {max_effect_error:.1%} (--max-effect-error): "
                          f"{best.effect_error:.2%}")
        best = min(measured, key=lambda r: (r.effect_error, r.output_bytes))
        return best, (f"no setting keeps the effect error at most {max_effect_error:.1%} (--max-effect-error); "
                      f"this one has the smallest, {best.effect_error:.2%}")
    if not rows:
        return None, "nothing to recommend: the sweep has no settings"
    live = [r for r in rows if r.fro_min == r.fro_min]
    if not live:
        best = min(rows, key=lambda r: r.output_bytes)
        return best, "every layer's update is zero: no setting loses anything, so the smallest file"
    under = [r for r in live if r.fro_min >= WEIGHT_SPACE_MIN_FRO]
    if under:
        best = min(under, key=lambda r: (r.output_bytes, -r.fro_min))
        return best, (f"weight-space rule: the smallest file in which every layer keeps >= "
                      f"{WEIGHT_SPACE_MIN_FRO:.0%} of its update's Frobenius norm (min {best.fro_min:.2%}){hint}")
    worst = max(r.fro_min for r in live)
    head = (f"weight-space rule: no setting keeps >= {WEIGHT_SPACE_MIN_FRO:.0%} of every layer's Frobenius norm "
            f"under these caps and rules (the worst layer keeps at most {worst:.2%})")
    mean = [r for r in live if r.fro_weighted >= WEIGHT_SPACE_MIN_FRO]  # a layer pinned low (--rule, a cap) sets
    if mean:  # every row's minimum: judge the size-weighted mean instead of tying on it
        best = min(mean, key=lambda r: (r.output_bytes, -r.fro_weighted))
        return best, (f"{head}; the smallest file whose size-weighted mean keeps >= {WEIGHT_SPACE_MIN_FRO:.0%} "
                      f"(w-mean {best.fro_weighted:.2%}){hint}")
    best = max(live, key=lambda r: (r.fro_min, r.fro_weighted, -r.output_bytes))
    return best, f"{head}; this one keeps the most (w-mean {best.fro_weighted:.2%}){hint}"


def default_sweep(base: bool = False) -> dict[str, tuple]:
    """Every registered policy's and budget's sweep values (those measured against a base model only with one)."""
    return {**{name: p.sweep for name, p in POLICIES.items() if base or not p.base},
            **{name: b.sweep for name, b in BUDGETS.items() if base or not b.needs_base}}


# ----------------------------------------------------------------------------------------------------------------
# Evaluating settings on the spectra


# what a decomposition is read under: another value needs the file read (and decomposed) again
READ_UNDER = {"output_format": "the output layout", "arch": "the architecture", "base": "the base model",
              "base_variant": "the base model's variant", "diffs_to_lora": "whether full diffs are pairs",
              "as_lora": "the form LoKr modules are written in", "block_weights": "the block strengths"}


class Evaluator:
    """Settings evaluated on one file's spectra: ranks (the shared planning step), exact size and fidelity.
    `analyzed`: the options the file was read and decomposed under (its layout, architecture, base and drop rules);
    `input_precision`: the save precision when a setting gives none (the input's, as resize takes it)."""

    def __init__(self, out: Output, sps: list[Spectrum], precision: str, analyzed: ResizeOptions,
                 input_precision: str, rules: RuleOutcome | None = None):
        self.out, self.sps, self.precision = out, sps, precision
        self.analyzed, self.input_precision = analyzed, input_precision
        self.rules = rules  # the analysed modules' strengths (scale rules, --block-weights)
        self._sizers: dict[tuple, OutputSizer] = {}

    def view(self, opts: ResizeOptions) -> tuple[Output, list[Spectrum], str]:
        """The output, the spectra of its layers and the save precision that resize would use with `opts`, from
        this decomposition: another precision, or drop rules that leave out more modules, are honoured; what needs
        the file read again (another layout, architecture or base, a module the analysis left out) raises
        OptionsError naming the fix."""
        for name, what in READ_UNDER.items():
            if getattr(opts, name) != getattr(self.analyzed, name):
                raise OptionsError(f"this analysis was read with {name}={getattr(self.analyzed, name)!r}; "
                                   f"{what} cannot change here: analyze again with {name}={getattr(opts, name)!r}")
        if [r for r in opts.block_rules if r.scales] != [r for r in self.analyzed.block_rules if r.scales]:
            raise OptionsError("this analysis was read with other scale rules; the strengths cannot change here: "
                               "analyze again with the scale rules of this setting")
        precision = opts.precision or self.input_precision
        kept = set(apply_rules(opts.block_rules, [m.name for m in self.out.layout.modules],
                               self.rules.preset if self.rules else None).kept)
        have = {sp.name for sp in self.sps}
        missing = sorted(kept - have)
        if missing:
            raise OptionsError(f"module {missing[0]} was left out of this analysis by its drop rules; analyze again "
                               "with the drop rules of this setting")
        out = self.out if self.out.cast == (opts.precision is not None) else replace(
            self.out, cast=opts.precision is not None)  # copied tensors are cast only to an asked-for precision
        if kept == have:
            return out, self.sps, precision
        idx = [i for i, sp in enumerate(self.sps) if sp.name in kept]
        return replace(out, jobs=[out.jobs[i] for i in idx]), [self.sps[i] for i in idx], precision

    def sizer(self, opts: ResizeOptions) -> OutputSizer:
        """The output's sizer for setting `opts` (its precision, its layers, its metadata); the emitted shapes
        are shared between settings of one precision and one set of layers."""
        out, sps, precision = self.view(opts)
        key = (precision, out.cast, tuple(sp.name for sp in sps))
        if key not in self._sizers:
            self._sizers[key] = sizer_for(out, sps, opts, precision)
            return self._sizers[key]
        return self._sizers[key].with_metadata(metadata_for(out, sps, opts, precision))

    def evaluate(self, opts: ResizeOptions, label: str | None = None) -> SettingRow:
        """Size and fidelity of the file `resize` would write with `opts` (OptionsError for an option this
        decomposition cannot honour: `view`). The row's ranks are those of the layers the setting keeps."""
        _, sps, precision = self.view(opts)
        sizer = self.sizer(opts)
        ranks, notes = plan(sps, opts, sizer)
        size, header, params = sizer.file_size(ranks)
        layers = []
        for sp, k in zip(sps, ranks):
            t = sp.kept(len(sp.S))[1]
            kk = sp.kept(k)[1]
            layers.append((sp.name, math.sqrt(kk / t) if t > 0 else float("nan"), sp.out_features * sp.in_features,
                           kk * sp.scale ** 2, t * sp.scale ** 2))
        base = self._base_losses(sps, ranks)
        budget = opts.budget
        if budget is not None:
            method, param = budget[0].name, budget[1]
        else:
            method, param = (opts.method, opts.param) if opts.method else (FIXED, opts.rank)
        return SettingRow(label or opts.label(), method, param, opts.flags(), size, params, **fidelity(layers),
                          ranks=ranks, options=opts, header_bytes=header, note=notes[0] if notes else None,
                          precision=precision, **base)

    @staticmethod
    def _base_losses(sps: list[Spectrum], ranks) -> dict:
        """The setting's losses relative to the base (SettingRow.base_loss, base_loss_max, base_worst), over the
        layers that have a base weight; {} without a base."""
        dropped = base = 0.0
        worst, worst_name = -1.0, None
        for sp, k in zip(sps, ranks):
            losses = sp.base_losses(int(k))
            if losses is None:
                continue
            dropped += (losses[0] * sp.base.fro) ** 2
            base += sp.base.fro ** 2
            if losses[0] > worst:
                worst, worst_name = losses[0], sp.name
        if worst_name is None:
            return {}
        return dict(base_loss=math.sqrt(dropped / base) if base > 0 else float("nan"), base_loss_max=worst,
                    base_worst=worst_name)

    def sweep_options(self, shared: ResizeOptions, sweep: Mapping[str, Sequence]) -> list[ResizeOptions]:
        """The options of every setting in `sweep` (fixed ranks above the cap, or that a rank constraint does not
        accept, are left out; a target_size of 'auto' becomes 1-2-5 sizes between the smallest and the largest file
        the caps allow)."""
        out = []
        for method, values in sweep.items():
            for v in values:
                if method == FIXED:
                    if (shared.rank is not None and v > shared.rank) or not accepts_rank(shared, v):
                        continue
                    conv = v if shared.conv_rank is None else min(v, shared.conv_rank)
                    out.append(shared.with_setting(rank=int(v), conv_rank=int(conv)))
                elif method in BUDGETS and v == "auto":
                    probe = shared.with_setting(**{method: 1})
                    sizer = self.sizer(probe)
                    lo, hi = (sizer.file_size(r)[0] for r in budget_bounds(self.view(probe)[1], probe, sizer))
                    out += [shared.with_setting(**{method: s}) for s in sizes_125(lo, hi)]
                elif method in BUDGETS:
                    out.append(shared.with_setting(**{method: v}))
                elif method in POLICIES:
                    out.append(shared.with_setting(method=method, param=float(v)))
                else:
                    raise OptionsError(f"unknown setting {method!r} in the sweep; choose from "
                                       f"{', '.join(default_sweep())}")
        return out


def sizes_125(lo: int, hi: int) -> list[int]:
    """1-2-5 x 10^k sizes strictly between lo and hi."""
    out = []
    e = 10 ** max(0, int(math.floor(math.log10(max(lo, 1)))))
    while e <= hi * 10:
        for m in (1, 2, 5):
            v = m * e
            if lo < v < hi:
                out.append(v)
        e *= 10
    return out


# ----------------------------------------------------------------------------------------------------------------
# One setting at each save precision

PRECISION_ROWS = ("fp16", "bf16", "float")
ROUNDING_SAMPLE = 8  # the layers with the largest updates whose rounding is measured


Reopen = Callable[[list[str]], ContextManager[list[LayerJob]]]  # layer names -> their jobs, their source open


@contextlib.contextmanager
def reread(src: os.PathLike, ev: Evaluator, names: list[str]) -> Iterator[list[LayerJob]]:
    """The jobs of layers `names` of the LoRA file `src`, read again as `ev` read it (its source open meanwhile)."""
    with open_tensor_file(src) as file:
        reader, _ = full_diffs_as_pairs(file) if ev.analyzed.diffs_to_lora else (file, [])
        layout = read_layout(reader.infos(), reader.metadata, src, ev.analyzed.output_format, ev.analyzed.arch,
                             ev.analyzed.as_lora)
        modules = {m.name: m for m in layout.modules}
        yield ruled_jobs([modules[n] for n in names], reader, ev.analyzed, ev.rules,
                         converting=ev.analyzed.output_format is not None, partial=False)


def at_precisions(ev: Evaluator, src: os.PathLike | Reopen, row: SettingRow, sample: int = ROUNDING_SAMPLE
                  ) -> tuple[list[SettingRow], str]:
    """`row`'s setting saved at each of PRECISION_ROWS, from the same spectra: the exact size and the rank's
    fidelity (`Evaluator.evaluate`; a budget's ranks may differ between precisions), and `rounding_error`: what
    rounding the factors to that dtype loses, ||dW_k,written - dW_k||_F / ||dW||_F with all layers as one update -
    dW_k the exact rank-k truncation (float64) and dW_k,written what the file applies (its factors made as resize
    makes them, `ops.job.start_layer`, times the scale it is loaded with). The analysis keeps singular values only,
    so the factors are computed again (from the LoRA file `src`, or through `src(names)`: the jobs of those layers,
    e.g. an extraction's), for the `sample` layers with the largest update (NaN when none is live);
    the returned sentence says which share of the update that covers. A layer resize would refuse in a precision
    (NumericalError: too small or too large for it) makes that row's rounding_error inf and its note the reason.

    Raises InputFileError when `src` cannot be read again."""
    rows = [ev.evaluate(replace(row.options, precision=p)) for p in PRECISION_ROWS]  # its label names p
    _, sps, _ = ev.view(rows[0].options)
    heavy = sorted((i for i, sp in enumerate(sps) if sp.energy > 0), key=lambda i: -sps[i].energy)[:sample]
    total = sum(sp.energy for sp in sps)
    if not heavy:
        return rows, "rounding not measured: every layer's update is zero"
    device = compute_device(ev.analyzed.device)
    reopen = src if callable(src) else partial(reread, src, ev)
    with reopen([sps[i].name for i in heavy]) as jobs:
        layers = [job.load() for job in jobs]  # the reader stays open: an exact copy reads the factors again
        decs = decompositions(jobs, layers, device, True)
        scales = [(sp.scale, sp.rank) for sp in sps]
        sampled = sum(sps[i].energy for i in heavy)
        for r in rows:
            dtype = SAVE_DTYPES[r.precision]
            alpha_of = alpha_rule(r.options, scales, dtype)
            lost = 0.0
            for i, job, layer, dec in zip(heavy, jobs, layers, decs):
                k = int(r.ranks[i])
                q = start_layer(job, layer, dec, r.options.with_setting(ranks={job.name: k}), dtype, alpha_of)
                try:
                    up, down = on_host(job.name, q.up, q.down, q.bound, exact=q.conversion == "exact")
                except NumericalError as e:
                    lost, r.note = float("inf"), str(e)
                    break
                written = output_scale(job.module, q.alpha_t, q.rank, layer) * (up.double() @ down.double())
                U, S, Vh = dec.factors(q.rank)
                exact = layer.scale * ((U * S) @ Vh).cpu()
                lost += float(torch.linalg.matrix_norm(written - exact)) ** 2
            r.rounding_error = math.sqrt(lost / sampled)
    return rows, (f"rounding measured on the {len(heavy)} layer{'s' if len(heavy) != 1 else ''} with the largest "
                  f"update{'s' if len(heavy) != 1 else ''} ({sampled / total:.0%} of the update's energy), "
                  "their factors made again as resize makes them")


def split_options(options: ResizeOptions | None, fields_: dict) -> tuple[ResizeOptions, ResizeOptions | None]:
    """(shared, chosen): options carrying the fields every setting shares (rank rule, caps, precision, rules,
    device, threads, output format), and the chosen setting when the options name one: a method (with its
    parameter, or `method="fixed"` with a rank), a budget or explicit ranks. A rank alone is the cap of every
    setting, not a chosen setting. Only the shared fields of `shared` are read."""
    if options is not None:
        if fields_:
            raise OptionsError("pass either options=ResizeOptions(...) or option fields, not both")
        named = options.method is not None or options.budget is not None or options.ranks is not None
        return options, options if named else None
    unknown = set(fields_) - set(SHARED_FIELDS) - set(CHOSEN_FIELDS) - {"rule"}
    if unknown:
        raise OptionsError(f"unknown option(s) for analyze: {', '.join(sorted(unknown))}")
    chosen = ResizeOptions(**fields_) if any(fields_.get(k) is not None for k in CHOSEN_FIELDS) else None
    shared = chosen or ResizeOptions(**{k: v for k, v in fields_.items() if k in SHARED_FIELDS or k == "rule"},
                                     **_PLACEHOLDER)
    return shared, chosen


def finish(ev: Evaluator, a_fields: dict, shared: ResizeOptions, chosen: ResizeOptions | None, chosen_label: str,
           sweep: Mapping[str, Sequence] | None, max_effect_error: float = DEFAULT_MAX_EFFECT_ERROR,
           reopen: Reopen | None = None, hint: str = EFFECT_HINT) -> Analysis:
    """The sweep and the chosen setting evaluated, and the recommendation among the sweep's rows; an Analysis.
    `reopen`: how its layers are read again for the rounding rows (at_precisions; default: the LoRA file);
    `hint`: the weight-space recommendation's pointer to measuring the model's output (recommendation)."""
    notes = list(a_fields.pop("notes"))
    base = any(sp.base is not None for sp in ev.sps)
    missing = [sp.name for sp in ev.sps if sp.base is None]
    if sweep is None and base and missing:  # base-relative settings would refuse those layers: left out
        left_out = [name for name in default_sweep(True) if name not in default_sweep(False)]
        notes.append(f"the settings measured against the base ({', '.join(left_out)}) are left out of the sweep: "
                     f"{len(missing)} module(s) have no weight in --base (e.g. {missing[0]})")
        base = False
    rows = [ev.evaluate(o) for o in ev.sweep_options(shared, default_sweep(base) if sweep is None else sweep)]
    chosen_row = None
    if chosen is not None:
        chosen_row = ev.evaluate(chosen, label=chosen_label)
        chosen_row.chosen = True
        if chosen_row.note:
            notes.append(chosen_row.note)
    recommended, reason = recommend(rows, max_effect_error, a_fields["input_bytes"], hint)
    src = a_fields["src"]
    return Analysis(shared=shared, layers=ev.sps, blocks=[block_of(sp.name) for sp in ev.sps], rows=rows,
                    chosen=chosen_row, recommended=recommended, recommended_reason=reason, notes=notes,
                    _evaluate=ev.evaluate, _at_precisions=lambda row: at_precisions(ev, reopen or src, row), **a_fields)


def decomposed(src: str | os.PathLike, shared: ResizeOptions, progress: Progress | None = None,
               base_config: str | None = None) -> tuple[Evaluator, dict]:
    """The file at `src` decomposed once under `shared` (its rules, precision, output format, device; a single-file
    --base's text encoders also from `base_config`, ops/base.py): the Evaluator of its settings, and the Analysis
    fields that describe the file."""
    src = resolve_input(local_path(src, "input"))
    device = compute_device(shared.device)
    with open_tensor_file(src) as file:
        reader, diff_notes = full_diffs_as_pairs(file) if shared.diffs_to_lora else (file, [])
        layout = read_layout(reader.infos(), reader.metadata, src, shared.output_format, shared.arch, shared.as_lora)
        precision, precision_notes = precision_of(layout, reader.infos(), shared.precision)
        input_precision = precision_of(layout, reader.infos(), None)[0]
        rules = rules_outcome(shared, layout, reader.infos(), reader.metadata)
        jobs = ruled_jobs(layout.modules, reader, shared, rules)
        base_notes = with_base(jobs, layout, reader.infos(), reader.metadata, shared, base_config)
        t1 = time.perf_counter()
        sps = spectra(jobs, device, shared.threads, progress)
        t_dec = time.perf_counter() - t1
        out = Output(layout, jobs, strengthened_companions(copied_sources(layout, reader), layout.known, rules),
                     [InputRecord(src.name, reader.metadata)],
                     cast=shared.precision is not None)
    return Evaluator(out, sps, precision, shared, input_precision, rules), dict(
        src=src, format=layout.format, precision=precision, input_bytes=src.stat().st_size, dropped=rules.dropped,
        seconds=0.0, decompose_seconds=t_dec,
        notes=precision_notes + rules.notes + list(layout.notes) + base_notes + diff_notes,
        rule_hits=rules.hits)


def analyze(src: str | os.PathLike, options: ResizeOptions | None = None, *, progress: Progress | None = None,
            sweep: Mapping[str, Sequence] | None = None, max_effect_error: float = DEFAULT_MAX_EFFECT_ERROR,
            effect: Probing | None = None, effect_progress: Progress | None = None, **option_fields) -> Analysis:
    """Decompose the LoRA at `src` once and evaluate a sweep of settings (`default_sweep()` unless given) on it.

    Option fields: rank / conv_rank (the cap of every dynamic and budget setting, as in resize), rank_rule
    ('exact'|'kohya'), precision (default: the input's), block_rules, output_format (sizes are those of the
    converted file), device, threads; and optionally the chosen setting (method + param, a fixed rank as
    method="fixed" + rank, target_size or target_fro, explicit ranks), evaluated as `Analysis.chosen`; a rank alone
    caps every setting and chooses none (so does `options=ResizeOptions(rank=N)`: give the fields with
    method="fixed" to name a fixed rank). `Analysis.recommended` is `recommend(rows, max_effect_error)`.

    `effect` (ops.effect.Probing: the base model, prompts, seed, timesteps): also measure every row's effect error
    on the base model's output (ops.effect; the `preview` extra), before the recommendation is made;
    `effect_progress(iterable, total)` wraps its loop over the distinct settings.

    Raises: OptionsError, InputFileError, LoraStructureError, NumericalError, DeviceError."""
    t0 = time.perf_counter()
    check_max_effect_error(max_effect_error)
    shared, chosen = split_options(options, option_fields)
    ev, a_fields = decomposed(src, shared, progress, effect.config if effect is not None else None)
    a = finish(ev, a_fields, shared, chosen, chosen.label() if chosen else "", sweep, max_effect_error)
    if effect is not None:
        from .effect import EffectMeter, measure_effects
        with EffectMeter(a.src, effect, shared) as meter:
            measure_effects(meter, a.rows + ([a.chosen] if a.chosen is not None else []), effect_progress,
                            [sp.name for sp in a.layers])
        a.notes.append(f"effect error: {meter.report.summary()}")
        a.recommended, a.recommended_reason = recommend(a.rows, max_effect_error, a.input_bytes)
    a.seconds = time.perf_counter() - t0
    return a


def analysis_from_result(result, sweep: Mapping[str, Sequence] | None = None) -> Analysis:
    """An Analysis built from a finished resize (its rows hold every layer's singular values): the sweep around
    it without decomposing again, with the resize's own setting as the chosen row."""
    t0 = time.perf_counter()
    names = {f.name for f in fields(ResizeOptions)}
    chosen = ResizeOptions(**{k: v for k, v in result.options.items() if k in names})
    with open_tensor_file(result.src) as file:
        reader, _ = full_diffs_as_pairs(file) if chosen.diffs_to_lora else (file, [])
        layout = read_layout(reader.infos(), reader.metadata, result.src, chosen.output_format, chosen.arch,
                             chosen.as_lora)
        modules = {m.name: m for m in layout.modules}
        sps = []
        for row in result.layers:
            m = re.fullmatch(r"conv(\d+(?:x\d+)*)", row.kind)
            kernel = tuple(int(x) for x in m.group(1).split("x")) if m else None
            in_ch = row.in_features // math.prod(kernel) if kernel else row.in_features
            sps.append(Spectrum(row.name, row.kind, row.out_features, row.in_features, row.old_rank, row.old_alpha,
                                row.scale, kernel, in_ch, row.singular_values, row.base))
        rules = rules_outcome(chosen, layout, reader.infos(), reader.metadata)
        jobs = ruled_jobs([modules[row.name] for row in result.layers], reader, chosen, rules)
        out = Output(layout, jobs, strengthened_companions(copied_sources(layout, reader), layout.known, rules),
                     [InputRecord(result.src.name, reader.metadata)], cast=chosen.precision is not None)
        ev = Evaluator(out, sps, result.precision, chosen, precision_of(layout, reader.infos(), None)[0], rules)
        a = finish(ev, dict(src=result.src, format=result.format, precision=result.precision,
                            input_bytes=result.input_bytes, dropped=rules.dropped, seconds=0.0,
                            decompose_seconds=0.0, notes=[], rule_hits=result.options.get("rule_hits") or {}),
                   chosen, chosen, chosen.label() + " (this resize)", sweep)
    if result.dst.suffix.lower() == ".safetensors" and a.chosen.output_bytes != result.output_bytes:
        a.notes.append(f"predicted {a.chosen.output_bytes} bytes, the file has {result.output_bytes}")
    a.seconds = time.perf_counter() - t0
    return a
