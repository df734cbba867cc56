"""diffusers as the judge of the 2025-26 model families, on tiny transformers built from configs (no weights):

- diffusers-layout files (`transformer.<diffusers path>.lora_A/B.weight`, as ai-toolkit and SimpleTuner write them;
  no alpha, mixed ranks after a dynamic resize) load with the model's own `load_lora_adapter` and every module's
  fused update is the best rank-k approximation of its input update (dense float64 SVD), for every family with a
  diffusers transformer class;
- native-layout files (kohya/musubi `lora_unet_`, ComfyUI-native `diffusion_model.<path>` with alphas, ai-toolkit's
  `diffusion_model.` A/B) go through the pipeline's own `lora_state_dict` converter into a fresh tiny model, and
  our resized file must change every weight exactly as a reference file does - the same layout, the same ranks,
  factors from a dense float64 SVD of the input's scaled update - with the truncation visible.

Only the (family, layout, modules) that diffusers' converters read are judged here (e.g. its LTX-2 and HiDream
converters take `diffusion_model.` A/B keys only, its Wan converter no conv3d patch embedding, and its Flux
converters split single-block linear1 at the real widths only); everything else is judged against dense float64
references in tests/e2e/test_model_families.py."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch

import diffusers
from peft.utils.other import get_pattern_key
from lora_resize.cli import main
from lora_resize.testing import archs, loras

from helpers import best_rank_k, decaying_spectrum, factors_with_spectrum, load_st, rel_err, write_lora

pytestmark = pytest.mark.thirdparty

TOL = 2e-5

# the tiny diffusers transformer of each family, sized as archs.NATIVE's tiny module lists
TINY = {
    "flux1": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, pooled_projection_dim=12, axes_dims_rope=(2, 2, 4))),
    "chroma": ("ChromaTransformer2DModel", dict(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, axes_dims_rope=(2, 2, 4), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1)),
    "flux2": ("Flux2Transformer2DModel", dict(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, timestep_guidance_channels=8, axes_dims_rope=(2, 2, 2, 2))),
    "qwen_image": ("QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, axes_dims_rope=(2, 2, 4))),
    "z_image": ("ZImageTransformer2DModel", dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=16, n_layers=1, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=12, axes_dims=[2, 2, 4], axes_lens=[64, 32, 32])),
    "wan": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=12,
        freq_dim=8, ffn_dim=32, num_layers=1, rope_max_seq_len=32)),
    "wan_i2v": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=8, out_channels=4, text_dim=12,
        freq_dim=8, ffn_dim=32, num_layers=1, rope_max_seq_len=32, image_dim=12, added_kv_proj_dim=16)),
    "hunyuan_video15": ("HunyuanVideo15Transformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_refiner_layers=1,
        text_embed_dim=12, text_embed_2_dim=12, image_embed_dim=12, rope_axes_dim=(2, 2, 4))),
    "ltx2": ("LTX2VideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
        audio_cross_attention_dim=8, num_layers=1, caption_channels=12)),
    "hidream": ("HiDreamImageTransformer2DModel", dict(
        patch_size=2, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        caption_channels=[12, 12], text_emb_dim=12, num_routed_experts=4, num_activated_experts=2,
        axes_dims_rope=(4, 4), llama_layers=[0])),
    "krea2": ("Krea2Transformer2DModel", dict(
        in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=40, timestep_embed_dim=8, text_hidden_dim=8, num_text_layers=3, text_num_attention_heads=2,
        text_num_key_value_heads=2, text_intermediate_size=24, num_layerwise_text_blocks=1, num_refiner_text_blocks=1,
        axes_dims_rope=(2, 2, 4))),
    "kandinsky5": ("Kandinsky5Transformer3DModel", dict(
        in_visual_dim=4, in_text_dim=12, in_text_dim2=12, time_dim=8, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=16, ff_dim=40, num_text_blocks=1, num_visual_blocks=1, axes_dims=(2, 2, 4))),
    # Anima's DiT is diffusers' Cosmos-Predict2 transformer (one 16-wide head: its rope needs head_dim // 6 > 1)
    "anima": ("CosmosTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=1, attention_head_dim=16, num_layers=1, mlp_ratio=4.0,
        text_embed_dim=12, adaln_lora_dim=8, max_size=(4, 16, 16), patch_size=(1, 2, 2), concat_padding_mask=True,
        extra_pos_embed_type=None)),
    "hunyuan_image": ("HunyuanImageTransformer2DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, text_embed_dim=12, rope_axes_dim=(4, 4))),
    "sd3": ("SD3Transformer2DModel", dict(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4)),
}

# (family, pipeline whose lora_state_dict converts, layouts it reads, which native modules)
NATIVE_JUDGED = [
    ("flux1", "FluxPipeline", ("musubi", "comfy"), lambda m: not m.name.endswith("linear1")),
    ("chroma", "ChromaPipeline", ("musubi", "comfy"), lambda m: not m.name.endswith("linear1")),
    ("flux2", "Flux2Pipeline", ("musubi", "ai_toolkit"), lambda m: not m.name.endswith("linear1")),
    ("qwen_image", "QwenImagePipeline", ("musubi", "comfy", "ai_toolkit"), lambda m: True),
    ("z_image", "ZImagePipeline", ("musubi", "comfy", "ai_toolkit"), lambda m: True),
    ("wan", "WanPipeline", ("musubi", "comfy"), lambda m: m.name.startswith("blocks.")),
    ("wan", "WanPipeline", ("ai_toolkit",), lambda m: not m.conv),
    ("wan_i2v", "WanImageToVideoPipeline", ("comfy",), lambda m: m.name.startswith("blocks.")),
    ("wan_i2v", "WanImageToVideoPipeline", ("ai_toolkit",), lambda m: not m.conv),
    ("ltx2", "LTX2Pipeline", ("ai_toolkit",), lambda m: True),
    ("hidream", "HiDreamImagePipeline", ("ai_toolkit",), lambda m: True),
    # Krea 2's converter reads `diffusion_model.` and `base_model.model.` A/B keys; its text fusion's projector
    # (text_layers -> 1) has rank 1, which no truncation changes
    ("krea2", "Krea2Pipeline", ("ai_toolkit", "peft"), lambda m: m.name != "txtfusion.projector"),
    ("anima", "AnimaModularPipeline", ("ai_toolkit",), lambda m: True),
]
ALPHA_LAYOUTS = ("musubi", "comfy")


def tiny(family: str):
    cls, cfg = TINY[family]
    torch.manual_seed(0)
    return getattr(diffusers, cls)(**cfg)


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())


def fused(model, state, prefix="transformer") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Load `state` (a path or a state dict) into `model`, fuse it; the weight changes, by parameter name."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    w = Warnings()
    for name in ("diffusers", "peft"):
        logging.getLogger(name).addHandler(w)
    try:
        if isinstance(state, dict):
            model.load_lora_adapter(state, prefix=prefix)
        else:
            model.load_lora_adapter(str(state), prefix=prefix, use_safetensors=True)
        model.fuse_lora()
    finally:
        for name in ("diffusers", "peft"):
            logging.getLogger(name).removeHandler(w)
    after = {n.replace("base_layer.", ""): p.detach() for n, p in model.named_parameters() if "lora_" not in n}
    return {n: after[n].double() - before[n].double() for n in before
            if n in after and not torch.equal(after[n], before[n])}, w.messages


def varied_factors(out: int, flat_in: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    r = min(6, out, flat_in)
    spectrum = decaying_spectrum(r, power=0.3 + 2.5 * torch.rand((), generator=g).item(), gap=0.97)
    up, down = factors_with_spectrum(out, flat_in, r, spectrum, g)
    return up.float(), down.float()


@pytest.mark.parametrize("family", sorted(TINY))
def test_diffusers_layout_loads_into_the_model_with_exact_updates(tmp_path, family):
    model = tiny(family)
    g = torch.Generator().manual_seed(1)
    sd, targets = {}, {}
    for n, m in model.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
            continue
        w = m.weight
        if w.ndim == 5 and all(k == 1 for k in w.shape[2:]):
            continue  # PEFT cannot merge a 1x1x1 Conv3d (its merge squeezes two dims only): a PEFT limitation
        up, down = varied_factors(w.shape[0], math.prod(w.shape[1:]), g)
        if w.ndim > 2:
            down = down.reshape(down.shape[0], *w.shape[1:])
            up = up.reshape(up.shape[0], up.shape[1], *([1] * (w.ndim - 2)))
        sd[f"transformer.{n}.lora_A.weight"], sd[f"transformer.{n}.lora_B.weight"] = down, up
        targets[n] = w.shape
    src = write_lora(tmp_path / "in.safetensors", sd)
    dst = tmp_path / "out.safetensors"
    assert main(["resize", str(src), "-o", str(dst), "-q", "--method", "sv_fro", "--param", "0.9"]) == 0
    out, meta = load_st(dst)
    ranks = {n: out[f"transformer.{n}.lora_A.weight"].shape[0] for n in targets}
    assert len(set(ranks.values())) > 1  # mixed ranks and no alpha keys
    # the output describes every module (a loader that infers one lora_alpha from one module's rank would
    # mis-scale the others): its rank, and an alpha equal to it (scale 1, as the file had)
    cfg = json.loads(meta["lora_adapter_metadata"])
    rp, ap = cfg["transformer.rank_pattern"], cfg["transformer.alpha_pattern"]
    for n, k in ranks.items():  # patterns resolved as PEFT resolves them
        assert rp.get(get_pattern_key(list(rp), n), cfg["transformer.r"]) == k, n
        assert ap.get(get_pattern_key(list(ap), n), cfg["transformer.lora_alpha"]) == k, n
    deltas, messages = fused(model, dst)
    assert messages == []
    assert set(deltas) == {f"{n}.weight" for n in targets}  # every module landed
    for n, shape in targets.items():
        A, B = sd[f"transformer.{n}.lora_A.weight"], sd[f"transformer.{n}.lora_B.weight"]
        want = best_rank_k(B.double().reshape(shape[0], -1) @ A.double().reshape(A.shape[0], -1), ranks[n])
        assert rel_err(deltas[f"{n}.weight"].reshape(shape[0], -1), want) < TOL, n


def reference(sd: dict, out: dict, shapes, layout: str) -> dict[str, torch.Tensor]:
    """The layout's own file for the same ranks as `out`, from a dense float64 SVD of each input update: up = U S,
    down = V^T, and the alpha that keeps the strength (alpha / rank = 1 with the scale in the factors)."""
    ref = {}
    for m in shapes:
        dk, uk, ak = loras.lora_keys(m.name, layout)
        k = out[dk].shape[0]
        r = sd[dk].shape[0]
        scale = float(sd[ak]) / r if ak in sd else 1.0
        dw = sd[uk].double().reshape(m.out, -1) @ sd[dk].double().reshape(r, -1) * scale
        U, S, Vh = torch.linalg.svd(dw, full_matrices=False)
        ref[uk], ref[dk] = (U[:, :k] * S[:k]).float().contiguous(), Vh[:k].float().contiguous()
        if ak in sd:
            ref[ak] = torch.tensor(float(k))
    return ref


def converted(family: str, pipeline: str, path) -> tuple[dict[str, torch.Tensor], list[str]]:
    state = getattr(diffusers, pipeline).lora_state_dict(str(path))
    return fused(tiny(family), state[0] if isinstance(state, tuple) else state)


def native_lora(family: str, layout: str, keep, seed: int) -> tuple[list, dict[str, torch.Tensor]]:
    """`family`'s modules that `keep` selects, as a LoRA in a native `layout`: (their shapes, the state dict), each
    with varied factors (seeded), alpha 3 where the layout stores one."""
    fn, kw, _ = archs.NATIVE[family]
    shapes = [m for m in fn(**kw) if keep(m)]
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m in shapes:
        up, down = varied_factors(m.out, m.flat_in, g)
        dk, uk, ak = loras.lora_keys(m.name, layout)
        sd[dk], sd[uk] = down, up
        if layout in ALPHA_LAYOUTS:
            sd[ak] = torch.tensor(3.0)
    return shapes, sd


@pytest.mark.parametrize("family, pipeline, layout, keep", [
    (f, p, layout, keep) for f, p, layouts, keep in NATIVE_JUDGED for layout in layouts],
    ids=[f"{f}-{layout}-{i}" for i, (f, p, layouts, keep) in enumerate(NATIVE_JUDGED) for layout in layouts])
def test_native_layouts_convert_and_load_as_the_exact_truncation(tmp_path, family, pipeline, layout, keep):
    shapes, sd = native_lora(family, layout, keep, seed=2)
    src = write_lora(tmp_path / "in.safetensors", sd)
    dst = tmp_path / "out.safetensors"
    assert main(["resize", str(src), "-o", str(dst), "-q", "--method", "sv_fro", "--param", "0.9"]) == 0
    out, _ = load_st(dst)
    ref = write_lora(tmp_path / "ref.safetensors", reference(sd, out, shapes, layout))
    ours, messages = converted(family, pipeline, dst)
    theirs, _ = converted(family, pipeline, ref)
    whole, _ = converted(family, pipeline, src)
    assert messages == []
    assert ours and set(ours) == set(theirs) == set(whole)
    for n in theirs:
        assert rel_err(ours[n], theirs[n]) < TOL, n
        assert rel_err(whole[n], theirs[n]) > 100 * TOL, n  # the judge can tell the truncation from the input


def test_onetrainer_flux_layout_converts_as_the_exact_truncation(tmp_path):
    """OneTrainer keys diffusers module paths kohya-style (`lora_transformer_transformer_blocks_0_attn_to_q`); its
    Flux attention modules go through diffusers' kohya-Flux converter (which reads only those)."""
    model = tiny("flux1")
    shapes = [archs.ModuleShape(n, m.weight.shape[0], m.weight.shape[1]) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and "transformer_blocks" in n and ".attn." in n]
    g = torch.Generator().manual_seed(3)
    sd = {}
    for m in shapes:
        up, down = varied_factors(m.out, m.flat_in, g)
        dk, uk, ak = loras.lora_keys(m.name, "onetrainer")
        sd[dk], sd[uk], sd[ak] = down, up, torch.tensor(2.0)
    src = write_lora(tmp_path / "in.safetensors", sd)
    dst = tmp_path / "out.safetensors"
    assert main(["resize", str(src), "-o", str(dst), "-q", "--method", "sv_fro", "--param", "0.9"]) == 0
    out, _ = load_st(dst)
    ref = write_lora(tmp_path / "ref.safetensors", reference(sd, out, shapes, "onetrainer"))
    ours, messages = converted("flux1", "FluxPipeline", dst)
    theirs, _ = converted("flux1", "FluxPipeline", ref)
    assert messages == [] and len(ours) == len(shapes) and set(ours) == set(theirs)
    for n in theirs:
        assert rel_err(ours[n], theirs[n]) < TOL, n


