"""Benchmark: `analyze --base` on the blog's SD1.5 LoCon (512:32:512:16 fp16, 1.16 GiB) against an SD1.5-sized
synthetic base checkpoint in the original single-file layout (`model.diffusion_model.<sgm path>`,
`cond_stage_model.transformer.<CLIP path>`; fp16; every weight the LoCon patches, 0.9+ GB), beside `analyze`
alone: wall seconds and peak RSS of each (a fresh process each), so what reading and measuring the base costs
is visible. The base is read one weight at a time: its peak RSS should stay near analyze's own.

    python benchmarks/bench_base.py
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ensure_sd15_locon, run_cli, warm

BASE_BUILD = """
import sys, torch
from lora_resize.testing import archs
from lora_resize.models import sd
from lora_resize.io.writer import write_safetensors
g = torch.Generator().manual_seed(0)
out = {}
for m in archs.sd15():
    comp, path = sd.from_kohya(m.name)
    if comp == "unet":
        key = "model.diffusion_model." + sd.unet_to_sgm(path, sdxl=False) + ".weight"
    else:
        key = "cond_stage_model.transformer." + path + ".weight"
    shape = (m.out, m.inp, *m.kernel_dims) if m.conv else (m.out, m.inp)
    out[key] = (torch.randn(*shape, generator=g) * 0.02).to(torch.float16)
write_safetensors(__import__("pathlib").Path(sys.argv[1]), out, {})
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "lora-resize-bench"))
    args = ap.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    src = ensure_sd15_locon(folder / "sd15_locon_512_512.safetensors", 512, 512)
    base = folder / "sd15_base_fp16.safetensors"
    if not base.exists():
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", BASE_BUILD, str(base)], check=True)
        print(f"built {base.name}: {base.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s")
    warm(src)
    warm(base)
    plain_s, plain_rss, _ = run_cli(["analyze", str(src), "-q"])
    base_s, base_rss, out = run_cli(["analyze", str(src), "--base", str(base), "-q"])
    print(f"input {src.name} ({src.stat().st_size / 2**30:.2f} GiB), base {base.name} "
          f"({base.stat().st_size / 1e9:.2f} GB); {os.cpu_count()} CPUs")
    print(f"analyze:          {plain_s:6.1f} s wall, peak RSS {plain_rss / 1e9:.2f} GB")
    print(f"analyze --base:   {base_s:6.1f} s wall, peak RSS {base_rss / 1e9:.2f} GB "
          f"(+{base_s - plain_s:.1f} s, x{base_s / plain_s:.2f})")
    print("\n" + "\n".join(out.splitlines()[:6]))


if __name__ == "__main__":
    main()
