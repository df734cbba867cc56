"""down/up pairs, the shape most families store a layer in: finding them by key suffix, checking their shapes
before any data is read, reading them into a low-rank layer and writing new factors back under the same keys."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from ..core.layer import LowRankLayer
from ..core.truncate import NewFactors
from ..errors import LoraStructureError, NumericalError
from ..io.reader import TensorInfo, TensorSource
from .base import Module

ALPHA = ".alpha"
MAGNITUDES = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")  # DoRA, as PEFT names it
FACTOR_NDIMS = (2, 3, 4, 5)  # linear, conv1d, conv2d and conv3d factors (down (r, in, *kernel), up (out, r, 1, ...))


def read_alpha(src: TensorSource, key: str, module: str) -> float:
    """A scalar alpha as a Python float; a non-finite one is an error (NumericalError) naming the module."""
    value = float(src.get(key).reshape(-1)[0].float())
    if not math.isfinite(value):
        raise NumericalError(f"layer {module} has a non-finite alpha ({value}); the file is damaged - re-export it")
    return value


def check_scalar(name: str, alpha: TensorInfo | None) -> None:
    """An alpha must hold one value (LoraStructureError otherwise)."""
    if alpha is not None and math.prod(alpha.shape) != 1:
        raise LoraStructureError(f"layer {name}: alpha must be a scalar, got shape {list(alpha.shape)}")


def check_pair(name: str, down: TensorInfo, up: TensorInfo, alpha: TensorInfo | None) -> None:
    """Shape checks for a down/up(/alpha) pair, before any data is read (LoraStructureError naming the layer)."""
    d, u = down.shape, up.shape
    if not (down.dtype.is_floating_point and up.dtype.is_floating_point):
        raise LoraStructureError(f"layer {name}: down/up must be floating point, got {down.dtype} and {up.dtype}")
    if len(d) not in FACTOR_NDIMS or len(u) != len(d):
        raise LoraStructureError(f"layer {name}: down {list(d)} and up {list(u)} must both be 2-D (linear) or "
                                 "both 3-, 4- or 5-D (conv1d, conv2d, conv3d)")
    if d[0] != u[1]:
        raise LoraStructureError(f"layer {name}: down rank {d[0]} does not match up rank {u[1]} "
                                 f"(down {list(d)}, up {list(u)}); the file is damaged")
    if len(u) > 2 and any(s != 1 for s in u[2:]):
        raise LoraStructureError(f"layer {name}: conv up must have a 1x1 kernel, got {list(u)} "
                                 f"(down {list(d)}); kernel mismatch")
    if min(d) == 0 or min(u) == 0:
        raise LoraStructureError(f"layer {name}: empty factor (down {list(d)}, up {list(u)})")
    check_scalar(name, alpha)


def matrices(down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...] | None]:
    """(up, down) of a (possibly conv) pair as matrices, and the conv kernel (None for linear)."""
    kernel = tuple(down.shape[2:]) if down.ndim > 2 else None
    return up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1), kernel


def emit_pair(new: NewFactors, down_key: str, up_key: str, alpha_key: str | None) -> dict[str, torch.Tensor]:
    """New factors in their tensor shapes under the given keys (and the alpha, when the family stores one)."""
    up, down = new.shaped()
    out = {down_key: down, up_key: up}
    if alpha_key is not None:
        out[alpha_key] = new.alpha
    return out


@dataclass
class PairModule(Module):
    """A down/up pair under any key names. Its scale: `alpha_key`'s value / rank when the file holds that key
    (`alpha_in_file`), else `config_scale` (a PEFT config's scale for the module), else 1. The output writes an
    alpha under `alpha_key` when it is set (kohya writes one even where the input had none), else it is loaded
    with the module's own fixed scale. `config_key`: (component, module path) under which a config names it."""
    down_key: str = ""
    up_key: str = ""
    alpha_key: str | None = None
    alpha_in_file: bool = False
    config_scale: float | None = None
    config_key: tuple[str, str] | None = None

    @property
    def output_scale(self) -> float | None:
        if self.alpha_key is not None:
            return None
        return self.config_scale if self.config_scale is not None else 1.0

    def load(self, src: TensorSource) -> LowRankLayer:
        down_t = src.get(self.down_key)
        up, down, kernel = matrices(down_t, src.get(self.up_key))
        in_channels = down_t.shape[1]
        if self.alpha_in_file:
            return LowRankLayer.with_alpha(up, down, read_alpha(src, self.alpha_key, self.name), kernel=kernel,
                                           in_channels=in_channels)
        if self.config_scale is not None:
            return LowRankLayer.with_scale(up, down, self.config_scale, kernel=kernel, in_channels=in_channels)
        return LowRankLayer.with_alpha(up, down, None, kernel=kernel, in_channels=in_channels)

    def scale_and_rank(self, src: TensorSource) -> tuple[float, int]:
        rank = src.infos()[self.down_key].shape[0]
        if self.alpha_in_file:
            return read_alpha(src, self.alpha_key, self.name) / rank, rank
        return (self.config_scale if self.config_scale is not None else 1.0), rank

    def weight_shape(self, infos: Mapping[str, TensorInfo]) -> tuple[int, tuple[int, ...]]:
        return infos[self.up_key].shape[0], tuple(infos[self.down_key].shape[1:])

    def emit(self, new: NewFactors) -> dict[str, torch.Tensor]:
        return emit_pair(new, self.down_key, self.up_key, self.alpha_key)


@dataclass
class Pair:
    """Keys of one down/up pair found by suffix, and its `<name>.alpha` when the file has one."""
    name: str
    down_key: str
    up_key: str
    alpha_key: str | None


def pair_module(p: Pair, config_scale: float | None = None, config_key: tuple[str, str] | None = None
                ) -> PairModule:
    """The module of a found pair, written back under its own keys (its alpha key, when the file has one)."""
    return PairModule(p.name, [p.down_key, p.up_key] + ([p.alpha_key] if p.alpha_key else []), p.down_key, p.up_key,
                      p.alpha_key, p.alpha_key is not None, config_scale, config_key)


def find_pairs(infos: Mapping[str, TensorInfo], keys: Iterable[str], forms: Iterable[tuple[str, str]]
               ) -> tuple[list[Pair], set[str]]:
    """Group `keys` into down/up pairs by suffix (first matching (down, up) form), with `<name>.alpha` when
    present; shapes checked. Returns the pairs (sorted by name) and the keys they own. An unpaired half, or a
    layer stored twice under two forms, is a LoraStructureError."""
    forms = list(forms)
    halves: dict[tuple[str, int], dict[int, str]] = {}
    for k in keys:
        for i, form in enumerate(forms):
            hit = next((j for j, s in enumerate(form) if k.endswith(s)), None)
            if hit is not None:
                halves.setdefault((k[: -len(form[hit])], i), {})[hit] = k
                break
    pairs, owned = [], set()
    for (name, i), got in sorted(halves.items()):
        if len(got) < 2:
            have = next(iter(got.values()))
            miss = name + forms[i][1 - next(iter(got))]
            raise LoraStructureError(f"{have} has no partner {miss}; the file is incomplete - re-export it")
        dk, uk = got[0], got[1]
        ak = name + ALPHA if name + ALPHA in infos else None
        check_pair(name, infos[dk], infos[uk], infos.get(ak))
        owned.update(k for k in (dk, uk, ak) if k)
        pairs.append(Pair(name, dk, uk, ak))
    names = [p.name for p in pairs]
    if len(set(names)) != len(names):
        dup = Counter(names).most_common(1)[0][0]
        raise LoraStructureError(f"layer {dup} is stored twice, under two key styles; keep one")
    return pairs, owned


def magnitudes(pairs: list[Pair], keys: Iterable[str], suffixes: tuple[str, ...] = MAGNITUDES) -> list[str]:
    """DoRA magnitude vectors of `pairs` (kept as trained); one without a LoRA pair is a LoraStructureError."""
    names = {p.name for p in pairs}
    found = []
    for k in keys:
        base = next((k[: -len(s)] for s in suffixes if k.endswith(s)), None)
        if base is None:
            continue
        if base not in names:
            raise LoraStructureError(f"{k} (a DoRA magnitude) has no lora_A/lora_B pair; the file is incomplete")
        found.append(k)
    return found


def dora_note(n: int) -> list[str]:
    return [f"{n} DoRA magnitude vector(s) kept as trained (not resized)"] if n else []
