"""--base: each LoRA module is matched to the base weight it patches, in the base's own key layout (SD1.5 and SDXL
single-file checkpoints with the original UNet and CLIP / OpenCLIP names, Flux native checkpoints, diffusers
folders, fp8 with per-tensor scales), and the base-relative numbers match a dense float64 computation here: the
base weights and the keys they sit under are written out by hand in this file, not taken from the code's tables."""
from __future__ import annotations

import json
import math

import pytest
import torch

import lora_resize
from lora_resize.cli import main

from helpers import load_st, write_lora

TOL = 1e-6


def pair(g, out, inp, rank, kernel=None):
    down = torch.randn(rank, inp, *(kernel or ()), generator=g) * 0.3
    up = torch.randn(out, rank, *((1,) * len(kernel or ())), generator=g) * 0.3
    return down, up


def lora(spec: dict[str, tuple], g, rank=4, alpha=2.0) -> dict[str, torch.Tensor]:
    """kohya LoRA: name -> (out, in, kernel or None)."""
    sd = {}
    for name, (out, inp, kernel) in spec.items():
        sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"] = pair(g, out, inp, rank, kernel)
        sd[name + ".alpha"] = torch.tensor(alpha)
    return sd


def dense(sd: dict, name: str, form=(".lora_down.weight", ".lora_up.weight", ".alpha")) -> torch.Tensor:
    d, u = sd[name + form[0]].double(), sd[name + form[1]].double()
    r = d.shape[0]
    scale = float(sd[name + form[2]]) / r if name + form[2] in sd else 1.0
    return u.reshape(u.shape[0], -1) @ d.reshape(r, -1) * scale


def expected(dw: torch.Tensor, W: torch.Tensor, k: int) -> dict[str, float]:
    """Strength, spectral ratio and the rank-k losses, against W, by dense float64 SVDs."""
    W = W.double().reshape(W.shape[0], -1)
    S = torch.linalg.svdvals(dw)
    w2 = float(torch.linalg.matrix_norm(W, 2))
    return dict(strength=float(dw.norm() / W.norm()), spectral_ratio=float(S[0]) / w2,
                base_loss_fro=float(S[k:].norm() / W.norm()), base_loss_spectral=(float(S[k]) if k < len(S) else 0.0) / w2)


def check(rows, sd, bases: dict[str, torch.Tensor], form=(".lora_down.weight", ".lora_up.weight", ".alpha")):
    by = {r.name: r for r in rows}
    for name, W in bases.items():
        r = by[name]
        assert r.base is not None, name
        want = expected(dense(sd, name, form), W, r.new_rank)
        for f, v in want.items():
            assert getattr(r, f) == pytest.approx(v, rel=TOL, abs=1e-12), (name, f)


