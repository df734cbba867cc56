"""What resize and merge share: layer jobs through the engine, a budget's planning pass, and the write.

    read (io.reader) -> modules (formats.detect) -> LayerJob -> core.schedule.through_engine:
        job.load() -> LowRankLayer -> decompose -> Decomposition -> ranks.plan.layer_rank -> k
        -> core.truncate -> NewFactors -> module.emit -> tensors
    -> io.metadata.output_metadata + layout.side_outputs -> io.writer.write_output
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, MutableMapping

import numpy as np
import torch

from ..core.contributions import MergedLayer, input_contributions
from ..core.decompose import Decomposition
from ..core.layer import LowRankLayer
from ..core.schedule import Progress, through_engine
from ..core.spectrum import Spectrum
from ..core.truncate import (FP8, PRECISION_OF_DTYPE, SAVE_DTYPES, AlphaRule, NewFactors, largest_entry, on_host,
                             retention, truncated_factors)
from ..errors import NumericalError, OptionsError
from ..formats import Layout, Module
from ..formats.blocks import module_blocks
from ..formats.companions import merge_rule
from ..formats.convert import check_one_model, exact_copy
from ..formats.lycoris import KeptLokr, KronLayer, LycorisModule
from ..io.metadata import InputRecord, SideOutputs, output_metadata, with_hashes
from ..io.reader import TensorInfo, TensorSource
from ..io.sizing import OutputSizer, Stub, saved_stub
from ..io.writer import HeldTensors, copied_dtype, copied_tensor, write_output
from ..options import ResizeOptions
from ..ranks.block_weights import parse_block_weights
from ..ranks.constraints import accepts_rank, active_constraints, constraint_notes
from ..ranks.plan import budget_bounds, layer_rank, pinned_rank, plan, unranked, whole_file
from ..ranks.rules import RuleOutcome, apply_rules
from ..results import BaseNorms, LayerResult
from ..units import format_size
from .base import base_norms

FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class LayerJob:
    """One output layer to compute: its name, how to read its low-rank form, the module that writes it (its
    `emit` and `output_scale`), its input scale and trained rank (read without the factors), and about how many
    bytes its factors have in float64 (sizes the windows)."""
    name: str
    load: Callable[[], LowRankLayer]
    module: Module
    scale_and_rank: Callable[[], tuple[float, int]]
    nbytes: int = 0
    base: BaseNorms | None = None  # the base weight it patches (--base)
    # a converted module's factors by rearrangement alone (formats.convert.Converted.exact): save dtype ->
    # (factors, "") or (None, why not)
    exact: Callable[[torch.dtype], tuple[NewFactors | None, str]] | None = None
    converting: bool = False  # the output is a conversion's (--output-format, convert): a whole layer that cannot
    # be copied says why (LayerResult.conversion, clamp_notes)
    # a dense weight difference (extract, --diffs-to-lora): (layer, device, vectors) -> its decomposition
    # (core.dense.DenseDecomposition) instead of the factored engine's (core.schedule.decompositions)
    decompose: Callable | None = None


def checked(name: str, layer: LowRankLayer) -> LowRankLayer:
    """`layer`, after checking that its alpha can be rescaled for any new rank in float32 (sd-scripts computes
    the new alpha there); NumericalError naming the layer when not."""
    if layer.alpha is not None and abs(layer.alpha) / layer.rank * min(layer.up.shape[0],
                                                                       layer.down.shape[1]) > FLOAT32_MAX:
        raise NumericalError(f"layer {name} has alpha {layer.alpha:g}, too large to rescale in float32; the file is "
                             "damaged - re-export it")
    return layer


def factor_bytes(module: Module, infos: Mapping[str, TensorInfo]) -> int:
    """About how large `module`'s tensors are in float64."""
    return sum(8 * math.prod(infos[k].shape) for k in module.keys if k in infos)


def module_job(module: Module, src: TensorSource, converting: bool = False) -> LayerJob:
    """A job that reads `module` from `src` and writes it with the same module (`converting`: in a conversion's
    layout, LayerJob.converting). Where the planned rank keeps the
    module whole (start_layer), the job copies its factors as they are (formats.convert.exact_copy: a conversion's
    rearrangement, or a pair as stored), bit for bit, rather than re-rounding an equal truncation: a resize at a
    layer's own rank writes the layer unchanged, so an image made with it is the original LoRA's."""
    exact = exact_copy(module)
    return LayerJob(module.name, lambda: checked(module.name, module.load(src)), module,
                    lambda: module.scale_and_rank(src), factor_bytes(module, src.infos()),
                    exact=(lambda dtype: exact(src, dtype)) if exact is not None else None, converting=converting)


