"""`lora-resize convert IN -o OUT --to LAYOUT [--arch ARCH] [rank options]`: one LoRA in another layout, every
layer's update kept (or resized in the same pass when a rank option is given)."""
from __future__ import annotations

import argparse

from .flags import (add_input, add_option_groups, add_output, add_output_flags, choices_of, input_of, option_values,
                    progress)
from .resize import layer_printer, render

HELP = "write a LoRA in another layout (kohya, comfy, diffusers, onetrainer, peft), exactly"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_input(p, "LoRA file to convert (.safetensors; .pt/.ckpt read weights-only), or an adapter folder")
    add_output(p, "output file (or folder for peft)", required=True)
    # the same setting as resize's --output-format (one dest: either flag sets it; two different values are refused)
    p.add_argument("--to", dest="output_format", required=True, metavar="LAYOUT", choices=choices_of("conversions"),
                   help="kohya (sd-scripts, musubi-tuner), comfy (lora_unet_ + ComfyUI's module paths: what ComfyUI, "
                        "Forge, InvokeAI and sd-scripts read), diffusers (diffusers, ai-toolkit, SimpleTuner), "
                        "onetrainer, peft (adapter folder)")
    add_option_groups(p, "rank", "output", "compute")
    add_output_flags(p, "per-layer lines in sd-scripts' format")


def run(args: argparse.Namespace) -> int:
    from ..ops.convert import convert

    fields = option_values(args)
    to = fields.pop("output_format")
    src = input_of(args, "lora-resize convert IN.safetensors -o OUT.safetensors --to LAYOUT")
    result = convert(src, args.output, to, progress=progress(args.quiet, "converting"),
                     on_layer=layer_printer(args, fields.get("method") is not None), **fields)
    return render(result, args, [])
