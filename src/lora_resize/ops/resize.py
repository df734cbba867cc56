"""The resize job: check everything first (options, paths, the file's header and every module's shapes), then
decompose the layers through the engine, then write atomically - or, `resized`, hand the same tensors and metadata
over in memory (the preview and the ComfyUI nodes apply them without a file)."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..core.schedule import Progress, compute_device
from ..formats import Layout, read_layout
from ..formats.convert import copied_sources
from ..io.metadata import InputRecord, SideFile
from ..io.paths import check_output_path, local_path, output_file, resolve_input
from ..io.reader import TensorSource, open_tensor_file
from ..io.writer import hashed
from ..options import ResizeOptions
from ..ranks.rules import RuleOutcome
from ..results import LayerResult, ResizeResult
from .diffs import Certified, full_diffs_as_pairs, ruled_jobs
from .job import (Output, as_options, build_output, clamp_notes, growth_notes, precision_of, produce, rules_outcome,
                  strengthened_companions, with_base)


@dataclass
class _Prepared:
    src: Path
    reader: TensorSource
    layout: Layout
    precision: str
    rules: RuleOutcome
    out: Output
    notes: list[str]
    certified: Certified


@contextlib.contextmanager
def _prepared(src: str | os.PathLike, opts: ResizeOptions,
              check: Callable[[Path, Layout], None] | None = None) -> Iterator[_Prepared]:
    """The input opened, read as its layout and checked, with the jobs of the layers to resize; `check(src,
    layout)` runs as soon as the layout is known (the output path's checks: before any base model is read)."""
    src = resolve_input(local_path(src, "input"))
    with open_tensor_file(src) as file:
        reader, diff_notes = full_diffs_as_pairs(file) if opts.diffs_to_lora else (file, [])
        layout = read_layout(reader.infos(), reader.metadata, src, opts.output_format, opts.arch, opts.as_lora)
        if check is not None:
            check(src, layout)
        precision, precision_notes = precision_of(layout, reader.infos(), opts.precision)
        rules = rules_outcome(opts, layout, reader.infos(), reader.metadata)
        certified = Certified()
        jobs = ruled_jobs(layout.modules, reader, opts, rules, certified, opts.output_format is not None)
        base_notes = with_base(jobs, layout, reader.infos(), reader.metadata, opts)
        out = Output(layout, jobs, strengthened_companions(copied_sources(layout, reader), layout.known, rules),
                     [InputRecord(src.name, reader.metadata)], cast=opts.precision is not None)
        yield _Prepared(src, reader, layout, precision, rules, out,
                        precision_notes + list(layout.notes) + base_notes + diff_notes, certified)


def resize(src: str | os.PathLike, dst: str | os.PathLike, options: ResizeOptions | None = None, *,
           progress: Progress | None = None, on_layer: Callable[[LayerResult], None] | None = None,
           **option_fields) -> ResizeResult:
    """Resize the LoRA at `src` and write it to `dst` (atomically; the input is never modified).

    Options come as a ResizeOptions or as its fields (rank=, conv_rank=, method=, param=, rank_rule=, precision=,
    device=, threads=, block_rules=, target_size=, target_fro=, output_format=). `progress(iterable, total)` wraps
    the layer loop; `on_layer(row)` sees each layer as it is done.

    Raises: OptionsError, InputFileError, LoraStructureError, NumericalError, OutputFileError, DeviceError."""
    t0 = time.perf_counter()
    opts = as_options(options, option_fields)
    local_path(dst, "output")
    device = compute_device(opts.device)
    where: dict = {}

    def check(src: Path, layout: Layout) -> None:
        where["dst"], where["new_folder"] = output_file(dst, src, layout.file_name)
        check_output_path(src, where["dst"], where["new_folder"])
    with _prepared(src, opts, check) as p:
        dst = where["dst"]
        done = produce(dst, p.out, opts, p.precision, device, progress, on_layer, where["new_folder"])
        grown = growth_notes(p.src.stat().st_size, dst.stat().st_size, done.rows, done.options, p.out, p.precision)
    notes = p.notes + p.certified.notes() + done.write_notes + clamp_notes(done.rows) + p.rules.notes + done.plan_notes
    notes += grown
    return ResizeResult(src=p.src, dst=dst, format=p.layout.format, precision=p.precision,
                        options={**done.options.as_dict(), "rule_hits": p.rules.hits}, layers=done.rows,
                        passthrough=list(p.layout.passthrough), copied=dict(p.layout.known), cast=done.cast,
                        input_bytes=p.src.stat().st_size,
                        output_bytes=dst.stat().st_size, seconds=time.perf_counter() - t0, metadata=done.metadata,
                        notes=notes)


@dataclass
class Resized:
    """A resize in memory: `tensors` and `metadata` are exactly what `resize` writes for the same input and
    options (the same keys, dtypes and bits; the metadata with its sshs hashes); `result` describes it as
    `resize`'s result does, with `dst` None and `output_bytes` the size of the safetensors file it would be.
    `files`: the companion files `resize` writes beside the file (a PEFT adapter's adapter_config.json, which holds
    its scale), as data - not written."""
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    result: ResizeResult
    files: list[SideFile] = field(default_factory=list)


def resized(src: str | os.PathLike, options: ResizeOptions | None = None, *, progress: Progress | None = None,
            **option_fields) -> Resized:
    """The tensors and metadata `resize(src, dst, ...)` would write, in memory: nothing is written. Options and
    errors as `resize` (no OutputFileError: there is no output path)."""
    t0 = time.perf_counter()
    opts = as_options(options, option_fields)
    device = compute_device(opts.device)
    with _prepared(src, opts) as p:
        b = build_output(p.out, opts, p.precision, device, progress)
        meta, nbytes = hashed(b.tensors, b.metadata)
        grown = growth_notes(p.src.stat().st_size, nbytes, b.rows, b.options, p.out, p.precision)
    notes = p.notes + p.certified.notes() + clamp_notes(b.rows) + p.rules.notes + b.plan_notes + grown
    result = ResizeResult(src=p.src, dst=None, format=p.layout.format, precision=p.precision,
                          options={**b.options.as_dict(), "rule_hits": p.rules.hits}, layers=b.rows,
                          passthrough=list(p.layout.passthrough), copied=dict(p.layout.known), cast=b.cast,
                          input_bytes=p.src.stat().st_size, output_bytes=nbytes,
                          seconds=time.perf_counter() - t0, metadata=meta, notes=notes)
    return Resized(b.tensors, meta, result, list(b.side.files))
