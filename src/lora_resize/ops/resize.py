"""The resize job: check everything first (options, paths, the file's header and every module's shapes), then
decompose the layers through the engine, then write atomically."""
from __future__ import annotations

import os
import time
from typing import Callable

from ..core.schedule import Progress, compute_device
from ..formats import read_layout
from ..formats.convert import copied_sources
from ..io.metadata import InputRecord
from ..io.paths import check_output_path, local_path, output_file, resolve_input
from ..io.reader import open_tensor_file
from ..options import ResizeOptions
from ..ranks.rules import apply_rules
from ..results import LayerResult, ResizeResult
from .job import Output, as_options, clamp_notes, growth_notes, module_job, precision_of, produce, with_base


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
    src = resolve_input(local_path(src, "input"))
    local_path(dst, "output")
    device = compute_device(opts.device)
    with open_tensor_file(src) as reader:
        layout = read_layout(reader.infos(), reader.metadata, src, opts.output_format, opts.arch)
        dst, new_folder = output_file(dst, src, layout.file_name)
        check_output_path(src, dst, new_folder)
        precision, precision_notes = precision_of(layout, reader.infos(), opts.precision)
        rules = apply_rules(opts.block_rules, [m.name for m in layout.modules])
        kept = set(rules.kept)
        jobs = [module_job(m, reader, opts.output_format is not None) for m in layout.modules
                if m.name in kept]
        base_notes = with_base(jobs, layout, reader.infos(), reader.metadata, opts)
        out = Output(layout, jobs, copied_sources(layout, reader),
                     [InputRecord(src.name, reader.metadata)], cast=opts.precision is not None)
        done = produce(dst, out, opts, precision, device, progress, on_layer, new_folder)
    notes = (precision_notes + list(layout.notes) + base_notes + done.write_notes + clamp_notes(done.rows)
             + rules.notes + done.plan_notes)
    notes += growth_notes(src.stat().st_size, dst.stat().st_size, done.rows)
    return ResizeResult(src=src, dst=dst, format=layout.format, precision=precision,
                        options={**done.options.as_dict(), "rule_hits": rules.hits}, layers=done.rows,
                        passthrough=list(layout.passthrough), copied=dict(layout.known), cast=done.cast,
                        input_bytes=src.stat().st_size,
                        output_bytes=dst.stat().st_size, seconds=time.perf_counter() - t0, metadata=done.metadata,
                        notes=notes)
