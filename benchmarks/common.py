"""Shared pieces of the benchmark scripts: synthetic inputs made in a child process, the CLI run in a fresh
process with its own peak RSS, and page-cache warming."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

PEAK_RSS_WRAPPER = (
    "import sys, lora_resize.cli as c\n"
    "rc = c.main(sys.argv[1:])\n"
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
    "print('PEAK_KB', hwm[0].split()[1] if hwm else 0, file=sys.stderr)\n"
    "sys.exit(rc)\n")


def run_cli(args: list[str]) -> tuple[float, int, str]:
    """Run the CLI in a fresh process: (wall seconds, its own peak RSS in bytes from /proc VmHWM, stdout).
    (ru_maxrss is not used: across fork+exec it inherits the parent's high-water mark.)"""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", PEAK_RSS_WRAPPER, *args], capture_output=True, text=True)
    secs = time.perf_counter() - t
    if p.returncode:
        sys.exit(f"lora-resize failed ({p.returncode}):\n{p.stderr}")
    peak_kb = int(p.stderr.rsplit("PEAK_KB", 1)[1].split()[0])
    return secs, peak_kb * 1024, p.stdout


def ensure_sd15_locon(path: Path, rank: int, conv_rank: int, seed: int = 0) -> Path:
    """Build the SD1.5 LoCon (alpha 32, conv alpha 16, fp16) in a child process, so this one stays small."""
    if not path.exists():
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import sys; from lora_resize.testing.loras import write_sd15_locon; "
                        "write_sd15_locon(sys.argv[1], rank=int(sys.argv[2]), alpha=32, conv_rank=int(sys.argv[3]), "
                        "conv_alpha=16, seed=int(sys.argv[4]))", str(path), str(rank), str(conv_rank), str(seed)],
                       check=True)
        print(f"built {path.name}: {path.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - t:.1f} s")
    return path


DIT_BUILD = """
import sys, torch
from lora_resize.testing import archs
from lora_resize.testing.synth import synth_factors
from lora_resize.io.writer import write_safetensors
path, family, rank, blocks = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
if family == "flux":
    shapes = archs.flux_dev(te1=None, te3=None, **({"double": blocks, "single": 2 * blocks} if blocks else {}))
    name = lambda n: n
elif family == "wan":
    shapes = archs.wan(**({"blocks": blocks} if blocks else {}))
    name = lambda n: "lora_unet_" + n.replace(".", "_")
else:
    shapes = archs.qwen_image(**({"blocks": blocks} if blocks else {}))
    name = lambda n: "lora_unet_" + n.replace(".", "_")
sd = {}
for m in shapes:
    up, down, _ = synth_factors(m.out, m.inp, rank, g)
    sd[name(m.name) + ".lora_down.weight"] = down.to(torch.bfloat16)
    sd[name(m.name) + ".lora_up.weight"] = up.to(torch.bfloat16)
    sd[name(m.name) + ".alpha"] = torch.tensor(rank / 2).to(torch.bfloat16)
meta = {"ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2), "ss_base_model_version": family,
        "ss_training_comment": f"synthetic {family} LoRA made by the benchmarks"}
write_safetensors(__import__("pathlib").Path(path), sd, meta)
"""


def ensure_dit_lora(path: Path, family: str, rank: int, blocks: int = 0) -> Path:
    """Build a kohya-named LoRA of a DiT family ('flux': Flux-dev, 'wan': Wan 2.1 14B, 'qwen': Qwen-Image) at its
    real layer sizes (bf16, alpha rank/2, trained-like spectra; `blocks` > 0: fewer blocks) in a child process."""
    if not path.exists():
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", DIT_BUILD, str(path), family, str(rank), str(blocks)], check=True)
        print(f"built {path.name} in {time.perf_counter() - t:.0f} s")
    return path


def ensure_flux_lora(path: Path, rank: int) -> Path:
    """The Flux-dev-shaped kohya LoRA (every double- and single-block linear)."""
    return ensure_dit_lora(path, "flux", rank)


def warm(path: Path) -> None:
    """Read a file once so every contestant finds it in the page cache."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass
