"""Factors with trained-like spectra: each layer's singular values decay as s_i ~ ((i + 3) / 3) ** -p with
p = 1.3 jittered by +-20% (a flat head, then a power-law tail: the shape that
reproduces the sizes sd-scripts' sv_ratio resize gives on trained LoCons), on random orthonormal singular vectors."""
from __future__ import annotations

import torch


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
