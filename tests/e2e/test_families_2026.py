"""The 2026 families (Krea 2, Kandinsky 5, Anima, HunyuanImage 2.1, HiDream-O1) beyond what the parametrised
family tests (test_model_families.py, test_convert.py, tests/oracles/test_model_families_diffusers.py) cover:
which family a file reads as, from each layout its trainers write and without metadata, with no existing family's
files taken; the names only ComfyUI's models have (HunyuanImage 2.1's are Flux.1's, HiDream-O1's lack musubi-tuner's
`model.`); the fused rows written out by hand (HunyuanImage 2.1), judged by dense float64 updates; a fused weight
both layouts fuse alike renamed with its bytes and rank; the module lists at their real sizes, and HiDream-O1's
decoder against transformers' own Qwen3-VL model."""
from __future__ import annotations

import pytest
import torch

import lora_resize
from lora_resize.models import hinted
from lora_resize.testing import archs, loras

from helpers import load_st, rel_err, write_lora

EXACT = 1e-6
KOHYA_LIKE = {"musubi", "musubi__", "comfy"}
NEW = ("krea2", "kandinsky5", "anima", "hunyuan_image", "hidream_o1")
# the architecture each module list's files belong to (the lists that are variants of one family)
ARCH_OF = {"chroma": "flux1", "wan_i2v": "wan", "sd35": "sd3"}


def family_lora(family: str, layout: str, rank: int = 4, seed: int = 0, dtype=torch.float32):
    fn, tiny, _ = archs.NATIVE[family]
    shapes = fn(**tiny)
    sd = loras.lora_state_dict(shapes, layout, rank=rank, alpha=2.0 if layout in KOHYA_LIKE else None, seed=seed,
                               dtype=dtype)
    return shapes, sd


def dw(sd: dict, name: str, style: str) -> torch.Tensor:
    """A module's scaled update (alpha / rank; no alpha: 1), dense float64."""
    dk, uk, ak = loras.lora_keys(name, style)
    down, up = sd[dk].double(), sd[uk].double()
    r = down.shape[0]
    return up.reshape(up.shape[0], -1) @ down.reshape(r, -1) * (float(sd[ak]) / r if ak in sd else 1.0)


DETECT = [(f, layout) for f, (_, _, layouts) in archs.NATIVE.items() for layout in layouts]


@pytest.mark.parametrize("family, layout", DETECT)
def test_every_family_is_read_as_itself_from_its_trainers_layouts(tmp_path, family, layout):
    """A file of any family, in any layout its trainers write, without metadata, reads as its own architecture
    (the converted file names it): the new families are found, and none of them takes an existing family's files."""
    _, sd = family_lora(family, layout)
    src = write_lora(tmp_path / "in.safetensors", sd)
    res = lora_resize.convert(src, tmp_path / "k.safetensors", "kohya", precision="float")
    assert load_st(res.dst)[1]["lora_resize_arch"] == ARCH_OF.get(family, family)


@pytest.mark.parametrize("value, arch", [("hunyuan-image-2.1/lora", "hunyuan_image"), ("anima-preview/lora", "anima"),
                                         ("anima-unknown", "anima"), ("krea-2/lora", "krea2"),
                                         ("kandinsky-5-lite", "kandinsky5"), ("hidream-o1-image", "hidream_o1"),
                                         ("hidream-i1-full", "hidream"), ("animagine-xl-4", None),
                                         ("stable-diffusion-xl-v1-base/lora", "sd")])
def test_metadata_names_the_new_families(value, arch):
    """sd-scripts' modelspec architectures (library/sai_model_spec.py: hunyuan-image-2.1, anima-preview) and the
    other families' names; an SDXL finetune whose name contains "anima" is not Anima."""
    assert hinted({"modelspec.architecture": value}) == arch


