"""The maths of the merge methods (core/merging.py is their registry): the weighted sum as stacked factors, and the
core space of the stacked factors in which the other methods work (Panariello et al., arXiv 2509.17786)."""
from __future__ import annotations

import torch

from ..errors import LoraStructureError
from .layer import LowRankLayer

CANCELLED = 1e-10  # a merged update this small next to its inputs' is rounding noise (float64: ~1e-16)


def check_shapes(name: str, parts: list[tuple[float, LowRankLayer]]) -> None:
    """LoraStructureError naming the layer when the inputs' layers differ in out x in or kernel."""
    first = parts[0][1]
    for _, layer in parts:
        if (layer.up.shape[0], layer.down.shape[1], layer.kernel) != (first.up.shape[0], first.down.shape[1],
                                                                       first.kernel):
            raise LoraStructureError(
                f"layer {name} has different shapes in the inputs: out x in {first.up.shape[0]} x "
                f"{first.down.shape[1]} (kernel {first.kernel}) vs {layer.up.shape[0]} x {layer.down.shape[1]} "
                f"(kernel {layer.kernel}); these LoRAs are for different models")


def stacked(name: str, parts: list[tuple[float, LowRankLayer]], cancelled: list[str] | None = None
            ) -> LowRankLayer:
    """One low-rank layer for sum_i w_i * scale_i * up_i @ down_i (shapes checked; LoraStructureError when they
    differ), in float64, with scale 1. When the weighted inputs cancel out (the sum, probed with four fixed random
    vectors, is below CANCELLED x sum_i |w_i scale_i| ||up_i||_F ||down_i||_F: a LoRA minus itself, a module two
    checkpoints left untrained), the layer comes back as exact zeros and its name is appended to `cancelled`."""
    check_shapes(name, parts)
    first = parts[0][1]
    ups = [layer.up.to(torch.float64) * (w * layer.scale) for w, layer in parts]
    downs = [layer.down.to(torch.float64) for _, layer in parts]
    up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    if len(parts) > 1:
        bound = sum(float(torch.linalg.vector_norm(u)) * float(torch.linalg.vector_norm(d)) for u, d in zip(ups, downs))
        probe = torch.randn(down.shape[1], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        if bound > 0 and float(torch.linalg.vector_norm(up @ (down @ probe.to(down.device)))) / 2 <= CANCELLED * bound:
            up = torch.zeros_like(up)
            if cancelled is not None:
                cancelled.append(name)
    return LowRankLayer.with_alpha(up, down, None, kernel=first.kernel, in_channels=first.in_channels)


def summed(name: str, parts: list[tuple[float, LowRankLayer]], settings) -> LowRankLayer:
    """The `sum` method: `stacked` (MergeMethod.combine's signature; `settings`, a core.merging.MergeSettings, unread)."""
    return stacked(name, parts)
