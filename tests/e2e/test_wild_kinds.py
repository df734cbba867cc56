"""Kinds of LoRA files found in the wild (built from descriptions of public bug reports, never copies of anyone's
file): every tensor of a file ends resized, copied by kind, or refused naming it - never LoRA factors copied
unresized without a word."""
from __future__ import annotations

import json

import pytest
import torch

import lora_resize
from lora_resize.cli import main

from helpers import (ALPHA, DOWN, UP, Spec, best_rank_k, dense_dw, family_files, load_st, make_state_dict, rel_err,
                     write_lora)

NAME = "lora_unet_blocks_0_self_attn_q"


def with_diffs(style: str) -> dict[str, torch.Tensor]:
    """A LoRA pair (kohya or lora_A/lora_B + .alpha) with a bias diff beside it, as ComfyUI's "Extract and Save
    Lora" writes, a full diff on another module, and a norm, as Wan lightx2v / OneTrainer files carry."""
    sd = make_state_dict([Spec(NAME, out=32, inp=32, rank=8, alpha=4.0),
                          Spec("lora_unet_blocks_0_ffn_0", out=64, inp=32, rank=8, alpha=4.0)], seed=3)
    if style == "ab":
        sd = {k.replace(DOWN, ".lora_A.weight").replace(UP, ".lora_B.weight").replace("lora_unet_", "diffusion_model.")
              .replace("blocks_0_self_attn_q", "blocks.0.self_attn.q").replace("blocks_0_ffn_0", "blocks.0.ffn.0"): v
              for k, v in sd.items()}
    base = "diffusion_model.blocks.0.self_attn.q" if style == "ab" else NAME
    other = "diffusion_model.blocks.0.cross_attn.o" if style == "ab" else "lora_unet_blocks_0_cross_attn_o"
    g = torch.Generator().manual_seed(4)
    sd[base + ".diff_b"] = torch.randn(32, generator=g)
    sd[other + ".diff"] = torch.randn(32, 32, generator=g)
    sd[other + ".diff_b"] = torch.randn(32, generator=g)
    sd["diffusion_model.blocks.0.norm3.w_norm"] = torch.randn(32, generator=g)
    return sd


@pytest.mark.parametrize("style", ["kohya", "ab"])
def test_a_lora_pair_with_diffs_on_the_same_module(tmp_path, style, capsys):
    sd = with_diffs(style)
    src = write_lora(tmp_path / "in.safetensors", sd)
    dst = tmp_path / "out.safetensors"
    assert main(["resize", str(src), "-o", str(dst), "--rank", "3", "--json", "-q"]) == 0
    res = json.loads(capsys.readouterr().out)
    out, _ = load_st(dst)
    assert len(res["layers"]) == 2
    assert res["copied"] == {"bias diff": 2, "full diff": 1, "norm": 1}
    for k, v in sd.items():
        if k.endswith(("diff", "diff_b", "w_norm")):
            assert torch.equal(out[k], v), k  # copied unchanged
    a = "lora_A.weight" if style == "ab" else "lora_down.weight"
    assert {out[k].shape[0] for k in out if k.endswith(a)} == {3}


def test_summary_lists_copied_tensors_by_kind(tmp_path, capsys):
    src = write_lora(tmp_path / "in.safetensors", with_diffs("kohya"))
    assert main(["resize", str(src), "-o", str(tmp_path / "o.safetensors"), "--rank", "3", "-q"]) == 0
    assert "4 other tensor(s) copied unchanged: 2 bias diff, 1 full diff, 1 norm" in capsys.readouterr().out


