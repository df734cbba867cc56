"""`lora-resize preview LORA --base MODEL`: the pictures of each setting side by side, as a labelled grid PNG and
in the HTML report."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import OptionsError
from ..results import DEFAULT_MAX_EFFECT_ERROR, DEFAULT_RENDER_STEPS
from .flags import (add_input, add_model_output_flags, add_option_groups, add_output, add_output_flags, input_of,
                    options_from_flags, probing_from, progress)

HELP = "render one prompt with the base model, the original LoRA and each setting, side by side"
DESCRIPTION = ("Render the same prompt and seed with the base model alone, with the original LoRA, then with each "
               "setting (default: sv_ratio 128, 32, 8, 4, 2; or --setting FLAGS, repeated) applied in memory, into "
               "a labelled grid PNG (-o, default <LORA>_preview.png beside the LoRA, under a free name): each "
               "picture with its setting, file size, effect error (the share of the LoRA's change to the "
               "denoiser's prediction the setting loses) and SSIM to the original-LoRA image (scikit-image, "
               "1 = identical). --report adds the pictures to the HTML report beside the size-vs-effect curve. "
               "Needs pip install 'lora-resize[preview]'.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_input(p, "LoRA file (.safetensors; .pt/.ckpt read weights-only), or an adapter folder")
    p.add_argument("--base", metavar="MODEL", help="the base model: a diffusers folder or a single-file SD1.5, "
                   "SDXL or Flux.1 checkpoint (required)")
    p.add_argument("--base-variant", metavar="NAME", help="with a diffusers folder as --base: its weight variant "
                                                          "(e.g. fp16)")
    p.add_argument("--setting", action="append", metavar="FLAGS",
                   help="a setting as resize flags, e.g. --setting \"--method sv_ratio --param 32\" (repeat for "
                        "several; default: sv_ratio 128, 32, 8, 4, 2)")
    add_model_output_flags(p, pictures=True)
    p.add_argument("--max-effect-error", type=float, default=DEFAULT_MAX_EFFECT_ERROR, metavar="X",
                   help=f"recommend the smallest file losing at most this effect error (default "
                        f"{DEFAULT_MAX_EFFECT_ERROR})")
    add_output(p, "the grid PNG (default: <LORA>_preview.png beside the LoRA, under a free name)")
    p.add_argument("--report", metavar="OUT.html", help="also write the HTML report, the pictures beside the curve")
    add_option_groups(p, "compute")
    add_output_flags(p, None)


def grid_path(args: argparse.Namespace, src: str) -> Path:
    """-o, or <stem>_preview.png beside the LoRA under a free name (never written over)."""
    from ..io.paths import free_name
    if args.output:
        path = Path(args.output)
        from ..report.html import check_out
        check_out(path, (".png",))
        return path
    folder = Path(src).parent if not Path(src).is_dir() else Path(src)
    stem = Path(src).stem if not Path(src).is_dir() else Path(src).name
    return folder / free_name(f"{stem}_preview.png", lambda n: os.path.lexists(folder / n))


def run(args: argparse.Namespace) -> int:
    from ..ops.preview import preview
    from ..report.grid import write_grid
    from ..report.text import strict_json

    src = input_of(args, "lora-resize preview LORA --base MODEL")
    if args.base is None:
        raise OptionsError("preview renders with the base model: add --base MODEL (a diffusers folder or a "
                           "single-file SD1.5 / SDXL / Flux.1 checkpoint)")
    if args.prompt and len(args.prompt) > 1:
        raise OptionsError("preview renders one prompt: give --prompt once")
    if args.report:
        from ..report.html import check_paths
        check_paths(args.report, None)
    out = grid_path(args, src)
    settings = [options_from_flags(line, f'--setting "{line}"') for line in args.setting or ()]
    probing = probing_from(args, args.base)
    p = preview(src, probing, settings or None, prompt=args.prompt[0] if args.prompt else None,
                steps=DEFAULT_RENDER_STEPS if args.steps is None else args.steps,
                max_effect_error=args.max_effect_error, progress=progress(args.quiet, "decomposing"),
                picture_progress=progress(args.quiet, "pictures", "picture"))
    written = [f"grid written to {write_grid(p.grid(), out)}"]
    if args.report:
        from ..report.html import write_html
        written.append(f"report written to {write_html(p.analysis, args.report, pictures=p)}")
    if args.json:
        print(strict_json({**p.as_dict(), "grid": str(out), "report": args.report}))
        return 0
    from ..report.text import preview_lines
    print(preview_lines(p))
    for line in written:
        print(line)
    return 0