def with_strength(job: LayerJob, strength: float) -> LayerJob:
    """`job` with its update multiplied by `strength` (a scale rule's or --block-weights'): the loaded layer's
    scale (and the scale `scale_and_rank` reports) is multiplied, so its spectrum, a budget's plan, the sizes and
    the truncation all see the scaled update and the factors written carry it (start_layer folds the layer's scale
    into them); a strength other than 1 cannot be a bit-for-bit copy (`exact` None). Strength 1: `job` itself."""
    if strength == 1:
        return job
    load, scale_and_rank = job.load, job.scale_and_rank

    def scaled() -> LowRankLayer:
        layer = load()
        return replace(layer, scale=layer.scale * strength)

    def scaled_scale_and_rank() -> tuple[float, int]:
        scale, rank = scale_and_rank()
        return scale * strength, rank
    return replace(job, load=scaled, scale_and_rank=scaled_scale_and_rank, exact=None)


class ScaledSource:
    """A TensorSource whose keys in `factors` read multiplied by their factor (in float64, back in their dtype: the
    sizes stay those of the input's tensors); every other key as `src` holds it."""

    def __init__(self, src: TensorSource, factors: Mapping[str, float]):
        self.src, self.factors = src, dict(factors)
        self.path, self.metadata = getattr(src, "path", None), getattr(src, "metadata", {})

    def infos(self) -> dict[str, TensorInfo]:
        return self.src.infos()

    def get(self, key: str) -> torch.Tensor:
        t = self.src.get(key)
        return t if key not in self.factors else (t.double() * self.factors[key]).to(t.dtype)

    def close(self) -> None:
        self.src.close()


def strengthened_companions(copied: Mapping[str, TensorSource], known: Mapping[str, str], rules: RuleOutcome
                            ) -> dict[str, TensorSource]:
    """The copied non-factor tensors with each module's strength applied to its own (a key under the module's name,
    `<module>.diff_b`), as a loader applies its strength (formats.companions.merge_rule): a kind it adds to the
    model (bias, full and modulation diffs, additive norms, PEFT lora_B biases) is multiplied by the strength, and
    left out at strength 0 (so is a DoRA magnitude); a kind it sets whatever the strength, or an unknown tensor, is
    copied as it is. Raises OptionsError for a kind that belongs to one update (a DoRA magnitude) of a module whose
    strength is neither 1 nor 0: it renormalises the whole scaled update, so no tensor of the file can carry the
    strength."""
    scaled = {n: s for n, s in rules.strengths.items() if s != 1}
    if not scaled:
        return dict(copied)
    owners = sorted(scaled, key=len, reverse=True)
    out: dict[str, TensorSource] = {}
    wrappers: dict[int, ScaledSource] = {}
    for key, src in copied.items():
        owner = next((n for n in owners if key.startswith(n + ".")), None)
        kind = known.get(key)
        rule = merge_rule(kind) if owner is not None else "same"
        if rule == "whole" and scaled[owner] != 0:
            raise OptionsError(f"module {owner} has a {kind} ({key}), which renormalises its whole update: a "
                               f"strength of {scaled[owner]:g} cannot be baked into it; give it strength 1, or 0 to "
                               "leave it out")
        if rule in ("add", "whole") and scaled[owner] == 0:
            continue  # 0 x what the loader adds: nothing; the magnitude of a module left out: nothing to apply
        out[key] = src
        if rule == "add":  # one wrapper per source, reading its scaled keys
            wrapper = wrappers.setdefault(id(src), ScaledSource(src, {}))
            wrapper.factors[key] = scaled[owner]
            out[key] = wrapper
    return out


def rules_outcome(opts: ResizeOptions, layout: Layout, infos: Mapping[str, TensorInfo],
                  metadata: Mapping[str, str], names: list[str] | None = None) -> RuleOutcome:
    """The block rules applied to the modules `names` (default: the layout's, in order), with the strengths of
    `opts.block_weights` (read on `layout`'s module names, formats.blocks) multiplying the scale rules'. Raises
    OptionsError for a preset of another model than the LoRA's, or when every module is dropped;
    LoraStructureError when a PEFT output's kept modules are of several models (formats.convert.check_one_model)."""
    outcome = _rules_outcome(opts, layout, infos, metadata, names)
    check_one_model(layout, outcome.kept)  # a PEFT output: the modules kept must be of one model
    return outcome


