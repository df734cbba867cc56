"""Merge several LoRAs into one of a chosen size, exactly: a weighted sum of low-rank products is itself one,
with the weighted factors stacked side by side (up = [w1 s1 up1 | w2 s2 up2 | ...], down = [down1; down2; ...]),
so the resize engine reduces it without ever forming the dense update."""
from __future__ import annotations

import math
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable

import torch

from ..core.contributions import MergedLayer
from ..core.layer import LowRankLayer
from ..core.merging import MERGE_PARAMS, MergeSettings, merged_layer
from ..core.schedule import Progress, compute_device
from ..core.truncate import FP8, PRECISION_OF_DTYPE, SAVE_DTYPES
from ..errors import LoraStructureError, OptionsError
from ..formats import Layout, Module, convert_layout, detect, key_family
from ..formats.base import BIAS_KIND, DORA_KIND
from ..formats.companions import merge_rule
from ..formats.convert import TARGETS, Converted, ConvertedLayout, copied_sources, detect_arch, scheme_of
from ..models import SD
from ..io.metadata import InputRecord
from ..io.paths import check_output_path, local_path, output_file, resolve_input
from ..io.reader import TensorInfo, TensorSource, open_tensor_file
from ..io.writer import copied_dtype, tensor_bytes
from ..options import ResizeOptions
from ..ranks.block_weights import parse_block_weights
from ..ranks.rules import RuleOutcome, parse_rules
from ..results import LayerResult, ResizeResult
from .diffs import full_diffs_as_pairs
from .job import (LayerJob, Output, as_options, checked, clamp_notes, factor_bytes, precision_of, produce,
                  rules_outcome, strengthened_companions, with_base, with_strength)


@dataclass(frozen=True)
class Source:
    """One input of a merge and its weight, with its own block strengths: `rules`, scale rules 'PATTERN=scale:X'
    (ranks/rules.py; 'PATTERN=drop' is strength 0: this input leaves those layers out) and `block_weights`,
    'PRESET:W1,...' (ranks/block_weights.py), both read on the output layout's module names. They multiply this
    input's weight per layer before the merge method combines the inputs (the global --rule / --block-weights
    then apply to the merged layer). `step`: the training step it was saved at, when it is one checkpoint of a run
    that ops.average averages (recorded in the output's metadata), else None."""
    path: Path
    weight: float = 1.0
    rules: tuple[str, ...] = ()
    block_weights: str | None = None
    step: int | None = None


def parse_source(text: str) -> Source:
    """'file.safetensors:0.8' -> Source(file, 0.8); without ':weight' the weight is 1. Raises OptionsError when
    the part after the last colon is not a number while the part before it is an existing file (a bad weight,
    not a file name with a colon)."""
    local_path(text, "input")
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return Source(Path(head), float(tail))
        except ValueError:
            if Path(head).exists() and not Path(text).exists():
                raise OptionsError(f"bad weight {tail} in {text}: write FILE:WEIGHT with a number, e.g. "
                                   f"{head}:0.8") from None
    return Source(Path(text), 1.0)