def _comfy_hunyuan_image(sd: dict) -> dict:
    """An sd-scripts HunyuanImage 2.1 file renamed as sd-scripts' networks/convert_hunyuan_image_lora_to_comfy.py
    does (img_mlp_fc1 -> img_mlp_0, img_mod_linear -> img_mod_lin, modulation_linear -> modulation_lin)."""
    pairs = (("img_mlp_fc1", "img_mlp_0"), ("img_mlp_fc2", "img_mlp_2"), ("img_mod_linear", "img_mod_lin"),
             ("txt_mlp_fc1", "txt_mlp_0"), ("txt_mlp_fc2", "txt_mlp_2"), ("txt_mod_linear", "txt_mod_lin"),
             ("modulation_linear", "modulation_lin"))
    out = {}
    for k, v in sd.items():
        for a, b in pairs:
            k = k.replace(a, b)
        out[k] = v
    return out


def test_comfyui_named_hunyuan_image_files_are_hunyuan_image_by_their_metadata(tmp_path):
    """ComfyUI's HunyuanImage 2.1 names are Flux.1's: with sd-scripts' metadata the file is HunyuanImage 2.1 and
    converts to sd-scripts' names, every factor as stored; without it the file reads as Flux.1, whose diffusers
    names are the same - the diffusers file is the same either way."""
    shapes, sd = family_lora("hunyuan_image", "musubi", dtype=torch.bfloat16)
    comfy = _comfy_hunyuan_image(sd)
    meta = {"modelspec.architecture": "hunyuan-image-2.1/lora"}
    tagged = write_lora(tmp_path / "tagged.safetensors", comfy, meta)
    out, omet = load_st(lora_resize.convert(tagged, tmp_path / "k.safetensors", "kohya").dst)
    assert omet["lora_resize_arch"] == "hunyuan_image"
    assert set(out) == set(sd)
    differ = [k for k in sd if not torch.equal(out[k], sd[k])]
    assert not differ, differ[:3]  # renamed: the same bytes (qkv and linear1 included)
    bare = write_lora(tmp_path / "bare.safetensors", comfy)
    d_tagged, _ = load_st(lora_resize.convert(tagged, tmp_path / "dt.safetensors", "diffusers").dst)
    d_bare, dmeta = load_st(lora_resize.convert(bare, tmp_path / "db.safetensors", "diffusers").dst)
    assert dmeta["lora_resize_arch"] == "flux1"
    assert set(d_tagged) == set(d_bare) and all(torch.equal(d_tagged[k], d_bare[k]) for k in d_tagged)


def test_hunyuan_image_fused_rows_land_where_the_model_puts_them(tmp_path):
    """HunyuanImage 2.1 at width d = 16, written out by hand (diffusers' HunyuanImageTransformer2DModel):
    img_attn_qkv -> attn.to_q, to_k, to_v (d rows each), txt_attn_qkv -> add_q/k/v_proj, single-block linear1 ->
    attn.to_q, to_k, to_v (d each) and proj_mlp (4d), mlp.fc1 -> ff.net.0.proj, mod.linear -> norm1.linear; each
    part keeps the fused module's rank (its rows of up, the shared down)."""
    d = 16
    shapes, sd = family_lora("hunyuan_image", "musubi")
    src = write_lora(tmp_path / "in.safetensors", sd)
    out, _ = load_st(lora_resize.convert(src, tmp_path / "d.safetensors", "diffusers", precision="float").dst)

    def got(path):
        a, b = out[f"transformer.{path}.lora_A.weight"].double(), out[f"transformer.{path}.lora_B.weight"].double()
        assert a.shape[0] == 4, path
        return b @ a
    for stream, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
        qkv = dw(sd, f"double_blocks.0.{stream}_attn_qkv", "musubi")
        for i, p in enumerate(names):
            assert rel_err(got(f"transformer_blocks.0.attn.{p}"), qkv[i * d:(i + 1) * d]) < EXACT, p
    linear1 = dw(sd, "single_blocks.0.linear1", "musubi")
    for path, rows in (("attn.to_q", (0, d)), ("attn.to_k", (d, 2 * d)), ("attn.to_v", (2 * d, 3 * d)),
                       ("proj_mlp", (3 * d, 7 * d))):
        assert rel_err(got(f"single_transformer_blocks.0.{path}"), linear1[rows[0]:rows[1]]) < EXACT, path
    for native, path in (("double_blocks.0.img_mlp.fc1", "transformer_blocks.0.ff.net.0.proj"),
                         ("double_blocks.0.txt_mod.linear", "transformer_blocks.0.norm1_context.linear"),
                         ("single_blocks.0.linear2", "single_transformer_blocks.0.proj_out"),
                         ("single_blocks.0.modulation.linear", "single_transformer_blocks.0.norm.linear")):
        assert rel_err(got(path), dw(sd, native, "musubi")) < EXACT, path