def _rules_outcome(opts: ResizeOptions, layout: Layout, infos: Mapping[str, TensorInfo],
                   metadata: Mapping[str, str], names: list[str] | None) -> RuleOutcome:
    names = [m.name for m in layout.modules] if names is None else names
    if opts.block_weights is None:
        return apply_rules(opts.block_rules, names)
    weights = parse_block_weights(opts.block_weights)
    found = module_blocks(layout, infos, metadata, opts.arch)
    weights.check_model(found.model, found.title)
    preset = {name: s for name, block in found.blocks.items() if (s := weights.strength(block)) is not None}
    outcome = apply_rules(opts.block_rules, names, preset)
    return replace(outcome, notes=outcome.notes + weights.unlisted_note(
        {n: b for n, b in found.blocks.items() if n in set(names)}))


def with_base(jobs: list[LayerJob], layout: Layout, infos: Mapping[str, TensorInfo], metadata: Mapping[str, str],
              opts: ResizeOptions, config: str | os.PathLike | None = None) -> list[str]:
    """With --base: each job's base weight norms (ops/base.py; `config`: a single-file base's --base-config
    folder, its text encoders read too), and the notes on modules without one."""
    if opts.base is None:
        return []
    t = time.perf_counter()
    norms, notes = base_norms(layout, infos, metadata, opts.base, opts.arch, opts.base_variant, config)
    for j in jobs:
        j.base = norms.get(j.name)
    return notes + [f"{len(norms)} base weight(s) measured in {time.perf_counter() - t:.1f} s"]


def alpha_rule(opts: ResizeOptions, scales_and_ranks: list[tuple[float, int]], save_dtype: torch.dtype
               ) -> Callable[[str, float | None, int, int], float]:
    """How the output's alphas are chosen, as (name, alpha, old rank, new rank) -> alpha: sd-scripts' per-layer
    alphas under `--rank-rule kohya`; otherwise one alpha for every layer (AlphaRule.one_for_all), the most common
    input scale's magnitude times --rank (else the most common input rank), so every consumer applies each layer
    at its strength; a sign (a negative strength, ops.job.with_strength) goes into the factors, never the alpha:
    diffusers' kohya Flux converter (`_convert_kohya_flux_lora_to_diffusers`: `while scale_down * 2 < scale_up`)
    never ends on a negative alpha. Either is then brought into the range `save_dtype` holds (`held_alpha`); the
    factors absorb the difference (start_layer)."""
    if opts.rank_rule == "kohya" or not scales_and_ranks:
        rule = AlphaRule()
    else:
        ranks = [r for _, r in scales_and_ranks]
        rank = opts.rank if opts.rank is not None else max(set(ranks), key=ranks.count)
        try:
            rule = AlphaRule.one_for_all([abs(s) for s, _ in scales_and_ranks], rank)
        except NumericalError:
            if opts.rank is None:
                raise
            raise NumericalError(f"--rank {opts.rank} times the layers' scale overflows float32 in the output's "
                                 "alpha; give a --rank no larger than the layers' sizes") from None
    return lambda name, alpha, rank, k: held_alpha(rule(name, alpha, rank, k), save_dtype)


def held_alpha(alpha: float, dtype: torch.dtype) -> float:
    """`alpha` brought into the range of normal numbers `dtype` stores (fp16: 6.1e-5 to 65504), sign kept; 0 stays
    0. A larger alpha (a huge --rank times the input's scale) would be stored as Inf, a smaller one as 0 or a
    subnormal: either would switch the layer off or break it in every loader. An alpha in range is returned as it
    is (the dtype rounds it when stored; the metadata states it as stored: io.metadata.written_dims)."""
    info = torch.finfo(dtype)
    if alpha == 0 or info.tiny <= abs(alpha) <= info.max:
        return alpha
    return math.copysign(min(max(abs(alpha), info.tiny), info.max), alpha)


def output_scale(module: Module, alpha: torch.Tensor, k: int, layer: LowRankLayer | None = None) -> float:
    """The scale a loader applies to the module's rank-k output: its family's fixed scale at that rank
    (Module.output_scale_at), else the stored alpha over k; for a `layer` read as a LoKr kept as LoKr
    (formats.lycoris.KronLayer, whose up @ down is ||W1||_F * W2), times ||W1||_F, which the loader's kron(W1, .)
    multiplies the written W2 factors by: the scale in the units of the layer's up @ down."""
    fixed = module.output_scale_at(k)
    scale = fixed if fixed is not None else float(alpha) / k
    return scale * layer.w1_norm if isinstance(layer, KronLayer) else scale