def merged_job(name: str, members: list[tuple[float, Module, TensorSource]], settings: MergeSettings,
               cancelled: list[str] | None = None, slots: list[int] | None = None, n_inputs: int | None = None,
               positions: list[int] | None = None) -> LayerJob:
    """A job whose layer is `members`' (weight, module, reader) merged by `settings`
    (core.merging.merged_layer: the weighted sum by default); the first one writes it. Its scale is 1 (the inputs'
    scales are in the merged factors), its rank at most the sum of theirs. A sum whose inputs cancel out is zero,
    its name appended to `cancelled`. The layer loaded is a core.contributions.MergedLayer carrying the members'
    weighted factors for the report (LayerResult.input_shares / input_kept), in the order of the merge's
    `n_inputs` inputs (`slots`: each member's position among them; default: the members are the inputs); they are
    dropped with the layer. `positions`: each member's 0-based place among the inputs given (weight 0 ones
    included; default: `slots`), what a random method (DARE) seeds each input's masks by."""
    slots = list(range(len(members))) if slots is None else slots
    n_inputs = len(members) if n_inputs is None else n_inputs

    def load() -> LowRankLayer:
        parts = [(w, checked(name, m.load(src))) for w, m, src in members]
        layer = merged_layer(name, parts, settings, cancelled, slots if positions is None else positions,
                             [src.path.name for _, _, src in members])
        inputs: list = [(None, None, None)] * n_inputs
        stacked = layer.up.shape[1] == sum(p.up.shape[1] for _, p in parts) and layer.scale == 1 and \
            settings.method == "sum" and bool(layer.up.any())
        at = 0
        for slot, (w, part) in zip(slots, parts):
            r = part.up.shape[1]
            # the sum's stacked factors hold each input's weighted factors side by side: views, no second copy
            inputs[slot] = ((1.0, layer.up[:, at:at + r], layer.down[at:at + r]) if stacked else
                            (w * part.scale, part.up, part.down))
            at += r
        del parts
        return MergedLayer(**{f.name: getattr(layer, f.name) for f in fields(LowRankLayer)}, inputs=tuple(inputs))

    def scale_and_rank() -> tuple[float, int]:
        return 1.0, sum(m.scale_and_rank(src)[1] for _, m, src in members)
    return LayerJob(name, load, members[0][1], scale_and_rank,
                    sum(factor_bytes(m, src.infos()) for _, m, src in members))


def input_strengths(n: int, src: Source, reader: TensorSource, layout: Layout, opts: ResizeOptions
                    ) -> RuleOutcome | None:
    """Input number `n`'s own strengths per module (its Source.rules and block_weights, read on `layout`, the
    input's modules under the output layout's names, by ops.job.rules_outcome as the global ones are), or None
    when it has none. Raises OptionsError, one line naming the input: a rank, cap or 'RANK' rule (a rank belongs to
    the merged layer: --rule), a malformed rule or preset, a preset of another model, or rules that leave out every
    module of the input (give it weight 0 instead)."""
    if not src.rules and src.block_weights is None:
        return None
    try:
        rules = parse_rules(src.rules)
        ranked = next((r for r in rules if r.action not in ("scale", "drop")), None)
        if ranked is not None:
            raise OptionsError(f"rule {ranked} sets a rank, which belongs to the merged layer: give it with --rule; "
                               "an input's own rules take PATTERN=scale:X (or PATTERN=drop, strength 0)")
        return rules_outcome(replace(opts, block_rules=rules, block_weights=src.block_weights), layout,
                             reader.infos(), reader.metadata)
    except OptionsError as e:
        if str(e).startswith("every module is dropped"):  # apply_rules' refusal, said of one input
            e = OptionsError("its own rules leave out every module; give it weight 0 to leave it out")
        raise OptionsError(f"input {n} ({src.path.name}): {e}") from None


def in_one_layout(layouts: list[Layout], readers: list, opts: ResizeOptions) -> list[Layout]:
    """The inputs' layouts written in one: --output-format's, else the first input's when they differ (a kohya and
    an ai-toolkit Flux LoRA merge in kohya's). Raises OptionsError when the first input's layout is not one that
    others convert to, LoraStructureError when the inputs are for different models."""
    schemes = [scheme_of(lay) for lay in layouts]
    target = opts.output_format
    if target is None and len(set(schemes)) > 1:
        if schemes[0] not in TARGETS:
            raise OptionsError(f"the inputs are in different layouts ({', '.join(sorted(set(schemes)))}); give "
                               f"--output-format ({', '.join(TARGETS)}) to merge them in one")
        target = schemes[0]
    out = [convert_layout(lay, target, r.infos(), r.metadata, opts.arch) for lay, r in zip(layouts, readers)]
    archs = {model_of(lay, scheme, r) for lay, scheme, r in zip(out, schemes, readers)} - {None}
    if len(archs) > 1 and opts.arch is None:
        raise LoraStructureError(f"the inputs are LoRAs of different models ({', '.join(sorted(archs))}); merge "
                                 "LoRAs of one model (or give --arch when one was misread)")
    return out