def test_a_fused_weight_both_layouts_fuse_alike_is_renamed_with_its_bytes_and_rank(tmp_path):
    """sd-scripts' `img_attn_qkv` and ComfyUI's `img_attn.qkv` (HunyuanImage 2.1) are one weight: converting to
    ComfyUI's layout renames it - rank 4 and the factors' bytes kept - where it was split into q, k, v and fused
    again block-diagonally at three times the rank. A real fusion (HunyuanVideo 1.5's split q/k/v into ComfyUI's
    qkv) still stacks the parts."""
    shapes, sd = family_lora("hunyuan_image", "musubi", dtype=torch.bfloat16)
    src = write_lora(tmp_path / "in.safetensors", sd)
    res = lora_resize.convert(src, tmp_path / "c.safetensors", "comfy")
    out, _ = load_st(res.dst)
    assert all(r.new_rank == r.old_rank == 4 for r in res.layers), [(r.name, r.old_rank, r.new_rank)
                                                                    for r in res.layers]
    for s in ("img", "txt"):
        base = f"lora_unet_double_blocks_0_{s}_attn_qkv"
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            assert torch.equal(out[base + suffix], sd[base + suffix]), base + suffix
    _, hv = family_lora("hunyuan_video15", "musubi")
    fused = lora_resize.convert(write_lora(tmp_path / "hv.safetensors", hv), tmp_path / "hvc.safetensors", "comfy",
                                precision="float")
    qkv = next(r for r in fused.layers if r.name.endswith("img_attn_qkv"))
    assert qkv.old_rank == 12  # three rank-4 parts, each with its own down


def test_comfyui_named_hidream_o1_files_convert_to_musubi_names(tmp_path):
    """HiDream-O1 as ComfyUI's model names it (no `model.`: `diffusion_model.language_model.layers.0...`) reads as
    HiDream-O1 without metadata and converts to musubi-tuner's names (`lora_unet_model_language_model_...`) with
    every factor as stored; musubi's file converts to ComfyUI's names and back to the same bytes."""
    fn, tiny, _ = archs.NATIVE["hidream_o1"]
    theirs = fn(**tiny, prefix="")
    sd = loras.lora_state_dict(theirs, "comfy", rank=4, alpha=2.0, dtype=torch.bfloat16, seed=2)
    src = write_lora(tmp_path / "comfy.safetensors", sd)
    out, meta = load_st(lora_resize.convert(src, tmp_path / "k.safetensors", "kohya").dst)
    assert meta["lora_resize_arch"] == "hidream_o1"
    for m in theirs:
        for k0, k1 in zip(loras.lora_keys(m.name, "comfy"), loras.lora_keys("model." + m.name, "musubi")):
            assert torch.equal(out[k1], sd[k0]), k1
    _, musubi = family_lora("hidream_o1", "musubi", dtype=torch.bfloat16)
    c, _ = load_st(lora_resize.convert(write_lora(tmp_path / "m.safetensors", musubi), tmp_path / "c.safetensors",
                                       "comfy").dst)
    assert {k.rsplit(".", 2)[0] for k in c if k.endswith("lora_down.weight")} == {
        "lora_unet_" + m.name.replace(".", "_") for m in theirs}
    back, _ = load_st(lora_resize.convert(tmp_path / "c.safetensors", tmp_path / "b.safetensors", "kohya").dst)
    assert set(back) == set(musubi) and all(torch.equal(back[k], musubi[k]) for k in musubi)


