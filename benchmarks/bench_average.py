"""Benchmark: `lora_resize.average` of one training run's checkpoints against the dense weighted mean of their
updates, next to the factor-wise average (mean of the ups times mean of the downs: musubi-tuner's
lora_post_hoc_ema.py, PEFT-style linear combinations of factors).

    python benchmarks/bench_average.py                        # 6 checkpoints of a Flux.1-shaped rank-32 LoRA
    python benchmarks/bench_average.py --double 19 --single 38 # every Flux.1 block (slow: the dense judge)

The checkpoints are one LoRA (sd-scripts/musubi keys, Flux.1 dev shapes at width 3072, bf16, alpha 16) drifting
along a training run: checkpoint i = checkpoint i-1 + a random walk step on each factor (elementwise noise of
--drift times the factor's RMS), saved with ss_steps. For uniform and ema (--beta) it prints, over all layers, the
relative Frobenius error sqrt(sum ||W - M||^2 / sum ||M||^2) against the dense mean M = sum_i w_i dW_i (float64),
worst layer in brackets, and the time of: ours at full rank (N*32, saved as float32: ~0), ours at rank 32 (the
input's size, bf16), the factor-wise average (rank 32, in memory, float32).
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import torch

import lora_resize
from lora_resize.io.reader import open_tensor_file
from lora_resize.io.writer import write_safetensors
from lora_resize.ops.average import average_weights
from lora_resize.testing.archs import flux1
from lora_resize.testing.loras import lora_keys, lora_state_dict

STYLE = "musubi"  # sd-scripts' / musubi-tuner's Flux keys: lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight


def checkpoints(folder: Path, n: int, rank: int, alpha: float, drift: float, double: int, single: int,
                seed: int) -> list[Path]:
    """`n` checkpoints of one run, steps 500, 1000, ...: a random walk of the factors from a trained-like LoRA."""
    shapes = flux1(double=double, single=single)
    sd = {k: v.float() for k, v in lora_state_dict(shapes, STYLE, rank=rank, alpha=alpha, seed=seed).items()}
    g = torch.Generator().manual_seed(seed + 1)
    paths = []
    for i in range(n):
        if i:
            sd = {k: v if k.endswith(".alpha") else
                  v + drift * v.pow(2).mean().sqrt() * torch.randn(v.shape, generator=g) for k, v in sd.items()}
        step = 500 * (i + 1)
        p = folder / f"flux-run-step{step:08d}.safetensors"
        write_safetensors(p, {k: v.to(torch.bfloat16) for k, v in sd.items()}, {"ss_steps": str(step)})
        paths.append(p)
    return paths


def read(path: Path) -> dict[str, torch.Tensor]:
    with open_tensor_file(path) as r:
        return {k: r.get(k) for k in r.infos()}


def add_update(acc: torch.Tensor, sd: dict[str, torch.Tensor], name: str, w: float) -> torch.Tensor:
    """acc += w * s * up @ down in float64 (s = alpha / rank), in place."""
    dk, uk, ak = lora_keys(name, STYLE)
    up, down = sd[uk].double(), sd[dk].double()
    s = float(sd[ak]) / down.shape[0] if ak in sd else 1.0
    return acc.addmm_(up * (w * s), down)


def dense_mean(sds: list[dict[str, torch.Tensor]], w: list[float], name: str) -> torch.Tensor:
    dk, uk, _ = lora_keys(name, STYLE)
    acc = torch.zeros(sds[0][uk].shape[0], sds[0][dk].shape[1], dtype=torch.float64)
    for wi, sd in zip(w, sds):
        add_update(acc, sd, name, wi)
    return acc


def errors(ref: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(relative Frobenius error over all layers, worst layer's) of `sd`'s updates against `ref`."""
    num = den = worst = 0.0
    for name, m in ref.items():
        d = float(add_update(-m, sd, name, 1.0).norm()) ** 2
        r = float(m.norm()) ** 2
        num, den, worst = num + d, den + r, max(worst, math.sqrt(d / r))
    return math.sqrt(num / den), worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=int, default=6)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--double", type=int, default=2, help="Flux.1 double blocks (19 in the model)")
    ap.add_argument("--single", type=int, default=4, help="Flux.1 single blocks (38 in the model)")
    ap.add_argument("--drift", type=float, default=0.15, help="random-walk step per checkpoint, times factor RMS")
    ap.add_argument("--beta", type=float, default=0.8)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "lora-resize-bench-average"))
    args = ap.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = checkpoints(folder, args.checkpoints, args.rank, 16.0, args.drift, args.double, args.single, seed=0)
    sds = [read(p) for p in paths]
    names = [m.name for m in flux1(double=args.double, single=args.single)]
    size = paths[0].stat().st_size
    print(f"inputs: {len(paths)} checkpoints of a Flux.1-shaped rank-{args.rank} LoRA ({len(names)} layers, width "
          f"3072, bf16, {size / 1e6:.1f} MB each), random-walk drift {args.drift} x factor RMS per checkpoint; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for weighting, params in (("uniform", {}), ("ema", {"beta": args.beta})):
        w = average_weights(weighting, len(paths), **params)
        t = time.perf_counter()
        ref = {n: dense_mean(sds, w, n) for n in names}
        dense_s = time.perf_counter() - t
        label = weighting + "".join(f" {k} {v}" for k, v in params.items())
        print(f"\n{label}: weights {', '.join(f'{x:.4f}' for x in w)}; dense mean (float64 judge) {dense_s:.1f} s")
        for what, opts in ((f"ours, full rank {len(paths) * args.rank}, float32",
                            {"rank": len(paths) * args.rank, "precision": "float"}),
                           (f"ours, rank {args.rank}, bf16", {"rank": args.rank})):
            out = folder / "avg.safetensors"
            t = time.perf_counter()
            lora_resize.average(paths, out, weighting=weighting, **params, **opts)
            secs = time.perf_counter() - t
            err, worst = errors(ref, read(out))
            print(f"  {what:<32} rel. Frobenius error {err:.2e} (worst layer {worst:.2e}), {secs:.2f} s")
        secs = math.inf
        for _ in range(3):  # the best of 3: it is milliseconds of work, easily drowned by a busy machine
            t = time.perf_counter()
            factor_wise = {k: sum(wi * sd[k].float() for wi, sd in zip(w, sds)) for k in sds[0]}
            secs = min(secs, time.perf_counter() - t)
        err, worst = errors(ref, factor_wise)
        print(f"  {f'factor-wise, rank {args.rank}, float32':<32} rel. Frobenius error {err:.2e} (worst layer "
              f"{worst:.2e}), {secs:.2f} s (in memory, not written)")


if __name__ == "__main__":
    main()
