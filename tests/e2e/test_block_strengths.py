"""Block strengths baked into the factors, end to end: scale rules (`--rule 'PATTERN=scale:X'`) and --block-weights
presets in the LoRA Block Weight notation. Judged by a dense float64 reference (X * up @ down * alpha / rank per
module, then its best rank-k), the exact size a budget plans (analyze's prediction == the file written), and, for
the presets, an independent table of which block each module of an SD1.5-, SDXL- and Flux-shaped file is in
(written here from the LBW block numbering: the original UNet's input_blocks / middle_block / output_blocks, Flux's
double_blocks / single_blocks), in kohya, ComfyUI, musubi and diffusers layouts."""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch

import lora_resize
from helpers import (BLOCKY, best_rank_k, dense_dw, layer_names, load_st, make_state_dict, refused_in_one_line,
                     rel_err, write_lora)
from lora_resize.cli import main
from lora_resize.testing import archs, loras

SCALES = ["lora_te_*=scale:0.5", "*attn2*=scale:-1", "*mid_block_resnets*=scale:0", "lora_unet_up_blocks_*=scale:2"]


def expected_strength(name: str) -> float:
    """The first matching scale rule of SCALES, as a user reads them."""
    for pattern, s in (("lora_te_", 0.5), ("attn2", -1.0), ("mid_block_resnets", 0.0), ("lora_unet_up_blocks_", 2.0)):
        if pattern in name:
            return s
    return 1.0