def factor_scale(name: str, scale: float, out_scale: float) -> float:
    """c such that out_scale * (c * up @ down) = scale * up @ down: 0 for a switched-off layer (scale 0, whatever
    the output's scale); NumericalError when the output's scale cannot carry a live layer (0 or not finite)."""
    if scale == 0:
        return 0.0
    if out_scale == 0 or not math.isfinite(out_scale):
        raise NumericalError(f"layer {name}: the output would apply it with scale {out_scale:g}, which cannot "
                             f"carry its update (scale {scale:g}); use --precision float")
    return scale / out_scale


def layer_row(sp: Spectrum, k: int, new_alpha: float, **flags) -> LayerResult:
    """The row of layer `sp` resized to rank k (flags: clamped, zero, underflow, singular_values). A partial
    spectrum (a dense layer's leading values, core.dense): the Frobenius retention counts its tail energy exactly;
    the sum retention is read on Spectrum.with_tail, whose equal tail values give the largest sum that energy
    allows, so it is a lower bound."""
    sum_kept, _, max_ratio = retention(sp.with_tail(), k)
    fro_kept = sp.fro_retained(k)
    base = {}
    if sp.base is not None:
        (strength, spectral), (loss_fro, loss_spec) = sp.base_strength(), sp.base_losses(k)
        base = dict(base=sp.base, strength=strength, spectral_ratio=spectral, base_loss_fro=loss_fro,
                    base_loss_spectral=loss_spec)
    return LayerResult(name=sp.name, kind=sp.kind, out_features=sp.out_features, in_features=sp.in_features,
                       old_rank=sp.rank, new_rank=k, old_alpha=sp.alpha, new_alpha=new_alpha,
                       sum_retained=sum_kept, fro_retained=fro_kept, max_ratio=max_ratio, scale=sp.scale, **base,
                       **flags)


def planned_rows(spectra: list[Spectrum], ranks, alpha: Callable[[str, float | None, int, int], float],
                 rank_rule: str) -> list[LayerResult]:
    """The rows a job would report for these ranks (what the metadata records), without computing factors: zero
    layers flagged as the planning step flags them under `rank_rule`."""
    return [layer_row(sp, int(k), alpha(sp.name, sp.alpha, sp.rank, int(k)),
                      zero=pinned_rank(sp, int(k), rank_rule).zero_layer) for sp, k in zip(spectra, ranks)]


# ----------------------------------------------------------------------------------------------------------------
# The engine passes


@dataclass
class Queued:
    """A layer whose new factors are computed (on a GPU: queued) on the compute device."""
    job: LayerJob
    layer: LowRankLayer
    spectrum: Spectrum
    rank: int
    clamped: bool
    zero: bool
    alpha: float
    alpha_t: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    bound: float | None = None  # no entry of up or down is larger (core.truncate.largest_entry)
    conversion: str | None = None  # a converted layer kept whole: "exact" (copied), else why it was re-rounded
    inputs: tuple | None = None  # a merged layer's (shares, kept, energy) per input (core.contributions)


def layer_spectrum(job: LayerJob, layer: LowRankLayer, dec) -> Spectrum:
    """The job's spectrum from its decomposition; a dense one's partial spectrum keeps the energy past its leading
    values (core.dense.DenseDecomposition.tail_energy), so retention and budgets count the whole update."""
    sp = Spectrum.of(job.name, layer, dec.S, job.base)
    tail = getattr(dec, "tail_energy", 0.0)
    return replace(sp, tail_energy=tail) if tail else sp


def start_layer(job: LayerJob, layer: LowRankLayer, dec: Decomposition, opts: ResizeOptions,
                save_dtype: torch.dtype, alpha_of: Callable[[str, float | None, int, int], float]) -> Queued:
    """Choose the layer's rank and compute its best rank-k factors in save_dtype, on the compute device.

    The new alpha comes from `alpha_of` (one value for all layers, or sd-scripts' scale * k); the factors absorb
    any difference between the layer's scale and the scale its output is loaded with (alpha / k with the stored
    alpha's rounding in the save dtype, or a family's fixed scale), so the output applies exactly the rank-k
    truncation of the scaled update (to float precision)."""
    sp = layer_spectrum(job, layer, dec)
    choice = layer_rank(sp, opts)
    k = choice.rank
    alpha = alpha_of(job.name, layer.alpha, layer.rank, k)
    alpha_t = torch.tensor(alpha, dtype=torch.float32).to(save_dtype)
    conversion = None
    if job.exact is not None:  # a layer that keeps every singular value copies the factors, bit for bit: no
        copy, why = job.exact(save_dtype)  # rank setting covers the layer (a zero or rank-deficient one included),
        # or the planned rank is the copy's own (a larger one, the kohya rule's growth to the layer's size, is
        # written at that rank as without a conversion: the plan analyze sizes is the rank written)
        if copy is not None and unranked(sp, opts) and not active_constraints(opts):  # (a constraint may pad it)
            return Queued(job, layer, sp, copy.down.shape[0], False, False, float(copy.alpha), copy.alpha, copy.up,
                          copy.down, conversion="exact")
        if copy is not None and k == copy.down.shape[0]:  # a rank setting: the copy must write what the plan
            why = planned_copy(job.module, copy, alpha_t)  # sizes (ops.analyze, sizer_for): its alpha, as stored
            if not why:
                return Queued(job, layer, sp, k, False, False, alpha, copy.alpha, copy.up, copy.down,
                              conversion="exact")
            copy = None
        whole = unranked(sp, opts) or k >= min(layer.rank, sp.out_features, sp.in_features)  # nothing truncated
        conversion = why if copy is None and whole and job.converting else None
    c = factor_scale(job.name, layer.scale, output_scale(job.module, alpha_t, k, layer))
    up, down = truncated_factors(dec, k, c, save_dtype)
    return Queued(job, layer, sp, k, choice.clamped_to_size, choice.zero_layer, alpha, alpha_t, up, down,
                  largest_entry(dec.S, c), conversion, merged_inputs(layer, dec, k))


