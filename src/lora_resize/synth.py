"""Synthetic LoRA files with trained-like spectra, for the demo, tests and benchmarks (no download needed).

Each layer's singular values decay as s_i ~ ((i + 3) / 3) ** -p with p = 1.3 jittered by +-20% (FORMATS.md §2),
on random orthonormal singular vectors. Layer lists per architecture live in archs.py; the demo's SD1.5 LoCon
(350 modules) is archs.sd15()."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .writer import write_safetensors


@dataclass(frozen=True)
class ModuleShape:
    """A layer to adapt: kohya name, output features, input channels, square kernel size (1 for linear)."""
    name: str
    out: int
    inp: int
    kernel: int = 1
    conv: bool = False


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g))
    return q


def synth_factors(out: int, n: int, rank: int, g: torch.Generator, decay: float = 1.3, jitter: float = 0.2,
                  top: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(up out x rank, down rank x n, S) in float32 whose product has the trained-like spectrum S."""
    p = min(out, n, rank)
    expo = decay * (1 + jitter * (2 * torch.rand((), generator=g).item() - 1))
    s0 = top if top is not None else 0.5 + 1.5 * torch.rand((), generator=g).item()
    S = s0 * ((torch.arange(p, dtype=torch.float32) + 3) / 3) ** -expo
    U, V = _orthonormal(out, p, g), _orthonormal(n, p, g)
    mix = _orthonormal(rank, rank, g)[:p]  # spread the p directions over all `rank` factor columns
    up = (U * S.sqrt()) @ mix
    down = mix.T @ (S.sqrt()[:, None] * V.T)
    return up, down, S


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
    from .archs import sd15  # archs builds on this module
    path = Path(path)
    sd = synth_locon(sd15(), rank, alpha, conv_rank, conv_alpha, dtype, seed, progress)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(float(alpha)),
            "ss_network_args": f'{{"conv_dim": "{conv_rank}", "conv_alpha": "{conv_alpha}"}}',
            "ss_base_model_version": "sd_v1", "ss_training_comment": "synthetic SD1.5 LoCon made by lora-resize"}
    write_safetensors(path, sd, meta)
    return path
