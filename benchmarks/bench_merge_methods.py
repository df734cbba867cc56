"""Benchmark: every registered merge method on 10 Flux-shaped rank-32 LoRAs, ours (`lora-resize merge
--merge-method M --rank K`, from the factors in the core space) against the dense implementation
(lora_resize.testing.dense_merge.dense_merge on the dense float64 updates tau_i = alpha/r * up_i @ down_i, then a
full SVD truncated to the same rank K): time and peak memory, each measured in its own process side by side, and
the relative Frobenius error of ours against the dense result per layer (the worst layer, and over all layers).

    python benchmarks/bench_merge_methods.py            # 10 inputs, rank 32, a subset of Flux-dev's layers at real
                                                         # width 3072 (see LAYERS), output rank 64
    python benchmarks/bench_merge_methods.py --quick    # the same at width 256 (CI-sized, seconds)
    python benchmarks/bench_merge_methods.py --methods sum,tsv --core-judge

Flux-dev has 19 double and 38 single blocks; the default takes the image stream of double block 0 and single
block 0 (LAYERS, real shapes), because the dense side needs T full m x n float64 updates per layer (10 x 226 MB for
attn_qkv) and minutes of SVDs. ties, dare and magnitude_prune are elementwise, so ours (the method on the core
matrices, README: Merge methods) is not the paper's dense version and their error column shows how far the two
are apart; `--core-judge` adds the dense judge of the core-space version (dense_core_bases: the canonical bases
from the dense updates, the method on U^T tau_i V), which ours matches to rounding. Also printed: our peak memory
merging 2 and 10 such inputs (sum), the bounded-memory check.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import run_cli, warm

# Flux-dev's img stream of double block 0 and single block 0 (archs.flux_dev names; at width d: d x d, 3d x d,
# d x (d + 4d), 4d x d, d x 4d); --layers N compares the first N (ours merges only those: the others dropped)
LAYERS = ["lora_unet_double_blocks_0_img_attn_proj", "lora_unet_double_blocks_0_img_attn_qkv",
          "lora_unet_single_blocks_0_linear2", "lora_unet_double_blocks_0_img_mlp_0",
          "lora_unet_double_blocks_0_img_mlp_2"]
FLAT = {"iso"}  # a flat merged spectrum has no unique rank-k truncation: compared at the full merged rank

BUILD = """
import sys, torch
from safetensors.torch import save_file
from lora_resize.testing import archs
from lora_resize.testing.loras import lora_state_dict
path, width, rank, seed, names = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
shapes = [m for m in archs.flux_dev(width=width, double=1, single=1, te1=None, te3=None) if m.name in names]
sd = lora_state_dict(shapes, "kohya", rank=rank, alpha=rank / 2, dtype=torch.bfloat16, seed=seed)
save_file(sd, path, {"ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2), "ss_base_model_version": "flux1"})
"""

# the dense side, in its own process: reads the factors with safetensors (not our reader), times the dense merge
# and SVD per layer, then (untimed) the error of ours against it
DENSE = """
import json, sys, time, torch
from safetensors import safe_open
from lora_resize.testing.dense_merge import dense_core_bases, dense_merge
method, ours, k, core, names, inputs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", \\
    sys.argv[5].split(","), sys.argv[6:]
torch.set_num_threads(1)
def dw(f, name):
    up, down = f.get_tensor(name + ".lora_up.weight").double(), f.get_tensor(name + ".lora_down.weight").double()
    return up @ down * (float(f.get_tensor(name + ".alpha")) / down.shape[0])
def best(W):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]
files = [safe_open(p, "pt") for p in inputs]
seconds, errs, core_errs, num, den, cnum, cden = 0.0, {}, {}, 0.0, 0.0, 0.0, 0.0
for name in names:
    t = time.perf_counter()
    taus = [dw(f, name) for f in files]
    ref = best(dense_merge(method, taus, name=name))
    seconds += time.perf_counter() - t
    mine = dw(safe_open(ours, "pt"), name)
    d2, r2 = float((mine - ref).norm()) ** 2, float(ref.norm()) ** 2
    errs[name], num, den = (d2 / r2) ** 0.5, num + d2, den + r2
    if core:
        U, V = dense_core_bases(taus)
        judge = best(U @ dense_merge(method, [U.T @ t @ V for t in taus], name=name) @ V.T)
        d2, r2 = float((mine - judge).norm()) ** 2, float(judge.norm()) ** 2
        core_errs[name], cnum, cden = (d2 / r2) ** 0.5, cnum + d2, cden + r2
    del taus
peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(json.dumps({"seconds": seconds, "peak": int(peak) * 1024, "worst": max(errs.values()),
                  "global": (num / den) ** 0.5,
                  "core_worst": max(core_errs.values()) if core_errs else None,
                  "core_global": (cnum / cden) ** 0.5 if core_errs else None}))
"""


def build(folder: Path, n: int, width: int, rank: int) -> list[Path]:
    paths = []
    for i in range(n):
        p = folder / f"flux{width}_r{rank}_{i}.safetensors"
        if not p.exists():
            subprocess.run([sys.executable, "-c", BUILD, str(p), str(width), str(rank), str(i), *LAYERS], check=True)
        warm(p)
        paths.append(p)
    return paths


def dense(method: str, ours: Path, k: int, core: bool, inputs: list[Path], layers: list[str]) -> dict:
    p = subprocess.run([sys.executable, "-c", DENSE, method, str(ours), str(k), "1" if core else "0",
                        ",".join(layers), *map(str, inputs)], capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"the dense side failed on {method}:\n{p.stderr}")
    return json.loads(p.stdout)


def main() -> None:
    from lora_resize.core.merging import merge_methods

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="width 256 instead of Flux's 3072 (CI-sized)")
    ap.add_argument("--width", type=int, default=None, help="the model width (default 3072, Flux's; --quick 256)")
    ap.add_argument("--layers", type=int, default=len(LAYERS), help=f"how many of the {len(LAYERS)} layers the "
                    "methods are compared on (the dense side's SVDs take minutes each at Flux's width)")
    ap.add_argument("--inputs", type=int, default=10)
    ap.add_argument("--rank", type=int, default=32, help="the inputs' rank")
    ap.add_argument("--out-rank", type=int, default=64, help="the merged LoRA's rank (ours and the dense side's)")
    ap.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    ap.add_argument("--core-judge", action="store_true", help="also the dense judge of the core-space version "
                    "(always with --quick)")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "lora-resize-bench"))
    args = ap.parse_args()
    width = args.width or (256 if args.quick else 3072)
    layers = LAYERS[:args.layers]
    drops = [a for n in LAYERS[args.layers:] for a in ("--rule", f"{n}=drop")]
    core = args.core_judge or args.quick
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = build(folder, args.inputs, width, args.rank)
    methods = args.methods.split(",") if args.methods else merge_methods()
    print(f"inputs: {args.inputs} Flux-dev-shaped kohya LoRAs, rank {args.rank}, bf16, width {width}, layers "
          f"{', '.join(n.replace('lora_unet_', '') for n in LAYERS)} ({paths[0].stat().st_size / 1e6:.1f} MB each); "
          f"merged at weight 1 each to rank {args.out_rank} (--precision float; {', '.join(sorted(FLAT))} at the "
          f"full merged rank {args.inputs * args.rank}); methods compared on "
          f"{', '.join(n.replace('lora_unet_', '') for n in layers)}")
    out = folder / "merged.safetensors"
    for n in (2, args.inputs):
        secs, rss, text = run_cli(["merge", *map(str, paths[:n]), "-o", str(out), "--rank", str(args.out_rank),
                                   "--precision", "float", "--json", "-q"])
        print(f"memory: ours, sum of {n} inputs: peak RSS {rss / 2**20:.0f} MiB, {secs:.1f} s wall")
    print(f"{'method':16} {'ours s':>8} {'ours MiB':>9} {'dense s':>8} {'dense MiB':>9} {'err worst':>10} "
          f"{'err all':>9}" + (f" {'core-judge worst':>17}" if core else ""))
    for method in methods:
        k = args.inputs * args.rank if method in FLAT else args.out_rank
        secs, rss, text = run_cli(["merge", *map(str, paths), "-o", str(out), "--rank", str(k), "--precision",
                                   "float", "--json", "-q", "--merge-method", method, *drops])
        mine = json.loads(text)["seconds"]
        d = dense(method, out, k, core, paths, layers)
        line = (f"{method:16} {mine:8.2f} {rss / 2**20:9.0f} {d['seconds']:8.2f} {d['peak'] / 2**20:9.0f} "
                f"{d['worst']:10.2e} {d['global']:9.2e}")
        if core:
            line += f" {d['core_worst']:17.2e}"
        print(line, flush=True)
    print("ours s: the merge's own seconds (the CLI's JSON; the process's start-up not counted); dense s: the dense "
          "merge and SVD per layer (file reads included); MiB: each process's peak RSS (VmHWM); err: ||ours - "
          "dense||_F / ||dense||_F, the worst layer and over all layers")


if __name__ == "__main__":
    main()
