"""Architectures (archs.py): the real key names and shapes of SD1.5, SDXL, SD3, Flux-dev, Wan 2.1 and Llama-style
PEFT targets, and an end-to-end CLI resize of each at a tiny width (every module kept), exact per module against a
dense float64 SVD. Also kohya Flux `split_qkv` files (down (3r, in), block-diagonal up) and the other prefixes
that carry kohya suffixes (`diffusion_model.`, OneTrainer's `lora_transformer_`, SimpleTuner's `lycoris_`)."""
from __future__ import annotations

import json

import pytest
import torch

from lora_resize.testing import archs, loras
from lora_resize.testing.archs import ModuleShape
from lora_resize.cli import main

from helpers import best_rank_k, load_st, rel_err, write_lora


def effective(sd, name: str, style: str, scale: float | None = None) -> tuple[torch.Tensor, int]:
    """(dW as a float64 matrix, rank) of module `name`; the scale is alpha / rank when the file has an alpha,
    else `scale` (a config's), else 1."""
    dk, uk, ak = loras.lora_keys(name, style)
    up, down = sd[uk], sd[dk]
    r = down.shape[0]
    dw = up.reshape(up.shape[0], -1).double() @ down.reshape(r, -1).double()
    if ak in sd:
        return dw * (float(sd[ak]) / r), r
    return dw * (1.0 if scale is None else scale), r


PEFT_CFG = {"peft_type": "LORA", "r": 6, "lora_alpha": 12, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
            "gate_proj", "up_proj", "down_proj"], "rank_pattern": {}, "alpha_pattern": {}}


@pytest.mark.parametrize("arch", sorted(archs.ARCHS))
def test_each_architecture_resizes_end_to_end_on_its_real_names(tmp_path, capsys, arch):
    fn, style = archs.ARCHS[arch]
    shapes = fn(**archs.TINY[arch])
    assert [m.name for m in shapes] == [m.name for m in fn()]  # same names and structure as the real model
    sd = loras.lora_state_dict(shapes, style, rank=6, alpha=3.0 if style == "kohya" else None, conv_rank=4,
                               seed=11)
    folder = tmp_path / "in"
    folder.mkdir()
    src = write_lora(folder / ("adapter_model.safetensors" if style == "peft" else f"{arch}.safetensors"), sd)
    if style == "peft":
        (folder / "adapter_config.json").write_text(json.dumps(PEFT_CFG))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / ("adapter_model.safetensors" if style == "peft" else "small.safetensors")
    assert main(["resize", str(src), "-o", str(dst), "-q", "--method", "sv_fro", "--param", "0.9", "--rank", "5"]) == 0
    text = capsys.readouterr().out
    assert f"{len(shapes)} layers ({style})" in text
    out, _ = load_st(dst)
    assert set(out) == set(sd)
    cfg = json.loads((out_dir / "adapter_config.json").read_text()) if style == "peft" else None
    ranks = set()
    for m in shapes:
        in_scale = out_scale = None
        if cfg is not None:
            k = cfg["rank_pattern"].get(m.name, cfg["r"])
            in_scale, out_scale = 12 / 6, cfg["alpha_pattern"].get(m.name, cfg["lora_alpha"]) / k
        want, _ = effective(sd, m.name, style, in_scale)
        got, k = effective(out, m.name, style, out_scale)
        ranks.add(k)
        assert k <= 5
        assert rel_err(got, best_rank_k(want, k)) < 1e-5, m.name
    assert len(ranks) > 1


def test_sd15_list_matches_sd_scripts_locon_counts():
    """An SD1.5 LoCon as sd-scripts networks/lora.py targets it: 350 modules (254 linear, 46 conv 1x1, 50 conv
    3x3; UNet 278), sum(in*k*k + out) = 1,216,704."""
    mods = archs.sd15()
    assert len(mods) == 350
    assert sum(not m.conv for m in mods) == 254
    assert sum(m.conv and m.kernel == 1 for m in mods) == 46 and sum(m.kernel == 3 for m in mods) == 50
    assert sum(m.name.startswith("lora_unet_") for m in mods) == 278
    assert sum(m.inp * m.kernel * m.kernel + m.out for m in mods) == 1_216_704