# ----------------------------------------------------------------------------------------------------------------
# Conversions, judged by diffusers' own converters and loaders: native files written as diffusers (ranks kept,
# and resized in the same pass: each split part its own truncation) load into the model with the update the
# pipeline's converter gives the native file; converted back to the native layout, the converter reads them so.

# modules diffusers' kohya converters leave out of a native file without a word (its Flux converter reads no
# img_in / txt_in, its Flux.2 converter no shared modulations); our diffusers files carry them, judged by the
# native file's own update
SKIPPED_BY_DIFFUSERS = {
    "flux1": {"x_embedder.weight": "img_in", "context_embedder.weight": "txt_in"},
    "chroma": {"x_embedder.weight": "img_in", "context_embedder.weight": "txt_in"},
    "flux2": {f"{m}.linear.weight": f"{m}.lin" for m in ("double_stream_modulation_img",
                                                          "double_stream_modulation_txt", "single_stream_modulation")},
}


def native_file(tmp_path, family: str, layout: str, keep, seed: int = 4):
    return write_lora(tmp_path / "native.safetensors", native_lora(family, layout, keep, seed)[1])


@pytest.mark.parametrize("family, pipeline, layout, keep", [
    (f, p, layouts[0], keep) for f, p, layouts, keep in NATIVE_JUDGED],
    ids=[f"{f}-{layouts[0]}-{i}" for i, (f, p, layouts, keep) in enumerate(NATIVE_JUDGED)])
