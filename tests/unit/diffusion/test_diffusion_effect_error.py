"""effect_error: the share of the original LoRA's change to the denoiser's output a setting loses."""
from __future__ import annotations

import pytest
import torch

from lora_resize.diffusion import effect_error
from lora_resize.errors import LoraStructureError


def test_it_is_the_mean_over_probes_of_the_lost_share_of_the_change():
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)]
    change = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)]
    orig = [b + c for b, c in zip(base, change)]
    setting = [orig[0] + 0.25 * change[0], base[1]]  # loses a quarter of probe 0's change, all of probe 1's
    assert effect_error(setting, orig, base) == pytest.approx((0.25 + 1.0) / 2, rel=1e-12)
    assert effect_error(orig, orig, base) == 0.0


def test_a_lora_that_changes_nothing_is_refused_in_one_line():
    x = [torch.ones(2, 2)]
    with pytest.raises(LoraStructureError, match="does not change this model's output at probe 0"):
        effect_error(x, x, x)


def test_lists_of_other_lengths_or_shapes_are_refused():
    with pytest.raises(ValueError, match="same number of probes"):
        effect_error([torch.ones(2)], [torch.ones(2)], [])
    with pytest.raises(ValueError, match="differ"):
        effect_error([torch.ones(2)], [torch.ones(3)], [torch.zeros(3)])
