"""`lora-resize analyze IN`: decompose once, then size and fidelity for a sweep of settings (text or --json), with
an optional HTML report and PNG curve."""
from __future__ import annotations

import argparse
import sys

from ..errors import OptionsError
from ..results import DEFAULT_MAX_EFFECT_ERROR, WEIGHT_SPACE_MIN_FRO
from .flags import (OUTPUT_FLAGS, add_input, add_model_output_flags, add_option_groups, add_output_flags,
                    add_picture_flags, input_of, option_values, probing_from, progress, refuse)

HELP = "decompose once; sizes and fidelity for a sweep of settings"
DESCRIPTION = ("Decompose every layer once, then print the exact output size, parameter count and fidelity of a "
               "sweep of settings (every method's and budget's sweep: sv_ratio 2..128, sv_fro and sv_cumulative "
               "0.5..0.99, fixed ranks 1..256, target_fro and target_size budgets). --rank/--conv-rank cap every "
               "setting as in resize (alone they choose no setting); a method (--method fixed --rank N for a fixed "
               "rank) or a target names the chosen setting, marked in the table and report; --precision and "
               "--output-format size the file that resize would write with them. One setting is recommended, with "
               "the reason: see --max-effect-error.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_input(p, "LoRA file to analyze (.safetensors; .pt/.ckpt read weights-only), or an adapter folder")
    add_option_groups(p, "rank", "output", "compute")
    add_picture_flags(p)
    p.add_argument("--max-effect-error", type=float, metavar="X",
                   help="recommend the smallest file that loses at most this share of the LoRA's change to the "
                        f"model's output, where that is measured (--base MODEL --effect); default "
                        f"{DEFAULT_MAX_EFFECT_ERROR}. Without it the recommendation follows the weight-space rule: "
                        f"the smallest file in which every layer keeps >= {WEIGHT_SPACE_MIN_FRO:.0%}% of its update's "
                        "Frobenius norm")
    add_model_output_flags(p, pictures=False)
    add_output_flags(p, "per-layer ranks and fidelity of the chosen setting (or the recommended one)")
    refuse(p, *OUTPUT_FLAGS, why="analyze writes no LoRA (drop it); it prints the sweep, and "
           "--report/--plot write pictures; run `lora-resize resize` with the flags of the row you pick")


def run(args: argparse.Namespace) -> int:
    from ..ops.analyze import analyze
    from ..report.text import analysis_table, per_layer_table, strict_json

    if args.report or args.plot:
        from ..report.html import check_paths
        check_paths(args.report, args.plot)
    src = input_of(args, "lora-resize analyze IN.safetensors")
    threshold = DEFAULT_MAX_EFFECT_ERROR if args.max_effect_error is None else args.max_effect_error
    a = analyze(src, progress=progress(args.quiet, "decomposing"), max_effect_error=threshold,
                effect=effect_probing(args), effect_progress=progress(args.quiet, "effect", "setting"),
                **option_values(args))
    written = []
    if args.report:
        from ..report.html import write_html
        written.append(f"report written to {write_html(a, args.report)}")
    if args.plot:
        from ..report.png import write_png
        written.append(f"plot written to {write_png(a, args.plot)}")
    if args.json:
        print(strict_json(a.as_dict()))
        if args.verbose:  # stdout holds the JSON alone
            print(per_layer_table(a), file=sys.stderr)
    else:
        print(analysis_table(a, verbose=args.verbose))
        for line in written:
            print(line)
    return 0


# the flags that only --effect reads (their defaults None: given without --effect they would be ignored: refused)
EFFECT_ONLY = {"prompt": "--prompt", "seed": "--seed", "probe_steps": "--probe-steps", "size": "--size",
               "base_config": "--base-config", "max_effect_error": "--max-effect-error"}


def effect_probing(args: argparse.Namespace):
    """The Probing of `--effect` (None without it). Raises OptionsError for --effect without --base, or one of the
    EFFECT_ONLY flags given without --effect."""
    if not args.effect:
        given = [flag for dest, flag in EFFECT_ONLY.items() if getattr(args, dest) is not None]
        if given:
            raise OptionsError(f"{given[0]} is read only with --effect (how the model's output is measured): add "
                               f"--effect (and --base MODEL), or drop {given[0]}")
        return None
    if args.base is None:
        raise OptionsError("--effect measures the model's output: add --base MODEL (a diffusers folder or a "
                           "single-file SD1.5 / SDXL / Flux.1 checkpoint)")
    return probing_from(args, args.base)