def test_native_files_converted_to_diffusers_load_with_the_converters_update(tmp_path, family, pipeline, layout,
                                                                             keep):
    src = native_file(tmp_path, family, layout, keep)
    whole, _ = converted(family, pipeline, src)
    assert whole
    dst = tmp_path / "d.safetensors"
    assert main(["convert", str(src), "-o", str(dst), "--to", "diffusers", "--precision", "float", "-q"]) == 0
    ours, messages = fused(tiny(family), dst)
    assert messages == [] and set(ours) == set(whole) | set(SKIPPED_BY_DIFFUSERS.get(family, {}))
    for n in whole:
        assert rel_err(ours[n], whole[n]) < TOL, n
    native, _ = load_st(src)
    for n, module in SKIPPED_BY_DIFFUSERS.get(family, {}).items():  # judged by the native file's own update
        dk, uk, ak = loras.lora_keys(module, layout)
        want = native[uk].double() @ native[dk].double() * (float(native[ak]) / native[dk].shape[0])
        assert rel_err(ours[n], want) < TOL, n
    # resized while converting: every diffusers weight gets the best rank-k approximation of its own update
    dyn = tmp_path / "dyn.safetensors"
    assert main(["convert", str(src), "-o", str(dyn), "--to", "diffusers", "--method", "sv_fro", "--param", "0.8",
                 "--precision", "float", "-q"]) == 0
    out, _ = load_st(dyn)
    got, messages = fused(tiny(family), dyn)
    assert messages == [] and set(got) == set(ours)
    truncated = 0
    for n in ours:
        k = out[f"transformer.{n[: -len('.weight')]}.lora_A.weight"].shape[0]
        want = best_rank_k(ours[n].reshape(ours[n].shape[0], -1), k).reshape(ours[n].shape)
        assert rel_err(got[n], want) < TOL, n
        truncated += rel_err(ours[n], want) > 100 * TOL
    assert truncated  # the judge can tell the truncation from the input
    if layout not in ALPHA_LAYOUTS:
        return
    # and back to the native layout: the converter reads the same update
    back = tmp_path / "back.safetensors"
    to = "comfy" if layout == "comfy" else "kohya"
    assert main(["convert", str(dst), "-o", str(back), "--to", to, "--precision", "float", "-q"]) == 0
    again, messages = converted(family, pipeline, back)
    assert messages == [] and set(again) == set(whole)
    for n in whole:
        assert rel_err(again[n], whole[n]) < TOL, n


