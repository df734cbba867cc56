"""Stability AI ControlLoRA: `<module>.down` / `<module>.up` (no `.weight`, no alpha: scale 1) beside the full
ControlNet weights that are copied unchanged (and the `lora_controlnet` marker key)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

from ..io.reader import TensorInfo
from .base import Format, Layout
from .pairs import find_pairs, pair_module

FORM = (".down", ".up")
MARKER = "lora_controlnet"


class ControlLora(Format):
    name = "controllora"
    title = "ControlLoRA"
    example = "<module>.down / <module>.up"
    priority = 0
    markers = (re.compile(r"\.(down|up)$"),)

    def claims(self, infos: Mapping[str, TensorInfo]) -> int:
        return sum(1 for k in infos if k.endswith(FORM))

    def parse(self, infos: Mapping[str, TensorInfo], metadata: Mapping[str, str], path: Path | None = None
              ) -> Layout:
        pairs, owned = find_pairs(infos, [k for k in infos if k.endswith(FORM)], [FORM])
        modules = [pair_module(p) for p in pairs]
        rest = [k for k in infos if k not in owned]
        # a ControlLoRA file is a whole ControlNet whose big layers are low-rank: the rest are its own weights
        known = {k: "ControlLoRA marker" if k == MARKER else "ControlNet weight" for k in rest}
        return Layout(self.name, modules, rest, known=known)
