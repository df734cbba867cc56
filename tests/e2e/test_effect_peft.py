"""A PEFT adapter folder holds its scale in adapter_config.json (lora_alpha / r): the preview and --effect apply
the original adapter and each resized one at that scale, read beside the file (the original) or from the config a
resize writes (`Resized.files`), not at scale 1."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import lora_resize
from lora_resize.ops.effect import InMemory, as_stored

pytest.importorskip("diffusers")
pytestmark = pytest.mark.thirdparty

TARGET = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
WEIGHT = f"unet.{TARGET}.weight"


@pytest.fixture
def adapter(tiny_base, tmp_path):
    """A rank-4 PEFT adapter on one UNet projection of the tiny SD1.5, lora_alpha 16 (scale 4)."""
    from diffusers import UNet2DConditionModel
    base, _ = tiny_base("sd1")
    W = UNet2DConditionModel.from_pretrained(base, subfolder="unet").get_submodule(TARGET).weight
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, W.shape[1], generator=g), torch.randn(W.shape[0], 4, generator=g) * 0.1
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file({f"base_model.model.{TARGET}.lora_A.weight": A, f"base_model.model.{TARGET}.lora_B.weight": B},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 16,
                                                             "target_modules": ["to_q"]}))
    return base, folder, 4.0 * (B.double() @ A.double())


def applied_delta(bm, lora: InMemory) -> torch.Tensor:
    before = bm.weights[WEIGHT].double().clone()
    with lora.applied(bm):
        return bm.weights[WEIGHT].double() - before


def test_the_original_and_a_resize_apply_at_the_configs_scale(adapter):
    from lora_resize.diffusion import BaseModel
    base, folder, dW = adapter
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    dW2 = (U[:, :2] * S[:2]) @ Vh[:2]
    r = lora_resize.resized(folder, rank=2)
    assert [f.name for f in r.files] == ["adapter_config.json"]
    with BaseModel(base) as bm:
        original = applied_delta(bm, as_stored(folder))
        torch.testing.assert_close(original, dW, rtol=1e-5, atol=1e-6 * float(dW.abs().max()))
        two = applied_delta(bm, InMemory.of(r))
        torch.testing.assert_close(two, dW2, rtol=1e-4, atol=1e-5 * float(dW.abs().max()))