def test_sd15_single_file_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(1)
    spec = {  # kohya names (diffusers paths) -> the original checkpoint's key, and the weight's shape
        "lora_unet_down_blocks_0_attentions_0_proj_in": ("input_blocks.1.1.proj_in", (8, 8, 1, 1)),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", (8, 8)),
        "lora_unet_down_blocks_0_resnets_1_conv1": ("input_blocks.2.0.in_layers.2", (8, 8, 3, 3)),
        "lora_unet_down_blocks_1_downsamplers_0_conv": ("input_blocks.6.0.op", (16, 16, 3, 3)),
        "lora_unet_mid_block_attentions_0_proj_out": ("middle_block.1.proj_out", (32, 32, 1, 1)),
        "lora_unet_up_blocks_0_upsamplers_0_conv": ("output_blocks.2.1.conv", (32, 32, 3, 3)),  # SD1.x: no attention
        "lora_unet_up_blocks_1_resnets_2_conv_shortcut": ("output_blocks.5.0.skip_connection", (32, 48, 1, 1)),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ("", (16, 16)),
    }
    base, bases = {}, {}
    for name, (path, shape) in spec.items():
        W = torch.randn(*shape, generator=g)
        key = ("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" if not path else
               f"model.diffusion_model.{path}.weight")
        base[key] = W
        bases[name] = W
    base["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3, generator=g)  # the VAE: ignored
    sd = lora({n: (s[0], math.prod(s[1:2]), tuple(s[2:]) or None) for n, (_, s) in spec.items()}, g)
    sd.update(lora({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (8, 12, None)}, g))
    src = write_lora(tmp_path / "sd15.safetensors", sd)
    ck = write_lora(tmp_path / "v1-5.safetensors", base)
    res = lora_resize.resize(src, tmp_path / "o.safetensors", rank=2, base=str(ck), precision="float")
    check(res.layers, sd, bases)
    missing = [r.name for r in res.layers if r.base is None]
    assert missing == ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"]
    assert any("no weight of their shape in the base" in n and missing[0] in n for n in res.notes)


def test_sdxl_single_file_with_the_openclip_text_encoder(tmp_path):
    g = torch.Generator().manual_seed(2)
    d2 = 20  # the second text encoder's width: q, k, v are thirds of attn.in_proj_weight
    in_proj = torch.randn(3 * d2, d2, generator=g)
    base = {"conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight": in_proj}
    bases = {"lora_te2_text_model_encoder_layers_1_self_attn_k_proj": in_proj[d2:2 * d2],
             "lora_te2_text_model_encoder_layers_1_self_attn_v_proj": in_proj[2 * d2:]}
    spec = {
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k":
            ("model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight", (16, 24)),
        "lora_unet_output_blocks_2_2_conv": ("model.diffusion_model.output_blocks.2.2.conv.weight", (32, 32, 3, 3)),
        "lora_unet_middle_block_0_emb_layers_1":
            ("model.diffusion_model.middle_block.0.emb_layers.1.weight", (32, 40)),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1":
            ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight", (32, 16)),
        "lora_te2_text_model_encoder_layers_1_mlp_fc2":
            ("conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_proj.weight", (d2, 48)),
        "lora_te2_text_model_encoder_layers_1_self_attn_out_proj":
            ("conditioner.embedders.1.model.transformer.resblocks.1.attn.out_proj.weight", (d2, d2)),
    }
    for name, (key, shape) in spec.items():
        base[key] = bases[name] = torch.randn(*shape, generator=g)
    sd = lora({n: (s[0], s[1], tuple(s[2:]) or None) for n, (_, s) in spec.items()}, g)
    sd.update(lora({n: (d2, d2, None) for n in ("lora_te2_text_model_encoder_layers_1_self_attn_k_proj",
                                                 "lora_te2_text_model_encoder_layers_1_self_attn_v_proj")}, g))
    src = write_lora(tmp_path / "sdxl.safetensors", sd)
    ck = write_lora(tmp_path / "sdxl_base.safetensors", base)
    res = lora_resize.resize(src, tmp_path / "o.safetensors", method="sv_fro", param=0.8, base=str(ck),
                             precision="float")
    assert all(r.base is not None for r in res.layers)
    check(res.layers, sd, bases)
    k = next(r for r in res.layers if r.name.endswith("self_attn_k_proj"))
    assert k.base.key.endswith("in_proj_weight[20:40]")


def flux_base(g, d=16):
    """A Flux.1 transformer's weights, by native name (the checkpoint's) with the diffusers names of their parts."""
    W = {"double_blocks.0.img_attn.qkv": torch.randn(3 * d, d, generator=g),
         "single_blocks.0.linear1": torch.randn(7 * d, d, generator=g),
         "final_layer.adaLN_modulation.1": torch.randn(2 * d, d, generator=g),
         "double_blocks.0.img_mlp.0": torch.randn(4 * d, d, generator=g)}
    parts = {  # diffusers path -> (native, rows, swapped halves)
        "transformer_blocks.0.attn.to_q": ("double_blocks.0.img_attn.qkv", (0, d), False),
        "transformer_blocks.0.attn.to_k": ("double_blocks.0.img_attn.qkv", (d, 2 * d), False),
        "transformer_blocks.0.attn.to_v": ("double_blocks.0.img_attn.qkv", (2 * d, 3 * d), False),
        "single_transformer_blocks.0.attn.to_q": ("single_blocks.0.linear1", (0, d), False),
        "single_transformer_blocks.0.attn.to_k": ("single_blocks.0.linear1", (d, 2 * d), False),
        "single_transformer_blocks.0.attn.to_v": ("single_blocks.0.linear1", (2 * d, 3 * d), False),
        "single_transformer_blocks.0.proj_mlp": ("single_blocks.0.linear1", (3 * d, 7 * d), False),
        "norm_out.linear": ("final_layer.adaLN_modulation.1", (0, 2 * d), True),
        "transformer_blocks.0.ff.net.0.proj": ("double_blocks.0.img_mlp.0", (0, 4 * d), False),
    }

    def part(path):
        native, (a, b), swap = parts[path]
        w = W[native][a:b]
        return torch.cat([w[w.shape[0] // 2:], w[:w.shape[0] // 2]]) if swap else w
    return W, parts, part


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model.", ""])
def test_diffusers_layout_lora_against_a_native_flux_checkpoint(tmp_path, prefix):
    g = torch.Generator().manual_seed(3)
    W, parts, part = flux_base(g)
    sd = {}
    for path in parts:
        out, inp = part(path).shape
        sd[f"transformer.{path}.lora_A.weight"], sd[f"transformer.{path}.lora_B.weight"] = pair(g, out, inp, 3)
    src = write_lora(tmp_path / "ai_toolkit.safetensors", sd)
    ck = write_lora(tmp_path / "flux1-dev.safetensors", {f"{prefix}{k}.weight": v for k, v in W.items()})
    res = lora_resize.resize(src, tmp_path / "o.safetensors", rank=2, base=str(ck), precision="float")
    check(res.layers, sd, {f"transformer.{p}": part(p) for p in parts}, (".lora_A.weight", ".lora_B.weight", ".alpha"))


def test_native_lora_against_a_diffusers_folder_and_an_fp8_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(4)
    W, parts, part = flux_base(g)
    folder = tmp_path / "FLUX.1-dev"
    (folder / "transformer").mkdir(parents=True)
    write_lora(folder / "transformer" / "diffusion_pytorch_model.safetensors",
               {f"{p}.weight": part(p).contiguous() for p in parts})
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    spec = {"lora_unet_double_blocks_0_img_attn_qkv": (48, 16, None), "lora_unet_single_blocks_0_linear1": (112, 16, None),
            "lora_unet_final_layer_adaLN_modulation_1": (32, 16, None), "lora_unet_double_blocks_0_img_mlp_0": (64, 16, None)}
    sd = lora(spec, g)
    src = write_lora(tmp_path / "musubi.safetensors", sd)
    res = lora_resize.resize(src, tmp_path / "o.safetensors", rank=2, base=str(folder), precision="float")
    check(res.layers, sd, {"lora_unet_" + n.replace(".", "_"): w for n, w in W.items()})
    # the same weights stored as fp8 with ComfyUI's per-tensor scale_weight: read dequantized
    fp8, deq = {}, {}
    for n, w in W.items():
        q = (w / 0.5).to(torch.float8_e4m3fn)
        fp8[f"model.diffusion_model.{n}.weight"] = q
        fp8[f"model.diffusion_model.{n}.scale_weight"] = torch.tensor(0.5)
        deq["lora_unet_" + n.replace(".", "_")] = q.double() * 0.5
    ck = write_lora(tmp_path / "flux1-dev-fp8.safetensors", fp8)
    res = lora_resize.resize(src, tmp_path / "o8.safetensors", rank=2, base=str(ck), precision="float")
    check(res.layers, sd, deq)


def test_a_flux_loras_text_encoder_modules_are_found_in_a_diffusers_folders_text_encoder(tmp_path):
    """A Flux LoRA's CLIP modules (`lora_te1_`) are the folder's `text_encoder/` weights (the family's part, under
    its own component), beside the transformer's."""
    g = torch.Generator().manual_seed(8)
    W, parts, part = flux_base(g)
    folder = tmp_path / "FLUX.1-dev"
    (folder / "transformer").mkdir(parents=True)
    (folder / "text_encoder").mkdir()
    write_lora(folder / "transformer" / "diffusion_pytorch_model.safetensors",
               {f"{p}.weight": part(p).contiguous() for p in parts})
    q = torch.randn(16, 16, generator=g)
    write_lora(folder / "text_encoder" / "model.safetensors", {"text_model.encoder.layers.0.self_attn.q_proj.weight": q})
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    spec = {"lora_unet_double_blocks_0_img_attn_qkv": (48, 16, None),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (16, 16, None)}
    sd = lora(spec, g)
    src = write_lora(tmp_path / "kohya.safetensors", sd)
    res = lora_resize.resize(src, tmp_path / "o.safetensors", rank=2, base=str(folder), precision="float")
    check(res.layers, sd, {"lora_unet_double_blocks_0_img_attn_qkv": W["double_blocks.0.img_attn.qkv"],
                           "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": q})


def test_base_relative_method_budget_and_analysis(tmp_path, capsys):
    g = torch.Generator().manual_seed(5)
    W, parts, part = flux_base(g)
    spec = {"lora_unet_" + n.replace(".", "_"): (w.shape[0], w.shape[1], None) for n, w in W.items()}
    sd = lora(spec, g, rank=8, alpha=8.0)
    src = write_lora(tmp_path / "l.safetensors", sd)
    ck = write_lora(tmp_path / "base.safetensors", {f"model.diffusion_model.{k}.weight": v for k, v in W.items()})
    bases = {"lora_unet_" + n.replace(".", "_"): w.double() for n, w in W.items()}
    # --method base_fro X: each layer the smallest rank whose loss is at most X of its base weight's norm
    X = 0.01
    res = lora_resize.resize(src, tmp_path / "m.safetensors", method="base_fro", param=X, base=str(ck),
                             precision="float")
    for r in res.layers:
        S = torch.linalg.svdvals(dense(sd, r.name))
        loss = [float(S[k:].norm() / bases[r.name].norm()) for k in range(len(S) + 1)]
        assert loss[r.new_rank] <= X * (1 + 1e-9) and (r.new_rank == 1 or loss[r.new_rank - 1] > X), r.name
    # --target-error X: the global loss sqrt(sum dropped / sum ||W||^2) is at most X, and one rank less anywhere
    # would break it only by the greedy's one-unit slack
    res = lora_resize.resize(src, tmp_path / "e.safetensors", target_error=0.004, base=str(ck), precision="float")
    out, _ = load_st(res.dst)
    dropped = sum(float((dense(sd, n) - dense(out, n)).norm()) ** 2 for n in bases)
    assert math.sqrt(dropped / sum(float(w.norm()) ** 2 for w in bases.values())) <= 0.004 * (1 + 1e-6)
    # --target-size with --base: the file fits; every rank is kept against the base-relative loss per byte
    res = lora_resize.resize(src, tmp_path / "s.safetensors", target_size=4000, base=str(ck), precision="float")
    assert res.output_bytes <= 4000
    # analyze --base: the base columns agree with what resize then writes
    assert main(["analyze", str(src), "--base", str(ck), "--json", "-q"]) == 0
    rows = json.loads(capsys.readouterr().out)["settings"]
    row = next(r for r in rows if r["method"] == "base_fro" and r["param"] == 0.01)
    assert row["base_loss_max"] <= 0.01 * (1 + 1e-9)
    m = lora_resize.resize(src, tmp_path / "a.safetensors", method="base_fro", param=0.01, base=str(ck))
    assert max(r.base_loss_fro for r in m.layers) == pytest.approx(row["base_loss_max"], rel=1e-9)


def test_a_base_of_another_model_or_no_base_is_refused(tmp_path, capsys):
    g = torch.Generator().manual_seed(6)
    W, _, _ = flux_base(g)
    sd = lora({"lora_unet_" + n.replace(".", "_"): (w.shape[0], w.shape[1], None) for n, w in W.items()}, g)
    src = write_lora(tmp_path / "l.safetensors", sd)
    other = write_lora(tmp_path / "other.safetensors", {f"model.diffusion_model.{k}.weight": torch.randn(8, 8)
                                                          for k in W})
    empty = write_lora(tmp_path / "sd15.safetensors", {"model.diffusion_model.input_blocks.0.0.weight":
                                                       torch.randn(8, 4, 3, 3)})
    for argv, why in ((["--base", str(other)], "LoRA's model: only 0 of its 4 modules"),
                      (["--base", str(empty)], "LoRA's model: only 0 of its 4 modules"),
                      (["--base", str(tmp_path / "nope.safetensors")], "nope.safetensors not found"),
                      (["--method", "base_fro", "--param", "0.01"], "add --base MODEL"),
                      (["--target-error", "0.01"], "add --base MODEL")):
        capsys.readouterr()
        assert main(["resize", str(src), "-o", str(tmp_path / "x.safetensors"), "--rank", "2", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert why in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.safetensors").exists()


def test_merge_and_batch_take_the_base_too(tmp_path, capsys):
    g = torch.Generator().manual_seed(7)
    W, _, _ = flux_base(g)
    spec = {"lora_unet_" + n.replace(".", "_"): (w.shape[0], w.shape[1], None) for n, w in W.items()}
    a, b = lora(spec, g), lora(spec, g)
    (tmp_path / "in").mkdir()
    fa, fb = write_lora(tmp_path / "in" / "a.safetensors", a), write_lora(tmp_path / "in" / "b.safetensors", b)
    ck = write_lora(tmp_path / "base.safetensors", {f"model.diffusion_model.{k}.weight": v for k, v in W.items()})
    res = lora_resize.merge([fa, f"{fb}:0.5"], tmp_path / "m.safetensors", rank=3, base=str(ck), precision="float")
    for r in res.layers:
        want = dense(a, r.name) + 0.5 * dense(b, r.name)
        Wn = W[next(n for n in W if "lora_unet_" + n.replace(".", "_") == r.name)].double()
        assert r.strength == pytest.approx(float(want.norm() / Wn.norm()), rel=TOL)
    assert main(["batch", str(tmp_path / "in"), str(tmp_path / "out"), "--rank", "2", "--base", str(ck), "-q"]) == 0
    manifest = json.loads((tmp_path / "out" / "lora-resize-manifest.json").read_text())
    assert len(manifest["files"]) == 2 and all(f["status"] == "ok" for f in manifest["files"])


def test_a_damaged_base_is_refused_in_one_line(tmp_path, capsys):
    g = torch.Generator().manual_seed(8)
    W, _, _ = flux_base(g)
    sd = lora({"lora_unet_" + n.replace(".", "_"): (w.shape[0], w.shape[1], None) for n, w in W.items()}, g)
    src = write_lora(tmp_path / "l.safetensors", sd)
    bad = {f"model.diffusion_model.{k}.weight": v.half() for k, v in W.items()}
    bad["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"][3, 2] = float("nan")
    ck = write_lora(tmp_path / "nan.safetensors", bad)
    for cmd in (["analyze", str(src)], ["resize", str(src), "-o", str(tmp_path / "x.safetensors"), "--rank", "2"]):
        capsys.readouterr()
        assert main([*cmd, "--base", str(ck)]) == 2
        err = capsys.readouterr().err
        assert "holds NaN or Inf" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.safetensors").exists()


def test_a_diffusers_folder_with_variants_is_read_as_diffusers_reads_it(tmp_path, capsys):
    # non_ema and fp16 files sort before the plain one: the plain one is the model, unless a variant is asked for
    g = torch.Generator().manual_seed(11)
    W, parts, part = flux_base(g)
    folder = tmp_path / "FLUX.1-dev"
    (folder / "transformer").mkdir(parents=True)
    plain = {f"{p}.weight": part(p).contiguous() for p in parts}
    other = {k: torch.randn(v.shape, generator=g) for k, v in plain.items()}
    write_lora(folder / "transformer" / "diffusion_pytorch_model.safetensors", plain)
    write_lora(folder / "transformer" / "diffusion_pytorch_model.non_ema.safetensors", other)
    write_lora(folder / "transformer" / "diffusion_pytorch_model.fp16.safetensors", {k: v.half() for k, v in
                                                                                       plain.items()})
    spec = {"lora_unet_double_blocks_0_img_attn_qkv": (48, 16, None), "lora_unet_single_blocks_0_linear1":
            (112, 16, None), "lora_unet_final_layer_adaLN_modulation_1": (32, 16, None),
            "lora_unet_double_blocks_0_img_mlp_0": (64, 16, None)}
    sd = lora(spec, g)
    src = write_lora(tmp_path / "musubi.safetensors", sd)
    names = {"lora_unet_" + n.replace(".", "_"): w for n, w in W.items()}
    res = lora_resize.resize(src, tmp_path / "o.safetensors", rank=2, base=str(folder), precision="float")
    check(res.layers, sd, names)
    res = lora_resize.resize(src, tmp_path / "o.safetensors", rank=2, base=str(folder), base_variant="fp16",
                             precision="float")
    check(res.layers, sd, {k: w.half() for k, w in names.items()})
    assert main(["resize", str(src), "-o", str(tmp_path / "x.safetensors"), "--rank", "2", "--base", str(folder),
                 "--base-variant", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "--base-variant bf16: no weight file of that variant" in err and len(err.strip().splitlines()) == 1
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    assert main(["analyze", str(src), "--base", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "choose one with --base-variant fp16" in err and len(err.strip().splitlines()) == 1


def test_an_fp8_base_with_an_unknown_scale_is_refused_in_one_line(tmp_path, capsys):
    g = torch.Generator().manual_seed(12)
    W, _, _ = flux_base(g)
    sd = lora({"lora_unet_" + n.replace(".", "_"): (w.shape[0], w.shape[1], None) for n, w in W.items()}, g)
    src = write_lora(tmp_path / "l.safetensors", sd)
    fp8 = {}
    for n, w in W.items():
        fp8[f"model.diffusion_model.{n}.weight"] = (w / 0.5).to(torch.float8_e4m3fn)
        fp8[f"model.diffusion_model.{n}.weight_scale"] = torch.tensor(0.5)
        fp8[f"model.diffusion_model.{n}.weight_scale_2"] = torch.tensor(0.01)
    ck = write_lora(tmp_path / "nvfp4ish.safetensors", fp8)
    dst = tmp_path / "x.safetensors"
    assert main(["resize", str(src), "-o", str(dst), "--rank", "2", "--base", str(ck)]) == 2
    err = capsys.readouterr().err
    assert "weight_scale_2" in err and "meaning is not known" in err and len(err.strip().splitlines()) == 1, err
    assert not dst.exists()