def regrouped(layout: Layout) -> str | None:
    """How a conversion to the output layout regrouped `layout`'s modules: 'fused' (parts placed into one output
    module, e.g. diffusers' to_q/to_k/to_v into a fused qkv), 'split' (an output module takes some rows of an
    input's, e.g. a fused qkv into to_q/to_k/to_v), or None (renamed at most, or not converted)."""
    feeds = [f for m in layout.modules if isinstance(m, Converted) for f in m.sources]
    return ("fused" if any(f.place is not None for f in feeds) else
            "split" if any(f.take is not None for f in feeds) else None)


def layout_note(live: list[Source], layouts: list[Layout], settings: MergeSettings, opts: ResizeOptions) -> list[str]:
    """A note for a method other than the (linear) sum when an input was converted to the output layout with
    modules fused or split: the method works on the output layout's modules, so which layout that is (the first
    input's, or --output-format's) changes the result."""
    if settings.method == "sum":
        return []
    how = [(s.path.name, regrouped(lay)) for s, lay in zip(live, layouts) if isinstance(lay, ConvertedLayout)]
    how = [(name, h) for name, h in how if h is not None]
    if not how:
        return []
    layout = opts.output_format or scheme_of(layouts[0])
    what = ("fused modules, e.g. a qkv, merged as one matrix" if how[0][1] == "fused" else
            "fused modules' parts, e.g. q, k, v, merged apart")
    return [f"{how[0][0]} was converted to the {layout} layout with modules {how[0][1]}: {settings.method} works on "
            f"the {layout} layout's modules ({what}), so another layout gives another result; --output-format "
            "chooses it (the sum is the same in any)"]


def model_of(layout: Layout, scheme: str, reader) -> str | None:
    """The architecture a layout's modules belong to (None when no known one reads them)."""
    if isinstance(layout, ConvertedLayout):
        return layout.arch
    try:
        arch = detect_arch(layout, scheme, None, reader.infos(), reader.metadata)
    except LoraStructureError:
        return None
    return arch.name if arch is not None else SD


class MergedTensors:
    """A TensorSource of the non-factor tensors a merge sums (formats.companions.merge_rule 'add'): each is
    sum_i w_i * t_i over the inputs holding it (a missing one adds nothing), in float64, written in the inputs'
    common dtype (differing dtypes: the one both promote to, torch.promote_types; float8: float32), or rounded
    once to `cast` (an explicit --precision) when given: `infos` keeps the common dtype, so the output lists the
    tensor as cast."""

    def __init__(self, path: Path, parts: dict[str, list[tuple[float, TensorSource]]], cast: torch.dtype | None):
        self.path, self.metadata, self._parts, self._cast = path, {}, parts, cast
        self._infos = {k: TensorInfo(src[0][1].infos()[k].shape, common_dtype([s.infos()[k].dtype for _, s in src]))
                       for k, src in parts.items()}

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def get(self, key: str) -> torch.Tensor:
        total = sum(w * src.get(key).to(torch.float64) for w, src in self._parts[key])
        return total.to(copied_dtype(self._infos[key].dtype, self._cast))

    def close(self) -> None:
        pass


def common_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    """The dtype that holds every one of `dtypes` (torch.promote_types: bf16 and fp16 give float32); torch
    promotes no float8 type, so float8 ones count as float32 when the dtypes differ."""
    if len(set(dtypes)) == 1:
        return dtypes[0]
    out = torch.float32 if dtypes[0] in FP8 else dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, torch.float32 if d in FP8 else d)
    return out


