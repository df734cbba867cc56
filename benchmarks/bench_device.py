"""Benchmark: the same LoRAs resized on the CPU and on a GPU, with the engine one layer at a time and batched.

Inputs: an SD1.5 LoCon at rank 32 (350 small layers, 36 shapes: the case where per-layer overhead dominates) and
a Flux-dev LoRA at rank 128 (304 layers of 3072-wide linears). For each, in this process (in-library seconds,
median of --repeat runs, after one warm-up run that is not counted; on a GPU the first includes CUDA start-up):

    cpu                         the default: small layers batched in 32 MB windows, a window per core
    cpu, one layer at a time    the schedule before batching (every window one layer)
    cuda, one layer at a time   (when CUDA is available) what batching buys on the GPU
    cuda                        the default on a GPU: 512 MB windows, same-shape batches

with the speed relative to the default CPU run and, for each CUDA run, the largest relative Frobenius difference of any layer's update (up @ down * alpha / k)
to the CPU run's, and whether every layer got the same rank. The comparison runs save in float32
(--precision float), so the difference shows the engine's agreement, not a half-precision rounding flip.

    python benchmarks/bench_device.py               # CPU rows only where there is no GPU
    python benchmarks/bench_device.py --repeat 5 --only sd15
    python benchmarks/bench_device.py --big --repeat 1   # + the blog's file, Wan and Qwen-Image sizes

Each input also runs the newest sd-scripts algorithm (bench_sdscripts_lowrank.their_layer: float32 merge, svd_lowrank
where both sides exceed 2048) on the CPU and on CUDA, one layer per shape timed and scaled; its "speed" column is
ours (default CPU) relative to it, so 0.02x means it took 50 times as long.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_sdscripts_lowrank import their_layer
from common import ensure_dit_lora, ensure_flux_lora, ensure_sd15_locon, warm  # benchmarks/common.py

from lora_resize import resize
from lora_resize.core import schedule
from lora_resize.io.reader import open_tensor_file

ONE_LAYER = (1, 1)  # window bytes (and alone-above size) that put every layer in a window of its own


def timed(src: Path, dst: Path, device: str, one_layer: bool, repeat: int, args) -> tuple[float, float, object]:
    """(median seconds, first-run seconds, last result) of resizing src on `device`."""
    default = schedule.window_bytes
    if one_layer:
        schedule.window_bytes = lambda d: ONE_LAYER
    try:
        times, result = [], None
        for _ in range(repeat + 1):
            t = time.perf_counter()
            result = resize(src, dst, method=args.method, param=args.param, rank=args.cap, device=device,
                            precision="float")
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    finally:
        schedule.window_bytes = default
    return statistics.median(times[1:]), times[0], result


def updates(path: Path, device: str) -> dict[str, torch.Tensor]:
    """Every layer's update up @ down * alpha / k (float64, on `device`), by layer name."""
    f = open_tensor_file(path)
    out = {}
    try:
        for key in f.infos():
            if key.endswith(".lora_down.weight"):
                name = key[: -len(".lora_down.weight")]
                down = f.get(key).double().to(device).flatten(1)
                up = f.get(name + ".lora_up.weight").double().to(device).flatten(1)
                out[name] = up @ down * (float(f.get(name + ".alpha")) / down.shape[0])
    finally:
        f.close()
    return out


def worst_difference(a: Path, b: Path, device: str) -> float:
    ua, ub = updates(a, device), updates(b, device)
    assert ua.keys() == ub.keys()
    return max(float((ua[k] - ub[k]).norm() / max(float(ua[k].norm()), 1e-300)) for k in ua)


