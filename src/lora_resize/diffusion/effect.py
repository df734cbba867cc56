"""The effect error: how much of the change a LoRA makes to a model's predictions a setting loses."""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import LoraStructureError


def effect_error(eps_setting: Sequence[torch.Tensor], eps_original: Sequence[torch.Tensor],
                 eps_base: Sequence[torch.Tensor]) -> float:
    """mean over probes p of ||eps_s[p] - eps_o[p]||_F / ||eps_o[p] - eps_b[p]||_F: the share of the original LoRA's
    change to the denoiser's output (at the same inputs, BaseModel.predict) that the setting does not reproduce;
    0 when the setting predicts what the original does, 1 when it predicts what the base does (larger when it
    moves elsewhere). Each argument: one tensor per probe (any shape, the same across the three), computed in
    float64. Raises ValueError when the lists differ in length or shapes, LoraStructureError when the original
    LoRA does not change a probe's output at all (nothing to measure against)."""
    if not (len(eps_setting) == len(eps_original) == len(eps_base)) or not eps_base:
        raise ValueError(f"effect_error needs the same number of probes for each (got {len(eps_setting)}, "
                         f"{len(eps_original)}, {len(eps_base)})")
    ratios = []
    for i, (s, o, b) in enumerate(zip(eps_setting, eps_original, eps_base)):
        if not (s.shape == o.shape == b.shape):
            raise ValueError(f"probe {i}: outputs of shapes {list(s.shape)}, {list(o.shape)}, {list(b.shape)} differ")
        o64 = o.detach().to("cpu", torch.float64)
        change = float((o64 - b.detach().to("cpu", torch.float64)).norm())
        if change == 0.0:
            raise LoraStructureError(f"the LoRA does not change this model's output at probe {i} (its prediction "
                                     "equals the base's bit for bit): its modules do not reach the denoiser's "
                                     "output here, so there is no effect to measure - check --base")
        ratios.append(float((s.detach().to("cpu", torch.float64) - o64).norm()) / change)
    return sum(ratios) / len(ratios)
