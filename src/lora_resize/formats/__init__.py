"""Key families as plug-ins. `detect` asks every registered family how many keys it recognises."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from ..errors import LoraStructureError
from ..tensorfile import TensorInfo
from .base import Format, Layout, LowRankLayer, Module
from .kohya import Kohya

FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    """Add a key family to the registry."""
    FORMATS[fmt.name] = fmt
    return fmt


register(Kohya())


def detect(infos: Mapping[str, TensorInfo], metadata: Mapping[str, str], path: Path | None = None) -> Layout:
    """Parse the file's keys with the family that recognises most of them."""
    best, score = None, 0
    for fmt in FORMATS.values():
        s = fmt.claims(infos)
        if s > score:
            best, score = fmt, s
    if best is None:
        sample = ", ".join(sorted(infos)[:3]) or "no tensors at all"
        raise LoraStructureError(f"no LoRA layers found (keys like {sample}); supported: "
                                 f"{', '.join(FORMATS)} (<name>.lora_down.weight / .lora_up.weight / .alpha)")
    return best.parse(infos, metadata, path)


__all__ = ["FORMATS", "Format", "Layout", "LowRankLayer", "Module", "detect", "register"]