def sdscripts_seconds(src: Path, device: str, args) -> float:
    """The newest sd-scripts algorithm (merge in float32; svd_lowrank where both sides exceed 2048, full SVD
    elsewhere) on `device`: one layer of every distinct shape timed, scaled by that shape's count."""
    f = open_tensor_file(src)
    by_shape: dict[tuple, list[str]] = {}
    for key, info in f.infos().items():
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            by_shape.setdefault((f.infos()[name + ".lora_up.weight"].shape[0], tuple(info.shape[1:])), []).append(name)
    total = 0.0
    try:
        for names in by_shape.values():
            n = names[0]
            up, down = f.get(n + ".lora_up.weight"), f.get(n + ".lora_down.weight")
            scale = float(f.get(n + ".alpha")) / down.shape[0]
            their_layer(up, down, scale, args.method, args.param, args.cap, device)  # warm-up
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            their_layer(up, down, scale, args.method, args.param, args.cap, device)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            total += (time.perf_counter() - t) * len(names)
    finally:
        f.close()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=["sd15", "flux", "blog", "wan", "qwen"])
    ap.add_argument("--big", action="store_true", help="also the SD1.5 LoCon at rank 512 (the blog's 1.16 GiB "
                    "file) and Wan 2.1 14B / Qwen-Image-sized rank-128 LoRAs (several minutes on a CPU)")
    ap.add_argument("--method", default="sv_fro")
    ap.add_argument("--param", type=float, default=0.9)
    ap.add_argument("--cap", type=int, default=64, help="rank cap for the dynamic method")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "lora-resize-bench"))
    args = ap.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    inputs = {"sd15": lambda: ensure_sd15_locon(folder / "batch_one_32.safetensors", 32, 16),
              "flux": lambda: ensure_flux_lora(folder / "flux_dev_r128.safetensors", 128)}
    if args.big or args.only in ("blog", "wan", "qwen"):
        inputs.update({"blog": lambda: ensure_sd15_locon(folder / "sd15_locon_512_512.safetensors", 512, 512),
                       "wan": lambda: ensure_dit_lora(folder / "wan_r128_b0.safetensors", "wan", 128),
                       "qwen": lambda: ensure_dit_lora(folder / "qwen_r128_b0.safetensors", "qwen", 128)})
    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else "none (CUDA rows skipped)"
    print(f"torch {torch.__version__}, {len(os.sched_getaffinity(0))} CPU cores, GPU: {gpu}; "
          f"{args.method} {args.param} cap {args.cap}, saved as float32, median of {args.repeat} after a warm-up")
    print(f"\n{'input':6} {'device, schedule':28} {'seconds':>8} {'first run':>10} {'speed':>8} "
          f"{'max rel diff':>13} {'ranks':>6}")
    for name, make in inputs.items():
        if args.only and name != args.only:
            continue
        src = make()
        warm(src)
        runs = [("cpu", False), ("cpu", True)] + ([("cuda", True), ("cuda", False)] if cuda else [])
        base = None
        for device, one_layer in runs:
            dst = folder / f"device_{name}_{device}_{'one' if one_layer else 'batched'}.safetensors"
            secs, first, result = timed(src, dst, device, one_layer, args.repeat, args)
            label = f"{device}, {'one layer at a time' if one_layer else 'batched (default)'}"
            if device == "cpu" and not one_layer:
                base = (secs, dst, [x.new_rank for x in result.layers])
            diff, same = "", ""
            if device == "cuda" and base is not None:
                diff = f"{worst_difference(base[1], dst, 'cuda'):.1e}"
                same = "same" if [x.new_rank for x in result.layers] == base[2] else "DIFFER"
            ratio = f"{base[0] / secs:.1f}x" if base is not None else ""
            print(f"{name:6} {label:28} {secs:8.2f} {first:10.2f} {ratio:>8} {diff:>13} {same:>6}", flush=True)
        for device in ["cpu"] + (["cuda"] if cuda else []):
            secs = sdscripts_seconds(src, device, args)
            print(f"{name:6} {'sd-scripts (newest), ' + device:28} {secs:8.2f} {'':>10} {base[0] / secs:7.3f}x",
                  flush=True)
    if not cuda:
        print("\nno CUDA device here: run this on a GPU machine for the cuda rows", file=sys.stderr)


if __name__ == "__main__":
    main()