def merged_precision(live: list[Source], layouts: list[Layout], readers: list[TensorSource], requested: str | None
                     ) -> tuple[str, list[str]]:
    """A merge's save precision and its notes: the requested one, else the one that holds every input's factors
    (each input's own, ops.job.precision_of, combined by common_dtype: fp16 and bf16 inputs give float, whatever
    their order), with a note when the inputs' precisions differ."""
    found = [precision_of(lay, r.infos(), requested) for lay, r in zip(layouts, readers)]
    notes = list(dict.fromkeys(n for _, ns in found for n in ns))
    names = [p for p, _ in found]
    if len(set(names)) == 1:
        return names[0], notes
    precision = PRECISION_OF_DTYPE.get(common_dtype([SAVE_DTYPES[p] for p in names]), "float")
    each = ", ".join(f"{s.path.name}: {p}" for s, p in zip(live, names))
    notes.append(f"the inputs' factors are in different precisions ({each}): saved as {precision}, which holds each "
                 "of them; --precision changes it")
    return precision, notes


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """`a` and `b` hold the same values in the same dtype and shape, bit for bit (NaNs included)."""
    return a.dtype == b.dtype and a.shape == b.shape and tensor_bytes(a) == tensor_bytes(b)


def merged_companions(live: list[Source], readers: list[TensorSource], layouts: list[Layout],
                      cast: torch.dtype | None = None, own: list[RuleOutcome | None] | None = None
                      ) -> tuple[dict[str, TensorSource], list[str], list[str]]:
    """The non-factor tensors of a merge (key -> the source to copy it from), the keys summed, and the notes,
    decided before any
    work, by what the loader does with each kind (formats.companions.merge_rule): added kinds (full, bias and
    modulation diffs, additive norms, PEFT lora_B biases) are summed as the LoRA updates are, sum_i w_i * t_i;
    kinds that belong to one update (DoRA magnitudes, LyCORIS modules copied as they are) are kept when the inputs
    holding them hold identical values and their weights sum to 1; kinds a loader sets (set weights, norm scales,
    reshape shapes, ControlNet weights) and unknown tensors are kept when identical. Raises LoraStructureError
    naming the key otherwise: shapes that differ, differing values, weights that change a whole update, an added
    tensor that is not floating point, or lora_B biases of layers whose inputs' scales differ. `own`: each input's
    own strengths (input_strengths), applied to its tensors first as to the global ones
    (ops.job.strengthened_companions: an added kind scaled, left out at 0)."""
    holders: dict[str, list[tuple[float, TensorSource, Layout]]] = {}
    for s, r, lay, rules_i in zip(live, readers, layouts, own or [None] * len(live)):
        sources = copied_sources(lay, r)  # a conversion's carried tensors are read renamed, split or fused
        if rules_i is not None:
            sources = strengthened_companions({k: sources[k] for k in lay.passthrough}, lay.known, rules_i)
        for key in lay.passthrough:
            if key in sources:
                holders.setdefault(key, []).append((s.weight, sources[key], lay))
    copied: dict[str, TensorSource] = {}
    added: dict[str, list[tuple[float, TensorSource]]] = {}
    kept: dict[str, int] = {}
    for key, held in holders.items():
        kind = next((lay.known[key] for _, _, lay in held if key in lay.known), None)
        rule = merge_rule(kind)
        label = f"{key} ({kind or 'an unknown tensor'})"
        infos = [r.infos()[key] for _, r, _ in held]
        if any(i.shape != infos[0].shape for i in infos):
            raise LoraStructureError(f"{label} has different shapes in the inputs ({infos[0].shape} vs "
                                     f"{next(i.shape for i in infos if i.shape != infos[0].shape)}); these LoRAs "
                                     "are for different models")
        if rule == "add":
            if not all(i.dtype.is_floating_point for i in infos):
                raise LoraStructureError(f"{label} is added to the model but is stored as {infos[0].dtype}, so "
                                         "it cannot be weighted; merge with weight 1 or re-export it")
            if kind == BIAS_KIND:
                check_bias_scales(key, held)
            if len(held) == 1 and held[0][0] == 1:  # one input at weight 1: its tensor, bit for bit
                copied[key] = held[0][1]
            else:
                added[key] = [(w, r) for w, r, _ in held]
            continue
        if kind == DORA_KIND:
            check_dora_alone(key, label, held, live, layouts)
        first = held[0][1].get(key)
        for w, r, _ in held[1:]:
            if not same_bits(first, r.get(key)):
                why = ("the loader applies it as one update" if rule == "whole" else
                       "the loader sets it, whatever the strength" if kind is not None else "what it does is unknown")
                raise LoraStructureError(f"{label} differs between {held[0][1].path.name} and {r.path.name}, and a "
                                         f"merge cannot combine it ({why}): merge LoRAs that share it, or leave one "
                                         "out")
        total = sum(w for w, _, _ in held)
        if rule == "whole" and abs(total - 1) > 1e-9:
            raise LoraStructureError(f"{label} belongs to one trained update and cannot be scaled: the inputs "
                                     f"holding it have weight(s) summing to {total:g}, not 1; merge it at weight 1 "
                                     "(or weights that sum to 1), or convert it to plain LoRA factors first")
        copied[key] = held[0][1]
        kept[rule] = kept.get(rule, 0) + 1
    if added:
        merged = MergedTensors(live[0].path, added, cast)
        copied.update({k: merged for k in added})
    copied = {k: copied[k] for k in holders}  # in the inputs' order
    notes = []
    if kept:
        notes.append(f"{sum(kept.values())} non-LoRA tensor(s) that loaders set or apply whole are the same in "
                     "every input that has them and are copied once")
    return copied, [k for k in holders if k in added], notes