def test_hidream_o1_decoder_is_transformers_qwen3_vl(tmp_path):
    """HiDream-O1's decoder is Qwen3-VL's: the tiny module list's decoder names and shapes are exactly the Linear
    modules of transformers' Qwen3VLForConditionalGeneration at the same sizes (grouped-query k/v included), and a
    musubi file converted to diffusers names those modules (`transformer.model.language_model...`)."""
    import transformers
    cfg = transformers.Qwen3VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8, vocab_size=32,
                         rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=16,
                           deepstack_visual_indexes=[]))
    model = transformers.Qwen3VLForConditionalGeneration(cfg)
    theirs = {n: tuple(m.weight.shape) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and ".language_model.layers." in n}
    shapes, sd = family_lora("hidream_o1", "musubi")
    ours = {m.name: (m.out, m.inp) for m in shapes if ".language_model.layers." in m.name}
    assert ours == theirs
    out, _ = load_st(lora_resize.convert(write_lora(tmp_path / "in.safetensors", sd), tmp_path / "d.safetensors",
                                         "diffusers", precision="float").dst)
    names = {k.removeprefix("transformer.").rsplit(".", 2)[0] for k in out if k.endswith("lora_A.weight")}
    assert set(theirs) <= names
    for n in theirs:
        a, b = out[f"transformer.{n}.lora_A.weight"].double(), out[f"transformer.{n}.lora_B.weight"].double()
        assert rel_err(b @ a, dw(sd, n, "musubi")) < EXACT, n


@pytest.mark.parametrize("family", NEW)
def test_real_sizes_of_the_new_module_lists(family):
    """The lists at their default (real) sizes: Krea 2's 264 Linears (musubi-tuner docs/krea2.md: every Linear of
    the DiT), its grouped-query k/v (48 heads, 12 kv heads of 128); Kandinsky 5 Video Lite's config (musubi-tuner's
    Kandinsky 5 pipelines: width 1792, ff 7168, 2 + 32 blocks); Anima (Cosmos-Predict2 2B);
    HunyuanImage 2.1 (sd-scripts' split dims 3 x 3584 + 14336); HiDream-O1's Qwen3-VL-8B decoder."""
    fn = archs.NATIVE[family][0]
    mods = {m.name: (m.out, m.inp) for m in fn()}
    expected = {
        "krea2": {"blocks.27.attn.wk": (1536, 6144), "blocks.0.mlp.down": (6144, 16384), "tproj.1": (36864, 6144),
                  "txtfusion.refiner_blocks.1.attn.wq": (2560, 2560), "txtfusion.projector": (1, 12),
                  "txtmlp.1": (6144, 2560), "first": (6144, 64)},
        "kandinsky5": {"visual_transformer_blocks.31.visual_modulation.out_layer": (16128, 512),
                       "text_transformer_blocks.1.feed_forward.in_layer": (7168, 1792),
                       "text_embeddings.in_layer": (1792, 3584), "visual_embeddings.in_layer": (1792, 132),
                       "out_layer.out_layer": (64, 1792)},
        "anima": {"blocks.27.cross_attn.k_proj": (2048, 1024), "blocks.0.mlp.layer1": (8192, 2048),
                  "blocks.0.adaln_modulation_mlp.2": (6144, 256), "x_embedder.proj.1": (2048, 68)},
        "hunyuan_image": {"double_blocks.19.img_attn_qkv": (10752, 3584), "single_blocks.39.linear1": (25088, 3584),
                          "single_blocks.0.linear2": (3584, 17920)},
        "hidream_o1": {"model.language_model.layers.35.self_attn.k_proj": (1024, 4096),
                       "model.language_model.layers.0.mlp.down_proj": (4096, 12288),
                       "model.x_embedder.proj1": (1024, 3072), "model.final_layer2.linear": (3072, 4096)},
    }[family]
    for name, shape in expected.items():
        assert mods[name] == shape, (family, name)
    if family == "krea2":
        assert len(mods) == 264