@pytest.fixture(scope="module")
def blocky(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blocky")
    sd = make_state_dict(BLOCKY, seed=5)
    return write_lora(folder / "blocky.safetensors", sd), sd


@pytest.mark.parametrize("k", [3, 64])
def test_scale_rules_give_the_best_rank_k_of_the_scaled_update(tmp_path, blocky, k):
    """Every module: the written update is the best rank-k approximation of X * dW (dense float64 SVD), with X of
    0.5, -1, 0 (dropped) and 2; at a rank that keeps every layer whole (64) that is X * dW itself, so a strength
    other than 1 is never the bit-for-bit copy of the input's factors; rank rules still apply beside them."""
    src, sd = blocky
    dst = tmp_path / "out.safetensors"
    res = lora_resize.resize(src, dst, rank=k, block_rules=(*SCALES, "*attn1*=cap:2"))
    out, meta = load_st(dst)
    written = set(layer_names(out))
    for name in layer_names(sd):
        s = expected_strength(name)
        if s == 0:
            assert name not in written
            continue
        want = best_rank_k(s * dense_dw(sd, name), 2 if "attn1" in name else k)
        assert rel_err(dense_dw(out, name), want) < 2e-6, name
    assert {r.name: r.scale for r in res.layers} == pytest.approx(
        {n: expected_strength(n) * float(sd[n + ".alpha"]) / sd[n + ".lora_down.weight"].shape[0]
         if n + ".alpha" in sd else expected_strength(n) for n in written})
    assert json.loads(meta["lora_resize"])["block_rules"] == [*SCALES, "*attn1*=cap:2"]
    assert "*attn2*=scale:-1" in meta["ss_training_comment"]
    text = lora_resize.summary(res)
    assert "rules: lora_te_*=scale:0.5: 2 modules; *attn2*=scale:-1: 2 modules" in text
    counts = Counter(expected_strength(n) for n in layer_names(sd))
    assert counts == {1.0: 3, -1.0: 2, 0.5: 2, 2.0: 2, 0.0: 1}  # every strength is tried
    assert "strengths baked into the factors: x-1: 2 modules; x0.5: 2 modules; x2: 2 modules; x0: 1 module dropped" in text


def test_a_negative_strength_goes_into_the_factors_not_the_alpha(tmp_path, family):
    """Every layer scaled by -1: the written alphas stay positive (the sign is in the factors; diffusers' kohya Flux
    converter loops forever on a negative alpha), and each update is -dW."""
    dst = tmp_path / "neg.safetensors"
    lora_resize.resize(family["flux"], dst, rank=64, block_rules=["*=scale:-1"])
    sd, _ = load_st(family["flux"])
    out, meta = load_st(dst)
    assert {float(v) for k, v in out.items() if k.endswith(".alpha")} == {32.0}  # 2 / 4 x --rank 64, positive
    assert meta["ss_network_alpha"] == "32.0"
    for name in layer_names(sd)[::7]:
        assert rel_err(dense_dw(out, name), -dense_dw(sd, name)) < 2e-6, name


def test_what_a_loader_adds_beside_a_module_takes_its_strength(tmp_path, blocky):
    """A module's bias and full diffs (`.diff_b`, `.diff`: ComfyUI's load_lora adds them with the strength) are
    multiplied by its strength, left out at 0; a tensor a loader sets is copied as it is; a DoRA magnitude of a
    scaled module is refused in one line (it renormalises the whole scaled update). Sizes stay exact."""
    _, sd = blocky
    sd = dict(sd)
    names = layer_names(sd)
    for name in names:
        sd[name + ".diff_b"] = torch.linspace(-1, 1, sd[name + ".lora_up.weight"].shape[0]).bfloat16()
    sd["lora_unet_up_blocks_2_attentions_0_transformer_blocks_0_ff_net_2.set_weight"] = torch.ones(3)
    src = write_lora(tmp_path / "diffs.safetensors", sd)
    dst = tmp_path / "o.safetensors"
    a = lora_resize.analyze(src, method="fixed", rank=4, block_rules=SCALES)
    res = lora_resize.resize(src, dst, rank=4, block_rules=SCALES)
    out, _ = load_st(dst)
    assert a.chosen.output_bytes == res.output_bytes == dst.stat().st_size
    for name in names:
        s = expected_strength(name)
        if s == 0:
            assert name + ".diff_b" not in out
        else:
            want = (sd[name + ".diff_b"].double() * s).bfloat16()
            assert out[name + ".diff_b"].dtype == torch.bfloat16 and torch.equal(out[name + ".diff_b"], want), name
    key = "lora_unet_up_blocks_2_attentions_0_transformer_blocks_0_ff_net_2.set_weight"
    assert torch.equal(out[key], sd[key])  # set whatever the strength
    dora = dict(sd)
    dora["lora_unet_up_blocks_2_attentions_0_transformer_blocks_0_ff_net_2.dora_scale"] = torch.ones(1, 128)
    src = write_lora(tmp_path / "dora.safetensors", dora)
    with pytest.raises(lora_resize.OptionsError, match="has a DoRA magnitude .* a strength of 2 cannot be baked"):
        lora_resize.resize(src, tmp_path / "never.safetensors", rank=4, block_rules=SCALES)
    assert not (tmp_path / "never.safetensors").exists()
    lora_resize.resize(src, tmp_path / "d1.safetensors", rank=4, block_rules=("*ff_net_2=scale:1", *SCALES))
    res = lora_resize.resize(src, tmp_path / "d0.safetensors", rank=4, block_rules=("*ff_net_2=scale:0", *SCALES))
    left = {k for k in load_st(res.dst)[0] if "ff_net_2" in k}
    assert left == {key}  # the module, its diff and its magnitude left out; what a loader sets is copied


def test_a_budget_plans_the_scaled_updates_to_the_byte(tmp_path, blocky):
    """--target-size ranks the layers by their scaled energy per byte: analyze's predicted size is the written
    file's; scaling one layer up gives it more of the budget than it gets at strength 1."""
    src, _ = blocky
    rules = ("*attn2*=scale:-1", "lora_unet_down_blocks_0_resnets_0_conv1=scale:30")
    a = lora_resize.analyze(src, target_size="40KB", block_rules=rules)
    res = lora_resize.resize(src, tmp_path / "o.safetensors", target_size="40KB", block_rules=rules)
    assert a.chosen.output_bytes == res.output_bytes == (tmp_path / "o.safetensors").stat().st_size <= 40_000
    plain = lora_resize.resize(src, tmp_path / "p.safetensors", target_size="40KB")
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    rank = {r.name: r.new_rank for r in res.layers}
    assert rank[conv] > {r.name: r.new_rank for r in plain.layers}[conv]


def test_analyze_json_shows_the_scaled_setting(tmp_path, blocky, capsys):
    """analyze --json: every setting's flags carry the scale rules and block weights, and each runs as resize to
    the size analyze predicted."""
    src, _ = blocky
    assert main(["analyze", str(src), "--json", "--rule", "*attn2*=scale:0.5", "--rule", "*mid*=scale:0"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert a["block_rules"] == ["*attn2*=scale:0.5", "*mid*=scale:0"] and a["block_weights"] is None
    assert a["rule_hits"] == {"*attn2*=scale:0.5": 2, "*mid*=scale:0": 2}
    assert len(a["layers"]) == len(BLOCKY) - 2
    row = a["recommended"] or a["settings"][0]
    assert "--rule '*attn2*=scale:0.5' --rule '*mid*=scale:0'" in row["args"]
    dst = tmp_path / "r.safetensors"
    lora_resize.resize(src, dst, lora_resize.options_from_flags(row["args"]))
    assert dst.stat().st_size == row["output_bytes"]


def test_merge_scales_the_weighted_sum(tmp_path, blocky):
    src, sd = blocky
    other = make_state_dict(BLOCKY, seed=9)
    b = write_lora(tmp_path / "b.safetensors", other)
    dst = tmp_path / "m.safetensors"
    lora_resize.merge([f"{src}:0.7", f"{b}:-0.4"], dst, rank=64, block_rules=["*attn2*=scale:-2"])
    out, _ = load_st(dst)
    for name in layer_names(sd):
        s = -2.0 if "attn2" in name else 1.0
        want = s * (0.7 * dense_dw(sd, name) - 0.4 * dense_dw(other, name))
        assert rel_err(dense_dw(out, name), want) < 2e-6, name


# ----------------------------------------------------------------------------------------------------------------
# Presets: which block each module is in, by an independent table


SD15_TABLE = [  # the original UNet numbers its input blocks 1..11 (three per down block: two layers, then the
    # downsampler) and its output blocks 0..11 (three per up block: three layers, the upsampler in the third)
    (r"lora_te_", lambda b, j: "BASE"),
    (r"lora_unet_down_blocks_(\d)_(?:attentions|resnets)_(\d)_", lambda b, j: f"IN{3 * b + j + 1:02d}"),
    (r"lora_unet_down_blocks_(\d)_downsamplers_0_conv", lambda b, j: f"IN{3 * b + 3:02d}"),
    (r"lora_unet_mid_block_", lambda b, j: "MID"),
    (r"lora_unet_up_blocks_(\d)_(?:attentions|resnets)_(\d)_", lambda b, j: f"OUT{3 * b + j:02d}"),
    (r"lora_unet_up_blocks_(\d)_upsamplers_0_conv", lambda b, j: f"OUT{3 * b + 2:02d}"),
]


def sd15_block(name: str) -> str | None:
    """LBW's block of an SD1.5 kohya module named by the diffusers UNet (SD15_TABLE)."""
    for pattern, block in SD15_TABLE:
        m = re.match(pattern, name)
        if m:
            return block(*(int(g) for g in m.groups()), *(None,) * (2 - len(m.groups())))
    return None


def sgm_block(name: str) -> str | None:
    """LBW's block of an SDXL kohya module named by the original UNet (`lora_unet_input_blocks_4_1_...`)."""
    if re.match(r"lora_te[12]_", name):
        return "BASE"
    m = re.match(r"lora_unet_(input|output)_blocks_(\d+)_", name)
    if m:
        return f"{'IN' if m.group(1) == 'input' else 'OUT'}{int(m.group(2)):02d}"
    return "MID" if name.startswith("lora_unet_middle_block_") else None


def flux_block(name: str) -> str | None:
    """A Flux.1 module's block under any of its names: double/single blocks natively, transformer_blocks /
    single_transformer_blocks in diffusers; the text encoders; the input embedders and the final layer."""
    flat = name.replace(".", "_")
    m = re.search(r"(?:^|_)(double_blocks|single_blocks|single_transformer_blocks|transformer_blocks)_(\d+)_", flat)
    if m:
        return f"{'S' if m.group(1).startswith('single') else 'D'}{int(m.group(2)):02d}"
    if flat.startswith("lora_te1_") or flat.startswith("text_encoder_"):
        return "CLIP"
    if flat.startswith("lora_te3_"):
        return "T5"
    if re.search(r"(img_in|txt_in|x_embedder|context_embedder|time_in|vector_in|guidance_in|time_text_embed)", flat):
        return "IN"
    return "OUT" if re.search(r"final_layer|proj_out|norm_out", flat) else None


SD26 = ["BASE", *(f"IN{i:02d}" for i in range(12)), "MID", *(f"OUT{i:02d}" for i in range(12))]
SD17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(3, 12))]
XL12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(6))]
FLUX61 = ["CLIP", "T5", "IN", *(f"D{i:02d}" for i in range(19)), *(f"S{i:02d}" for i in range(38)), "OUT"]
FLUX58 = ["BASE", *FLUX61[3:-1]]


