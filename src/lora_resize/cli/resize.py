"""`lora-resize resize IN -o OUT [options]`: resize one LoRA file."""
from __future__ import annotations

import argparse

from .flags import (add_input, add_option_groups, add_output, add_output_flags, add_picture_flags, input_of,
                    options_from, progress, write_line)

HELP = "resize one LoRA file"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_input(p, "LoRA file to resize (.safetensors; .pt/.ckpt read weights-only), or an adapter folder")
    add_output(p, "output file (.safetensors or .pt/.pth/.ckpt)")
    p.add_argument("--svd_lowrank_niter", type=int, help=argparse.SUPPRESS)  # sd-scripts flag; we are always exact
    add_option_groups(p, "rank", "output", "compute")
    add_picture_flags(p)
    add_output_flags(p, "per-layer lines in sd-scripts' format")


def render(result, args: argparse.Namespace, notes: list[str]) -> int:
    """Print a resize or merge result: JSON, or sd-scripts' closing verbose line and our summary."""
    from ..report.text import average_line, strict_json, summary
    result.notes.extend(notes)
    if args.json:
        print(strict_json(result.as_dict()))
        return 0
    if args.verbose:
        print(average_line(result))
    print(summary(result))
    return 0


def layer_printer(args: argparse.Namespace, dynamic: bool):
    """With -v, a per-layer line in sd-scripts' format as each layer is done (on stderr with --json)."""
    from ..report.text import verbose_line
    return (lambda row: write_line(verbose_line(row, dynamic), args)) if args.verbose else None


def write_pictures(result, report: str | None, plot: str | None) -> list[str]:
    """For --report/--plot: the sweep around the resize from the singular values it already has (no second
    decomposition), with its own setting as the chosen one; returns notes."""
    from ..ops.analyze import analysis_from_result
    a = analysis_from_result(result)
    notes = []
    if report:
        from ..report.html import write_html
        notes.append(f"report written to {write_html(a, report)}")
    if plot:
        from ..report.png import write_png
        notes.append(f"plot written to {write_png(a, plot)}")
    return notes


def run(args: argparse.Namespace, notes: list[str] | None = None, **overrides) -> int:
    """Run a parsed resize command; `overrides` replace option fields (the sd-scripts form's defaults)."""
    from ..errors import OptionsError
    from ..ops.resize import resize

    src = input_of(args, "lora-resize resize IN.safetensors -o OUT.safetensors")
    if not args.output:
        raise OptionsError("no output file: add -o OUT.safetensors (--save_to)")
    notes = list(notes or [])
    if args.svd_lowrank_niter is not None:
        notes.append("--svd_lowrank_niter is ignored: lora-resize is always exact and already fast")
    opts = options_from(args, **overrides)
    if args.report or args.plot:
        from ..report.html import check_paths
        check_paths(args.report, args.plot)
    result = resize(src, args.output, opts, progress=progress(args.quiet, "resizing"),
                    on_layer=layer_printer(args, opts.dynamic))
    if args.report or args.plot:
        notes += write_pictures(result, args.report, args.plot)
    return render(result, args, notes)