@pytest.mark.parametrize("family", NEW)
def test_new_families_merge_across_their_layouts(tmp_path, family):
    """Two LoRAs of a new family, one in its trainers' layout and one converted to diffusers' names, merge in the
    first one's layout: every module is the exact weighted sum of the two updates (dense float64)."""
    layout = archs.NATIVE[family][2][0]
    shapes, a = family_lora(family, layout, seed=1)
    _, b = family_lora(family, layout, seed=2)
    fa = write_lora(tmp_path / "a.safetensors", a)
    fb = lora_resize.convert(write_lora(tmp_path / "b0.safetensors", b), tmp_path / "b.safetensors", "diffusers",
                             precision="float").dst
    res = lora_resize.merge([fa, f"{fb}:0.5"], tmp_path / "m.safetensors", rank=16, precision="float")
    out, meta = load_st(res.dst)
    assert {k for k in out if not k.endswith(".alpha")} == {k for k in a if not k.endswith(".alpha")}
    for m in shapes:
        assert rel_err(dw(out, m.name, layout), dw(a, m.name, layout) + 0.5 * dw(b, m.name, layout)) < EXACT, m.name


def _arch(tmp_path, shapes, layout: str, meta: dict | None = None) -> str:
    """The architecture a file of `shapes` in `layout` reads as (converted to diffusers), or the refusal."""
    sd = loras.lora_state_dict(shapes, layout, rank=2, alpha=1.0)
    src = write_lora(tmp_path / "p.safetensors", sd, meta)
    try:
        return load_st(lora_resize.convert(src, tmp_path / "p_d.safetensors", "diffusers").dst)[1]["lora_resize_arch"]
    except lora_resize.LoraStructureError as e:
        return "refused: " + str(e)


def test_partial_files_of_shared_names_keep_their_old_reading(tmp_path):
    """Files of only some blocks, whose names several families share (Flux.1's and HunyuanVideo 1.5's double
    blocks, HunyuanImage 2.1's sd-scripts names), read as they did before HunyuanImage 2.1 was tabled: its
    signature is the one name only it has (the single blocks' `modulation.linear`), so it takes no Flux.1 or
    HunyuanVideo 1.5 file; its own double-block-only files need their metadata (sd-scripts writes it)."""
    f1 = archs.flux1(width=16, double=1, single=1, in_channels=4, context=12)
    double = [m for m in f1 if m.name.startswith("double_blocks")]
    assert _arch(tmp_path, [m for m in f1 if m.name.startswith("single_blocks")], "musubi") == "flux1"
    for part in (double, [m for m in double if "attn" in m.name]):  # ambiguous before, and still refused
        got = _arch(tmp_path, part, "musubi")
        assert got.startswith("refused") and "flux1" in got and "hunyuan_video15" in got, got
    hv = archs.hunyuan_video15(width=16, blocks=1)
    assert _arch(tmp_path, [m for m in hv if "mlp" in m.name or "mod" in m.name], "musubi") == "hunyuan_video15"
    hi = archs.hunyuan_image(width=16, double=1, single=1)
    assert _arch(tmp_path, [m for m in hi if m.name.startswith("single_blocks")], "musubi") == "hunyuan_image"
    meta = {"modelspec.architecture": "hunyuan-image-2.1/lora"}
    assert _arch(tmp_path, [m for m in hi if m.name.startswith("double_blocks")], "musubi", meta) == "hunyuan_image"
