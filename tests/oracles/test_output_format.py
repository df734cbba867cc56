"""--output-format: a kohya SD1.5 LoCon converted to diffusers' key names by diffusers itself
(`StableDiffusionPipeline.lora_state_dict`), then resized by us with --output-format kohya, must come back under
the original kohya names with the rank-k truncation of the original updates; undefined directions are refused."""
from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline

from lora_resize.testing import archs, loras
from lora_resize.cli import main
from lora_resize.formats.convert import key_base, read_name

from helpers import best_rank_k, dense_dw, load_st, rel_err, write_lora

pytestmark = pytest.mark.thirdparty

DOWN_FORMS = (".lora.down.weight", "_lora.down.weight", ".lora_linear_layer.down.weight")


def diffusers_file(tmp_path):
    shapes = archs.sd15(ch=(8, 16, 32, 32), ctx=12, te=(16, 2, 32))
    sd = loras.lora_state_dict(shapes, "kohya", rank=8, alpha=4.0, conv_rank=6, seed=1)
    kohya = write_lora(tmp_path / "kohya.safetensors", sd)
    converted, alphas = StableDiffusionPipeline.lora_state_dict(str(kohya))
    out = {k: v.contiguous() for k, v in converted.items()}
    for key, a in (alphas or {}).items():  # keyed by module or by its down weight: store as <module>.alpha
        down = key[: -len(".alpha")]
        base = next((down[: -len(f)] for f in DOWN_FORMS if down.endswith(f)), down)
        out[base + ".alpha"] = torch.tensor(float(a))
    return sd, write_lora(tmp_path / "diffusers.safetensors", out)


def test_diffusers_to_kohya_round_trip(tmp_path, capsys):
    sd, src = diffusers_file(tmp_path)
    dst = tmp_path / "back.safetensors"
    assert main(["resize", str(src), "-o", str(dst), "--rank", "5", "--output-format", "kohya",
                 "--precision", "float"]) == 0
    assert "converted from diffusers to kohya" in capsys.readouterr().out
    out, meta = load_st(dst)
    names = sorted(k[: -len(".lora_down.weight")] for k in out if k.endswith(".lora_down.weight"))
    original = {k[: -len(".lora_down.weight")] for k in sd if k.endswith(".lora_down.weight")}
    assert len(names) > 200 and set(names) <= original  # every module back under its original kohya name
    assert "lora_adapter_metadata" not in meta
    for name in names:
        want = dense_dw(sd, name)
        want = want.reshape(want.shape[0], -1)
        k = out[name + ".lora_down.weight"].shape[0]
        got = dense_dw(out, name).reshape(want.shape)
        assert k == min(5, min(want.shape)) and rel_err(got, best_rank_k(want, k)) < 1e-5, name


def test_component_less_unet_files_convert_as_the_unet(tmp_path):
    """Old `save_attn_procs` / `pytorch_lora_weights` files name UNet modules from the UNet's top
    (down_blocks...processor.to_q_lora.down.weight): --output-format kohya names them lora_unet_..."""
    sd, src = diffusers_file(tmp_path)
    unet = {k[len("unet."):]: v for k, v, in load_st(src)[0].items() if k.startswith("unet.")}
    bare = write_lora(tmp_path / "pytorch_lora_weights.safetensors", unet)
    dst = tmp_path / "k.safetensors"
    assert main(["resize", str(bare), "-o", str(dst), "--rank", "4", "--output-format", "kohya", "-q"]) == 0
    names = {k[: -len(".lora_down.weight")] for k in load_st(dst)[0] if k.endswith(".lora_down.weight")}
    original = {k[: -len(".lora_down.weight")] for k in sd if k.startswith("lora_unet_") and k.endswith(".lora_down.weight")}
    assert names == original


@pytest.mark.parametrize("name,two,want", [
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out",
     False, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"),
    ("text_encoder.text_model.encoder.layers.3.self_attn.to_k", True,
     "lora_te1_text_model_encoder_layers_3_self_attn_k_proj"),
    ("text_encoder_2.text_model.encoder.layers.0.mlp.fc1", True, "lora_te2_text_model_encoder_layers_0_mlp_fc1"),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k", False,
     "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"),
    ("unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k", True,  # SDXL: sd-scripts' sgm names
     "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"),
    ("unet.up_blocks.0.upsamplers.0.conv", True, "lora_unet_output_blocks_2_2_conv"),
    ("unet.mid_block.resnets.1.time_emb_proj", True, "lora_unet_middle_block_2_emb_layers_1"),
    ("mid_block.resnets.0.conv1", False, "lora_unet_mid_block_resnets_0_conv1"),
])
def test_kohya_names(name, two, want):
    scheme = "diffusers"
    n = read_name(name, scheme, None)
    assert key_base("kohya", n, sdxl=two) == want


def test_undefined_directions_are_refused(tmp_path, capsys):
    sd, src = diffusers_file(tmp_path)
    kohya = tmp_path / "kohya.safetensors"
    llm = write_lora(tmp_path / "llm.safetensors", loras.lora_state_dict(
        archs.llama(hidden=16, kv=8, inter=24, layers=1), "peft", rank=4, seed=2))
    for args, why in (([str(kohya), "--output-format", "peft"], "a PEFT adapter holds one model"),
                      ([str(llm), "--output-format", "kohya"], "reads as a known architecture"),
                      ([str(src), "--output-format", "a1111"], "invalid choice")):
        assert main(["resize", *args, "-o", str(tmp_path / "x.safetensors"), "--rank", "4"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lora-resize: error:") and why in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.safetensors").exists()
    assert main(["resize", str(kohya), "-o", str(tmp_path / "same.safetensors"), "--rank", "2",
                 "--output-format", "kohya"]) == 0  # already kohya: nothing to convert
