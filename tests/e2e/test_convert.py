"""Layout conversion (`lora-resize convert`, `--output-format` on resize and merge), judged by dense float64
updates: a round trip through any target layout gives back every module's exact update and rank; fused <-> split
rows land where the model puts them (Flux, written out by hand here, not read from the tables); the alpha
conventions; SD/SDXL kohya names; merging the same model's LoRAs across layouts. diffusers' own converters and
loaders judge the same conversions in tests/oracles/test_convert_loaders.py."""
from __future__ import annotations

import json

import pytest
import torch

import lora_resize
from lora_resize.cli import main
from lora_resize.testing import archs, loras

from helpers import best_rank_k, load_st, rel_err, write_lora

TARGETS = ("kohya", "comfy", "diffusers", "onetrainer", "peft")
KOHYA_LIKE = {"musubi", "musubi__", "comfy", "onetrainer"}
EXACT = 1e-6


def family_lora(family: str, layout: str, rank: int = 4, seed: int = 0):
    fn, tiny, _ = archs.NATIVE[family]
    shapes = fn(**tiny)
    sd = loras.lora_state_dict(shapes, layout, rank=rank, alpha=2.0 if layout in KOHYA_LIKE else None, seed=seed)
    return shapes, sd


def dw(sd: dict, name: str, style: str) -> torch.Tensor:
    """A module's scaled update, read the way kohya/ComfyUI (alpha / rank, none: 1) and A/B files (1) read it."""
    dk, uk, ak = loras.lora_keys(name, style)
    down, up = sd[dk].double(), sd[uk].double()
    r = down.shape[0]
    scale = float(sd[ak]) / r if ak in sd else 1.0
    return up.reshape(up.shape[0], -1) @ down.reshape(r, -1) * scale


def out_file(tmp_path, target: str, name: str):
    return tmp_path / name if target == "peft" else tmp_path / f"{name}.safetensors"


CASES = [(f, layouts[0], t) for f, (_, _, layouts) in archs.NATIVE.items() for t in TARGETS]
CASES += [(f, layout, "diffusers") for f, (_, _, layouts) in archs.NATIVE.items() for layout in layouts[1:]]


@pytest.mark.parametrize("family, layout, target", CASES)
def test_a_round_trip_through_any_layout_keeps_every_update_and_rank(tmp_path, family, layout, target):
    shapes, sd = family_lora(family, layout)
    src = write_lora(tmp_path / "in.safetensors", sd)
    mid = lora_resize.convert(src, out_file(tmp_path, target, "mid"), target, precision="float")
    assert all(r.new_rank == r.old_rank for r in mid.layers)  # a conversion changes no rank
    back = lora_resize.convert(mid.dst, tmp_path / "back.safetensors", "kohya", precision="float")
    out, meta = load_st(back.dst)
    assert set(out) == {k for m in shapes for k in loras.lora_keys(m.name, "musubi")}  # the trainer's names
    for m in shapes:
        dk, _, _ = loras.lora_keys(m.name, "musubi")
        assert out[dk].shape[0] == sd[loras.lora_keys(m.name, layout)[0]].shape[0], m.name  # the same rank
        assert rel_err(dw(out, m.name, "musubi"), dw(sd, m.name, layout)) < EXACT, m.name