def distinct(blocks: list[str]) -> list[float]:
    """A different strength per block (negative ones, and one block off), so a module in the wrong block shows."""
    values = [round(0.25 + 0.125 * i, 3) * (-1 if i % 3 == 2 else 1) for i in range(len(blocks))]
    values[1] = 0.0
    return values


def strengths_of(src, weights: str, **fields) -> tuple[dict[str, float], set[str]]:
    """Each module's strength as the resize applies it (its scale over its scale without the weights), and the
    modules written: at a rank that keeps every layer whole."""
    base = lora_resize.resized(src, rank=64, **fields).result
    res = lora_resize.resized(src, rank=64, block_weights=weights, **fields)
    plain = {r.name: r.scale for r in base.layers}
    return {r.name: r.scale / plain[r.name] for r in res.result.layers}, {r.name for r in res.result.layers}


def check_preset(src, preset: str, blocks: list[str], block_of, zero_fill: bool, rest: str | None = None, **fields):
    values = distinct(blocks)
    got, written = strengths_of(src, f"{preset}:{','.join(map(str, values))}", **fields)
    table = dict(zip(blocks, values))
    names = [r.name for r in lora_resize.resized(src, rank=64, **fields).result.layers]
    seen = set()
    for name in names:
        block = block_of(name)
        want = table.get(block, table[rest] if rest else (0.0 if zero_fill and block in SD26 else 1.0))
        seen.add(block)
        if want == 0:
            assert name not in written, name
        else:
            assert got[name] == pytest.approx(want, rel=1e-12), (name, block)
    return seen


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    folder = tmp_path_factory.mktemp("families")

    def make(name: str, shapes, layout: str = "kohya", alpha: float | None = 2.0):
        return write_lora(folder / f"{name}.safetensors",
                          loras.lora_state_dict(shapes, layout, rank=4, alpha=alpha, seed=len(name)))
    return {
        "sd15": make("sd15", archs.sd15(**archs.TINY["sd15"])),
        "sdxl": make("sdxl", archs.sdxl(**archs.TINY["sdxl"])),
        "flux": make("flux", archs.flux_dev(**archs.TINY["flux_dev"])),
        "flux_musubi": make("flux_musubi", archs.flux1(**archs.NATIVE["flux1"][1]), "musubi"),
        "flux_comfy": make("flux_comfy", archs.flux1(**archs.NATIVE["flux1"][1]), "comfy"),
    }


