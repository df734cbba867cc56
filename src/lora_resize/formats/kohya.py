"""kohya-ss / sd-scripts LoRA and LoCon: `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha`
(scale alpha / rank, 1 without alpha: sd-scripts networks/lora.py `LoRAModule`, networks/resize_lora.py). The
output always stores an alpha, as sd-scripts does."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

from ..errors import LoraStructureError
from ..io.reader import TensorInfo
from .base import Format, Layout
from .pairs import ALPHA, PairModule, check_pair

DOWN, UP = ".lora_down.weight", ".lora_up.weight"


def kohya_module(name: str, keys: list[str], alpha_in_file: bool) -> PairModule:
    """A module written under kohya's keys for `name` (the alpha key always written)."""
    return PairModule(name, keys, name + DOWN, name + UP, name + ALPHA, alpha_in_file)


class Kohya(Format):
    name = "kohya"
    title = "kohya"
    example = "lora_unet_..._to_q.lora_down.weight"
    priority = 10  # a plain kohya file ties with lycoris (which reads the same keys): kohya names it
    markers = (re.compile(r"(^|[._])lora_(down|up)([._]|$)"), re.compile(r"\.alpha$"))

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
            modules.append(kohya_module(b, keys, ak in infos))
        return Layout(self.name, modules, [k for k in infos if k not in owned])