def test_peft_adapter_folders_load_in_peft_with_the_native_update(tmp_path):
    """A native Flux file written as a PEFT adapter folder (adapter_config.json with every module's rank and
    alpha): PEFT's own PeftModel.from_pretrained wraps the tiny transformer and merges exactly what diffusers'
    converter makes of the native file."""
    from peft import PeftModel
    keep = NATIVE_JUDGED[0][3]
    src = native_file(tmp_path, "flux1", "musubi", keep)
    whole, _ = converted("flux1", "FluxPipeline", src)
    folder = tmp_path / "adapter"
    assert main(["convert", str(src), "-o", str(folder), "--to", "peft", "--method", "sv_fro", "--param", "0.95",
                 "--precision", "float", "-q"]) == 0
    model = tiny("flux1")
    before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    after = {n: p.detach().double() for n, p in merged.named_parameters()}
    out, _ = load_st(folder / "adapter_model.safetensors")
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == set(whole) | set(SKIPPED_BY_DIFFUSERS["flux1"])
    for n in whole:
        k = out[f"base_model.model.{n[: -len('.weight')]}.lora_A.weight"].shape[0]
        assert rel_err(after[n] - before[n], best_rank_k(whole[n], k)) < TOL, n


def _module_paths(model) -> set[str]:
    """The paths of a model's Linear and Conv modules: what PEFT's injection (and so diffusers' load_lora_adapter)
    can put a LoRA layer on."""
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return {name for name, mod in model.named_modules() if isinstance(mod, kinds)}


