"""Benchmark: `lora-resize merge` of two LoRAs against the dense reference (sum of the weighted dense dW per layer,
then a full SVD of it, truncated to the same ranks) — what svd_merge_lora-style tools do.

    python benchmarks/bench_merge.py                 # two SD1.5 LoCons at rank 128 (conv 128), sv_fro 0.95
    python benchmarks/bench_merge.py --reference all # the reference on every layer instead of one per shape

The reference is timed on one layer per distinct (out, in*k*k) shape and scaled by that shape's count, as in
bench_resize.py; the script says so in its output.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from common import ensure_sd15_locon, run_cli, warm

from lora_resize.formats import detect
from lora_resize.io.reader import open_tensor_file


def dense_reference(layers: list[tuple[float, object]], k: int) -> torch.Tensor:
    """Weighted sum of dense dW in float32, full SVD, rank-k truncation (the effective update)."""
    W = None
    for w, layer in layers:
        scale = layer.scale
        d = (layer.up.float() @ layer.down.float()) * (w * scale)
        W = d if W is None else W + d
    U, S, Vh = torch.linalg.svd(W)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "lora-resize-bench"))
    ap.add_argument("--weights", default="0.8,0.5")
    ap.add_argument("--method", default="sv_fro")
    ap.add_argument("--param", default="0.95")
    ap.add_argument("--reference", choices=["shapes", "all"], default="shapes")
    args = ap.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    wa, wb = (float(x) for x in args.weights.split(","))
    a = ensure_sd15_locon(folder / f"merge_a_{args.rank}.safetensors", args.rank, args.rank, seed=1)
    b = ensure_sd15_locon(folder / f"merge_b_{args.rank}.safetensors", args.rank, args.rank, seed=2)
    out = folder / "merged.safetensors"
    for p in (a, b):
        warm(p)
    secs, rss, text = run_cli(["merge", f"{a}:{wa}", f"{b}:{wb}", "-o", str(out), "--method", args.method,
                               "--param", args.param, "--json", "-q"])
    result = json.loads(text)
    ranks = {row["name"]: row["new_rank"] for row in result["layers"]}
    print(f"inputs: 2 x SD1.5 LoCon rank {args.rank}, {a.stat().st_size / 1e6:.0f} MB each; weights {wa}, {wb}; "
          f"{args.method} {args.param}")
    print(f"ours: {result['seconds']:.2f} s in-library ({secs:.2f} s wall with start-up), peak RSS "
          f"{rss / 1e9:.2f} GB, output {result['output_bytes'] / 1e6:.1f} MB, mean fro {result['mean_fro_retained']:.2%}")

    ra, rb = open_tensor_file(a), open_tensor_file(b)
    la, lb = detect(ra.infos(), ra.metadata), detect(rb.infos(), rb.metadata)
    mods_b = {m.name: m for m in lb.modules}
    by_shape = collections.defaultdict(list)
    for m in la.modules:
        info_up, info_down = ra.infos()[m.up_key], ra.infos()[m.down_key]
        n = 1
        for d in info_down.shape[1:]:
            n *= d
        by_shape[(info_up.shape[0], n)].append(m)
    ro = open_tensor_file(out)
    ref_s, timed, worst = 0.0, 0, 0.0
    for shape, mods in sorted(by_shape.items()):
        for m in (mods if args.reference == "all" else mods[:1]):
            parts = [(wa, m.load(ra)), (wb, mods_b[m.name].load(rb))]
            t = time.perf_counter()
            ref = dense_reference(parts, ranks[m.name])
            ref_s += (time.perf_counter() - t) * (1 if args.reference == "all" else len(mods))
            timed += 1
            u, d = ro.get(m.up_key).double(), ro.get(m.down_key).double()
            alpha = float(ro.get(m.name + ".alpha"))
            mine = u.reshape(u.shape[0], -1) @ d.reshape(d.shape[0], -1) * (alpha / d.shape[0])
            worst = max(worst, float((mine - ref.double()).norm() / ref.double().norm()))
    how = "every layer" if args.reference == "all" else (
        f"{timed} layers timed, one per distinct shape, scaled by each shape's count to {len(la.modules)} layers")
    print(f"dense reference (sum + full SVD, float32): {ref_s:.1f} s ({how})")
    print(f"exactness: worst relative Frobenius difference vs the reference: {worst:.2e} (fp16 output)")
    print(f"speed-up: {ref_s / result['seconds']:.1f}x")


if __name__ == "__main__":
    main()
