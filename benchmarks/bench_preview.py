"""Benchmark: seconds per setting of `preview` (one picture each) and of `analyze --effect` (the effect error of
each distinct setting), on the tiny test pipelines (lora_resize.testing.pipelines: SD1.5-, SDXL- and Flux.1-like,
random weights, CPU) and, with `--device cuda` where a GPU is present, on an SD1.5-sized UNet (the
UNet2DConditionModel of SD1.5's config values, random weights: no download) inside the tiny pipeline, with a
rank-32 LoRA on its attention and feed-forward linears. Prints one line per setting, the model load, the probes,
and the peak memory (process RSS; GPU: torch's peak allocation).

    python benchmarks/bench_preview.py                 # the tiny models on the CPU
    python benchmarks/bench_preview.py --device cuda   # also the SD1.5-sized UNet on the GPU
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from lora_resize.ops.analyze import analyze
from lora_resize.ops.effect import Probing
from lora_resize.ops.preview import preview
from lora_resize.testing import pipelines

# SD1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json values); cross-attention width is the tiny text
# encoder's, so the pipeline around it stays the tiny one (attn2's to_k/to_v are 32 wide instead of 768)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def timed(label: str, fn):
    t = time.perf_counter()
    out = fn()
    print(f"  {label}: {time.perf_counter() - t:.2f} s")
    return out


def bench(folder: Path, lora: Path, device: str, steps: int, probe_steps: int, sweep: dict) -> None:
    probing = Probing(base=str(folder), prompts=("a photo of a cat",), timesteps=probe_steps, device=device)
    p = preview(lora, probing, steps=steps)
    w, h = p.size
    print(f"  preview: {len(p.pictures)} pictures at {w}x{h}, {steps} steps, {p.seconds:.1f} s in all "
          f"(with loading the base and recording the probes)")
    for pic, s in zip(p.pictures, p.picture_seconds):
        print(f"    {pic.label().splitlines()[0]:<22} {s:6.2f} s")
    t = time.perf_counter()
    times: list[float] = []

    def per_setting(it, total):
        last = time.perf_counter()
        for x in it:
            yield x
            now = time.perf_counter()
            times.append(now - last)
            last = now
    a = analyze(lora, sweep=sweep, effect=probing, effect_progress=per_setting)
    print(f"  analyze --effect: {len(a.rows)} settings, {len(times)} distinct, {time.perf_counter() - t:.1f} s in all;"
          f" per distinct setting (resized + patch + predict at {probe_steps} probes): "
          + ", ".join(f"{s:.2f}" for s in times) + " s")


def peak() -> str:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    gpu = f", GPU peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if torch.cuda.is_available() else ""
    return f"peak RSS {rss:.0f} MiB{gpu}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (the tiny models) or cuda (also the SD1.5-sized UNet)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--probe-steps", type=int, default=4)
    args = ap.parse_args()
    sweep = {"fixed": (1, 2, 4, 8)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for family in pipelines.FAMILIES:
            print(f"{family} (tiny, CPU):")
            pipe = pipelines.tiny_pipeline(family, seed=0)
            folder = pipelines.save_folder(pipe, root / family)
            lora = pipelines.tiny_lora(pipe, root / f"{family}.safetensors", rank=8)
            bench(folder, lora, "cpu", args.steps, args.probe_steps, sweep)
        print(peak())
        if not args.device.startswith("cuda"):
            print("SD1.5-sized UNet: skipped (give --device cuda to run it on a GPU)")
            return
        if not torch.cuda.is_available():
            print("SD1.5-sized UNet: skipped: torch sees no CUDA GPU here")
            return
        from diffusers import UNet2DConditionModel
        pipe = pipelines.tiny_pipeline("sd1", seed=0)
        torch.manual_seed(0)
        pipe.unet = UNet2DConditionModel(cross_attention_dim=pipe.text_encoder.config.hidden_size, **SD15_UNET)
        params = sum(p.numel() for p in pipe.unet.parameters())
        folder = timed("save the pipeline", lambda: pipelines.save_folder(pipe, root / "sd15unet"))
        lora = timed("make the rank-32 LoRA", lambda: pipelines.tiny_lora(pipe, root / "sd15unet.safetensors",
                                                                          rank=32, text_encoder=False))
        print(f"SD1.5-sized UNet ({params / 1e6:.0f} M parameters, float32) on {torch.cuda.get_device_name()}, "
              f"LoRA {lora.stat().st_size / 1e6:.1f} MB:")
        bench(folder, lora, args.device, args.steps, args.probe_steps, {"fixed": (4, 8, 16, 32)})
        print(peak())


if __name__ == "__main__":
    main()
