"""kohya-ss / sd-scripts LoRA and LoCon: `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ..errors import LoraStructureError, NumericalError
from ..tensorfile import TensorInfo, TensorSource
from .base import Format, Layout, LowRankLayer, Module

DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
FLOAT32_MAX = 3.4028234663852886e38


def read_alpha(src: TensorSource, key: str, module: str) -> float:
    """A scalar alpha as a Python float; a non-finite one is an error naming the module."""
    value = float(src.get(key).reshape(-1)[0].float())
    if value != value or value in (float("inf"), float("-inf")):
        raise NumericalError(f"layer {module} has a non-finite alpha ({value}); the file is damaged - re-export it")
    return value


def check_pair(name: str, down: TensorInfo, up: TensorInfo, alpha: TensorInfo | None) -> None:
    """Shape checks for a down/up(/alpha) pair, before any data is read."""
    d, u = down.shape, up.shape
    if not (down.dtype.is_floating_point and up.dtype.is_floating_point):
        raise LoraStructureError(f"layer {name}: down/up must be floating point, got {down.dtype} and {up.dtype}")
    if len(d) not in (2, 4) or len(u) != len(d):
        raise LoraStructureError(f"layer {name}: down {list(d)} and up {list(u)} must both be 2-D (linear) or "
                                 "both 4-D (conv)")
    if d[0] != u[1]:
        raise LoraStructureError(f"layer {name}: down rank {d[0]} does not match up rank {u[1]} "
                                 f"(down {list(d)}, up {list(u)}); the file is damaged")
    if len(u) == 4 and tuple(u[2:]) != (1, 1):
        raise LoraStructureError(f"layer {name}: conv up must have a 1x1 kernel, got {list(u)} "
                                 f"(down {list(d)}); kernel mismatch")
    if min(d) == 0 or min(u) == 0:
        raise LoraStructureError(f"layer {name}: empty factor (down {list(d)}, up {list(u)})")
    if alpha is not None:
        n = 1
        for s in alpha.shape:
            n *= s
        if n != 1:
            raise LoraStructureError(f"layer {name}: alpha must be a scalar, got shape {list(alpha.shape)}")


def as_layer(down: torch.Tensor, up: torch.Tensor, alpha: float | None) -> LowRankLayer:
    """Matrix form of a (possibly conv) down/up pair."""
    conv = down.ndim == 4
    return LowRankLayer(up=up.reshape(up.shape[0], -1), down=down.reshape(down.shape[0], -1), alpha=alpha,
                        kernel=tuple(down.shape[2:]) if conv else None, in_channels=down.shape[1])


def shaped(layer: LowRankLayer, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """New matrix factors reshaped to the layer's tensor shapes (conv: down k x in x kh x kw, up out x k x 1 x 1)."""
    if layer.kernel is None:
        return up, down
    k = down.shape[0]
    return up.reshape(up.shape[0], k, 1, 1), down.reshape(k, layer.in_channels, *layer.kernel)


@dataclass
class KohyaModule(Module):
    down_key: str = ""
    up_key: str = ""
    alpha_key: str | None = None

    def load(self, src: TensorSource) -> LowRankLayer:
        down, up = src.get(self.down_key), src.get(self.up_key)
        alpha = read_alpha(src, self.alpha_key, self.name) if self.alpha_key else None
        layer = as_layer(down, up, alpha)
        # the new alpha is alpha / rank * new_rank in float32, and a new rank may reach min(out, in*kh*kw)
        if alpha is not None and abs(alpha) / layer.rank * min(layer.up.shape[0], layer.down.shape[1]) > FLOAT32_MAX:
            raise NumericalError(f"layer {self.name} has alpha {alpha:g}, too large to rescale in float32; the file "
                                 "is damaged - re-export it")
        return layer

    def emit(self, layer, up, down, alpha):
        up, down = shaped(layer, up, down)
        return {self.down_key: down, self.up_key: up, self.name + ALPHA: alpha}


class Kohya(Format):
    name = "kohya"
    example = "lora_unet_..._to_q.lora_down.weight"

    def claims(self, infos: Mapping[str, TensorInfo]) -> int:
        return sum(1 for k in infos if k.endswith((DOWN, UP)))

    def parse(self, infos: Mapping[str, TensorInfo], metadata: Mapping[str, str], path: Path | None = None
              ) -> Layout:
        # in the order sd-scripts visits them (its loop walks the lora_down keys in key order), so the "last layer"
        # whose alpha it records in ss_network_alpha is the same
        bases = sorted({k[: -len(s)] for k in infos for s in (DOWN, UP) if k.endswith(s)}, key=lambda b: b + DOWN)
        modules, owned = [], set()
        for b in bases:
            dk, uk, ak = b + DOWN, b + UP, b + ALPHA
            if dk not in infos or uk not in infos:
                have, miss = (dk, uk) if dk in infos else (uk, dk)
                raise LoraStructureError(f"{have} has no partner {miss}; the file is incomplete - re-export it")
            check_pair(b, infos[dk], infos[uk], infos.get(ak))
            keys = [dk, uk] + ([ak] if ak in infos else [])
            owned.update(keys)
            modules.append(KohyaModule(b, keys, dk, uk, ak if ak in infos else None))
        stray = sorted(k for k in infos if k.endswith(ALPHA) and k not in owned)
        if stray:
            raise LoraStructureError(f"{stray[0]} has no lora_down/lora_up pair; the file is incomplete")
        return Layout(self.name, modules, [k for k in infos if k not in owned])