@pytest.mark.parametrize("key, shape", [
    ("double_blocks.0.processor.qkv_lora_x.down.weight", (4, 16)),  # a LoRA token in the name
    ("model.layers.0.mlp.lora_magic.weight", (4, 16)),
    ("some_module.alpha", ()),                                       # an alpha that belongs to nothing
])
def test_unknown_tensors_that_look_like_lora_parts_are_refused(tmp_path, capsys, key, shape):
    sd = make_state_dict([Spec(NAME, out=16, inp=16, rank=4, alpha=2.0)], seed=1)
    sd[key] = torch.ones(shape)
    src = write_lora(tmp_path / "in.safetensors", sd)
    assert main(["resize", str(src), "-o", str(tmp_path / "o.safetensors"), "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert key in err and "nothing was written" in err and err.count("\n") == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_an_unknown_down_up_pair_that_chains_is_refused(tmp_path, capsys):
    """A pair of a layout no family knows (here `<m>.a.weight` / `<m>.b.weight`) must not be copied unresized."""
    sd = make_state_dict([Spec(NAME, out=16, inp=16, rank=4, alpha=2.0)], seed=1)
    sd["blocks.3.attn.a.weight"] = torch.randn(4, 24)
    sd["blocks.3.attn.b.weight"] = torch.randn(32, 4)
    sd["blocks.3.norm.weight"] = torch.randn(32)  # an ordinary other tensor: fine
    src = write_lora(tmp_path / "in.safetensors", sd)
    assert main(["resize", str(src), "-o", str(tmp_path / "o.safetensors"), "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert "blocks.3.attn.a.weight and blocks.3.attn.b.weight look like the down/up factors" in err


@pytest.mark.parametrize("family", ["kohya", "lycoris", "peft", "diffusers_metadata", "ai_toolkit", "controllora",
                                    "xlabs"])
def test_every_tensor_ends_resized_or_copied_exactly_once(tmp_path, family):
    src = family_files(tmp_path / "f")[family]
    res = lora_resize.resize(src, tmp_path / "o.safetensors", rank=2)
    keys = set(load_st(src)[0])
    from lora_resize.formats import detect
    from lora_resize.io.reader import open_tensor_file
    with open_tensor_file(src) as r:
        layout = detect(r.infos(), r.metadata, src)
    owned = [k for m in layout.modules for k in m.keys]
    assert len(owned) == len(set(owned)) and not set(owned) & set(res.passthrough)
    assert set(owned) | set(res.passthrough) == keys
    assert set(res.copied_kinds) <= {"other", "DoRA magnitude", "LoRA bias", "ControlNet weight",
                                     "ControlLoRA marker", "bias diff", "full diff", "norm"}


def test_zero_layers_are_counted(tmp_path, capsys):
    sd = make_state_dict([Spec(NAME, out=16, inp=16, rank=4, alpha=2.0),
                          Spec("lora_unet_blocks_0_ffn_2", out=16, inp=32, rank=4, alpha=2.0, zero=True),
                          Spec("lora_unet_blocks_1_ffn_2", out=16, inp=32, rank=4, alpha=2.0, zero=True)], seed=2)
    src = write_lora(tmp_path / "in.safetensors", sd)
    assert main(["resize", str(src), "-o", str(tmp_path / "o.safetensors"), "--method", "sv_fro", "--param",
                 "0.9", "-q"]) == 0
    assert "2 zero layer(s) (no update: untrained modules?) kept as rank-1 zeros" in capsys.readouterr().out
    res = lora_resize.resize(src, tmp_path / "o.safetensors", method="sv_fro", param=0.9)
    assert res.as_dict()["zero_layers"] == ["lora_unet_blocks_0_ffn_2", "lora_unet_blocks_1_ffn_2"]


def test_an_output_larger_than_its_input_is_a_warning_with_the_fix(tmp_path, capsys):
    """A LoHa written as plain factors at high fidelity can be several times its input."""
    g = torch.Generator().manual_seed(9)
    n = "lora_unet_blocks_0_ffn_0"
    sd = {f"{n}.hada_w1_a": torch.randn(64, 4, generator=g), f"{n}.hada_w1_b": torch.randn(4, 64, generator=g),
          f"{n}.hada_w2_a": torch.randn(64, 4, generator=g), f"{n}.hada_w2_b": torch.randn(4, 64, generator=g),
          f"{n}.alpha": torch.tensor(4.0)}
    src = write_lora(tmp_path / "loha.safetensors", sd)
    dst = tmp_path / "o.safetensors"
    assert main(["resize", str(src), "-o", str(dst), "--method", "sv_fro", "--param", "0.99", "-q"]) == 0
    text = capsys.readouterr().out
    assert dst.stat().st_size > src.stat().st_size
    assert "warning: the output" in text and "is larger than the input" in text
    assert f"--target-size {src.stat().st_size}" in text and "--rank 4" in text
    assert main(["resize", str(src), "-o", str(dst), "--rank", "4", "-q"]) == 0
    assert "larger than the input" not in capsys.readouterr().out and dst.stat().st_size <= src.stat().st_size


@pytest.mark.parametrize("out_features", [1, 4])
def test_a_layer_with_fewer_outputs_than_the_rank(tmp_path, out_features):
    """A projection to one output, a 4-way MoE router: the rank is clamped to the layer's size, exactly."""
    name = "lora_unet_blocks_0_ff_i_gate"
    sd = make_state_dict([Spec(name, out=out_features, inp=48, rank=16, alpha=8.0)], seed=6)
    src = write_lora(tmp_path / "in.safetensors", sd)
    for opts in (dict(rank=8), dict(method="sv_fro", param=0.99, rank=8), dict(target_fro=0.99)):
        res = lora_resize.resize(src, tmp_path / "o.safetensors", precision="float", **opts)
        out, _ = load_st(tmp_path / "o.safetensors")
        k = out[name + DOWN].shape[0]
        assert k <= out_features and res.layers[0].new_rank == k
        assert rel_err(dense_dw(out, name), best_rank_k(dense_dw(sd, name), k)) < 1e-5
        assert float(out[name + ALPHA]) == 8.0 / 16 * opts.get("rank", 16)  # one alpha: scale x (--rank or input rank)
