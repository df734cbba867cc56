"""Key families as plug-ins. `detect` asks every registered family how many keys it recognises."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from ..errors import LoraStructureError
from ..tensorfile import TensorInfo
from .base import Format, Layout, LowRankLayer, Module
from .controllora import ControlLora
from .diffusers import Diffusers
from .kohya import Kohya
from .lycoris import Lycoris
from .peft import Peft

FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    """Add a key family to the registry."""
    FORMATS[fmt.name] = fmt
    return fmt


register(Kohya())
register(Lycoris())  # after kohya: on a plain kohya file the two tie and kohya wins
register(Peft())  # base_model.model.*.lora_A/lora_B + adapter_config.json
register(Diffusers())  # unet./text_encoder./transformer.*.lora_A/B, .lora.down/.up (not base_model.model.)
register(ControlLora())  # <module>.down / <module>.up


def key_family(name: str) -> str:
    """The family whose key names a family's output uses: one that covers another writes its keys (lycoris ->
    kohya)."""
    fmt = FORMATS.get(name)
    return fmt.covers[0] if fmt is not None and fmt.covers else name


def detect(infos: Mapping[str, TensorInfo], metadata: Mapping[str, str], path: Path | None = None) -> Layout:
    """Parse the file's keys with the family that recognises most of them. Keys of another family left over
    (a file mixing kohya and PEFT layers, say) are an error naming one, never copied through unresized."""
    best, score = None, 0
    for fmt in FORMATS.values():
        s = fmt.claims(infos)
        if s > score:
            best, score = fmt, s
    if best is None:
        sample = ", ".join(sorted(infos)[:3]) or "no tensors at all"
        examples = "; ".join(f"{f.name}: {f.example}" for f in FORMATS.values() if f.example)
        raise LoraStructureError(f"no LoRA layers found (keys like {sample}); supported key families: {examples}")
    layout = best.parse(infos, metadata, path)
    rest = {k: infos[k] for k in layout.passthrough}
    for fmt in FORMATS.values():
        if fmt is not best and fmt.name not in best.covers and rest and fmt.claims(rest):
            key = next(k for k in sorted(rest) if fmt.claims({k: rest[k]}))
            raise LoraStructureError(f"{key} is a {fmt.name} key in a {best.name} file; mixed key families are not "
                                     "supported - split the file or convert it to one family")
    return layout


__all__ = ["FORMATS", "Format", "Layout", "LowRankLayer", "Module", "detect", "key_family", "register"]