def check_dora_alone(key: str, label: str, held: list[tuple[float, TensorSource, Layout]], live: list[Source],
                     layouts: list[Layout]) -> None:
    """A DoRA magnitude renormalises its layer's whole update (the loader scales base + update column-wise to
    it): an input that updates the same layer as plain LoRA would be renormalised too, changing its effect.
    LoraStructureError naming the key and that input."""
    holders = {id(lay) for _, _, lay in held}
    owner = max((m.name for m in held[0][2].modules if key.startswith(m.name + ".")), key=len, default=None)
    if owner is None:
        return
    for s, lay in zip(live, layouts):
        if id(lay) not in holders and any(m.name == owner for m in lay.modules):
            raise LoraStructureError(f"{label}: {s.path.name} updates the same layer as plain LoRA, and a DoRA "
                                     "magnitude renormalises the whole update of its layer, so it would change that "
                                     "input's effect; merge DoRA files only with each other, or leave one out")


def check_bias_scales(key: str, held: list[tuple[float, TensorSource, Layout]]) -> None:
    """PEFT multiplies a lora_B bias by its layer's scale (peft/tuners/lora/layer.py `Linear.forward`): biases of
    layers the inputs scale differently cannot be summed as they are (LoraStructureError naming the key)."""
    up = key[:-len("bias")] + "weight"
    scales = set()
    for _, r, lay in held:
        module = next((m for m in lay.modules if up in m.keys), None)
        if module is not None:
            scales.add(module.scale_and_rank(r)[0])
    if len(scales) > 1:
        raise LoraStructureError(f"{key} (LoRA bias): the inputs scale this layer differently "
                                 f"({', '.join(f'{s:g}' for s in sorted(scales))}) and PEFT scales the bias with it, "
                                 "so the biases cannot be summed; merge adapters with the same lora_alpha / r")


