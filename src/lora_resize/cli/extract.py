"""`lora-resize extract --base BASE --tuned TUNED -o OUT [rank options]`: a LoRA of a fine-tune's difference."""
from __future__ import annotations

import argparse

from .flags import add_option_groups, add_output, add_output_flags, option_values, options_from, progress

HELP = "extract a LoRA from a fine-tuned checkpoint (its difference to the base)"
DESCRIPTION = ("Write a LoRA of TUNED - BASE: every linear and conv weight of the denoiser and the text encoders "
               "that differs, as the best rank-k factors of its difference (the SVD of the dense difference), "
               "with every rank option resize has (--rank, --method/--param, --target-size, --target-fro, --rule). "
               "Both checkpoints in one layout: .safetensors single files (SD/SDXL, DiT native, ComfyUI) or "
               "diffusers folders, fp8 with scales read as stored; read one weight at a time. Differing biases are "
               "left out (--bias-diffs: written as `.diff_b`, which ComfyUI adds), as are norms, embeddings and other "
               "weights, each listed in a note. Default layout: the trainers' (kohya names; --output-format for "
               "another). --analyze prints the sizes and fidelities of the default sweep instead of writing a file.")
EXTRACT_BASE_HELP = "the checkpoint the fine-tune started from (.safetensors file or diffusers folder)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tuned", required=True, metavar="MODEL",
                   help="the fine-tuned (or distilled) checkpoint, in the layout of --base")
    add_output(p, "output LoRA file (.safetensors)")
    p.add_argument("--analyze", action="store_true",
                   help="print the sizes and fidelities of the default sweep of settings; write nothing")
    p.add_argument("--bias-diffs", action="store_true",
                   help="write differing biases as `<module>.diff_b` (ComfyUI adds them to the bias; diffusers' "
                        "kohya loader refuses such a file); default: left out, listed in a note")
    add_option_groups(p, "rank", "output", "compute")
    for a in p._actions:  # the rank group's --base (a base to measure a LoRA against) is extract's base model
        if a.dest == "base":
            a.help, a.required = EXTRACT_BASE_HELP, True
        elif a.dest == "base_variant":
            a.help = "with diffusers folders: read the weight files of this variant (e.g. fp16) in both"
    add_output_flags(p, "per-layer lines in sd-scripts' format")


def run(args: argparse.Namespace) -> int:
    from ..errors import OptionsError
    from ..ops.extract import extract, extraction_analysis, refuse_base_measures
    from .resize import layer_printer, render

    fields = option_values(args)
    base, variant = fields.pop("base"), fields.pop("base_variant")
    refuse_base_measures(fields.get("method"), fields.get("target_error"))
    if args.analyze:
        from ..report.text import analysis_table, strict_json
        if args.output:
            raise OptionsError("extract --analyze writes no file: drop -o, or drop --analyze to extract")
        a = extraction_analysis(base, args.tuned, bias_diffs=args.bias_diffs, base_variant=variant,
                                progress=progress(args.quiet, "decomposing"), **fields)
        print(strict_json(a.as_dict()) if args.json else analysis_table(a, verbose=args.verbose))
        return 0
    if not args.output:
        raise OptionsError("no output file: add -o OUT.safetensors (or --analyze for the sweep)")
    opts = options_from(args, base=None, base_variant=None)
    result = extract(base, args.tuned, args.output, opts, bias_diffs=args.bias_diffs, base_variant=variant,
                     progress=progress(args.quiet, "extracting"), on_layer=layer_printer(args, opts.dynamic))
    return render(result, args, [])