def test_sd15_preset_every_block_and_the_text_encoder(family):
    """SD15, 26 values: every UNet module its own block's strength, BASE the text encoder's; 17 values: the blocks
    it does not list (the conv-only ones a LoCon trains) at 0, as LBW's to26 fills them."""
    seen = check_preset(family["sd15"], "SD15", SD26, sd15_block, True)
    assert {"BASE", "IN03", "MID", "OUT00", "OUT11"} <= seen
    check_preset(family["sd15"], "SD15", SD17, sd15_block, True)
    notes = lora_resize.resized(family["sd15"], rank=4, block_weights="SD15:ALL").result.notes
    assert ("--block-weights SD15 with 17 values does not list block(s) IN03, IN06, IN09, IN10, IN11, OUT00, OUT01, "
            "OUT02: their 22 module(s) are left out, as the LoRA Block Weight extension applies them at 0; give 26 "
            "values to set them") in notes


def test_sd15_preset_is_exact_against_the_dense_reference(tmp_path, family):
    src = family["sd15"]
    values = distinct(SD17)
    dst = tmp_path / "o.safetensors"
    lora_resize.resize(src, dst, rank=2, block_weights="SD15:" + ",".join(map(str, values)))
    sd, _ = load_st(src)
    out, meta = load_st(dst)
    table = dict(zip(SD17, values))
    for name in layer_names(sd):
        s = table.get(sd15_block(name), 0.0)
        if s == 0:
            assert name not in layer_names(out)
        else:
            assert rel_err(dense_dw(out, name), best_rank_k(s * dense_dw(sd, name), 2)) < 2e-6, name
    recorded = json.loads(meta["lora_resize"])["block_weights"]  # normalised: as short as reads back exactly
    assert recorded.startswith("SD15:0.25,0,-0.5,") and [float(v) for v in recorded[5:].split(",")] == values


