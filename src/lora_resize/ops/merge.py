"""Merge several LoRAs into one of a chosen size, exactly: a weighted sum of low-rank products is itself one,
with the weighted factors stacked side by side (up = [w1 s1 up1 | w2 s2 up2 | ...], down = [down1; down2; ...]),
so the resize engine reduces it without ever forming the dense update."""
from __future__ import annotations

import math
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ..core.layer import LowRankLayer
from ..core.schedule import Progress, compute_device
from ..errors import LoraStructureError, OptionsError
from ..formats import Layout, Module, convert_layout, detect, key_family
from ..formats.convert import TARGETS, ConvertedLayout, detect_arch, scheme_of
from ..models import SD
from ..io.metadata import InputRecord
from ..io.paths import check_output_path, local_path, output_file, resolve_input
from ..io.reader import TensorSource, open_tensor_file
from ..options import ResizeOptions
from ..ranks.rules import apply_rules
from ..results import LayerResult, ResizeResult
from .job import (LayerJob, Output, as_options, checked, clamp_notes, factor_bytes, precision_of, produce,
                  with_base)


@dataclass(frozen=True)
class Source:
    """One input of a merge and its weight."""
    path: Path
    weight: float = 1.0


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


CANCELLED = 1e-10  # a merged update this small next to its inputs' is rounding noise (float64: ~1e-16)