# every family with a diffusers transformer (HiDream-O1's is in no released diffusers: transformers' Qwen3-VL model
# judges its names in tests/e2e/test_families_2026.py)
ACCEPT = [(f, layout) for f, (_, _, layouts) in archs.NATIVE.items() for layout in layouts if f in TINY or f == "sd35"]


@pytest.mark.parametrize("family, layout", ACCEPT)
def test_diffusers_peft_and_onetrainer_outputs_name_the_models_modules(tmp_path, family, layout):
    """Every family from every layout its trainers write, converted to diffusers (`transformer.<path>`), PEFT
    (`base_model.model.<path>`) and OneTrainer (`lora_transformer_<path with _>`): every path is a Linear/Conv of
    the family's diffusers transformer (the modules PEFT injects into), so no key is left unloaded."""
    fn, tiny_cfg, _ = archs.NATIVE[family]
    shapes = fn(**tiny_cfg)
    sd = loras.lora_state_dict(shapes, layout, rank=2, alpha=1.0 if layout in ALPHA_LAYOUTS + ("musubi__",) else None)
    src = write_lora(tmp_path / "in.safetensors", sd)
    paths = _module_paths(tiny("sd3" if family == "sd35" else family))
    for target, prefix, flat in (("diffusers", "transformer.", False), ("peft", "base_model.model.", False),
                                 ("onetrainer", "lora_transformer_", True)):
        dst = tmp_path / target if target == "peft" else tmp_path / f"{target}.safetensors"
        res = main(["convert", str(src), "-o", str(dst), "--to", target, "--precision", "float", "-q"])
        assert res == 0
        keys = load_st(dst / "adapter_model.safetensors" if target == "peft" else dst)[0]
        bases = {k.rsplit(".", 2)[0] for k in keys if k.endswith(".weight")}
        want = {prefix + (p.replace(".", "_") if flat else p) for p in paths}
        assert bases and bases <= want, (target, sorted(bases - want)[:3])