def test_sdxl_uses_sgm_block_names_and_both_text_encoders():
    mods = {m.name: m for m in archs.sdxl()}
    by = {n: (m.out, m.inp) for n, m in mods.items()}
    assert by["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == (640, 640)
    assert by["lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k"] == (1280, 2048)
    assert by["lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj"] == (10240, 1280)
    assert mods["lora_unet_input_blocks_3_0_op"] == ModuleShape("lora_unet_input_blocks_3_0_op", 320, 320, 3, True)
    assert mods["lora_unet_output_blocks_2_2_conv"].out == 1280
    assert by["lora_unet_output_blocks_3_0_skip_connection"] == (640, 1920)
    assert not any(n.startswith("lora_unet_input_blocks_1_1_") for n in by)  # first block: no attention
    assert sum(n.startswith("lora_te1_") for n in by) == 12 * 6 and sum(n.startswith("lora_te2_") for n in by) == 32 * 6
    assert by["lora_te2_text_model_encoder_layers_31_mlp_fc1"] == (5120, 1280)


def test_flux_dev_shapes():
    mods = archs.flux_dev()
    by = {m.name: (m.out, m.inp) for m in mods}
    unet = [n for n in by if n.startswith("lora_unet_")]
    assert len(unet) == 19 * 10 + 38 * 3
    for s in ("img", "txt"):
        p = f"lora_unet_double_blocks_18_{s}_"
        assert by[p + "attn_qkv"] == (9216, 3072) and by[p + "attn_proj"] == (3072, 3072)
        assert by[p + "mlp_0"] == (12288, 3072) and by[p + "mlp_2"] == (3072, 12288)
        assert by[p + "mod_lin"] == (18432, 3072)
    p = "lora_unet_single_blocks_37_"
    assert by[p + "linear1"] == (21504, 3072) and by[p + "linear2"] == (3072, 15360)
    assert by[p + "modulation_lin"] == (9216, 3072)
    assert by["lora_te1_text_model_encoder_layers_11_mlp_fc2"] == (768, 3072)
    assert by["lora_te3_encoder_block_23_layer_1_DenseReluDense_wi_0"] == (10240, 4096)
    assert sum(n.startswith("lora_te3_") for n in by) == 24 * 7


def test_sd3_wan_llama_shapes():
    sd3 = {m.name: (m.out, m.inp) for m in archs.sd3()}
    assert sd3["transformer.transformer_blocks.0.attn.to_q"] == (1536, 1536)
    assert sd3["transformer.transformer_blocks.0.ff.net.0.proj"] == (6144, 1536)
    assert "transformer.transformer_blocks.23.attn.to_add_out" not in sd3  # the last context block is pre-only
    assert "transformer.transformer_blocks.23.ff_context.net.2" not in sd3
    wan = {m.name: (m.out, m.inp) for m in archs.wan21()}
    assert len(wan) == 40 * 10 and wan["lora_unet_blocks_39_ffn_0"] == (13824, 5120)
    assert wan["lora_unet_blocks_0_cross_attn_k"] == (5120, 5120)
    llama = {m.name: (m.out, m.inp) for m in archs.llama()}
    assert llama["model.layers.31.self_attn.k_proj"] == (1024, 4096)
    assert llama["model.layers.0.mlp.down_proj"] == (4096, 14336)


# ----------------------------------------------------------------------------------------------------------------
# Flux split_qkv, other kohya-suffixed prefixes


def test_flux_split_qkv_file_resizes_exactly(tmp_path):
    """kohya's split_qkv saves q, k, v LoRAs merged: down (3r, in) stacked, up (3d, 3r) block-diagonal; the
    engine sees one rank-3r pair and keeps the best rank-k approximation of the whole fused update."""
    d, r = 24, 4
    g = torch.Generator().manual_seed(12)
    sd = {}
    for i in range(2):
        name = f"lora_unet_double_blocks_{i}_img_attn_qkv"
        up = torch.zeros(3 * d, 3 * r)
        for j in range(3):
            up[j * d:(j + 1) * d, j * r:(j + 1) * r] = torch.randn(d, r, generator=g) * (0.5 ** j)
        sd[name + ".lora_up.weight"] = up
        sd[name + ".lora_down.weight"] = torch.randn(3 * r, d, generator=g)
        sd[name + ".alpha"] = torch.tensor(2.0)
    src = write_lora(tmp_path / "split.safetensors", sd)
    for args, cap in ((["--rank", "5"], 5), (["--method", "sv_fro", "--param", "0.95"], 3 * r)):
        assert main(["resize", str(src), "-o", str(tmp_path / "o.safetensors"), "-q", *args]) == 0
        out, _ = load_st(tmp_path / "o.safetensors")
        for i in range(2):
            name = f"lora_unet_double_blocks_{i}_img_attn_qkv"
            want, r_in = effective(sd, name, "kohya")
            got, k = effective(out, name, "kohya")
            assert r_in == 3 * r and k <= cap and out[name + ".lora_up.weight"].shape == (3 * d, k)
            assert rel_err(got, best_rank_k(want, k)) < 1e-6


@pytest.mark.parametrize("style", ["diffusion_model.", "lora_transformer_", "lycoris_"])
def test_other_prefixes_with_kohya_suffixes_are_the_kohya_family(tmp_path, capsys, style):
    if style == "diffusion_model.":  # ComfyUI-style: the model's own module path
        names = [f"diffusion_model.double_blocks.{i}.img_attn.qkv" for i in range(2)] + \
                ["diffusion_model.single_blocks.0.linear1"]
    elif style == "lora_transformer_":  # OneTrainer on a diffusers transformer
        names = [f"lora_transformer_single_transformer_blocks_{i}_attn_to_q" for i in range(2)] + \
                ["lora_transformer_transformer_blocks_0_ff_net_0_proj"]
    else:  # SimpleTuner's LyCORIS-wrapped LoRA
        names = [f"lycoris_transformer_blocks_{i}_attn_to_k" for i in range(2)] + ["lycoris_proj_out"]
    shapes = [ModuleShape(n, 24 + 8 * i, 16) for i, n in enumerate(names)]
    sd = loras.lora_state_dict(shapes, "kohya", rank=8, alpha=4.0, seed=13)
    src = write_lora(tmp_path / "in.safetensors", sd)
    assert main(["resize", str(src), "-o", str(tmp_path / "o.safetensors"), "--rank", "3"]) == 0
    assert "3 layers (kohya)" in capsys.readouterr().out
    out, _ = load_st(tmp_path / "o.safetensors")
    assert set(out) == set(sd)
    for m in shapes:
        want, _ = effective(sd, m.name, "kohya")
        got, k = effective(out, m.name, "kohya")
        assert k == 3 and rel_err(got, best_rank_k(want, 3)) < 1e-6
