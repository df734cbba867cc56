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
    add_merge_method(p)
    add_option_groups(p, "rank", "output", "compute")
    add_output_flags(p, "per-layer lines in sd-scripts' format")
    refuse(p, *INPUT_FLAGS, why="merge takes its inputs as FILE[:WEIGHT] arguments, e.g. lora-resize merge "
           "a.safetensors:0.8 b.safetensors:0.5 -o ab.safetensors")


def add_merge_method(p: argparse.ArgumentParser) -> None:
    """--merge-method and the parameters the methods read, from their registry (core.merging)."""
    from ..core.merging import MERGE_METHODS, MERGE_PARAMS

    g = p.add_argument_group("merge method")
    g.add_argument("--merge-method", choices=list(MERGE_METHODS), default="sum",
                   help="how the weighted inputs' updates combine: "
                        + "; ".join(f"{m.name}: {m.help}" for m in MERGE_METHODS.values()))
    for param in MERGE_PARAMS.values():
        readers = ", ".join(n for n, m in MERGE_METHODS.items() if param.name in m.params) or "no method yet"
        g.add_argument(param.flag, dest=param.name, type=param.type, metavar=param.metavar, default=None,
                       help=f"{param.help} (read by {readers})")


def merge_settings(args: argparse.Namespace):
    """The MergeSettings of parsed arguments (OptionsError for a parameter the method does not read)."""
    from ..core.merging import MERGE_PARAMS, MergeSettings

    return MergeSettings(args.merge_method, **{p: getattr(args, p) for p in MERGE_PARAMS})


def run(args: argparse.Namespace) -> int:
    from ..errors import OptionsError
    from ..ops.merge import merge
    from .resize import layer_printer, render

    if not args.output:
        raise OptionsError("no output file: add -o OUT.safetensors")
    opts = options_from(args)
    result = merge(args.sources, args.output, opts, progress=progress(args.quiet, "merging"),
                   on_layer=layer_printer(args, opts.dynamic), merge_method=merge_settings(args))
    return render(result, args, [])
