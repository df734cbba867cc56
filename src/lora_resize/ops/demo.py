"""`lora-resize demo`: synthesize an SD1.5-shaped LoCon, resize it with a dynamic method, print what happened."""
from __future__ import annotations

import time
from pathlib import Path

from ..options import ResizeOptions
from ..report.text import summary
from ..testing.loras import write_sd15_locon
from ..units import format_size
from .resize import resize

SMALL = dict(rank=64, alpha=32, conv_rank=32, conv_alpha=16)
FULL = dict(rank=512, alpha=32, conv_rank=512, conv_alpha=16)  # the "trained at 512 by mistake" case
DEMO_OPTIONS = dict(method="sv_fro", param=0.9, rank=128)


def demo(folder: str | Path, full: bool = False, progress=None, synth_progress=None) -> int:
    """Write demo_in.safetensors and demo_out.safetensors into `folder` and print a summary; returns 0."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shape = FULL if full else SMALL
    src, dst = folder / "demo_in.safetensors", folder / "demo_out.safetensors"
    t = time.perf_counter()
    write_sd15_locon(src, **shape, progress=synth_progress)
    print(f"synthesized an SD1.5 LoCon (350 layers, rank {shape['rank']}, conv rank {shape['conv_rank']}, fp16): "
          f"{src} ({format_size(src.stat().st_size)}, {time.perf_counter() - t:.1f} s)")
    opts = ResizeOptions(**DEMO_OPTIONS)
    print(f"resizing with --method {opts.method} --param {opts.param} --rank {opts.rank} ...")
    result = resize(src, dst, opts, progress=progress)
    print(summary(result))
    print(f"\nsame job, sd-scripts form: lora-resize --model {src} --save_to {dst} --new_rank {opts.rank} "
          f"--dynamic_method {opts.method} --dynamic_param {opts.param} --save_precision fp16")
    return 0