def test_sdxl_preset_on_the_original_unets_names(family):
    seen = check_preset(family["sdxl"], "SDXL", XL12, sgm_block, True)
    assert {"BASE", "IN01", "IN07", "MID", "OUT00", "OUT08"} <= seen
    check_preset(family["sdxl"], "SDXL", ["BASE", *(f"IN{i:02d}" for i in range(9)), "MID",
                                          *(f"OUT{i:02d}" for i in range(9))], sgm_block, True)


@pytest.mark.parametrize("which", ["flux", "flux_musubi", "flux_comfy"])
def test_flux_presets_double_and_single_blocks(family, which):
    """FLUX, 58 values (Inspire Pack): D/S blocks their own, everything else (text encoders, embedders) BASE;
    61 values (LBW): CLIP, T5, IN and OUT their own."""
    seen = check_preset(family[which], "FLUX", FLUX61, flux_block, False)
    assert {"D00", "S00"} <= seen and ({"CLIP", "T5"} <= seen if which == "flux" else "IN" in seen)
    check_preset(family[which], "FLUX", FLUX58, flux_block, False, rest="BASE")


def test_flux_preset_in_the_diffusers_layout(tmp_path, family):
    """A diffusers-named Flux LoRA (transformer_blocks.N: fused qkv split into to_q/to_k/to_v): each part gets its
    native block's strength."""
    dst = tmp_path / "flux_diffusers.safetensors"
    lora_resize.convert(family["flux_musubi"], dst, "diffusers")
    assert any(".single_transformer_blocks.0." in k for k in load_st(dst)[0])
    seen = check_preset(dst, "FLUX", FLUX61, flux_block, False)
    assert {"D00", "S00", "IN"} <= seen


def test_a_preset_bakes_while_converting(tmp_path, family):
    """convert honours the block weights too: every layer keeps its rank, its update scaled (a strength is never
    the bit-for-bit copy), the blocks at 0 left out."""
    dst = tmp_path / "c.safetensors"
    values = distinct(SD26)
    lora_resize.convert(family["sd15"], dst, "kohya", block_weights="SD15:" + ",".join(map(str, values)))
    sd, _ = load_st(family["sd15"])
    out, _ = load_st(dst)
    table = dict(zip(SD26, values))
    for name in layer_names(sd):
        s = table[sd15_block(name)]
        if s == 0:
            assert name not in layer_names(out)
        else:
            assert out[name + ".lora_down.weight"].shape == sd[name + ".lora_down.weight"].shape
            assert rel_err(dense_dw(out, name), s * dense_dw(sd, name)) < 2e-6, name


@pytest.mark.parametrize("file, weights, fix", [
    ("sdxl", "SD15:OUTALL", "--block-weights SD15 is for Stable Diffusion 1.x/2.x LoRAs, but this LoRA is SDXL's: "
                            "give SDXL:... (12 or 20 values)"),
    ("sd15", "FLUX:ALL", "is Stable Diffusion 1.x/2.x's: give SD15:... (17 or 26 values)"),
    ("flux", "SDXL:ALL", "this LoRA is Flux.1"),
    ("sd15", "SD15:1,1", "--block-weights SD15 takes 17 or 26 values"),
])
def test_a_preset_for_another_model_is_refused_in_one_line(tmp_path, capsys, family, file, weights, fix):
    dst = tmp_path / "never.safetensors"
    line = refused_in_one_line(capsys, ["resize", str(family[file]), "-o", str(dst), "--rank", "4",
                                        "--block-weights", weights])
    assert fix in line and not dst.exists()


def test_a_model_without_a_preset_is_refused(tmp_path, capsys):
    fn, tiny, _ = archs.NATIVE["wan"]
    src = write_lora(tmp_path / "wan.safetensors", loras.lora_state_dict(fn(**tiny), "musubi", rank=4, alpha=2.0))
    line = refused_in_one_line(capsys, ["analyze", str(src), "--block-weights", "FLUX:ALL"])
    assert "no block preset is defined for it" in line and "scale:X" in line
