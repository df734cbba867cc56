"""The 2025-26 model families end to end, on their native module paths and shapes at a tiny width (ratios kept:
fused widths, MLP ratios, gated MLPs, experts, the conv3d patch embedding), in each layout their trainers write
(kohya/musubi `lora_unet_`, `lora_unet__`, ComfyUI-native `diffusion_model.`, ai-toolkit, DiffSynth's adapter-named
keys, raw PEFT dumps): every module is read, resized exactly (a dense float64 SVD judges each), and written back
under its own keys. The real loaders judge the same files in tests/oracles/test_model_families_diffusers.py."""
from __future__ import annotations

import pytest
import torch

import lora_resize
from lora_resize.testing import archs, loras

from helpers import best_rank_k, load_st, rel_err, write_lora

CASES = [(family, layout) for family, (_, _, layouts) in archs.NATIVE.items() for layout in layouts]
KOHYA_LIKE = {"musubi", "musubi__", "comfy"}  # layouts that store an alpha


def family_lora(family: str, layout: str, seed: int = 0) -> tuple[list, dict[str, torch.Tensor]]:
    fn, tiny, _ = archs.NATIVE[family]
    shapes = fn(**tiny)
    sd = loras.lora_state_dict(shapes, layout, rank=6, alpha=3.0 if layout in KOHYA_LIKE else None, seed=seed)
    return shapes, sd


def dw(sd: dict, m, layout: str) -> torch.Tensor:
    dk, uk, ak = loras.lora_keys(m.name, layout)
    down, up = sd[dk].double(), sd[uk].double()
    r = down.shape[0]
    scale = float(sd[ak]) / r if ak in sd else 1.0
    return up.reshape(up.shape[0], -1) @ down.reshape(r, -1) * scale


@pytest.mark.parametrize("family, layout", CASES)
def test_every_module_is_read_and_resized_exactly(tmp_path, family, layout):
    shapes, sd = family_lora(family, layout)
    src = write_lora(tmp_path / "in.safetensors", sd)
    dst = tmp_path / "out.safetensors"
    res = lora_resize.resize(src, dst, method="sv_fro", param=0.85, precision="float")
    assert len(res.layers) == len(shapes) and not res.passthrough
    out, _ = load_st(dst)
    assert set(out) == set(sd) | ({loras.lora_keys(m.name, layout)[2] for m in shapes} if layout in KOHYA_LIKE
                                  else set())
    ranks = set()
    for m in shapes:
        dk, _, _ = loras.lora_keys(m.name, layout)
        k = out[dk].shape[0]
        ranks.add(k)
        assert tuple(out[dk].shape[1:]) == tuple(sd[dk].shape[1:]), m.name  # conv3d stays conv3d
        assert rel_err(dw(out, m, layout), best_rank_k(dw(sd, m, layout), k)) < 1e-5, (m.name, k)
    assert len(ranks) > 1  # a dynamic method: the layers really got different ranks


def test_the_conv3d_patch_embedding_follows_conv_rank(tmp_path):
    shapes, sd = family_lora("wan", "comfy")
    src = write_lora(tmp_path / "in.safetensors", sd)
    lora_resize.resize(src, tmp_path / "o.safetensors", rank=4, conv_rank=2)
    out, _ = load_st(tmp_path / "o.safetensors")
    assert out["diffusion_model.patch_embedding.lora_down.weight"].shape == (2, 4, 1, 2, 2)
    assert out["diffusion_model.patch_embedding.lora_up.weight"].shape == (16, 2, 1, 1, 1)
    assert out["diffusion_model.blocks.0.ffn.0.lora_down.weight"].shape == (4, 16)


@pytest.mark.parametrize("family", ["flux1", "flux2", "wan", "qwen_image", "z_image", "ltx2", "hidream",
                                    "hunyuan_video15", "sd35"])
def test_real_sizes_of_the_module_lists(family):
    """The lists at their default (real) sizes have the widths FORMATS.md §3b gives."""
    fn = archs.NATIVE[family][0]
    mods = {m.name: (m.out, m.inp) for m in fn()}
    expected = {
        "flux1": {"double_blocks.0.img_attn.qkv": (9216, 3072), "single_blocks.37.linear1": (21504, 3072),
                  "single_blocks.0.linear2": (3072, 15360), "double_blocks.18.txt_mod.lin": (18432, 3072)},
        "flux2": {"double_blocks.7.img_mlp.0": (36864, 6144), "double_blocks.0.img_mlp.2": (6144, 18432),
                  "single_blocks.47.linear1": (55296, 6144), "single_blocks.0.linear2": (6144, 24576),
                  "txt_in": (6144, 15360)},
        "wan": {"blocks.39.ffn.0": (13824, 5120), "blocks.0.self_attn.q": (5120, 5120),
                "time_projection.1": (30720, 5120)},
        "qwen_image": {"transformer_blocks.59.img_mod.1": (18432, 3072), "txt_in": (3072, 3584)},
        "z_image": {"layers.29.feed_forward.w1": (10240, 3840), "layers.0.adaLN_modulation.0": (15360, 256),
                    "context_refiner.1.attention.to_q": (3840, 3840)},
        "ltx2": {"transformer_blocks.47.audio_to_video_attn.to_q": (2048, 4096),
                 "transformer_blocks.0.video_to_audio_attn.to_k": (2048, 4096)},
        "hidream": {"double_stream_blocks.15.block.ff_i.experts.3.w1": (6912, 2560),
                    "single_stream_blocks.31.block.adaLN_modulation.1": (15360, 2560)},
        "hunyuan_video15": {"double_blocks.53.img_mlp.fc1": (8192, 2048)},
        "sd35": {"joint_blocks.37.context_block.adaLN_modulation.1": (4864, 2432),
                 "joint_blocks.0.x_block.mlp.fc1": (9728, 2432)},
    }[family]
    for name, shape in expected.items():
        assert mods[name] == shape, (family, name)
    if family == "wan":
        conv = next(m for m in fn() if m.name == "patch_embedding")
        assert conv.kernel_dims == (1, 2, 2) and conv.flat_in == 16 * 4