def merged_inputs(layer: LowRankLayer, dec: Decomposition, k: int) -> tuple | None:
    """A merged layer's (shares, kept, energy) per input at its written rank k (core.contributions, from the rank-k
    truncation's bases: the written layer before rounding to the save dtype); None for any other layer. A zero
    layer is written as zeros: its shares are NaN."""
    if not isinstance(layer, MergedLayer) or not layer.inputs:
        return None
    U, S, Vh = dec.factors(max(k, 1))
    return input_contributions(layer.inputs, U, S, Vh)


def planned_copy(module: Module, copy: NewFactors, planned: torch.Tensor) -> str:
    """"" when a conversion's exact copy (formats.convert.exact_factors) writes what the plan states for its rank
    (planned_rows, io.sizing.OutputSizer: the planned alpha `planned`, as stored in the save precision, unless the
    output is loaded at a fixed scale and stores none); else why not (the layer is then re-rounded at that rank)."""
    if copy.alpha.dtype != planned.dtype:
        return "its alpha is stored in another precision than the save precision"
    stored = float(planned)
    if module.output_scale is None and float(copy.alpha) != stored:
        return f"its alpha {float(copy.alpha):g} is not the output's {stored:g} (--rank-rule kohya keeps each layer's)"
    return ""


def input_fields(inputs: tuple | None) -> dict:
    """LayerResult's input_shares / input_kept / input_energy from merged_inputs' triple ({} without one)."""
    return {} if inputs is None else dict(zip(("input_shares", "input_kept", "input_energy"), inputs))


def finish_layer(q: Queued) -> tuple[LayerResult, dict[str, torch.Tensor]]:
    """The layer's row and its output tensors on the CPU, checked to fit the save precision."""
    up, down = on_host(q.job.name, q.up, q.down, q.bound, exact=q.conversion == "exact")
    S = q.spectrum.S
    row = layer_row(q.spectrum, q.rank, q.alpha, clamped=q.clamped, zero=q.zero, singular_values=S,
                    underflow=bool(S.size and S[0] > 0 and not (bool(up.any()) and bool(down.any()))),
                    conversion=q.conversion, **input_fields(q.inputs))
    kept = q.layer.kept if isinstance(q.layer, KronLayer) else {}
    return row, q.job.module.emit(NewFactors(up, down, q.alpha_t, q.layer.kernel, q.layer.in_channels, kept))


def run_jobs(jobs: list[LayerJob], opts: ResizeOptions, device: torch.device, save_dtype: torch.dtype,
             progress: Progress | None = None, on_layer: Callable[[LayerResult], None] | None = None,
             out: MutableMapping[str, torch.Tensor] | None = None
             ) -> tuple[list[LayerResult], MutableMapping[str, torch.Tensor]]:
    """Decompose and truncate every job (in order); returns the rows and the output tensors (added to `out`, a
    dict by default; io.writer.HeldTensors keeps them out of memory)."""
    rows: list[LayerResult] = []
    out = {} if out is None else out
    alpha_of = alpha_rule(opts, [j.scale_and_rank() for j in jobs], save_dtype)
    for row, tensors in through_engine(jobs, device, lambda j, layer, dec: start_layer(j, layer, dec, opts,
                                                                                       save_dtype, alpha_of),
                                       finish_layer, opts.threads, progress):
        out.update(tensors)
        rows.append(row)
        if on_layer:
            on_layer(row)
    return rows, out