def merge(sources: list[Source | str | os.PathLike], dst: str | os.PathLike, options: ResizeOptions | None = None, *,
          progress: Progress | None = None, on_layer: Callable[[LayerResult], None] | None = None,
          merge_method: str | MergeSettings = "sum", **option_fields) -> ResizeResult:
    """Merge `sources` (weighted LoRAs of the same model) into one LoRA at `dst`, reduced with the resize options
    (a budget included: --target-size plans the merged layers together).

    `merge_method`: a registered method's name (core.merging.MERGE_METHODS; its parameters, e.g. `density=0.2`,
    `seed=1`, as keywords beside the option fields) or a MergeSettings. Each layer of the result is the best
    rank-k approximation of the method's merged update: for `sum` (the default) sum_i w_i * dW_i. Layers present in
    only some inputs are merged from those. A weight of 0 drops that input. A Source's own `rules` /
    `block_weights` multiply its weight per layer before the method (input_strengths). Each row of the result
    carries every input's share of the written layer and the energy of it kept (LayerResult.input_shares,
    input_kept, input_energy: core.contributions). Memory: the inputs are read per layer, one window of layers at a
    time (core.schedule), nothing per input held across layers. Raises the same errors as `resize`, and
    OptionsError for an unknown method or a parameter it does not read, or for an input's own rules (one line
    naming the input)."""
    t0 = time.perf_counter()
    params = {p: option_fields.pop(p) for p in MERGE_PARAMS if p in option_fields}
    if isinstance(merge_method, MergeSettings):
        if params:
            raise OptionsError(f"give {', '.join(params)} in the MergeSettings, not beside it")
        settings = merge_method
    else:
        settings = MergeSettings(merge_method, **params)
    opts = as_options(options, option_fields)
    srcs = [s if isinstance(s, Source) else parse_source(s) if isinstance(s, str) else Source(Path(s))
            for s in sources]
    srcs = [replace(s, path=resolve_input(local_path(s.path, "input")),
                    rules=(s.rules,) if isinstance(s.rules, str) else tuple(s.rules)) for s in srcs]
    if not srcs:
        raise OptionsError("merge needs at least one input: A.safetensors:0.8 B.safetensors:0.5 ...")
    for s in srcs:
        if not math.isfinite(s.weight):
            raise OptionsError(f"{s.path.name}: weight {s.weight} is not a finite number")
    notes = [f"{s.path.name} has weight 0 and is left out" for s in srcs if s.weight == 0]
    live = [s for s in srcs if s.weight != 0]
    numbers = [n for n, s in enumerate(srcs, 1) if s.weight != 0]  # each input's position among those given
    if not live:
        raise OptionsError("every input has weight 0: nothing to merge")
    local_path(dst, "output")
    device = compute_device(opts.device)
    with ExitStack() as stack:
        readers = [stack.enter_context(open_tensor_file(s.path)) for s in live]
        if opts.diffs_to_lora:  # full diffs as pairs of full rank, merged with the other inputs' factors
            pairs = [full_diffs_as_pairs(r) for r in readers]
            readers = [r for r, _ in pairs]
            notes += [f"{s.path.name}: {n}" for s, (_, ns) in zip(live, pairs) for n in ns]
        layouts = in_one_layout([detect(r.infos(), r.metadata, s.path) for s, r in zip(live, readers)], readers,
                                opts)
        dst, new_folder = output_file(dst, live[0].path, layouts[0].file_name)
        for s in live:
            check_output_path(s.path, dst, new_folder)
        families = {key_family(lay.format) for lay in layouts}
        if len(families) > 1:
            raise LoraStructureError(f"the inputs are in different key families ({', '.join(sorted(families))}); "
                                     "merge files of one family")
        notes += layout_note(live, layouts, settings, opts)
        own = [input_strengths(n, s, r, lay, opts) for n, s, r, lay in zip(numbers, live, readers, layouts)]
        members: dict[str, list[tuple[float, Module, TensorSource]]] = {}
        slots: dict[str, list[int]] = {}
        for i, (s, r, lay, rules_i) in enumerate(zip(live, readers, layouts, own)):
            for m in lay.modules:
                strength = 1.0 if rules_i is None else 0.0 if m.name in rules_i.dropped else \
                    rules_i.strengths.get(m.name, 1.0)
                if strength != 0:
                    members.setdefault(m.name, []).append((s.weight * strength, m, r))
                    slots.setdefault(m.name, []).append(i)
        left_out = {m.name for lay in layouts for m in lay.modules} - set(members)
        if not members:
            raise OptionsError("the inputs' own rules leave out every layer: nothing to merge")
        if left_out:
            notes.append(f"{len(left_out)} layer(s) are left out: every input holding them has strength 0 there "
                         f"(its own rules), e.g. {min(left_out)}")
        input_rules = [{"input": n, "file": s.path.name, "rules": [str(x) for x in parse_rules(s.rules)],
                        "block_weights": s.block_weights, "hits": rules_i.hits,
                        "preset_modules": len(rules_i.preset or {})}
                       for n, s, rules_i in zip(numbers, live, own) if rules_i is not None]
        notes += [f"input {n} ({s.path.name}): {note}" for n, s, rules_i in zip(numbers, live, own)
                  if rules_i is not None for note in rules_i.notes]
        precision, precision_notes = merged_precision(live, layouts, readers, opts.precision)
        notes += precision_notes
        partial = sum(1 for v in members.values() if len(v) < len(live))
        if partial:
            notes.append(f"{partial} layer(s) are in only some of the inputs and are merged from those")
        names = sorted(members, key=lambda n: members[n][0][1].keys[0])
        infos = {k: v for r in reversed(readers) for k, v in r.infos().items()}
        rules = rules_outcome(opts, replace(layouts[0], modules=[members[n][0][1] for n in names]), infos,
                              readers[0].metadata)
        notes += rules.notes
        cancelled: list[str] = []
        jobs = [with_strength(merged_job(name, members[name], settings, cancelled, slots[name], len(live),
                                         [numbers[i] - 1 for i in slots[name]]),
                              rules.strengths.get(name, 1)) for name in rules.kept]
        notes += with_base(jobs, replace(layouts[0], modules=[j.module for j in jobs]), infos, readers[0].metadata,
                           opts)
        copied, summed, companion_notes = merged_companions(
            live, readers, layouts, SAVE_DTYPES[precision] if opts.precision is not None else None, own)
        copied = strengthened_companions(copied, {k: kind for lay in reversed(layouts) for k, kind in lay.known.items()},
                                         rules)
        notes += companion_notes
        # the output: the first input's layout, each layer written by the module of the first input that has it
        layout = replace(layouts[0], modules=[j.module for j in jobs])
        out = Output(layout, jobs, copied, [InputRecord(s.path.name, r.metadata, s.weight,
                                                        tuple(str(x) for x in parse_rules(s.rules)),
                                                        s.block_weights and parse_block_weights(s.block_weights).text,
                                                        s.step)
                                            for s, r in zip(live, readers)], merged=settings.as_dict(),
                     cast=opts.precision is not None)
        done = produce(dst, out, opts, precision, device, progress, on_layer, new_folder)
    notes += list(layouts[0].notes) + done.write_notes + clamp_notes(done.rows) + done.plan_notes
    if cancelled and settings.method == "sum":
        notes.append("warning: the inputs cancel out in every layer: the merged LoRA changes nothing"
                     if len(cancelled) == len(jobs) else
                     f"{len(cancelled)} layer(s) cancel out (the weighted inputs sum to zero there, within rounding) "
                     f"and are written as zeros, e.g. {min(cancelled)}")
    elif cancelled:
        why = f"{settings.label()} makes them zero: the inputs cancel, or every entry was trimmed or dropped"
        notes.append(f"warning: the merged update is zero in every layer ({why}): the merged LoRA changes nothing"
                     if len(cancelled) == len(jobs) else
                     f"{len(cancelled)} layer(s) come out zero ({why}) and are written as zeros, e.g. "
                     f"{min(cancelled)}")
    return ResizeResult(src=live[0].path, dst=dst, format=layouts[0].format, precision=precision,
                        options={**done.options.as_dict(), **settings.as_dict(), "merge_label": settings.label(),
                                 "sources": [[str(s.path), s.weight] for s in srcs],
                                 "rule_hits": rules.hits, "input_rules": input_rules},
                        layers=done.rows, passthrough=list(copied), cast=done.cast, summed=summed,
                        copied={k: kind for lay in reversed(layouts) for k, kind in lay.known.items() if k in copied},
                        input_bytes=sum(s.path.stat().st_size for s in live), output_bytes=dst.stat().st_size,
                        seconds=time.perf_counter() - t0, metadata=done.metadata, notes=notes)
