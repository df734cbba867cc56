"""Benchmark: `lora-resize batch` on N small LoRAs (SD1.5 LoCon rank 32, fp16) with 1 and with 2 workers.

    python benchmarks/bench_batch.py              # 200 files
    python benchmarks/bench_batch.py --files 40

One synthetic file is generated and hard-linked N times (distinct paths, identical content), so the benchmark
measures resizing, not generation; each run writes into a fresh output folder.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ensure_sd15_locon, warm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "lora-resize-bench"))
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    one = ensure_sd15_locon(root / "batch_one_32.safetensors", 32, 32)
    src = root / f"batch_in_{args.files}"
    if not src.exists():
        src.mkdir()
        for i in range(args.files):
            os.link(one, src / f"lora_{i:04d}.safetensors")
    warm(one)
    print(f"{args.files} files of {one.stat().st_size / 1e6:.1f} MB (SD1.5 LoCon rank 32, fp16), "
          f"resize --method sv_fro --param 0.9; {os.cpu_count()} CPUs")
    for w in (int(x) for x in args.workers.split(",")):
        out = root / f"batch_out_w{w}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "lora_resize.cli", "batch", str(src), str(out), "--method",
                            "sv_fro", "--param", "0.9", "--workers", str(w), "-q"], capture_output=True, text=True)
        secs = time.perf_counter() - t
        if p.returncode:
            sys.exit(p.stdout[-2000:] + p.stderr[-2000:])
        print(f"workers={w}: {secs:.1f} s, {args.files / secs:.2f} files/s  ({p.stdout.strip().splitlines()[-1]})")
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