def spectra(jobs: list[LayerJob], device: torch.device, threads: int | None = None,
            progress: Progress | None = None) -> list[Spectrum]:
    """Decompose every job; keep only its spectrum (what planning and analysis need)."""
    return list(through_engine(jobs, device, lambda j, layer, dec: layer_spectrum(j, layer, dec),
                               lambda s: s, threads, progress, vectors=False))


# ----------------------------------------------------------------------------------------------------------------
# A whole job


def precision_of(layout: Layout, infos: Mapping[str, TensorInfo], requested: str | None
                 ) -> tuple[str, list[str]]:
    """The save precision: the requested one, else that of the dtype most of the LoRA factors are stored in
    (fp8 factors: bf16, said in a note); and the notes."""
    if requested:
        return requested, []
    counts: dict[torch.dtype, int] = {}
    for m in layout.modules:
        for k in m.keys:
            if infos[k].dtype.is_floating_point and len(infos[k].shape) >= 2:
                counts[infos[k].dtype] = counts.get(infos[k].dtype, 0) + 1
    dtype = max(counts, key=counts.get) if counts else torch.float32
    precision = PRECISION_OF_DTYPE.get(dtype, "float")
    notes = [f"the factors are stored as {str(dtype).split('.')[-1]}: saved as {precision}, the smallest precision "
             "every tested loader applies (fp8 output is not offered); --precision changes it"] if dtype in FP8 else []
    return precision, notes


@dataclass
class Output:
    """What a job writes: the output layout (its modules, in order, emit the layers; it derives the side
    outputs), the copied tensors (key -> the reader holding it), the inputs as the metadata records them.
    `cast`: the precision was asked for (--precision), so the copied floating-point tensors are cast to it;
    otherwise they are copied bit for bit (io.writer.copied_dtype)."""
    layout: Layout
    jobs: list[LayerJob]
    copied: dict[str, TensorSource]
    sources: list[InputRecord]
    merged: bool | dict = False  # a merge: True, or its MergeSettings.as_dict(), which the metadata records
    cast: bool = False

    def copied_cast(self, save_dtype: torch.dtype) -> torch.dtype | None:
        """The dtype the copied floating-point tensors are cast to, None when they keep theirs."""
        return save_dtype if self.cast else None

    def cast_keys(self, save_dtype: torch.dtype) -> list[str]:
        """The copied tensors whose dtype the output changes (in file order)."""
        cast = self.copied_cast(save_dtype)
        return [k for k, src in self.copied.items() if copied_dtype(src.infos()[k].dtype, cast) != src.infos()[k].dtype]


def copied_stubs(out: Output, save_dtype: torch.dtype) -> dict[str, Stub]:
    cast = out.copied_cast(save_dtype)
    return {k: saved_stub(src.infos()[k].shape, src.infos()[k].dtype, cast) for k, src in out.copied.items()}


def metadata_for(out: Output, sps: list[Spectrum], opts: ResizeOptions, precision: str
                 ) -> Callable[[np.ndarray], dict[str, str]]:
    """ranks -> the metadata `produce` would write for them with `opts` (hashes as placeholders)."""
    alpha_of = alpha_rule(opts, [(sp.scale, sp.rank) for sp in sps], SAVE_DTYPES[precision])

    def meta(ranks) -> dict[str, str]:
        rows = planned_rows(sps, ranks, alpha_of, opts.rank_rule)
        return with_hashes(output_metadata(opts, precision, out.layout.format, rows, out.sources,
                                           out.layout.side_outputs(rows).metadata, out.merged,
                                           out.layout.written_network(), out.layout.arch))
    return meta


def sizer_for(out: Output, sps: list[Spectrum], opts: ResizeOptions, precision: str) -> OutputSizer:
    """The exact size of what `produce` would write for given ranks (same tensors, same metadata)."""
    save_dtype = SAVE_DTYPES[precision]
    return OutputSizer([j.module for j in out.jobs], sps, copied_stubs(out, save_dtype), save_dtype,
                       metadata_for(out, sps, opts, precision))


def with_budget_plan(out: Output, opts: ResizeOptions, precision: str, device: torch.device,
                     progress: Progress | None) -> tuple[ResizeOptions, list[str]]:
    """For a budget or --uniform-rank (ranks.plan.whole_file): a first pass for every layer's spectrum, the plan,
    and the options with the planned ranks (explicit ranks the user gave still win). Else: the options as they
    are."""
    if not whole_file(opts):
        return opts, []
    sps = spectra(out.jobs, device, opts.threads, progress)
    ranks, notes = plan(sps, opts, sizer_for(out, sps, opts, precision))
    return replace(opts, ranks={**{sp.name: int(k) for sp, k in zip(sps, ranks)}, **(opts.ranks or {})}), notes


