"""LoRA files for the synthetic architectures (archs.py): tensors in the kohya, PEFT or diffusers key family with
trained-like spectra (synth.py), and the demo's SD1.5 LoCon (350 modules, FORMATS.md §2)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..io.writer import write_safetensors
from .archs import ModuleShape, sd15
from .synth import synth_factors

STYLES = ("kohya", "peft", "diffusers")


def lora_keys(name: str, style: str) -> tuple[str, str, str]:
    """(down, up, alpha) keys of module `name` in a key family."""
    if style == "kohya":
        return name + ".lora_down.weight", name + ".lora_up.weight", name + ".alpha"
    base = ("base_model.model." + name) if style == "peft" else name
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    return base + ".lora_A.weight", base + ".lora_B.weight", base + ".alpha"


def lora_state_dict(shapes: Sequence[ModuleShape], style: str = "kohya", rank: int = 8, alpha: float | None = None,
                    dtype: torch.dtype = torch.float32, seed: int = 0, conv_rank: int | None = None
                    ) -> dict[str, torch.Tensor]:
    """A LoRA's tensors for `shapes` in a key family, each layer with a trained-like spectrum. `alpha` None writes
    no alpha keys (PEFT and diffusers files never have them; scale 1 or the config's)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for m in shapes:
        r = conv_rank if (conv_rank and m.kernel > 1) else rank
        up, down, _ = synth_factors(m.out, m.inp * m.kernel * m.kernel, r, g)
        if m.conv:
            up, down = up.reshape(m.out, r, 1, 1), down.reshape(r, m.inp, m.kernel, m.kernel)
        dk, uk, ak = lora_keys(m.name, style)
        sd[dk], sd[uk] = down.to(dtype).contiguous(), up.to(dtype).contiguous()
        if alpha is not None:
            sd[ak] = torch.tensor(float(alpha)).to(dtype)
    return sd


def synth_locon(shapes: list[ModuleShape], rank: int, alpha: float, conv_rank: int, conv_alpha: float,
                dtype: torch.dtype = torch.float16, seed: int = 0, progress=None) -> dict[str, torch.Tensor]:
    """A kohya LoCon state dict: 3x3 convs get conv_rank/conv_alpha (skipped when conv_rank is 0), the rest rank/alpha.
    `progress(iterable, total)` may wrap the loop over layers."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for m in (progress(shapes, len(shapes)) if progress else shapes):
        r, a = (conv_rank, conv_alpha) if m.kernel > 1 else (rank, alpha)
        if r <= 0:
            continue
        up, down, _ = synth_factors(m.out, m.inp * m.kernel * m.kernel, r, g)
        if m.conv:
            up, down = up.reshape(m.out, r, 1, 1), down.reshape(r, m.inp, m.kernel, m.kernel)
        sd[m.name + ".lora_up.weight"] = up.to(dtype)
        sd[m.name + ".lora_down.weight"] = down.to(dtype)
        sd[m.name + ".alpha"] = torch.tensor(float(a)).to(dtype)
    return sd


def write_sd15_locon(path: str | Path, rank: int = 32, alpha: float = 16, conv_rank: int = 16,
                     conv_alpha: float = 8, dtype: torch.dtype = torch.float16, seed: int = 0, progress=None) -> Path:
    """Write an SD1.5-shaped LoCon with sd-scripts-style metadata; returns the path."""
    path = Path(path)
    sd = synth_locon(sd15(), rank, alpha, conv_rank, conv_alpha, dtype, seed, progress)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(float(alpha)),
            "ss_network_args": f'{{"conv_dim": "{conv_rank}", "conv_alpha": "{conv_alpha}"}}',
            "ss_base_model_version": "sd_v1", "ss_training_comment": "synthetic SD1.5 LoCon made by lora-resize"}
    write_safetensors(path, sd, meta)
    return path
