"""Benchmark: a Flux-dev-shaped kohya LoRA at rank 128 (every double-block and single-block linear: 19 x 10 +
38 x 3 = 304 layers, archs.flux_dev names and shapes, bf16, trained-like spectra) resized with sv_fro 0.9.

Prints the resize's wall seconds (a fresh process: start-up and torch import included), its in-library seconds,
its own peak RSS (/proc/self/status VmHWM at exit) and the output size, against the targets of issue 3:
< 30 s, peak RSS < 2 x output size + 500 MB. Then checks a layer of every shape against an independent float64
reference (SVD of up, then of the small rest), since a fast wrong answer is no answer.

    python benchmarks/bench_flux.py                 # builds the input once (a minute or two), then resizes it
    python benchmarks/bench_flux.py --rank 64 --param 0.8
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from common import ensure_flux_lora, run_cli, warm  # benchmarks/common.py: the CLI in a fresh process, its own VmHWM

from lora_resize.io.reader import open_tensor_file

def reference_check(src: Path, dst: Path) -> float:
    """Worst relative Frobenius error, over one layer per distinct shape, of our output's dW against the best
    rank-k approximation of the input's dW computed independently in float64."""
    a, b = open_tensor_file(src), open_tensor_file(dst)
    seen, worst = set(), 0.0
    for key, info in a.infos().items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        shape = (a.infos()[name + ".lora_up.weight"].shape[0], info.shape[1])
        if shape in seen:
            continue
        seen.add(shape)
        up, down = a.get(name + ".lora_up.weight").double(), a.get(key).double()
        r = down.shape[0]
        scale = float(a.get(name + ".alpha")) / r
        nu, nd = b.get(name + ".lora_up.weight").double(), b.get(key).double()
        k = nd.shape[0]
        mine = nu @ nd * (float(b.get(name + ".alpha")) / k)
        U1, S1, V1h = torch.linalg.svd(up, full_matrices=False)
        U2, S2, V2h = torch.linalg.svd((S1[:, None] * V1h) @ down * scale, full_matrices=False)
        ref = ((U1 @ U2[:, :k]) * S2[:k]) @ V2h[:k]
        worst = max(worst, float((mine - ref).norm() / ref.norm()))
    a.close()
    b.close()
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--method", default="sv_fro")
    ap.add_argument("--param", default="0.9")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "lora-resize-bench"))
    args = ap.parse_args()

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / f"flux_dev_r{args.rank}.safetensors"
    dst = folder / "flux_resized.safetensors"
    ensure_flux_lora(src, args.rank)
    size = src.stat().st_size
    print(f"input: {src} ({size / 1e9:.3f} GB, 304 layers, rank {args.rank}, bf16); torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs")
    warm(src)  # a warm page cache, as for a file just written by a trainer
    secs, rss, out = run_cli(["resize", str(src), "-o", str(dst), "--method", args.method, "--param",
                                   args.param, "--json", "-q"])
    result = json.loads(out)
    out_bytes = result["output_bytes"]
    ranks = [x["new_rank"] for x in result["layers"]]
    print(f"resize: {secs:.2f} s wall (process start and torch import included), {result['seconds']:.2f} s "
          f"in-library; peak RSS {rss / 1e6:.0f} MB; output {out_bytes / 1e6:.1f} MB; ranks {min(ranks)}..{max(ranks)} "
          f"(mean {sum(ranks) / len(ranks):.1f}); mean Frobenius retained {result['mean_fro_retained']:.2%}")
    worst = reference_check(src, dst)
    print(f"exactness: worst relative difference to a float64 reference, one layer per shape: {worst:.1e} "
          "(bf16 output)")
    rss_cap = 2 * out_bytes + 500e6
    print("\nfigure                      value      target")
    print(f"{'seconds (wall)':26} {secs:8.2f}      < 30")
    print(f"{'peak RSS (MB)':26} {rss / 1e6:8.0f}      < {rss_cap / 1e6:.0f} (2 x output + 500 MB)")
    ok = secs < 30 and rss < rss_cap
    print("targets met" if ok else "TARGET MISSED")


if __name__ == "__main__":
    main()