def test_flux_fused_and_split_rows_land_where_the_model_puts_them(tmp_path):
    """Flux.1 at width d = 16: img_attn.qkv -> to_q, to_k, to_v (d rows each); single-block linear1 -> to_q, to_k,
    to_v (d each) and proj_mlp (4d); final_layer.adaLN_modulation.1 -> norm_out.linear with its (shift, scale)
    halves swapped; each part keeps the fused module's rank (its rows of up, the shared down)."""
    d = 16
    fn, tiny, _ = archs.NATIVE["flux1"]
    shapes = fn(**tiny) + [archs.ModuleShape("final_layer.adaLN_modulation.1", 2 * d, d)]
    sd = loras.lora_state_dict(shapes, "musubi", rank=4, alpha=2.0, seed=0)
    src = write_lora(tmp_path / "in.safetensors", sd)
    lora_resize.convert(src, tmp_path / "d.safetensors", "diffusers", precision="float")
    out, _ = load_st(tmp_path / "d.safetensors")

    def got(path):
        a, b = out[f"transformer.{path}.lora_A.weight"].double(), out[f"transformer.{path}.lora_B.weight"].double()
        return b @ a
    qkv = dw(sd, "double_blocks.0.img_attn.qkv", "musubi")
    for i, p in enumerate(("to_q", "to_k", "to_v")):
        assert rel_err(got(f"transformer_blocks.0.attn.{p}"), qkv[i * d:(i + 1) * d]) < EXACT
        assert out[f"transformer.transformer_blocks.0.attn.{p}.lora_A.weight"].shape[0] == 4
    txt = dw(sd, "double_blocks.0.txt_attn.qkv", "musubi")
    assert rel_err(got("transformer_blocks.0.attn.add_v_proj"), txt[2 * d:]) < EXACT
    linear1 = dw(sd, "single_blocks.0.linear1", "musubi")
    for path, rows in (("attn.to_q", (0, d)), ("attn.to_k", (d, 2 * d)), ("attn.to_v", (2 * d, 3 * d)),
                       ("proj_mlp", (3 * d, 7 * d))):
        assert rel_err(got(f"single_transformer_blocks.0.{path}"), linear1[rows[0]:rows[1]]) < EXACT, path
    ada = dw(sd, "final_layer.adaLN_modulation.1", "musubi")
    assert rel_err(got("norm_out.linear"), torch.cat([ada[ada.shape[0] // 2:], ada[:ada.shape[0] // 2]])) < EXACT
    assert rel_err(got("transformer_blocks.0.ff.net.0.proj"), dw(sd, "double_blocks.0.img_mlp.0", "musubi")) < EXACT


def test_split_parts_fuse_block_diagonally_with_the_alpha_convention_stated(tmp_path):
    """Parts split from one fused module (scale 1, rank 4 each, one shared down) fuse back to its numerical rank,
    4; under --rank-rule kohya its alpha is its scale times that rank, by default the file's one alpha."""
    shapes, sd = family_lora("flux1", "musubi")
    mid = lora_resize.convert(write_lora(tmp_path / "in.safetensors", sd), tmp_path / "d.safetensors", "diffusers",
                              precision="float").dst
    for rule, want in (("kohya", 4.0), ("exact", None)):
        dst = tmp_path / f"k_{rule}.safetensors"
        lora_resize.convert(mid, dst, "kohya", precision="float", rank_rule=rule)
        out, _ = load_st(dst)
        name = "lora_unet_double_blocks_0_img_attn_qkv"
        assert out[name + ".lora_down.weight"].shape[0] == 4  # rank 12 of a rank-4 update: its numerical rank
        alphas = {float(v) for k, v in out.items() if k.endswith(".alpha")}
        if want is None:
            assert len(alphas) == 1  # one alpha for every layer
        else:
            # sd-scripts' rule: the fused module's scale (1) times its new rank
            assert float(out[name + ".alpha"]) == pytest.approx(want)
        assert rel_err(dw(out, "double_blocks.0.img_attn.qkv", "musubi"),
                       dw(sd, "double_blocks.0.img_attn.qkv", "musubi")) < EXACT


def test_fused_alpha_is_three_times_a_part_alpha_when_parts_keep_their_rank(tmp_path):
    """Three rank-4 parts with independent updates fuse to rank 12: under --rank-rule kohya the fused alpha is
    three times the parts' (scale kept), as musubi-tuner's ComfyUI converter writes it."""
    d, g = 16, torch.Generator().manual_seed(5)
    sd = {}
    for p in ("to_q", "to_k", "to_v"):
        sd[f"transformer.transformer_blocks.0.attn.{p}.lora_A.weight"] = torch.randn(4, d, generator=g)
        sd[f"transformer.transformer_blocks.0.attn.{p}.lora_B.weight"] = torch.randn(d, 4, generator=g)
        sd[f"transformer.transformer_blocks.0.attn.{p}.alpha"] = torch.tensor(2.0)
    src = write_lora(tmp_path / "in.safetensors", sd)
    dst = tmp_path / "k.safetensors"
    lora_resize.convert(src, dst, "kohya", arch="flux1", rank_rule="kohya", precision="float")
    out, _ = load_st(dst)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    assert out[name + ".lora_down.weight"].shape[0] == 12 and float(out[name + ".alpha"]) == pytest.approx(6.0)
    fused = dw(out, "double_blocks.0.img_attn.qkv", "musubi")
    for i, p in enumerate(("to_q", "to_k", "to_v")):
        a = sd[f"transformer.transformer_blocks.0.attn.{p}.lora_A.weight"].double()
        b = sd[f"transformer.transformer_blocks.0.attn.{p}.lora_B.weight"].double()
        assert rel_err(fused[i * d:(i + 1) * d], b @ a * 0.5) < EXACT, p


def test_resizing_while_converting_truncates_each_part_on_its_own(tmp_path):
    shapes, sd = family_lora("flux1", "musubi", rank=8)
    src = write_lora(tmp_path / "in.safetensors", sd)
    dst = tmp_path / "d.safetensors"
    assert main(["convert", str(src), "-o", str(dst), "--to", "diffusers", "--method", "sv_fro", "--param", "0.8",
                 "--precision", "float", "-q"]) == 0
    out, _ = load_st(dst)
    qkv = dw(sd, "double_blocks.0.img_attn.qkv", "musubi")
    ranks = set()
    for i, p in enumerate(("to_q", "to_k", "to_v")):
        a = out[f"transformer.transformer_blocks.0.attn.{p}.lora_A.weight"].double()
        b = out[f"transformer.transformer_blocks.0.attn.{p}.lora_B.weight"].double()
        ranks.add(a.shape[0])
        assert rel_err(b @ a, best_rank_k(qkv[i * 16:(i + 1) * 16], a.shape[0])) < 1e-5, p


def test_sd_kohya_names_round_trip_sgm_for_sdxl(tmp_path):
    """sd-scripts' SDXL files key the UNet by the sgm model's paths (lora_unet_input_blocks_4_1_...): through
    diffusers and back they get the same keys; SD1.5's diffusers-style kohya names likewise; to ComfyUI and
    OneTrainer Stable Diffusion keeps kohya's names (what both read)."""
    for name, shapes in (("sdxl", archs.sdxl(**archs.TINY["sdxl"])), ("sd15", archs.sd15(**archs.TINY["sd15"]))):
        sd = loras.lora_state_dict(shapes, "kohya", rank=4, alpha=2.0, seed=1)
        src = write_lora(tmp_path / f"{name}.safetensors", sd)
        mid = lora_resize.convert(src, tmp_path / f"{name}_d.safetensors", "diffusers", precision="float").dst
        d, _ = load_st(mid)
        assert all(k.split(".")[0] in ("unet", "text_encoder", "text_encoder_2") for k in d)
        back = lora_resize.convert(mid, tmp_path / f"{name}_k.safetensors", "kohya", precision="float").dst
        out, _ = load_st(back)
        assert set(out) == set(sd), name
        for k in (k for k in sd if k.endswith(".lora_down.weight")):
            base = k[: -len(".lora_down.weight")]
            want = (sd[base + ".lora_up.weight"].double().flatten(1) @ sd[k].double().flatten(1)) * 0.5
            got = out[base + ".lora_up.weight"].double().flatten(1) @ out[k].double().flatten(1)
            got = got * float(out[base + ".alpha"]) / out[k].shape[0]
            assert rel_err(got, want) < EXACT, base
        comfy = lora_resize.convert(src, tmp_path / f"{name}_c.safetensors", "comfy")
        assert set(load_st(comfy.dst)[0]) == set(sd)


def test_peft_target_writes_an_adapter_folder_with_every_module_described(tmp_path):
    shapes, sd = family_lora("wan", "musubi", rank=8)
    src = write_lora(tmp_path / "in.safetensors", sd)
    res = lora_resize.convert(src, tmp_path / "adapter", "peft", method="sv_fro", param=0.95, precision="float")
    assert res.dst == tmp_path / "adapter" / "adapter_model.safetensors"
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    out, _ = load_st(res.dst)
    assert cfg["peft_type"] == "LORA" and len(cfg["target_modules"]) == len(shapes)
    assert all(k.startswith("base_model.model.") for k in out)
    ranks = {k[len("base_model.model."):-len(".lora_A.weight")]: v.shape[0] for k, v in out.items()
             if k.endswith(".lora_A.weight")}
    assert len(set(ranks.values())) > 1
    for path, k in ranks.items():  # each module's rank and alpha (scale 1: alpha = rank) as PEFT resolves them
        assert cfg["rank_pattern"].get(path, cfg["r"]) == k
        assert cfg["alpha_pattern"].get(path, cfg["lora_alpha"]) == k


def test_merge_across_layouts_of_one_model(tmp_path):
    """A kohya/musubi Flux LoRA and a diffusers-layout (ai-toolkit) one merge in the first input's layout, each
    layer the exact weighted sum; LoRAs of different models, or a first input whose layout others cannot be
    written in, are refused with the way out."""
    shapes, a = family_lora("flux1", "musubi", seed=1)
    _, b0 = family_lora("flux1", "musubi", seed=2)
    fa = write_lora(tmp_path / "a.safetensors", a)
    fb = lora_resize.convert(write_lora(tmp_path / "b0.safetensors", b0), tmp_path / "b.safetensors",
                             "diffusers").dst
    res = lora_resize.merge([fa, f"{fb}:0.5"], tmp_path / "m.safetensors", rank=16, precision="float")
    assert res.format == "kohya"
    out, _ = load_st(res.dst)
    for m in shapes:
        assert rel_err(dw(out, m.name, "musubi"), dw(a, m.name, "musubi") + 0.5 * dw(b0, m.name, "musubi")) < EXACT
    res = lora_resize.merge([fb, fa], tmp_path / "m2.safetensors", rank=16, precision="float")  # diffusers first
    assert res.format == "diffusers" and all(k.startswith("transformer.") for k in load_st(res.dst)[0])
    _, w = family_lora("wan", "musubi")
    fw = write_lora(tmp_path / "w.safetensors", w)
    fbw = lora_resize.convert(fw, tmp_path / "wd.safetensors", "diffusers").dst
    with pytest.raises(lora_resize.LoraStructureError, match="different models"):
        lora_resize.merge([fb, fbw], tmp_path / "x.safetensors", rank=4)
    _, t = family_lora("flux1", "ai_toolkit")
    ft = write_lora(tmp_path / "t.safetensors", t)
    with pytest.raises(lora_resize.OptionsError, match="give --output-format"):
        lora_resize.merge([ft, fa], tmp_path / "x.safetensors", rank=4)
    res = lora_resize.merge([ft, fa], tmp_path / "m3.safetensors", rank=16, output_format="comfy", precision="float")
    assert all(k.startswith("lora_unet_") for k in load_st(res.dst)[0])  # ComfyUI's Flux names, as kohya keys them
    assert not (tmp_path / "x.safetensors").exists()


def test_convert_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    shapes, sd = family_lora("flux1", "musubi")
    src = write_lora(tmp_path / "in.safetensors", sd)
    llm = write_lora(tmp_path / "llm.safetensors", loras.lora_state_dict(
        archs.llama(hidden=16, kv=8, inter=24, layers=1), "peft", rank=4, seed=2))
    for argv, why in (([str(src), "--to", "a1111"], "invalid choice"),
                      ([str(llm), "--to", "kohya"], "reads as a known architecture"),
                      ([str(src), "--to", "diffusers", "--arch", "wan"], "does not read as a Wan"),
                      ([str(src), "--to", "diffusers", "--output-format", "kohya"], "given twice with different values"),
                      ([str(src)], "--to")):
        capsys.readouterr()
        assert main(["convert", *argv, "-o", str(tmp_path / "x.safetensors"), "-q"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("lora-resize: error:") and why in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.safetensors").exists()
    # the same layout: written as it is, every update kept
    assert main(["convert", str(src), "-o", str(tmp_path / "same.safetensors"), "--to", "kohya", "-q"]) == 0
    assert "already in the kohya layout" in capsys.readouterr().out
    out, _ = load_st(tmp_path / "same.safetensors")
    assert set(out) == set(sd)
    for m in shapes:
        assert rel_err(dw(out, m.name, "musubi"), dw(sd, m.name, "musubi")) < EXACT


def test_lycoris_modules_convert_as_their_exact_updates(tmp_path):
    """LoHa, LoKr and Tucker LoCon modules (kohya names) written as diffusers pairs: each keeps its whole update
    (LoHa: (w1a w1b) * (w2a w2b); LoKr: kron(w1, w2a w2b); Tucker: the core between down and up; scale alpha / r),
    so they also merge with LoRAs of another layout."""
    from helpers import _loha_lokr
    sd = _loha_lokr(torch.Generator().manual_seed(3))
    src = write_lora(tmp_path / "ly.safetensors", sd)
    lora_resize.convert(src, tmp_path / "d.safetensors", "diffusers", precision="float")
    out, _ = load_st(tmp_path / "d.safetensors")
    n1, n2, n3 = ("down_blocks.0.attentions.0.proj_in", "text_model.encoder.layers.0.mlp.fc1",
                  "down_blocks.0.resnets.0.conv1")
    g = {k: v.double() for k, v in sd.items()}
    p1, p2, p3 = "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1", \
        "lora_unet_down_blocks_0_resnets_0_conv1"
    want = {
        "unet." + n1: (g[f"{p1}.hada_w1_a"] @ g[f"{p1}.hada_w1_b"]) * (g[f"{p1}.hada_w2_a"] @ g[f"{p1}.hada_w2_b"]) * 2 / 4,
        "text_encoder." + n2: torch.kron(g[f"{p2}.lokr_w1"], g[f"{p2}.lokr_w2_a"] @ g[f"{p2}.lokr_w2_b"]) * 1.5 / 3,
        "unet." + n3: torch.einsum("ijkl,jr,pi->prkl", g[f"{p3}.lora_mid.weight"], g[f"{p3}.lora_down.weight"][:, :, 0, 0],
                                   g[f"{p3}.lora_up.weight"][:, :, 0, 0]).reshape(8, -1) * 4 / 5,
    }
    for name, w in want.items():
        a, b = out[name + ".lora_A.weight"].double(), out[name + ".lora_B.weight"].double()
        assert rel_err(b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1), w) < EXACT, name
    assert out["unet." + n3 + ".lora_A.weight"].shape[1:] == (6, 3, 3)  # the conv stays a conv


def test_a_peft_output_beside_another_adapter_config_leaves_it_alone(tmp_path, capsys):
    shapes, sd = family_lora("flux1", "musubi")
    src = write_lora(tmp_path / "in.safetensors", sd)
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "adapter_config.json").write_text('{"someone": "else"}')
    assert main(["convert", str(src), "-o", str(sub / "z.safetensors"), "--to", "peft", "-q"]) == 0
    out = capsys.readouterr().out
    assert (sub / "adapter_config.json").read_text() == '{"someone": "else"}'
    assert json.loads((sub / "z_adapter_config.json").read_text())["peft_type"] == "LORA"
    assert "belongs to another file and is left alone" in out
    # a conversion that grows the file (split modules, longer names) does not advise a lower rank
    assert "no layer's rank grew" in out and "--rank 4, the input's" not in out


# ----------------------------------------------------------------------------------------------------------------
# Each module in its own layout; text encoders and text connectors; the names each consumer's key map accepts


def _updates(sd: dict, style_of) -> dict:
    """name -> scaled dense update of every module of a kohya-form or A/B state dict (style_of(base) -> style)."""
    out = {}
    for k in sd:
        for dk, form in ((".lora_down.weight", "kohya"), (".lora_A.weight", "diffusers")):
            if k.endswith(dk):
                base = k[: -len(dk)]
                out[base] = dw(sd, base, form)
    return out


def test_a_file_whose_modules_mix_prefixes_reads_each_by_its_own(tmp_path):
    """musubi-tuner's LTX-2 ComfyUI files key the text connector `text_embedding_projection.aggregate_embed`
    without the `diffusion_model.` every other module has: each module is read in its own layout, so diffusers
    gets `transformer.<path>` and the connector as diffusers' own converter names it (`connectors.text_proj_in`,
    lora_conversion_utils._convert_non_diffusers_ltx2_lora_to_diffusers) - never `transformer.diffusion_model.*`."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_ltx2_lora_to_diffusers as ltx2_conv
    fn, tiny, _ = archs.NATIVE["ltx2"]
    shapes = fn(**tiny)
    for style, alpha in (("ai_toolkit", None), ("comfy", 2.0)):
        sd = loras.lora_state_dict(shapes, style, rank=4, alpha=alpha, seed=3)
        g = torch.Generator().manual_seed(4)
        form = loras.STYLES[style][0]
        sd["text_embedding_projection.aggregate_embed" + form[0]] = torch.randn(4, 24, generator=g)
        sd["text_embedding_projection.aggregate_embed" + form[1]] = torch.randn(12, 4, generator=g)
        src = write_lora(tmp_path / f"{style}.safetensors", sd)
        res = lora_resize.convert(src, tmp_path / f"{style}_d.safetensors", "diffusers", precision="float")
        out, _ = load_st(res.dst)
        assert not any("diffusion_model" in k for k in out), sorted(out)[:3]
        want = {k.rsplit(".", 2)[0] for k in ltx2_conv(sd, "text_embedding_projection")}  # diffusers' own name
        assert want == {"connectors.text_proj_in"} and "connectors.text_proj_in.lora_A.weight" in out
        assert {k.split(".", 1)[0] for k in out} == {"transformer", "connectors"}
        back = lora_resize.convert(res.dst, tmp_path / f"{style}_c.safetensors", "comfy", precision="float")
        got, _ = load_st(back.dst)
        bases = {k.rsplit(".", 2)[0] for k in got if k.endswith("lora_down.weight")}
        assert "text_embedding_projection.aggregate_embed" in bases
        assert bases - {"text_embedding_projection.aggregate_embed"} == {"lora_unet_" + m.name.replace(".", "_")
                                                                         for m in shapes}
        assert any("kohya-style loaders do not read" in n for n in back.notes)
        a, b = _updates(sd, None), _updates(got, None)
        for name in a:
            key = name if name.startswith("text_") else "lora_unet_" + name.removeprefix("diffusion_model.").replace(".", "_")
            assert rel_err(b[key], a[name]) < EXACT, name
        with pytest.raises(lora_resize.LoraStructureError, match="no name known here in the kohya layout"):
            lora_resize.convert(src, tmp_path / "k.safetensors", "kohya")
        assert not (tmp_path / "k.safetensors").exists()


@pytest.mark.parametrize("family, form", [("qwen_image", "kohya"), ("z_image", "kohya"), ("wan", "diffsynth"),
                                          ("flux1", "kohya")])
def test_bare_module_paths_convert(tmp_path, family, form):
    """LoRAs keyed by the bare model path (Qwen-Image Lightning's `transformer_blocks.0.attn.to_q.lora_down.weight`,
    Z-Image's; no `transformer.` / `diffusion_model.`) convert, with --arch where names are shared by families;
    through every target and back, each module keeps its update."""
    fn, tiny, _ = archs.NATIVE[family]
    shapes = fn(**tiny)
    style = "kohya" if form == "kohya" else "diffsynth"
    sd = loras.lora_state_dict(shapes, style, rank=4, alpha=2.0 if style == "kohya" else None, seed=6)
    src = write_lora(tmp_path / "in.safetensors", sd)
    for target in TARGETS:
        mid = lora_resize.convert(src, out_file(tmp_path, target, target), target, arch=family, precision="float")
        back = lora_resize.convert(mid.dst, tmp_path / f"{target}_back.safetensors", "comfy", precision="float")
        out, _ = load_st(back.dst)
        for m in shapes:
            assert rel_err(dw(out, m.name, "musubi") if family not in ("z_image",) or
                           "attention.to_" not in m.name else _comfy_z(out, m.name),
                           dw(sd, m.name, style)) < EXACT, (target, m.name)


def _comfy_z(out: dict, name: str) -> torch.Tensor:
    """Z-Image's q/k/v rows of ComfyUI's fused `attention.qkv` (each as wide as the layer)."""
    if name.endswith("to_out.0"):  # to_out.0 -> attention.out
        return dw(out, name.replace("attention.to_out.0", "attention.out"), "musubi")
    p, t = name.rsplit(".", 1)
    fused = dw(out, p + ".qkv", "musubi")
    d = fused.shape[0] // 3
    i = ("to_q", "to_k", "to_v").index(t)
    return fused[i * d:(i + 1) * d]


CLIP = dict(width=16, layers=1, mlp=24)


def _clip(prefix: str, sep: str = "_") -> list:
    """CLIP text-encoder modules under a prefix (kohya `lora_te1_`, flattened; diffusers `text_encoder.`, dotted)."""
    mods = archs._clip("", CLIP["width"], CLIP["layers"], CLIP["mlp"])
    if sep == "_":
        return [archs.ModuleShape(prefix + m.name, m.out, m.inp) for m in mods]
    return [archs.ModuleShape(prefix + clip_dotted(m.name), m.out, m.inp) for m in mods]


def clip_dotted(flat: str) -> str:
    return (flat.replace("text_model_encoder_layers_", "text_model.encoder.layers.").replace("_self_attn_", ".self_attn.")
            .replace("_mlp_", ".mlp.").replace("layers.0_", "layers.0."))


def test_sd3_with_its_three_text_encoders_is_detected_and_converts(tmp_path):
    """OneTrainer's SD3 files: `lora_transformer_<diffusers path>` with `lora_te1_` (CLIP-L), `lora_te2_` (CLIP-G),
    `lora_te3_` (T5-XXL): read as SD3 (its metadata says so), written to diffusers as `transformer.`,
    `text_encoder.`, `text_encoder_2.` (diffusers' StableDiffusion3Pipeline components), to kohya and back
    to the same keys and updates; to kohya as sd-scripts' lora_sd3.py names them; the T5's modules to diffusers,
    whose SD3 loader takes none, are refused."""
    t5 = archs._t5("lora_te3_", 16, 1, 16, 24)
    shapes = ([archs.ModuleShape("lora_transformer_" + m.name.replace(".", "_"), m.out, m.inp)
               for m in archs.sd3(width=16, blocks=2, prefix="")] + _clip("lora_te1_") + _clip("lora_te2_") + t5)
    sd = loras.lora_state_dict(shapes, "kohya", rank=4, alpha=2.0, seed=7)
    meta = {"modelspec.architecture": "stable-diffusion-v3-medium/lora"}
    src = write_lora(tmp_path / "in.safetensors", sd, meta)
    # diffusers' SD3 loader takes no T5 LoRA (_lora_loadable_modules: transformer, text_encoder, text_encoder_2)
    with pytest.raises(lora_resize.LoraStructureError, match="no LoRA in diffusers' pipelines"):
        lora_resize.convert(src, tmp_path / "d.safetensors", "diffusers")
    no_t5 = write_lora(tmp_path / "no_t5.safetensors", {k: v for k, v in sd.items() if "lora_te3_" not in k}, meta)
    d, dmeta = load_st(lora_resize.convert(no_t5, tmp_path / "d.safetensors", "diffusers", precision="float").dst)
    assert {k.split(".")[0] for k in d} == {"transformer", "text_encoder", "text_encoder_2"}
    assert dmeta["lora_resize_arch"] == "sd3"
    mid = lora_resize.convert(src, tmp_path / "k.safetensors", "kohya", precision="float")
    back = lora_resize.convert(mid.dst, tmp_path / "o.safetensors", "onetrainer", precision="float")
    out, _ = load_st(back.dst)
    assert set(out) == set(sd)
    for m in shapes:
        assert rel_err(dw(out, m.name, "kohya"), dw(sd, m.name, "kohya")) < EXACT, m.name
    names = {key.rsplit(".", 2)[0] for key in load_st(mid.dst)[0]}
    bare = write_lora(tmp_path / "bare.safetensors", sd)  # no metadata: CLIP-G, a text encoder only SD3 has, decides
    assert load_st(lora_resize.convert(bare, tmp_path / "b.safetensors", "kohya").dst)[1]["lora_resize_arch"] == "sd3"
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv" in names
    assert {n for n in names if n.startswith("lora_te")} == {m.name for m in shapes if m.name.startswith("lora_te")}


def test_flux_with_its_clip_text_encoder_is_flux_and_converts(tmp_path):
    """diffusers' train_dreambooth_lora_flux --train_text_encoder: `transformer.*` with `text_encoder.*` (CLIP-L):
    detected as Flux (its transformer modules decide, not the CLIP modules SD shares), the text encoder written as
    sd-scripts' `lora_te1_` (networks/lora_flux.py) and back."""
    sdx = loras.lora_state_dict([archs.ModuleShape("transformer.transformer_blocks.0.attn.to_out.0", 16, 16),
                                 archs.ModuleShape("transformer.single_transformer_blocks.0.proj_out", 16, 80)]
                                + _clip("text_encoder.", "."), "diffusers", rank=4, seed=8)
    src = write_lora(tmp_path / "in.safetensors", sdx)
    for target in ("kohya", "comfy"):
        res = lora_resize.convert(src, tmp_path / f"{target}.safetensors", target, precision="float")
        out, meta = load_st(res.dst)
        assert meta["lora_resize_arch"] == "flux1"
        names = {k.rsplit(".", 2)[0] for k in out if k.endswith("lora_down.weight")}
        assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names, names
        back = lora_resize.convert(res.dst, tmp_path / f"{target}_d.safetensors", "diffusers", precision="float")
        got, _ = load_st(back.dst)
        assert set(got) == set(sdx)
        for k in (k for k in sdx if k.endswith("lora_A.weight")):
            base = k[: -len(".lora_A.weight")]
            assert rel_err(dw(got, base, "diffusers"), dw(sdx, base, "diffusers")) < EXACT, base


# ComfyUI's key map (comfy/lora.py model_lora_keys_unet): for every model it reads a module as
# `diffusion_model.<weight path>` and `lora_unet_<weight path, . as _>`, by the paths of ComfyUI's own model code - the
# trainers' native paths except where ComfyUI's model fuses or renames (its HunyuanVideo 1.5 blocks: fused
# `img_attn.qkv`, `img_mlp.0/2`, `img_mod.lin`; its Lumina2 / Z-Image: fused `attention.qkv`, `attention.out`).
COMFY_RENAMES = {
    "hunyuan_video15": ((r"_attn_[qkv]$", "_attn.qkv"), (r"_attn_proj$", "_attn.proj"), (r"_mlp\.fc1$", "_mlp.0"),
                        (r"_mlp\.fc2$", "_mlp.2"), (r"_mod\.linear$", "_mod.lin")),
    "z_image": ((r"attention\.to_[qkv]$", "attention.qkv"), (r"attention\.to_out\.0$", "attention.out")),
    # sd-scripts networks/convert_hunyuan_image_lora_to_comfy.py (and the dotted paths of ComfyUI's flux-style blocks)
    "hunyuan_image": ((r"_attn_qkv$", "_attn.qkv"), (r"_attn_proj$", "_attn.proj"), (r"_mlp\.fc1$", "_mlp.0"),
                      (r"_mlp\.fc2$", "_mlp.2"), (r"_mod\.linear$", "_mod.lin"),
                      (r"modulation\.linear$", "modulation.lin")),
    # ComfyUI's HiDreamO1Transformer holds the Qwen3-VL modules at the top (comfy/ldm/hidream_o1/model.py);
    # musubi-tuner's model keeps them under `model.`
    "hidream_o1": ((r"^model\.", ""),),
}


def comfy_weights(family: str) -> set[str]:
    """The weight paths of ComfyUI's model of a family (archs.NATIVE's module list under ComfyUI's names)."""
    import re
    fn, tiny, _ = archs.NATIVE[family]
    out = set()
    for m in fn(**tiny):
        name = m.name
        for rx, to in COMFY_RENAMES.get(family, ()):
            name = re.sub(rx, to, name)
        out.add(name)
    return out


def comfy_accepts(family: str) -> set[str]:
    """The module names ComfyUI's key map reads for a family: its weights as `diffusion_model.` and `lora_unet_`
    names; for Z-Image (its Lumina2 branch, z_image_to_diffusers) also the diffusers names (the trainers') as
    `diffusion_model.`, `transformer.`, bare and `lycoris_`, each mapped to its rows of the fused weight."""
    fn, tiny, _ = archs.NATIVE[family]
    weights = comfy_weights(family)
    out = {"diffusion_model." + w for w in weights} | {"lora_unet_" + w.replace(".", "_") for w in weights}
    if family == "z_image":
        for m in fn(**tiny):
            out |= {"diffusion_model." + m.name, "transformer." + m.name, m.name, "lycoris_" + m.name.replace(".", "_")}
    return out


def musubi_names(family: str) -> set[str]:
    """sd-scripts' / musubi-tuner's names (networks/lora_flux.py, musubi's networks): `lora_unet_` + the model
    code's module path with `_`, which their loaders match against the model's modules."""
    fn, tiny, _ = archs.NATIVE[family]
    return {"lora_unet_" + m.name.replace(".", "_") for m in fn(**tiny)}


ACCEPT_CASES = [(f, layout) for f, (_, _, layouts) in archs.NATIVE.items() for layout in layouts]


@pytest.mark.parametrize("family, layout", ACCEPT_CASES)
def test_converted_keys_are_what_each_target_loader_reads(tmp_path, family, layout):
    """Every family, from every layout its trainers write: the `comfy` output's modules are all in ComfyUI's key
    map, the `kohya` output's are sd-scripts'/musubi-tuner's names of the model's modules (and so ComfyUI's where
    its model's names are the trainers'), and every input module's update arrives (tests/oracles/
    test_model_families_diffusers.py judges the diffusers, PEFT and OneTrainer outputs by diffusers' models)."""
    shapes, sd = family_lora(family, layout)
    src = write_lora(tmp_path / "in.safetensors", sd)
    for target, accepted in (("comfy", comfy_accepts(family)), ("kohya", musubi_names(family))):
        res = lora_resize.convert(src, tmp_path / f"{target}.safetensors", target, precision="float")
        bases = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in load_st(res.dst)[0]}
        assert bases and bases <= accepted, sorted(bases - accepted)[:3]
        if target == "comfy" and family not in COMFY_RENAMES:  # ComfyUI's names are the trainers': one file for all
            assert bases <= musubi_names(family), sorted(bases - musubi_names(family))[:3]
        elif target == "comfy":  # no one name serves ComfyUI and musubi-tuner: the summary says so
            assert any("musubi-tuner and sd-scripts do not read them" in n for n in res.notes), res.notes


FUSED_IN_COMFY = {"hunyuan_video15", "z_image"}  # COMFY_RENAMES that fuse split weights; the others only rename


@pytest.mark.parametrize("family, layout", [(f, layout) for f, layout in ACCEPT_CASES if layout in ("musubi", "comfy")])
def test_conversion_notes_say_what_happened(tmp_path, family, layout):
    """The notes name a conversion only where names changed - from one layout to another, or rewritten within one
    (never 'from comfy to comfy') - and ComfyUI's fusing only where the output fuses what the input split."""
    _, sd = family_lora(family, layout)
    src = write_lora(tmp_path / "in.safetensors", sd)
    for target in ("comfy", "kohya"):
        res = lora_resize.convert(src, tmp_path / f"{target}.safetensors", target)
        out = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in load_st(res.dst)[0]}
        inp = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
        said = [n for n in res.notes if n.startswith("key names")]
        assert not any(f"from {t} to {t}" in n for n in said for t in ("comfy", "kohya", "diffusers")), said
        assert bool(said) == (out != inp), (said, sorted(out - inp)[:2])
        fused = [n for n in res.notes if "fuses what its trainers split" in n]
        assert bool(fused) == (target == "comfy" and len(out) < len(inp)), res.notes  # fewer modules: fused
        if target == "comfy" and family in COMFY_RENAMES and family not in FUSED_IN_COMFY and layout == "musubi":
            assert any("differ from its trainers'" in n for n in res.notes), res.notes  # renamed only


# ----------------------------------------------------------------------------------------------------------------
# Conversion without a resize is lossless: factors copied bit for bit


def _module_tensors(sd: dict, name: str, style: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down, up, scale) of a module as stored (scale: alpha / rank, 1 without an alpha)."""
    dk, uk, ak = loras.lora_keys(name, style)
    return sd[dk], sd[uk], float(sd[ak]) / sd[dk].shape[0] if ak in sd else 1.0


BITS = [(f, layout, t) for f, (_, _, layouts) in archs.NATIVE.items() for layout in layouts for t in TARGETS]


@pytest.mark.parametrize("family, layout, target", BITS)
def test_bf16_conversions_copy_the_factors_bit_for_bit(tmp_path, family, layout, target):
    """A bf16 file of any family and layout, converted to any target without a resize and back to its trainers'
    kohya names: every down comes back with the same bytes and every up with the same numbers times its scale
    (renames, splits of a fused weight into rows of up with the shared down, fusions into stacked downs and
    block-diagonal ups need no arithmetic; a power-of-two alpha / rank moves into up exactly where the target has
    no alpha), and the converted file's rows say each layer was copied."""
    fn, tiny, _ = archs.NATIVE[family]
    shapes = fn(**tiny)
    sd = loras.lora_state_dict(shapes, layout, rank=4, alpha=2.0 if layout in KOHYA_LIKE else None,
                               dtype=torch.bfloat16, seed=9)
    src = write_lora(tmp_path / "in.safetensors", sd)
    mid = lora_resize.convert(src, out_file(tmp_path, target, "mid"), target)
    assert all(r.conversion == "exact" for r in mid.layers), [(r.name, r.conversion) for r in mid.layers][:3]
    back = lora_resize.convert(mid.dst, tmp_path / "back.safetensors", "kohya")
    out, _ = load_st(back.dst)
    for m in shapes:
        d0, u0, s0 = _module_tensors(sd, m.name, layout)
        d1, u1, s1 = _module_tensors(out, m.name, "musubi")
        assert d1.dtype == torch.bfloat16 and torch.equal(d1, d0), m.name
        # up as stored, or times a power-of-two scale where the target has no alpha (diffusers/PEFT A/B: scale 1;
        # alpha 2 / rank 4 = 1/2 moves into up exactly)
        assert torch.equal(u1.double() * s1, u0.double() * s0), m.name


def test_fused_parts_of_different_scales_are_re_rounded_and_the_summary_says_so(tmp_path, capsys):
    """Flux q/k/v parts with different alphas cannot share one fused alpha: the conversion re-rounds them once and
    the summary names a layer and the bound."""
    g = torch.Generator().manual_seed(2)
    sd = {}
    for p, a in (("to_q", 2.0), ("to_k", 4.0), ("to_v", 2.0)):
        sd[f"transformer.transformer_blocks.0.attn.{p}.lora_A.weight"] = torch.randn(4, 16, generator=g).bfloat16()
        sd[f"transformer.transformer_blocks.0.attn.{p}.lora_B.weight"] = torch.randn(16, 4, generator=g).bfloat16()
        sd[f"transformer.transformer_blocks.0.attn.{p}.alpha"] = torch.tensor(a).bfloat16()
    src = write_lora(tmp_path / "in.safetensors", sd)
    assert main(["convert", str(src), "-o", str(tmp_path / "k.safetensors"), "--to", "kohya", "--arch", "flux1"]) == 0
    out = capsys.readouterr().out
    assert "could not be copied exactly" in out and "different scales" in out and "2^-8 bf16" in out


def _same_tensors(a: dict, b: dict) -> list[str]:
    """The keys whose tensors differ between two state dicts (in dtype or in any bit), or are in one only."""
    return sorted(set(a) ^ set(b)) + [k for k in sorted(set(a) & set(b))
                                      if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", list(archs.NATIVE))
def test_a_chain_of_conversions_returns_every_factor_byte(tmp_path, family, dtype):
    """A file of any family through every layout in turn (kohya -> comfy -> diffusers -> onetrainer -> peft ->
    kohya), each hop converted twice: the second conversion, to the layout the file is already in, writes every
    tensor with the same bytes (the layout's own modules copied, not re-decomposed), and the chain ends with the
    input's factors and alphas, byte for byte - a zero layer and a rank-deficient one included (nothing chooses a
    rank, so nothing is truncated to the numerical rank). Scale 1 (alpha = rank) keeps every hop exact: a target
    loaded at scale 1 holds the factors as they are."""
    fn, tiny, layouts = archs.NATIVE[family]
    shapes, layout = fn(**tiny), layouts[0]
    sd = loras.lora_state_dict(shapes, layout, rank=4, alpha=4.0 if layout in KOHYA_LIKE else None, dtype=dtype,
                               seed=3)
    zero, deficient = (loras.lora_keys(m.name, layout) for m in (shapes[-1], shapes[0]))
    sd[zero[1]] = torch.zeros_like(sd[zero[1]])  # an untrained layer (one no layout fuses: a zero part of a fused
    # weight has no columns of up of its own, so a split gives it the whole fused down - its update, not its bytes)
    sd[deficient[0]][1] = sd[deficient[0]][0]  # numerical rank 3 of 4
    prev = write_lora(tmp_path / "in.safetensors", sd)
    for i, target in enumerate((*TARGETS, "kohya")):
        first = lora_resize.convert(prev, out_file(tmp_path, target, f"{i}"), target)
        again = lora_resize.convert(first.dst, out_file(tmp_path, target, f"{i}again"), target)
        assert all(r.conversion == "exact" for r in again.layers), target
        differ = _same_tensors(load_st(first.dst)[0], load_st(again.dst)[0])
        assert not differ, (target, differ[:3])
        prev = again.dst
    out, _ = load_st(prev)
    for m in shapes:
        theirs, ours = loras.lora_keys(m.name, layout), loras.lora_keys(m.name, "musubi")
        for k0, k1 in zip(theirs, ours):
            if k0 in sd:
                assert out[k1].dtype == dtype and torch.equal(out[k1], sd[k0]), (m.name, k1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_file_already_in_the_target_layout_is_copied_byte_for_byte(tmp_path, dtype):
    """SD1.5 kohya and diffusers files converted to their own layout (and kohya's to comfy, which keys Stable
    Diffusion by the same names) without a resize: every tensor as stored - alphas of any value (0, negative, one
    whose scale is no power of two, float32 beside half-precision factors), an untrained layer, a rank-deficient
    one; nothing is re-decomposed."""
    shapes = archs.sd15(**archs.TINY["sd15"])[:6]
    sd = loras.lora_state_dict(shapes, "kohya", rank=4, alpha=4.0, dtype=dtype, seed=5)
    names = [m.name for m in shapes]
    for name, alpha in zip(names, (0.0, -4.0, 2.0 ** -3, 3.0)):
        sd[name + ".alpha"] = torch.tensor(alpha, dtype=dtype)
    sd[names[3] + ".alpha"] = torch.tensor(3.3, dtype=torch.float32)  # 3.3 is no half-precision number
    sd[names[4] + ".lora_up.weight"] = torch.zeros_like(sd[names[4] + ".lora_up.weight"])
    sd[names[5] + ".lora_down.weight"][1] = sd[names[5] + ".lora_down.weight"][0]
    src = write_lora(tmp_path / "k.safetensors", sd)
    for target in ("kohya", "comfy"):
        res = lora_resize.convert(src, tmp_path / f"{target}.safetensors", target)
        assert all(r.conversion == "exact" for r in res.layers), target
        differ = _same_tensors(sd, load_st(res.dst)[0])
        assert not differ, (target, differ[:3])
    for name in names[:4]:
        sd[name + ".alpha"] = torch.tensor(4.0, dtype=dtype)  # scale 1: diffusers' A/B keys hold the factors
    d = lora_resize.convert(write_lora(tmp_path / "k1.safetensors", sd), tmp_path / "d.safetensors", "diffusers")
    res = lora_resize.convert(d.dst, tmp_path / "d_again.safetensors", "diffusers")
    assert all(r.conversion == "exact" for r in res.layers)
    differ = _same_tensors(load_st(d.dst)[0], load_st(res.dst)[0])
    assert not differ, differ[:3]


@pytest.mark.parametrize("family", list(archs.NATIVE))
def test_bias_and_full_diffs_follow_their_module_through_every_target(tmp_path, family):
    """A file whose every module carries a `.diff_b` and a `.diff` (ComfyUI's load_lora adds them to the bias and
    the weight as they are), each made from its own module's update (the diff: the update rounded; the diff_b: its
    row sums rounded): converted to every kohya-style layout, each output module's diffs are again those of its
    own update - renamed, split rows or fused rows, bit for bit, so the loaded update (dense float64) is the
    input's - and converted back they are the input's bytes; diffusers and PEFT, whose loaders drop such keys,
    refuse in one line and write nothing."""
    fn, tiny, layouts = archs.NATIVE[family]
    shapes, layout = fn(**tiny), layouts[0]
    sd = loras.lora_state_dict(shapes, layout, rank=4, alpha=4.0 if layout in KOHYA_LIKE else None,
                               dtype=torch.bfloat16, seed=4)
    assert layout in KOHYA_LIKE  # every family's trainers write a kohya-form file (musubi-tuner's or ComfyUI's)
    for base, w in _updates(sd, None).items():
        down = sd[base + ".lora_down.weight"]
        sd[base + ".diff"] = w.reshape(w.shape[0], *down.shape[1:]).bfloat16()
        sd[base + ".diff_b"] = w.sum(1).bfloat16()
    src = write_lora(tmp_path / "in.safetensors", sd)
    for target in TARGETS:
        dst = out_file(tmp_path, target, target)
        if target in ("diffusers", "peft"):
            with pytest.raises(lora_resize.LoraStructureError, match="bias diff|full diff"):
                lora_resize.convert(src, dst, target)
            assert not dst.exists()
            continue
        mid, _ = load_st(lora_resize.convert(src, dst, target).dst)
        for base, w in _updates(mid, None).items():
            assert torch.equal(mid[base + ".diff"], w.reshape(mid[base + ".diff"].shape).bfloat16()), base
            assert torch.equal(mid[base + ".diff_b"], w.sum(1).bfloat16()), base
        assert {k for k in mid if k.endswith((".diff", ".diff_b"))} == {b + s for b in _updates(mid, None)
                                                                       for s in (".diff", ".diff_b")}
        back, _ = load_st(lora_resize.convert(dst, tmp_path / f"{target}_back.safetensors", "kohya").dst)
        for m in shapes:
            theirs, ours = loras.lora_keys(m.name, layout)[0], loras.lora_keys(m.name, "musubi")[0]
            for s in (".diff", ".diff_b"):
                k0, k1 = theirs.replace(".lora_down.weight", s), ours.replace(".lora_down.weight", s)
                assert back[k1].dtype == torch.bfloat16 and torch.equal(back[k1], sd[k0]), k1


def test_a_kohya_dora_file_converts_to_its_own_layout(tmp_path):
    """A kohya file with DoRA magnitudes (`dora_scale`: read by the LyCORIS family, whose keys are kohya's) converted
    to kohya is its own layout: accepted (it was refused as having 'no equivalent in the kohya layout'), its
    magnitudes kept bit for bit, every update kept."""
    from helpers import Spec, dense_dw, make_state_dict
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    sd = make_state_dict([Spec(name, 32, 32, 4, alpha=2.0)], seed=3, dtype=torch.bfloat16)
    sd[name + ".dora_scale"] = torch.rand(1, 32, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    src = write_lora(tmp_path / "dora.safetensors", sd)
    dst = tmp_path / "out.safetensors"
    lora_resize.convert(src, dst, "kohya")
    out = load_st(dst)[0]
    assert out[name + ".dora_scale"].dtype == torch.bfloat16 and torch.equal(out[name + ".dora_scale"],
                                                                             sd[name + ".dora_scale"])
    assert rel_err(dense_dw(out, name), dense_dw(sd, name)) < 2 ** -7