def stacked(name: str, parts: list[tuple[float, LowRankLayer]], cancelled: list[str] | None = None
            ) -> LowRankLayer:
    """One low-rank layer for sum_i w_i * scale_i * up_i @ down_i (shapes checked; LoraStructureError when they
    differ), in float64, with scale 1. When the weighted inputs cancel out (the sum, probed with four fixed random
    vectors, is below CANCELLED x sum_i |w_i scale_i| ||up_i||_F ||down_i||_F: a LoRA minus itself, a module two
    checkpoints left untrained), the layer comes back as exact zeros and its name is appended to `cancelled`."""
    first = parts[0][1]
    ups, downs = [], []
    for w, layer in parts:
        if (layer.up.shape[0], layer.down.shape[1], layer.kernel) != (first.up.shape[0], first.down.shape[1],
                                                                       first.kernel):
            raise LoraStructureError(
                f"layer {name} has different shapes in the inputs: out x in {first.up.shape[0]} x "
                f"{first.down.shape[1]} (kernel {first.kernel}) vs {layer.up.shape[0]} x {layer.down.shape[1]} "
                f"(kernel {layer.kernel}); these LoRAs are for different models")
        ups.append(layer.up.to(torch.float64) * (w * layer.scale))
        downs.append(layer.down.to(torch.float64))
    up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    if len(parts) > 1:
        bound = sum(float(torch.linalg.vector_norm(u)) * float(torch.linalg.vector_norm(d)) for u, d in zip(ups, downs))
        probe = torch.randn(down.shape[1], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        if bound > 0 and float(torch.linalg.vector_norm(up @ (down @ probe.to(down.device)))) / 2 <= CANCELLED * bound:
            up = torch.zeros_like(up)
            if cancelled is not None:
                cancelled.append(name)
    return LowRankLayer.with_alpha(up, down, None, kernel=first.kernel, in_channels=first.in_channels)


def merged_job(name: str, members: list[tuple[float, Module, TensorSource]], cancelled: list[str] | None = None
               ) -> LayerJob:
    """A job whose layer is the weighted sum of `members`' (weight, module, reader); the first one writes it. Its
    scale is 1 (the inputs' scales are in the stacked factors), its rank the sum of theirs. A layer whose inputs
    cancel out is zero, its name appended to `cancelled`."""
    def load() -> LowRankLayer:
        return stacked(name, [(w, checked(name, m.load(src))) for w, m, src in members], cancelled)

    def scale_and_rank() -> tuple[float, int]:
        return 1.0, sum(m.scale_and_rank(src)[1] for _, m, src in members)
    return LayerJob(name, load, members[0][1], scale_and_rank,
                    sum(factor_bytes(m, src.infos()) for _, m, src in members))


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


def model_of(layout: Layout, scheme: str, reader) -> str | None:
    """The architecture a layout's modules belong to (None when no known one reads them)."""
    if isinstance(layout, ConvertedLayout):
        return layout.arch
    try:
        arch = detect_arch(layout, scheme, None, reader.infos(), reader.metadata)
    except LoraStructureError:
        return None
    return arch.name if arch is not None else SD


def merge(sources: list[Source | str | os.PathLike], dst: str | os.PathLike, options: ResizeOptions | None = None, *,
          progress: Progress | None = None, on_layer: Callable[[LayerResult], None] | None = None,
          **option_fields) -> ResizeResult:
    """Merge `sources` (weighted LoRAs of the same model) into one LoRA at `dst`, reduced with the resize options
    (a budget included: --target-size plans the merged layers together).

    Each layer of the result is the best rank-k approximation of sum_i w_i * dW_i. Layers present in only some
    inputs are merged from those. A weight of 0 drops that input. Raises the same errors as `resize`."""
    t0 = time.perf_counter()
    opts = as_options(options, option_fields)
    srcs = [s if isinstance(s, Source) else parse_source(s) if isinstance(s, str) else Source(Path(s))
            for s in sources]
    srcs = [Source(resolve_input(local_path(s.path, "input")), s.weight) for s in srcs]
    if not srcs:
        raise OptionsError("merge needs at least one input: A.safetensors:0.8 B.safetensors:0.5 ...")
    for s in srcs:
        if not math.isfinite(s.weight):
            raise OptionsError(f"{s.path.name}: weight {s.weight} is not a finite number")
    notes = [f"{s.path.name} has weight 0 and is left out" for s in srcs if s.weight == 0]
    live = [s for s in srcs if s.weight != 0]
    if not live:
        raise OptionsError("every input has weight 0: nothing to merge")
    local_path(dst, "output")
    device = compute_device(opts.device)
    with ExitStack() as stack:
        readers = [stack.enter_context(open_tensor_file(s.path)) for s in live]
        layouts = in_one_layout([detect(r.infos(), r.metadata, s.path) for s, r in zip(live, readers)], readers,
                                opts)
        dst, new_folder = output_file(dst, live[0].path, layouts[0].file_name)
        for s in live:
            check_output_path(s.path, dst, new_folder)
        families = {key_family(lay.format) for lay in layouts}
        if len(families) > 1:
            raise LoraStructureError(f"the inputs are in different key families ({', '.join(sorted(families))}); "
                                     "merge files of one family")
        members: dict[str, list[tuple[float, Module, TensorSource]]] = {}
        for s, r, lay in zip(live, readers, layouts):
            for m in lay.modules:
                members.setdefault(m.name, []).append((s.weight, m, r))
        precision, precision_notes = precision_of(layouts[0], readers[0].infos(), opts.precision)
        notes += precision_notes
        partial = sum(1 for v in members.values() if len(v) < len(live))
        if partial:
            notes.append(f"{partial} layer(s) are in only some of the inputs and are merged from those")
        rules = apply_rules(opts.block_rules, sorted(members, key=lambda n: members[n][0][1].keys[0]))
        notes += rules.notes
        cancelled: list[str] = []
        jobs = [merged_job(name, members[name], cancelled) for name in rules.kept]
        infos = {k: v for r in reversed(readers) for k, v in r.infos().items()}
        notes += with_base(jobs, replace(layouts[0], modules=[j.module for j in jobs]), infos, readers[0].metadata,
                           opts)
        copied: dict[str, TensorSource] = {}
        for r, lay in zip(readers, layouts):
            for key in lay.passthrough:
                copied.setdefault(key, r)
        if copied:
            notes.append(f"{len(copied)} non-LoRA tensor(s) copied from the first input that has them")
        # the output: the first input's layout, each layer written by the module of the first input that has it
        layout = replace(layouts[0], modules=[j.module for j in jobs])
        out = Output(layout, jobs, copied, [InputRecord(s.path.name, r.metadata, s.weight)
                                            for s, r in zip(live, readers)], merged=True,
                     cast=opts.precision is not None)
        done = produce(dst, out, opts, precision, device, progress, on_layer, new_folder)
    notes += list(layouts[0].notes) + done.write_notes + clamp_notes(done.rows) + done.plan_notes
    if cancelled:
        notes.append("warning: the inputs cancel out in every layer: the merged LoRA changes nothing"
                     if len(cancelled) == len(jobs) else
                     f"{len(cancelled)} layer(s) cancel out (the weighted inputs sum to zero there, within rounding) "
                     f"and are written as zeros, e.g. {min(cancelled)}")
    return ResizeResult(src=live[0].path, dst=dst, format=layouts[0].format, precision=precision,
                        options={**done.options.as_dict(), "sources": [[str(s.path), s.weight] for s in srcs],
                                 "rule_hits": rules.hits},
                        layers=done.rows, passthrough=list(copied), cast=done.cast,
                        copied={k: kind for lay in reversed(layouts) for k, kind in lay.known.items() if k in copied},
                        input_bytes=sum(s.path.stat().st_size for s in live), output_bytes=dst.stat().st_size,
                        seconds=time.perf_counter() - t0, metadata=done.metadata, notes=notes)
