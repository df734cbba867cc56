"""`lora-resize average CKPT... -o OUT [--weighting ema --beta 0.9] [rank options]`: one run's checkpoints into
their weighted mean."""
from __future__ import annotations

import argparse

from .flags import INPUT_FLAGS, add_option_groups, add_output, add_output_flags, options_from, progress, refuse

HELP = "average the checkpoints of one training run (uniform, linear, EMA, power EMA) into one LoRA"
DESCRIPTION = ("Average checkpoints: each layer becomes the best rank-k approximation of the weighted mean of the "
               "checkpoints' updates (never of their factors), the checkpoints ordered by their training step "
               "(from metadata: ss_steps, ai-toolkit's training_info; else the last number in the file name; else "
               "--steps). Example: lora-resize average run-000004.safetensors run-000006.safetensors "
               "run-000008.safetensors -o avg.safetensors --weighting ema --beta 0.8 --rank 32")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..ops.average import WEIGHTINGS

    p.add_argument("sources", nargs="+", metavar="CKPT", help="checkpoints of one training run (two or more)")
    add_output(p, "output file (.safetensors or .pt/.pth/.ckpt)")
    g = p.add_argument_group("weighting")
    g.add_argument("--weighting", choices=list(WEIGHTINGS), default="uniform",
                   help="how the checkpoints are weighted: " + "; ".join(f"{k}: {v}" for k, v in WEIGHTINGS.items()))
    g.add_argument("--beta", type=float, metavar="B", default=None,
                   help="the EMA's decay, in (0, 1), for --weighting ema (higher: more of the early checkpoints)")
    g.add_argument("--sigma-rel", dest="sigma_rel", type=float, metavar="S", default=None,
                   help="the power-function EMA's relative width (Karras et al. 2024, EDM2), in (0, 0.300283], for "
                        "--weighting power (smaller: more of the late checkpoints; EDM2 uses 0.05-0.15)")
    g.add_argument("--steps", metavar="S1,S2,...", default=None,
                   help="each checkpoint's training step, in the order of the files (overrides metadata and names)")
    add_option_groups(p, "rank", "output", "compute")
    add_output_flags(p, "per-layer lines in sd-scripts' format")
    refuse(p, *INPUT_FLAGS, why="average takes its checkpoints as arguments, e.g. lora-resize average "
           "a-000004.safetensors a-000008.safetensors -o avg.safetensors")


def run(args: argparse.Namespace) -> int:
    from ..errors import OptionsError
    from ..ops.average import average
    from .resize import layer_printer, render

    if not args.output:
        raise OptionsError("no output file: add -o OUT.safetensors")
    opts = options_from(args)
    result = average(args.sources, args.output, opts, weighting=args.weighting, beta=args.beta,
                     sigma_rel=args.sigma_rel, steps=args.steps, progress=progress(args.quiet, "averaging"),
                     on_layer=layer_printer(args, opts.dynamic))
    return render(result, args, [])