@dataclass
class Built:
    """A job's output in memory: its rows, the tensors `produce` writes (factors and copied tensors), the metadata
    without its hashes, the side outputs (metadata entries are in `metadata`; companion files in `side.files`), the
    plan's notes, the options as run (a budget's ranks filled in) and the copied tensors whose dtype was changed."""
    rows: list[LayerResult]
    tensors: MutableMapping[str, torch.Tensor]  # a dict unless build_output was given where to hold them
    metadata: dict[str, str]
    side: SideOutputs
    plan_notes: list[str]
    options: ResizeOptions
    cast: list[str] = field(default_factory=list)


@dataclass
class Produced:
    """A written job: its rows, the metadata written, the writer's notes, the plan's notes, the options as
    run (a budget's ranks filled in) and the copied tensors whose dtype was changed (an explicit --precision)."""
    rows: list[LayerResult]
    metadata: dict[str, str]
    write_notes: list[str]
    plan_notes: list[str]
    options: ResizeOptions
    cast: list[str] = field(default_factory=list)


def build_output(out: Output, opts: ResizeOptions, precision: str, device: torch.device,
                 progress: Progress | None = None, on_layer: Callable[[LayerResult], None] | None = None,
                 held: MutableMapping[str, torch.Tensor] | None = None) -> Built:
    """Plan (a budget), run the engine and assemble what the job writes, in memory (nothing written; `held`: where
    the tensors are kept, a dict by default)."""
    save_dtype = SAVE_DTYPES[precision]
    run_opts, plan_notes = with_budget_plan(out, opts, precision, device, progress)
    rows, tensors = run_jobs(out.jobs, run_opts, device, save_dtype, progress, on_layer, held)
    cast = out.copied_cast(save_dtype)
    for key, src in out.copied.items():
        tensors.setdefault(key, copied_tensor(src.get(key), cast))
    side = out.layout.side_outputs(rows)
    meta = output_metadata(run_opts, precision, out.layout.format, rows, out.sources, side.metadata, out.merged,
                           out.layout.written_network(), out.layout.arch)
    return Built(rows, tensors, meta, side, plan_notes + constraint_notes(run_opts, rows), run_opts,
                 out.cast_keys(save_dtype))


def produce(dst: Path, out: Output, opts: ResizeOptions, precision: str, device: torch.device,
            progress: Progress | None = None, on_layer: Callable[[LayerResult], None] | None = None,
            new_folder: bool = False) -> Produced:
    """`build_output`, then write `dst` atomically with its metadata and companion files (making its folder first
    when `new_folder`). The tensors wait for the write in a scratch file beside `dst` (io.writer.HeldTensors), not
    in memory."""
    with HeldTensors(next(p for p in dst.absolute().parents if p.is_dir())) as held:
        b = build_output(out, opts, precision, device, progress, on_layer, held)
        meta, write_notes = write_output(dst, b.tensors, b.metadata, b.side.files, new_folder)
    return Produced(b.rows, meta, write_notes, b.plan_notes, b.options, b.cast)


def clamp_notes(rows: list[LayerResult]) -> list[str]:
    """Notes on layers that could not be given what was asked: smaller than the rank, or lost to underflow."""
    notes = []
    clamped = [r for r in rows if r.clamped]
    if clamped:
        notes.append(f"{len(clamped)} layer(s) were smaller than the rank asked for and keep their full rank "
                     f"(e.g. {clamped[0].name}: {clamped[0].new_rank})")
    rounded = [r for r in rows if r.conversion not in (None, "exact")]
    if rounded:
        notes.append(f"{len(rounded)} converted layer(s) could not be copied exactly and were re-rounded once to the "
                     "save precision: each factor entry is its exact value rounded (relative error at most 2^-8 "
                     "bf16, 2^-11 fp16, 2^-24 float; the update within about twice that) - e.g. "
                     f"{rounded[0].name}: {rounded[0].conversion}")
    lost = [r for r in rows if r.underflow]
    if lost:
        notes.append(f"{len(lost)} layer(s) are too small for the save precision and were saved as zeros (e.g. "
                     f"{lost[0].name}); use --precision bf16 or float to keep them")
    return notes