def test_flux_text_encoder_modules_convert_to_what_diffusers_loads(tmp_path):
    """A kohya Flux file with CLIP-L modules (`lora_te1_`, sd-scripts' networks/lora_flux.py) converted to diffusers
    (`text_encoder.<CLIP path>`) loads into a tiny FluxPipeline with no message, and fusing it changes each CLIP
    weight by exactly the module's update (alpha / rank scaled)."""
    import transformers
    torch.manual_seed(0)
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1,
                                                          num_heads=2))
    pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=te,
                                  tokenizer=None, text_encoder_2=t5, tokenizer_2=None, transformer=tiny("flux1"))
    clip_te = [archs.ModuleShape(m.name, m.out, m.inp) for m in archs._clip("lora_te1_", 16, 1, 24)]
    sd = loras.lora_state_dict([archs.ModuleShape("lora_unet_double_blocks_0_img_attn_proj", 16, 16)] + clip_te,
                               "kohya", rank=2, alpha=1.0, seed=3)
    src = write_lora(tmp_path / "flux.safetensors", sd)
    dst = tmp_path / "d.safetensors"
    assert main(["convert", str(src), "-o", str(dst), "--to", "diffusers", "--precision", "float", "-q"]) == 0
    assert any(k.startswith("text_encoder.") for k in load_st(dst)[0])
    before = {n: m.weight.detach().clone().double() for n, m in te.named_modules() if isinstance(m, torch.nn.Linear)}
    w = Warnings()
    for name in ("diffusers", "peft"):
        logging.getLogger(name).addHandler(w)
    try:
        pipe.load_lora_weights(str(dst))
        pipe.fuse_lora(components=["transformer", "text_encoder"])
    finally:
        for name in ("diffusers", "peft"):
            logging.getLogger(name).removeHandler(w)
    assert w.messages == []
    for m in clip_te:
        path = m.name.removeprefix("lora_te1_text_model_").replace("encoder_layers_0_", "encoder.layers.0.")
        path = path.replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
        w = dict(te.named_modules())[path].weight.detach().double()
        want = sd[m.name + ".lora_up.weight"].double() @ sd[m.name + ".lora_down.weight"].double() * 0.5
        assert rel_err(w - before[path], want) < TOL, path


def test_sd3_text_encoder_modules_name_the_pipelines_clip_modules(tmp_path):
    """OneTrainer's SD3 CLIP-L and CLIP-G modules (`lora_te1_`, `lora_te2_`) converted to diffusers become
    `text_encoder.` / `text_encoder_2.` paths of transformers' CLIP text model (StableDiffusion3Pipeline's LoRA
    components); T5 modules are refused for diffusers, which loads none."""
    import transformers
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_size=16, intermediate_size=24,
                                                                  num_hidden_layers=1, num_attention_heads=2))
    paths = {p if p.startswith("text_model.") else "text_model." + p for p in _module_paths(clip)}  # transformers 5
    te = [archs.ModuleShape(m.name, m.out, m.inp) for m in archs._clip("lora_te1_", 16, 1, 24)]
    sd3 = loras.lora_state_dict([archs.ModuleShape("lora_transformer_transformer_blocks_0_attn_to_q", 16, 16)]
                                + te + [archs.ModuleShape(m.name, m.out, m.inp) for m in archs._clip("lora_te2_", 16, 1, 24)],
                                "kohya", rank=2, alpha=1.0)
    src = write_lora(tmp_path / "sd3.safetensors", sd3, {"modelspec.architecture": "stable-diffusion-v3-medium/lora"})
    assert main(["convert", str(src), "-o", str(tmp_path / "s.safetensors"), "--to", "diffusers", "-q"]) == 0
    keys = load_st(tmp_path / "s.safetensors")[0]
    assert {k.split(".")[0] for k in keys} == {"transformer", "text_encoder", "text_encoder_2"}
    for comp in ("text_encoder", "text_encoder_2"):
        got = {k.rsplit(".", 2)[0].removeprefix(comp + ".") for k in keys if k.startswith(comp + ".")}
        assert len(got) == len(te) and got <= paths, comp
