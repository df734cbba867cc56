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


# ----------------------------------------------------------------------------------------------------------------
# Copied tensors keep their bits: a float32 bias diff in a bf16 LoRA must not be rounded to bf16


def _side(shape, dtype, seed) -> torch.Tensor:
    """Values that a narrower dtype cannot hold (float32 mantissas, fp16 values outside bf16's)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64) * (1 + 1e-3 * torch.rand(shape, generator=g,
                                                                                       dtype=torch.float64))
    return t.to(dtype) if dtype.is_floating_point else (t * 100).to(dtype)


def non_factor_files(folder) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """A bf16 LoRA of each family with every kind of non-factor tensor that family's files carry beside it, in
    other dtypes (float32, fp16, an integer): kohya with every companion kind and an embedding, LyCORIS with a
    DoRA magnitude and an OFT module, diffusers with PEFT's lora_B.bias and DoRA magnitude, ControlLoRA with
    ControlNet weights. Returns file -> (tensors, the kind the tool should list each non-factor tensor as)."""
    from lora_resize.formats.companions import COMPANIONS
    folder.mkdir(parents=True, exist_ok=True)
    kohya = make_state_dict([Spec(NAME, out=32, inp=32, rank=8, alpha=4.0)], seed=5, dtype=torch.bfloat16)
    kinds = {}
    suffix = {"full diff": ".diff", "bias diff": ".diff_b", "modulation diff": ".diff_m", "set weight": ".set_weight",
              "reshape weight": ".reshape_weight", "norm": ".w_norm", "norm scale": ".norm.scale"}
    assert set(suffix) == {kind for _, kind in COMPANIONS}  # every companion kind the formats know
    for i, (kind, end) in enumerate(sorted(suffix.items())):
        key = "lora_unet_blocks_1_attn" + end
        kohya[key] = _side((32, 32) if kind == "full diff" else (32,), (torch.float32, torch.float16)[i % 2], i)
        kinds[key] = kind
    kohya["bundle_emb.token.string_to_param.*"] = _side((2, 32), torch.float32, 20)  # a bundled embedding
    kohya["training_step"] = _side((3,), torch.int64, 21)
    kinds.update({"bundle_emb.token.string_to_param.*": "other", "training_step": "other"})
    files = {"kohya": (kohya, kinds)}

    lyco = make_state_dict([Spec("lora_unet_blocks_0_ffn_0", out=32, inp=16, rank=4, alpha=2.0)], seed=6,
                           dtype=torch.bfloat16)
    lyco["lora_unet_blocks_0_ffn_0.dora_scale"] = _side((32, 1), torch.float32, 22)
    lyco["lora_unet_blocks_1_ffn_0.oft_blocks"] = _side((4, 8, 8), torch.float32, 23)
    files["lycoris"] = (lyco, {"lora_unet_blocks_0_ffn_0.dora_scale": "DoRA magnitude",
                               "lora_unet_blocks_1_ffn_0.oft_blocks": "OFT/BOFT module"})

    base = "transformer.transformer_blocks.0.attn.to_q"
    diff = {base + ".lora_A.weight": _side((4, 32), torch.bfloat16, 24),
            base + ".lora_B.weight": _side((32, 4), torch.bfloat16, 25),
            base + ".lora_B.bias": _side((32,), torch.float32, 26),
            base + ".lora_magnitude_vector": _side((32,), torch.float32, 27)}
    files["diffusers"] = (diff, {base + ".lora_B.bias": "LoRA bias", base + ".lora_magnitude_vector": "DoRA magnitude"})

    cl = {"input_blocks.4.1.proj_in.down": _side((4, 16), torch.bfloat16, 28),
          "input_blocks.4.1.proj_in.up": _side((16, 4), torch.bfloat16, 29),
          "input_blocks.0.0.weight": _side((8, 4, 3, 3), torch.float32, 30),
          "lora_controlnet": torch.tensor([])}
    files["controllora"] = (cl, {"input_blocks.0.0.weight": "ControlNet weight",
                                 "lora_controlnet": "ControlLoRA marker"})
    return {name: (write_lora(folder / f"{name}.safetensors", sd), sd, kinds) for name, (sd, kinds) in files.items()}


COPY_JOBS = [(f, j) for f in ("kohya", "lycoris", "diffusers", "controllora") for j in ("resize", "merge")] + [
    ("kohya", "convert"), ("diffusers", "convert")]


@pytest.mark.parametrize("family, job", COPY_JOBS)
def test_copied_tensors_keep_their_bits_unless_a_precision_is_asked_for(tmp_path, capsys, family, job):
    src, sd, kinds = non_factor_files(tmp_path / "in")[family]
    out_path = tmp_path / "out.safetensors"
    args = {"resize": ["resize", str(src), "--rank", "2"], "merge": ["merge", str(src), "--rank", "2"],
            "convert": ["convert", str(src), "--to", family]}[job]  # (other targets refuse non-factor tensors)
    assert main([*args, "-o", str(out_path), "--json", "-q"]) == 0
    res = json.loads(capsys.readouterr().out)
    out, _ = load_st(out_path)
    for key, kind in kinds.items():
        assert out[key].dtype == sd[key].dtype and torch.equal(out[key], sd[key]), (key, out[key].dtype)
    assert res["copied"] == {k: sum(1 for v in kinds.values() if v == k) for k in set(kinds.values())}
    assert res["cast"] == {}

    out_path.unlink()
    assert main([*args, "-o", str(out_path), "--precision", "fp16", "-q"]) == 0
    text = capsys.readouterr().out
    out, _ = load_st(out_path)
    cast = {k: kind for k, kind in kinds.items() if sd[k].is_floating_point() and sd[k].dtype != torch.float16}
    for key in kinds:
        want = sd[key].to(torch.float16) if key in cast else sd[key]
        assert out[key].dtype == want.dtype and torch.equal(out[key], want), key
    counted = {k: sum(1 for v in cast.values() if v == k) for k in set(cast.values())}
    line = next(x for x in text.splitlines() if "cast to fp16" in x)
    assert line.strip().startswith(f"{len(cast)} other tensor(s) cast to fp16"), line
    assert all(f"{n} {kind}" in line for kind, n in counted.items()), line
    unchanged = len(kinds) - len(cast)
    assert (f"{unchanged} other tensor(s) copied unchanged" in text) == (unchanged > 0), text
