"""Which LoRA module a checkpoint weight is read under (ops.extract.module_name, open_clip_parts), and the dense
update a DenseSource layer holds (ops.diffs.dense_of)."""
from __future__ import annotations

import pytest
import torch

from lora_resize.core.layer import LowRankLayer
from lora_resize.ops.diffs import Dense, DenseSource, dense_of
from lora_resize.ops.extract import module_name, open_clip_parts


@pytest.mark.parametrize("key, folder, want", [
    ("model.diffusion_model.input_blocks.1.1.proj_in.weight", False, "diffusion_model.input_blocks.1.1.proj_in"),
    ("diffusion_model.double_blocks.0.img_attn.qkv.weight", False, "diffusion_model.double_blocks.0.img_attn.qkv"),
    ("double_blocks.0.img_attn.qkv.weight", False, "diffusion_model.double_blocks.0.img_attn.qkv"),
    ("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", False,
     "text_encoder.text_model.encoder.layers.0.mlp.fc1"),
    ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight", False,
     "text_encoder.text_model.encoder.layers.0.mlp.fc1"),
    ("first_stage_model.encoder.conv_in.weight", False, None),
    ("conditioner.embedders.1.model.transformer.resblocks.0.attn.out_proj.weight", False, None),  # open_clip_parts
    ("unet.down_blocks.0.attentions.0.proj_in.weight", True, "unet.down_blocks.0.attentions.0.proj_in"),
    ("text_encoder.encoder.layers.0.mlp.fc1.weight", True, "text_encoder.text_model.encoder.layers.0.mlp.fc1"),
    ("text_encoder.text_model.encoder.layers.0.mlp.fc1.weight", True,
     "text_encoder.text_model.encoder.layers.0.mlp.fc1"),
    ("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.weight", True,
     "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q"),  # T5: no CLIP wrapper added
    ("transformer.transformer_blocks.0.attn.to_q.weight", True, "transformer.transformer_blocks.0.attn.to_q"),
])
def test_module_name(key, folder, want):
    assert module_name(key, folder) == want


def test_open_clip_parts():
    kind, parts = open_clip_parts("conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight",
                                  (96, 32))
    assert kind == "weight" and parts == [
        ("text_encoder_2.text_model.encoder.layers.3.self_attn.q_proj", (0, 32)),
        ("text_encoder_2.text_model.encoder.layers.3.self_attn.k_proj", (32, 64)),
        ("text_encoder_2.text_model.encoder.layers.3.self_attn.v_proj", (64, 96))]
    kind, parts = open_clip_parts("cond_stage_model.model.transformer.resblocks.0.mlp.c_proj.bias", (32,))
    assert (kind, parts) == ("bias", [("text_encoder.text_model.encoder.layers.0.mlp.fc2", None)])
    assert open_clip_parts("conditioner.embedders.1.model.text_projection", (32, 32)) is None
    assert open_clip_parts("model.diffusion_model.out.2.weight", (4, 32, 3, 3)) is None


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8), (6, 2, 3, 3), (30, 2, 3, 3)])
def test_dense_source_pairs_multiply_to_the_update(shape):
    """The identity goes on the smaller side; up @ down is the update; a fused stack of two is their rows."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(shape, generator=g, dtype=torch.float64)
    src = DenseSource(None, {}, {"m": Dense(shape, torch.float32, lambda: W)})
    up, down = src.get("m.lora_up.weight"), src.get("m.lora_down.weight")
    r = min(shape[0], W[0].numel())
    assert up.shape == (shape[0], r, *([1] * (len(shape) - 2))) and down.shape == (r, *shape[1:])
    layer = LowRankLayer.with_alpha(up.reshape(shape[0], r), down.reshape(r, -1), None)
    assert torch.equal(dense_of(layer), W.reshape(shape[0], -1))
    fused = LowRankLayer.with_alpha(torch.block_diag(layer.up, layer.up), torch.cat([layer.down, layer.down]), None)
    assert torch.allclose(dense_of(fused), torch.cat([W.reshape(shape[0], -1)] * 2), atol=1e-12)
