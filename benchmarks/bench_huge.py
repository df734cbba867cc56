"""Benchmark: a Wan 2.1 14B-sized LoRA (rank 128 on every attention and FFN linear of 40 blocks, float32,
2.5 GB) resized in bounded memory. Target (issue #5): peak RSS under the output size + 1 GB.

    python benchmarks/bench_huge.py
    python benchmarks/bench_huge.py --rank 64 --dtype bf16

The input is generated once (in a child process) and kept in the benchmark folder.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import run_cli, warm

MAKE = ("import sys, torch\n"
        "from lora_resize.testing.archs import wan21; from lora_resize.testing.loras import lora_state_dict\n"
        "from lora_resize.io.writer import write_safetensors\n"
        "sd = lora_state_dict(wan21(), 'kohya', rank=int(sys.argv[2]), alpha=64, dtype=getattr(torch, sys.argv[3]))\n"
        "write_safetensors(__import__('pathlib').Path(sys.argv[1]), sd, {'ss_network_dim': sys.argv[2]})\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "lora-resize-bench"))
    ap.add_argument("--method", default="sv_fro")
    ap.add_argument("--param", default="0.9")
    args = ap.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / f"wan21_r{args.rank}_{args.dtype}.safetensors"
    dst = folder / "wan21_resized.safetensors"
    if not src.exists():
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", MAKE, str(src), str(args.rank), args.dtype], check=True)
        print(f"built {src.name} in {time.perf_counter() - t:.0f} s")
    warm(src)
    size = src.stat().st_size
    secs, rss, out = run_cli(["resize", str(src), "-o", str(dst), "--method", args.method, "--param", args.param,
                              "--json", "-q"])
    res = json.loads(out)
    bound = res["output_bytes"] + 2**30
    print(f"input {size / 1e9:.2f} GB ({len(res['layers'])} layers, rank {args.rank}, {args.dtype}); "
          f"{args.method} {args.param} -> output {res['output_bytes'] / 1e6:.1f} MB")
    print(f"seconds: {res['seconds']:.1f} in-library, {secs:.1f} wall")
    print(f"peak RSS {rss / 1e9:.2f} GB; bound (output + 1 GiB) {bound / 1e9:.2f} GB -> "
          f"{'within' if rss <= bound else 'OVER'} ({rss / size:.2f}x the input size)")


if __name__ == "__main__":
    main()