def growth_notes(input_bytes: int, output_bytes: int, rows: list[LayerResult], opts: ResizeOptions | None = None,
                 out: Output | None = None, precision: str | None = None) -> list[str]:
    """A warning when the output is larger than the input, with its cause - LoKr/LoHa modules written as plain
    factors (`out`'s layout), else the names, metadata or precision when no rank grew - and, when ranks grew,
    settings that keep the size which `opts` accepts: the input's rank or the nearest below it that a rank
    constraint accepts (ranks/constraints.py), and a --target-size of the input's size, raised to the smallest
    file a budget can plan under `opts` (`smallest_file`, needing `out` and `precision`) when that is larger."""
    if output_bytes <= input_bytes:
        return []
    out_text, inp = format_size(output_bytes), format_size(input_bytes)
    if out_text == inp:  # a few bytes more (metadata): equal when rounded, so say by how much
        out_text, inp = f"{output_bytes:,} bytes", f"{input_bytes:,} bytes"
    head = f"warning: the output ({out_text}) is larger than the input ({inp})"
    plain = expanded_lycoris(out.layout.modules) if out is not None else {}
    if plain:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(plain.items()))
        keep = (" (leave out --as-lora and --output-format: a LoKr that is smaller stays LoKr)"
                if "LoKr" in plain else "")
        head += (f"; {kinds} module(s) are written as plain factors, which hold their update in more numbers than "
                 f"the Kronecker/Hadamard form{keep}")
    if all(r.new_rank <= r.old_rank for r in rows):  # not the ranks: names, metadata, split modules, precision
        if plain:
            return [head]
        return [head + "; no layer's rank grew: the output's key names and metadata, a wider save precision, or "
                       "fused modules written as their parts (each with the shared down) take the room"]
    opts = opts if opts is not None else ResizeOptions(rank=1)
    rank = max((r.old_rank for r in rows), default=1)
    fits = next((k for k in range(rank, 0, -1) if accepts_rank(opts, k)), None)
    floor = smallest_file(out, rows, opts, precision, input_bytes) if out is not None and precision is not None else None
    advice = []
    if fits is not None:
        advice.append(f"a fixed rank (e.g. --rank {fits}, " + ("the input's)" if fits == rank else
                                                             "the largest the rank constraint accepts up to the "
                                                             "input's)"))
    if floor is None or floor <= input_bytes:
        advice.append(f"--target-size {input_bytes} for the best fidelity that fits the input's size")
    if advice:
        return [head + "; to keep it no larger give " + ", or ".join(advice)]
    return [head + f"; these options allow no file as small as the input (the rank constraint accepts no rank up "
                   f"to the input's {rank}): the smallest they allow is {floor} bytes (--target-size {floor}); "
                   "loosen the rank constraint or leave modules out with --rule 'PATTERN=drop'"]


def expanded_lycoris(modules: list[Module]) -> dict[str, int]:
    """How many LoKr / LoHa modules among `modules` (or fed into them: a conversion's, a merge's) are written
    as plain factors, by label ('LoKr', 'LoHa', 'Tucker LoHa', ...); a LoKr kept as LoKr is not counted."""
    counts: dict[str, int] = {}
    for m in modules:
        for src in [f.module for f in getattr(m, "sources", [])] or [m]:
            if isinstance(src, LycorisModule) and not isinstance(src, KeptLokr) and src.kind in ("lokr", "loha"):
                counts[src.label] = counts.get(src.label, 0) + 1
    return counts


def smallest_file(out: Output, rows: list[LayerResult], opts: ResizeOptions, precision: str, near: int
                  ) -> int | None:
    """The bytes of the smallest file a --target-size near `near` bytes can plan for `out`'s layers under `opts`'
    other settings (caps, rules, rank constraints, --uniform-rank: ranks.plan.budget_bounds), sized exactly
    (sizer_for: the metadata written with that --target-size, found again at the floor until it holds); None when
    a budget does not go with them. Reads every layer's factors again (for its shape)."""
    try:
        opts.with_setting(target_size=near)
    except OptionsError:
        return None
    by = {r.name: r for r in rows}
    sps = []
    for j in out.jobs:
        layer = j.load()
        row = by.get(j.name)
        S = row.singular_values if row is not None and row.singular_values is not None else np.ones(layer.rank)
        sps.append(Spectrum.of(j.name, layer, S, j.base))
    target, floor = near, None
    for _ in range(3):  # the metadata names the target: size the floor with the target it advises
        budget = opts.with_setting(target_size=target)
        sizer = sizer_for(out, sps, budget, precision)
        floor = int(sizer.file_size(budget_bounds(sps, budget, sizer)[0])[0])
        if floor <= target:
            break
        target = floor
    return floor


def as_options(options: ResizeOptions | None, fields: dict) -> ResizeOptions:
    """The options of a job call: a ResizeOptions or its fields (OptionsError when both are given)."""
    if options is not None and fields:
        raise OptionsError("pass either options=ResizeOptions(...) or option fields, not both")
    return options if options is not None else ResizeOptions(**fields)

