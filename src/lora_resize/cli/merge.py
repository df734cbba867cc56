"""`lora-resize merge A.safetensors:0.8 B.safetensors:0.5 -o OUT [options]`: weighted LoRAs into one."""
from __future__ import annotations

import argparse

from .flags import INPUT_FLAGS, add_option_groups, add_output, add_output_flags, options_from, progress, refuse

HELP = "merge weighted LoRAs into one of a chosen size"
DESCRIPTION = ("Merge LoRAs: each layer becomes the best rank-k approximation of the weighted sum. Example: "
               "lora-resize merge a.safetensors:0.8 b.safetensors:0.5 -o ab.safetensors --method sv_fro --param 0.95")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", metavar="FILE[:WEIGHT]",
                   help="inputs with weights (default 1; may be negative; 0 leaves the input out)")
    add_output(p, "output file (.safetensors or .pt/.pth/.ckpt)")
    add_option_groups(p, "rank", "output", "compute")
    add_output_flags(p, "per-layer lines in sd-scripts' format")
    refuse(p, *INPUT_FLAGS, why="merge takes its inputs as FILE[:WEIGHT] arguments, e.g. lora-resize merge "
           "a.safetensors:0.8 b.safetensors:0.5 -o ab.safetensors")


def run(args: argparse.Namespace) -> int:
    from ..errors import OptionsError
    from ..ops.merge import merge
    from .resize import layer_printer, render

    if not args.output:
        raise OptionsError("no output file: add -o OUT.safetensors")
    opts = options_from(args)
    result = merge(args.sources, args.output, opts, progress=progress(args.quiet, "merging"),
                   on_layer=layer_printer(args, opts.dynamic))
    return render(result, args, [])
