"""XLabs Flux LoRAs (x-flux): `double_blocks.N.processor.qkv_lora1.down.weight` / `.up.weight` (image stream qkv,
h -> 3h), `proj_lora1` (its output projection), `qkv_lora2` / `proj_lora2` (the text stream); single blocks
`single_blocks.N.processor.qkv_lora` and `proj_lora`; optionally under `diffusion_model.`. No alpha: scale 1
(XLabs-AI x-flux src/flux/modules/layers.py,
`DoubleStreamBlockLoraProcessor` / `SingleStreamBlockLoraProcessor`). The output keeps the keys and writes no alpha."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

from ..io.reader import TensorInfo
from .base import Format, Layout
from .pairs import find_pairs, pair_module

KEY = re.compile(r"(^|\.)(double|single)_blocks\.\d+\.processor\.(qkv|proj)_lora[12]?\.(down|up)\.weight$")
FORM = (".down.weight", ".up.weight")


class XLabs(Format):
    name = "xlabs"
    title = "XLabs"
    example = "double_blocks.0.processor.qkv_lora1.down.weight"
    priority = 7  # above diffusers, whose old processor form also ends single-block keys (qkv_lora.down.weight)
    markers = (re.compile(r"\.processor\.\w+_lora\d*\.(down|up)\.weight$"),)

    def claims(self, infos: Mapping[str, TensorInfo]) -> int:
        return sum(1 for k in infos if KEY.search(k))

    def parse(self, infos: Mapping[str, TensorInfo], metadata: Mapping[str, str], path: Path | None = None
              ) -> Layout:
        pairs, owned = find_pairs(infos, [k for k in infos if KEY.search(k)], [FORM])
        return Layout(self.name, [pair_module(p) for p in pairs], [k for k in infos if k not in owned])
