"""Benchmark: lora-resize against the classic algorithm (sd-scripts resize_lora.py: merge up@down, full SVD of
every dW, same ranks) on the SD1.5 LoCon 512:32:512:16 fp16 case (1.16 GiB), plus the time to just read the input
and write the output, and our peak RSS.

    python benchmarks/bench_resize.py                      # the full case; reference timed on one layer per shape
    python benchmarks/bench_resize.py --reference all      # time the reference on every layer (~7-9 min here)
    python benchmarks/bench_resize.py --rank 64 --conv-rank 32   # a smaller input

The reference sample: each distinct (out, in*k*k) shape's SVD is timed once on a real layer of that shape and
multiplied by the number of layers with that shape (SVD time depends on the shape only). Targets (issues #2, #24):
>= 50x the reference for the whole run, <= 2x read+write, peak RSS <= 1 GB.
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
from lora_resize.io.writer import write_safetensors




def read_write_baseline(src: Path, produced: Path, scratch: Path) -> float:
    """Seconds to read every tensor of the input and to write the output's tensors to a new file."""
    t = time.perf_counter()
    r = open_tensor_file(src)
    for k in r.infos():
        r.get(k)
    r.close()
    o = open_tensor_file(produced)
    tensors = {k: o.get(k) for k in o.infos()}
    meta = o.metadata
    o.close()
    write_safetensors(scratch, tensors, meta)
    secs = time.perf_counter() - t
    scratch.unlink()
    return secs


def reference_layer(up: torch.Tensor, down: torch.Tensor, alpha: float | None, k: int) -> torch.Tensor:
    """The classic algorithm on one layer: float32 merge, full SVD, truncate to k, sd-scripts factor split."""
    r = down.shape[0]
    W = up.float().reshape(up.shape[0], -1) @ down.float().reshape(r, -1)
    U, S, Vh = torch.linalg.svd(W)
    new_up = U[:, :k] @ torch.diag(S[:k])
    new_down = Vh[:k]
    scale = 1.0 if alpha is None else alpha / r
    return (new_up @ new_down) * scale  # the effective rank-k dW, for the exactness check


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--conv-rank", type=int, default=512)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "lora-resize-bench"))
    ap.add_argument("--method", default="sv_ratio")
    ap.add_argument("--param", default="8")
    ap.add_argument("--cap", default="128", help="the rank cap for the dynamic method")
    ap.add_argument("--reference", choices=["shapes", "all", "none"], default="shapes")
    args = ap.parse_args()

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / f"sd15_locon_{args.rank}_{args.conv_rank}.safetensors"
    dst = folder / "resized.safetensors"
    ensure_sd15_locon(src, args.rank, args.conv_rank)
    size = src.stat().st_size
    print(f"input: {src} ({size / 2**30:.3f} GiB, {size:,} bytes); torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs")

    warm(src)

    cmd = ["resize", str(src), "-o", str(dst), "--method", args.method, "--param", args.param, "--rank", args.cap,
           "--json", "-q"]
    ours_s, ours_rss, out = run_cli(cmd)
    result = json.loads(out)
    ranks = {row["name"]: row["new_rank"] for row in result["layers"]}
    print(f"ours:      {ours_s:7.2f} s wall (process start and torch import included), peak RSS "
          f"{ours_rss / 2**30:.2f} GiB; in-library {result['seconds']:.2f} s; output "
          f"{result['output_bytes'] / 1e6:.1f} MB; mean fro retained {result['mean_fro_retained']:.2%}")

    io_s = read_write_baseline(src, dst, folder / "rw_baseline.safetensors")
    print(f"read+write only: {io_s:.2f} s")

    reader = open_tensor_file(src)
    layout = detect(reader.infos(), reader.metadata)
    by_shape: dict[tuple, list] = collections.defaultdict(list)
    for m in layout.modules:
        info = reader.infos()[m.down_key]
        n = 1
        for d in info.shape[1:]:
            n *= d
        by_shape[(reader.infos()[m.up_key].shape[0], n)].append(m)
    ref_s, timed_layers, worst_err = 0.0, 0, 0.0
    if args.reference != "none":
        ours_out = open_tensor_file(dst)
        for shape, mods in sorted(by_shape.items()):
            sample = mods if args.reference == "all" else mods[:1]
            for m in sample:
                layer = m.load(reader)
                t = time.perf_counter()
                ref = reference_layer(reader.get(m.up_key), reader.get(m.down_key), layer.alpha, ranks[m.name])
                dt = time.perf_counter() - t
                ref_s += dt * (1 if args.reference == "all" else len(mods))
                timed_layers += 1
                u, d = ours_out.get(m.up_key).double(), ours_out.get(m.down_key).double()
                a = float(ours_out.get(m.name + ".alpha"))
                mine = u.reshape(u.shape[0], -1) @ d.reshape(d.shape[0], -1) * (a / d.shape[0])
                worst_err = max(worst_err, float((mine - ref.double()).norm() / ref.double().norm()))
        ours_out.close()
        how = "every layer" if args.reference == "all" else (
            f"{timed_layers} layers timed (one per distinct shape), scaled by each shape's count to "
            f"{len(layout.modules)} layers")
        print(f"reference: {ref_s:7.1f} s ({how}); merge + full SVD in float32, torch default threads")
        print(f"exactness: worst relative Frobenius difference ours vs reference on those layers: {worst_err:.2e} "
              f"(fp16 output)")
    reader.close()

    lib_s = result["seconds"]
    rows = [("speed-up vs reference", ref_s / lib_s if ref_s else float("nan"), ">= 50x"),
            ("ours / read+write", lib_s / io_s, "<= 2x"),
            ("peak RSS (GB)", ours_rss / 1e9, "<= 1 GB")]
    print("\n(ratios use our in-library seconds; the reference is timed in-process too)")
    print("figure                    value     target")
    for name, value, target in rows:
        print(f"{name:24} {value:8.2f}     {target}")


if __name__ == "__main__":
    main()
