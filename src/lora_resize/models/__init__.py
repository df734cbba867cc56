"""Model architectures: which weights a LoRA's modules update, under the model code's names and diffusers', and how
the two correspond (base.py); the 2025-26 diffusion transformers (dit.py) and the Stable Diffusion UNets with their
text encoders (sd.py). The layout conversions (formats/convert.py) read a module's name into this canonical form
and write it back under another layout's name."""
from __future__ import annotations

import re
import typing

from ..registry import Registry
from .base import Architecture, Mapping
from .dit import ARCHITECTURES

SD = "sd"  # the Stable Diffusion UNets and their CLIP text encoders (sd.py): kohya and diffusers names only
# the layouts a LoRA of a known architecture can be written in (formats/convert.py writes them; named here, in a
# room without torch, so the command line can offer them without importing it)
LAYOUTS = ("kohya", "comfy", "diffusers", "onetrainer", "peft")
MODELS: Registry[Architecture] = Registry("architecture")
for _a in ARCHITECTURES:
    MODELS.add(_a.name, _a)



ARCH_KEY = "lora_resize_arch"  # the metadata entry where a converted file names its architecture
# metadata values that name a family (sd-scripts' and musubi-tuner's `modelspec.architecture` and
# `ss_base_model_version`, e.g. "flux-1-dev/lora", "stable-diffusion-xl-v1-base", "sd_v1", "wan2.1-t2v-14b"),
# most specific first
HINTS = [(re.compile(p, re.IGNORECASE), name) for p, name in (
    (r"hunyuan[-_ ]?video[-_ ]?1[._]?5|hv15", "hunyuan_video15"),
    # sd-scripts library/sai_model_spec.py: "hunyuan-image-2.1", "anima-preview"; Krea 2, Kandinsky 5 by name
    (r"hunyuan[-_ ]?image", "hunyuan_image"), (r"krea[-_ ]?2", "krea2"), (r"kandinsky[-_ ]?5", "kandinsky5"),
    (r"(^|[^a-z])anima([^a-z]|$)", "anima"), (r"flux[-_.]?2|klein", "flux2"),
    (r"flux|chroma|kontext", "flux1"), (r"stable-diffusion-(v)?3|sd3", "sd3"), (r"wan", "wan"),
    (r"qwen", "qwen_image"), (r"z[-_]?image", "z_image"), (r"ltx[-_]?2", "ltx2"), (r"hidream[-_ ]?o1", "hidream_o1"),
    (r"hidream", "hidream"),
    (r"stable-diffusion-(v1|v2|xl)|sd_?v?[12]|sdxl", SD))]


def hinted(metadata: typing.Mapping[str, str]) -> str | None:
    """The architecture a file's metadata names (ours, then sd-scripts' / musubi-tuner's fields), or None."""
    if metadata.get(ARCH_KEY) in architectures():
        return metadata[ARCH_KEY]
    for key in ("modelspec.architecture", "ss_base_model_version"):
        value = metadata.get(key) or ""
        hit = next((name for rx, name in HINTS if rx.search(value)), None)
        if hit is not None:
            return hit
    return None


def architectures() -> list[str]:
    """What --arch may name: sd and every registered architecture."""
    return [SD, *MODELS]


__all__ = ["ARCH_KEY", "LAYOUTS", "MODELS", "SD", "Architecture", "Mapping", "architectures", "hinted"]
