"""diffusers as the judge: resized kohya SD1.5-, SDXL- and Flux-shaped LoRAs (archs.py names, tiny widths) load
through a pipeline's public `load_lora_weights` with no warning, every module lands, and the weight change
`fuse_lora` applies to each layer equals the best rank-k approximation of the input's dW (dense float64 SVD).
Also: a diffusers-family SD3 LoRA with per-module ranks in `lora_adapter_metadata` is resized and the rewritten
metadata rebuilds every module at its new rank."""
from __future__ import annotations

import pytest

import math
import re
from pathlib import Path

import torch
from diffusers import (FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel, EulerDiscreteScheduler)
from peft.tuners.lora import LoraLayer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from lora_resize.testing import archs, loras
from lora_resize.cli import main

from helpers import best_rank_k, load_st, rel_err, write_lora
from helpers import loader_messages

pytestmark = pytest.mark.thirdparty

TOL = 2e-5  # float32 merge into float32 weights


# ----------------------------------------------------------------------------------------------------------------
# helpers


def clip(width: int, layers: int, mlp: int, cls=CLIPTextModel, **extra):
    torch.manual_seed(0)
    return cls(CLIPTextConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                              num_attention_heads=2, vocab_size=64, max_position_embeddings=16, bos_token_id=0,
                              eos_token_id=1, pad_token_id=1, **extra))


def weights(model: torch.nn.Module, prefix: str) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """Each Linear/Conv2d of `model` by its kohya-style name (prefix + path with '_'), with a copy of its weight.
    CLIP text models are named `text_model.encoder...` in kohya's keys (transformers 5 drops `text_model.`)."""
    clip_model = isinstance(model, (CLIPTextModel, CLIPTextModelWithProjection))
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            if clip_model and not n.startswith("text_model.") and n != "text_projection":
                n = "text_model." + n
            out[prefix + n.replace(".", "_")] = (m, m.weight.detach().clone())
    return out


def lora_layer_count(*models) -> int:
    return sum(1 for m in models for x in m.modules() if isinstance(x, LoraLayer))


def truncated(sd: dict[str, torch.Tensor], name: str, k: int, dense: bool = True) -> torch.Tensor:
    """The best rank-k approximation of the kohya layer's dW = up @ down * alpha / r, float64, as a matrix: by a
    dense SVD of dW, or (dense=False, for full-size layers) by the SVD of up, then of the small (r x in) rest."""
    up, down = sd[name + ".lora_up.weight"], sd[name + ".lora_down.weight"]
    r = down.shape[0]
    up, down = up.reshape(up.shape[0], -1).double(), down.reshape(r, -1).double()
    a = sd.get(name + ".alpha")
    scale = float(a) / r if a is not None else 1.0
    if dense:
        return best_rank_k(up @ down * scale, k)
    U1, S1, V1h = torch.linalg.svd(up, full_matrices=False)
    U2, S2, V2h = torch.linalg.svd((S1[:, None] * V1h) @ down * scale, full_matrices=False)
    return ((U1 @ U2[:, :k]) * S2[:k]) @ V2h[:k]


def delta(module: torch.nn.Module, before: torch.Tensor) -> torch.Tensor:
    return (module.weight.detach().double() - before.double()).reshape(before.shape[0], -1)


def resize(src: Path, dst: Path, *args: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    assert main(["resize", str(src), "-o", str(dst), "-q", *args]) == 0
    return load_st(dst)


def ranks_of(out: dict[str, torch.Tensor]) -> dict[str, int]:
    return {k[: -len(".lora_down.weight")]: v.shape[0] for k, v in out.items() if k.endswith(".lora_down.weight")}


def check_fused(sd_in, ranks, targets) -> int:
    """targets: kohya name -> list of (module, weight before, row slice) that diffusers fused; returns how many
    layers were compared."""
    n = 0
    for name, parts in targets.items():
        want = truncated(sd_in, name, ranks[name])
        full = truncated(sd_in, name, min(want.shape))
        old_rank = sd_in[name + ".lora_down.weight"].shape[0]
        for module, before, rows in parts:
            got = delta(module, before)
            assert got.shape == want[rows].shape, name
            err = rel_err(got, want[rows])
            assert err < TOL, (name, err)
            if ranks[name] < min(old_rank, *want.shape):  # the check can tell the truncation from the original
                assert rel_err(full[rows], want[rows]) > 100 * TOL, name
        n += 1
    return n


# ----------------------------------------------------------------------------------------------------------------
# SD1.5


SD15_CH = (8, 16, 32, 32)


@pytest.mark.parametrize("args", [("--rank", "5", "--conv-rank", "4"), ("--method", "sv_fro", "--param", "0.95",
                                                                      "--rank", "6"),
                                  ("--method", "sv_fro", "--param", "0.95", "--output-format", "diffusers")],
                         ids=["fixed", "dynamic", "dynamic-to-diffusers"])
def test_sd15_locon_loads_in_diffusers_with_exact_deltas(tmp_path, args):
    """Fixed and dynamic resizes alike: every layer carries one alpha (its own ratio in its factors), so diffusers,
    which gives SD attention and CLIP layers the file's most common alpha, applies each at its strength (before,
    a dynamic resize had 55 of 290 layers at 1.33x)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=SD15_CH, layers_per_block=2, cross_attention_dim=12, attention_head_dim=2,
        norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    te = clip(16, 2, 32)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=te, tokenizer=None, unet=unet,
                                   scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    shapes = archs.sd15(ch=SD15_CH, ctx=12, te=(16, 2, 32))
    sd = loras.lora_state_dict(shapes, "kohya", rank=8, alpha=4.0, conv_rank=6, seed=1)
    for m in shapes[::3]:  # layers of several strengths, as a LoCon's conv_alpha and edited files have them
        sd[m.name + ".alpha"] = torch.tensor(6.0)
    src = write_lora(tmp_path / "sd15.safetensors", sd)
    out, _ = resize(src, tmp_path / "small.safetensors", *args)
    if "--output-format" in args:  # diffusers' names: unet.<path>, text_encoder.<path> (kohya: '.' as '_')
        assert all(k.split(".")[0] in ("unet", "text_encoder") for k in out)
        out = {"lora_" + k.replace("text_encoder.", "te.").replace(".lora_A.weight", "").replace(".", "_")
               + ".lora_down.weight": v for k, v in out.items() if k.endswith(".lora_A.weight")}
    ranks = ranks_of(out)
    assert len(ranks) == len(shapes)
    if args[0] == "--rank":
        assert {ranks[m.name] for m in shapes if m.kernel == 3} == {4} and ranks[shapes[-1].name] == 5
    else:
        assert len(set(ranks.values())) > 1  # layers of different ranks and strengths

    before = {**weights(unet, "lora_unet_"), **weights(te, "lora_te_")}
    with loader_messages() as msgs:
        pipe.load_lora_weights(str(tmp_path / "small.safetensors"), adapter_name="small")
        pipe.fuse_lora(components=["unet", "text_encoder"])
    assert msgs == []
    assert lora_layer_count(unet, te) == len(shapes)
    targets = {m.name: [(before[m.name][0], before[m.name][1], slice(None))] for m in shapes}
    assert check_fused(sd, ranks, targets) == len(shapes)


# ----------------------------------------------------------------------------------------------------------------
# SDXL (sgm names)


SDXL_CH, SDXL_DEPTH, LPB = (8, 16, 32), (0, 1, 2), 2
SGM_RESNET = {"in_layers_2": "conv1", "emb_layers_1": "time_emb_proj", "out_layers_3": "conv2",
              "skip_connection": "conv_shortcut"}


def sgm_to_diffusers(name: str) -> str:
    """kohya SDXL (sgm) module name -> diffusers UNet name with '_' (an independent statement of the mapping)."""
    m = re.match(r"lora_unet_middle_block_(\d+)_(.*)$", name)
    if m:
        rest = SGM_RESNET.get(m.group(2), m.group(2))
        return f"mid_block_{['resnets_0', 'attentions_0', 'resnets_1'][int(m.group(1))]}_{rest}"
    m = re.match(r"lora_unet_(input_blocks|output_blocks)_(\d+)_(\d+)_(.*)$", name)
    kind, i, inner, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    rest = SGM_RESNET.get(rest, rest)
    if kind == "input_blocks":
        b, j = (i - 1) // (LPB + 1), (i - 1) % (LPB + 1)
        if rest == "op":
            return f"down_blocks_{b}_downsamplers_0_conv"
        return f"down_blocks_{b}_{['resnets', 'attentions'][inner]}_{j}_{rest}"
    b, j = i // (LPB + 1), i % (LPB + 1)
    if rest == "conv":
        return f"up_blocks_{b}_upsamplers_0_conv"
    return f"up_blocks_{b}_{['resnets', 'attentions'][inner]}_{j}_{rest}"


def sdxl_pipeline():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=SDXL_CH, layers_per_block=LPB, cross_attention_dim=24,
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), use_linear_projection=True,
        norm_num_groups=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    te1, te2 = clip(16, 2, 32), clip(16, 2, 40, CLIPTextModelWithProjection, projection_dim=16)
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=te1, text_encoder_2=te2, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=EulerDiscreteScheduler(steps_offset=1))
    shapes = archs.sdxl(ch=SDXL_CH, depth=SDXL_DEPTH, ctx=24, te1=(16, 2, 32), te2=(16, 2, 40))
    unet_w = weights(unet, "")
    before = {**weights(te1, "lora_te1_"), **weights(te2, "lora_te2_")}
    for m in shapes:
        if m.name.startswith("lora_unet_"):
            before[m.name] = unet_w[sgm_to_diffusers(m.name)]
    return pipe, (unet, te1, te2), shapes, before


@pytest.mark.parametrize("to", [None, "diffusers"])
def test_sdxl_lora_loads_in_diffusers_with_exact_deltas(tmp_path, to):
    """sd-scripts' SDXL names (sgm), resized as they are or converted to diffusers' names in the same pass (a
    dynamic resize: mixed ranks, described in lora_adapter_metadata): diffusers applies every layer's exact
    truncation."""
    pipe, models, shapes, before = sdxl_pipeline()
    assert any("input_blocks_4_1_transformer_blocks_0_attn1_to_q" in m.name for m in shapes)
    sd = loras.lora_state_dict(shapes, "kohya", rank=8, alpha=8.0, conv_rank=4, seed=2)
    src = write_lora(tmp_path / "sdxl.safetensors", sd)
    if to is None:
        out, _ = resize(src, tmp_path / "small.safetensors", "--rank", "5", "--conv-rank", "3")
        ranks = ranks_of(out)
        assert {ranks[m.name] for m in shapes if m.conv and m.kernel == 3} == {3}
    else:
        out, meta = resize(src, tmp_path / "small.safetensors", "--method", "sv_fro", "--param", "0.9",
                           "--output-format", to)
        assert all(k.split(".")[0] in ("unet", "text_encoder", "text_encoder_2") for k in out)
        flat = {k.rsplit(".lora_A.weight", 1)[0].replace(".", "_"): v.shape[0] for k, v in out.items()
                if k.endswith(".lora_A.weight")}
        kohya = {("unet_" + sgm_to_diffusers(m.name) if m.name.startswith("lora_unet_") else
                  m.name.replace("lora_te1_", "text_encoder_").replace("lora_te2_", "text_encoder_2_")): m.name
                 for m in shapes}
        ranks = {kohya[f]: k for f, k in flat.items()}
        assert len(ranks) == len(shapes) and len(set(ranks.values())) > 1
    with loader_messages() as msgs:
        pipe.load_lora_weights(str(tmp_path / "small.safetensors"))
        pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"])
    assert msgs == []
    assert lora_layer_count(*models) == len(shapes)
    targets = {m.name: [(before[m.name][0], before[m.name][1], slice(None))] for m in shapes}
    assert check_fused(sd, ranks, targets) == len(shapes)


# ----------------------------------------------------------------------------------------------------------------
# Flux (kohya names; fused qkv, split_qkv input)


FLUX_D = 16


def split_qkv(sd: dict[str, torch.Tensor], name: str, r: int, g: torch.Generator) -> None:
    """Replace a fused qkv layer by kohya's split_qkv form: down (3r, in) stacked, up (3d, 3r) block-diagonal."""
    out, inp = sd[name + ".lora_up.weight"].shape[0], sd[name + ".lora_down.weight"].shape[1]
    d = out // 3
    up = torch.zeros(out, 3 * r)
    for i in range(3):
        up[i * d:(i + 1) * d, i * r:(i + 1) * r] = torch.randn(d, r, generator=g) * 0.3
    sd[name + ".lora_up.weight"] = up
    sd[name + ".lora_down.weight"] = torch.randn(3 * r, inp, generator=g) * 0.3


def flux_targets(transformer, shapes):
    """kohya Flux name -> the diffusers modules it becomes, each with the rows of dW it receives."""
    d, h = FLUX_D, 4 * FLUX_D
    w = {n: (m, m.weight.detach().clone()) for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    thirds = [slice(0, d), slice(d, 2 * d), slice(2 * d, 3 * d)]
    table = {
        "img_attn_proj": [("attn.to_out.0", slice(None))],
        "img_attn_qkv": [(f"attn.to_{x}", s) for x, s in zip("qkv", thirds)],
        "img_mlp_0": [("ff.net.0.proj", slice(None))], "img_mlp_2": [("ff.net.2", slice(None))],
        "img_mod_lin": [("norm1.linear", slice(None))],
        "txt_attn_proj": [("attn.to_add_out", slice(None))],
        "txt_attn_qkv": [(f"attn.add_{x}_proj", s) for x, s in zip("qkv", thirds)],
        "txt_mlp_0": [("ff_context.net.0.proj", slice(None))], "txt_mlp_2": [("ff_context.net.2", slice(None))],
        "txt_mod_lin": [("norm1_context.linear", slice(None))],
        "linear1": [("attn.to_q", thirds[0]), ("attn.to_k", thirds[1]), ("attn.to_v", thirds[2]),
                    ("proj_mlp", slice(3 * d, 3 * d + h))],
        "linear2": [("proj_out", slice(None))], "modulation_lin": [("norm.linear", slice(None))],
    }
    targets = {}
    for m in shapes:
        md = re.match(r"lora_unet_double_blocks_(\d+)_(.*)$", m.name)
        ms = re.match(r"lora_unet_single_blocks_(\d+)_(.*)$", m.name)
        if md:
            base, key = f"transformer_blocks.{md.group(1)}.", md.group(2)
        elif ms:
            base, key = f"single_transformer_blocks.{ms.group(1)}.", ms.group(2)
        else:
            continue
        targets[m.name] = [(*w[base + t], rows) for t, rows in table[key]]
    return targets


def test_flux_lora_with_split_qkv_loads_in_diffusers_with_exact_deltas(tmp_path):
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                         pooled_projection_dim=12, axes_dims_rope=(2, 2, 4))
    te = clip(12, 2, 24)
    t5 = T5EncoderModel(T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=te, tokenizer=None,
                        text_encoder_2=t5, tokenizer_2=None, transformer=transformer)
    # diffusers splits single-block linear1 at Flux-dev's fixed widths (3072 x 3 + 12288), so at a tiny width
    # linear1 is left out here; the test below takes it at full width.
    shapes = [m for m in archs.flux_dev(width=FLUX_D, double=2, single=2, te1=(12, 2, 24), te3=None)
              if not m.name.endswith("linear1")]
    sd = loras.lora_state_dict(shapes, "kohya", rank=6, alpha=3.0, seed=3)
    g = torch.Generator().manual_seed(4)
    for i in range(2):
        split_qkv(sd, f"lora_unet_double_blocks_{i}_img_attn_qkv", 4, g)
        sd[f"lora_unet_double_blocks_{i}_img_attn_qkv.alpha"] = torch.tensor(8.0)  # alpha / 3r as kohya saves it
    src = write_lora(tmp_path / "flux.safetensors", sd)
    out, _ = resize(src, tmp_path / "small.safetensors", "--method", "sv_ratio", "--param", "6")
    ranks = ranks_of(out)
    assert ranks["lora_unet_double_blocks_0_img_attn_qkv"] < 12  # split_qkv rank 3r = 12, cut

    targets = flux_targets(transformer, shapes)
    te_w = weights(te, "lora_te1_")
    targets.update({m.name: [(*te_w[m.name], slice(None))] for m in shapes if m.name.startswith("lora_te1_")})
    with loader_messages() as msgs:
        pipe.load_lora_weights(str(tmp_path / "small.safetensors"))
        pipe.fuse_lora(components=["transformer", "text_encoder"])
    assert msgs == []
    n_modules = sum(len(v) for v in targets.values())
    assert lora_layer_count(transformer, te) == n_modules
    assert check_fused(sd, ranks, targets) == len(shapes)


@pytest.mark.slow
def test_flux_single_block_linear1_at_full_width_converts_to_exact_deltas(tmp_path):
    """Flux-dev's linear1 (3072 -> 21504) on one single block at the real width, through the pipeline's public
    `lora_state_dict`, which splits it into to_q/to_k/to_v/proj_mlp and bakes alpha / rank into the factors: the
    update each target module then receives (lora_B @ lora_A at scale 1) equals its rows of our rank-k dW."""
    shapes = archs.flux_dev(double=0, single=1, te1=None, te3=None)
    sd = loras.lora_state_dict(shapes, "kohya", rank=8, alpha=4.0, seed=5)
    src = write_lora(tmp_path / "flux1.safetensors", sd)
    out, _ = resize(src, tmp_path / "small.safetensors", "--method", "sv_fro", "--param", "0.9", "--rank", "6")
    ranks = ranks_of(out)
    with loader_messages() as msgs:
        state = FluxPipeline.lora_state_dict(str(tmp_path / "small.safetensors"))
    assert msgs == []
    d, h = 3072, 12288
    parts = {"linear1": [("attn.to_q", slice(0, d)), ("attn.to_k", slice(d, 2 * d)),
                         ("attn.to_v", slice(2 * d, 3 * d)), ("proj_mlp", slice(3 * d, 3 * d + h))],
             "linear2": [("proj_out", slice(None))], "modulation_lin": [("norm.linear", slice(None))]}
    assert len(state) == 2 * 6
    for kind, mods in parts.items():
        name = f"lora_unet_single_blocks_0_{kind}"
        want = truncated(sd, name, ranks[name], dense=False)
        for path, rows in mods:
            base = "transformer.single_transformer_blocks.0." + path
            got = state[base + ".lora_B.weight"].double() @ state[base + ".lora_A.weight"].double()
            assert rel_err(got, want[rows]) < TOL, (name, path)


# ----------------------------------------------------------------------------------------------------------------
# SD3, diffusers key family with lora_adapter_metadata


def test_sd3_diffusers_lora_with_metadata_is_rebuilt_at_new_ranks(tmp_path):
    import json
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                        caption_projection_dim=16, pooled_projection_dim=12, out_channels=4)
    shapes = archs.sd3(width=16, blocks=2)
    sd = loras.lora_state_dict(shapes, "diffusers", rank=8, seed=6)
    # as diffusers' training scripts save it: a PEFT config per component in the metadata (alpha 4 -> scale 0.5,
    # and one module trained at rank 8 with alpha 16 through the patterns)
    cfg = {"r": 8, "lora_alpha": 4, "target_modules": sorted({m.name.split(".", 3)[3] for m in shapes}),
           "rank_pattern": {}, "alpha_pattern": {"transformer_blocks.1.attn.to_q": 16}, "use_rslora": False,
           "use_dora": False, "lora_dropout": 0.0, "init_lora_weights": True, "bias": "none"}
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in cfg.items()})}
    src = write_lora(tmp_path / "sd3.safetensors", sd, meta)
    dst = tmp_path / "small.safetensors"
    assert main(["resize", str(src), "-o", str(dst), "-q", "--method", "sv_fro", "--param", "0.8"]) == 0
    out, out_meta = load_st(dst)
    assert set(out) == set(sd)  # same keys, same family
    ranks = {k[: -len(".lora_A.weight")]: v.shape[0] for k, v in out.items() if k.endswith(".lora_A.weight")}
    assert len(set(ranks.values())) > 1
    new_cfg = json.loads(out_meta["lora_adapter_metadata"])
    assert new_cfg["transformer.target_modules"] == cfg["target_modules"]

    w = {n: (m, m.weight.detach().clone()) for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    with loader_messages() as msgs:
        # use_safetensors: without it this model-level loader reads no metadata (diffusers 0.42)
        transformer.load_lora_adapter(str(dst), prefix="transformer", adapter_name="small", use_safetensors=True)
        transformer.fuse_lora()
    assert msgs == []
    assert lora_layer_count(transformer) == len(shapes)
    wrappers = dict(transformer.named_modules())
    for m in shapes:
        path = m.name[len("transformer."):]
        scale = (16 if path == "transformer_blocks.1.attn.to_q" else 4) / 8
        dw = sd[m.name + ".lora_B.weight"].double() @ sd[m.name + ".lora_A.weight"].double() * scale
        module, before = w[path]
        assert wrappers[path].lora_A["small"].weight.shape[0] == ranks[m.name]
        assert rel_err(delta(module, before), best_rank_k(dw, ranks[m.name])) < TOL, m.name


# ----------------------------------------------------------------------------------------------------------------
# Features of a diffusers-layout LoRA that its config must carry through a resize (lora_bias, DoRA, rsLoRA, patterns)


def tiny_sd3():
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                                 pooled_projection_dim=12, out_channels=4)


def feature_file(tmp_path: Path, feature: str) -> tuple[Path, dict[str, torch.Tensor], dict[str, float]]:
    """A diffusers-layout SD3 LoRA with one feature the loader must be told about: `lora_bias` (lora_B.bias
    vectors, as Flux Control LoRAs and PEFT lora_bias=True adapters carry; no metadata), `dora` (DoRA
    magnitudes; no metadata), `rslora` (a config with use_rslora), `patterns` (a config with rank_pattern and
    alpha_pattern, one module trained at another rank). Returns the file, its tensors and each module's scale."""
    import json
    shapes = archs.sd3(width=16, blocks=2)
    sd = loras.lora_state_dict(shapes, "diffusers", rank=8, seed=7)
    paths = [m.name[len("transformer."):] for m in shapes]
    g = torch.Generator().manual_seed(8)
    scales = {p: 1.0 for p in paths}
    meta = {"format": "pt"}
    if feature == "lora_bias":
        for m in shapes:
            sd[m.name + ".lora_B.bias"] = torch.randn(m.out, generator=g)
    elif feature == "dora":
        for m in shapes:
            sd[m.name + ".lora_magnitude_vector"] = torch.rand(m.out, generator=g) + 0.5
    else:
        cfg = {"r": 8, "lora_alpha": 4, "target_modules": sorted(paths), "use_rslora": feature == "rslora",
               "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "lora_dropout": 0.0, "bias": "none",
               "init_lora_weights": True}
        if feature == "patterns":
            short = "transformer_blocks.0.attn.to_k"
            sd["transformer." + short + ".lora_A.weight"] = sd["transformer." + short + ".lora_A.weight"][:4]
            sd["transformer." + short + ".lora_B.weight"] = sd["transformer." + short + ".lora_B.weight"][:, :4]
            cfg["rank_pattern"] = {short: 4}
            cfg["alpha_pattern"] = {short: 6, "transformer_blocks.1.attn.to_q": 16}
        for p in paths:
            r = cfg["rank_pattern"].get(p, 8)
            a = cfg["alpha_pattern"].get(p, 4)
            scales[p] = a / math.sqrt(r) if cfg["use_rslora"] else a / r
        meta["lora_adapter_metadata"] = json.dumps({f"transformer.{k}": v for k, v in cfg.items()})
    return write_lora(tmp_path / f"{feature}.safetensors", sd, meta), sd, scales


@pytest.mark.parametrize("feature", ["lora_bias", "dora", "rslora", "patterns"])
def test_resized_diffusers_lora_keeps_what_its_loader_needs(tmp_path, feature):
    """The resized file loads in diffusers (`load_lora_adapter`, which builds its PEFT LoraConfig from the
    metadata we write) with every feature of the input: the lora_B biases and DoRA magnitudes as trained (DoRA
    modules built as DoRA), and each module's update scaling * B @ A the best rank-k approximation of the
    trained one under rsLoRA's and the patterns' scales."""
    src, sd, scales = feature_file(tmp_path, feature)
    dst = tmp_path / "small.safetensors"
    assert main(["resize", str(src), "-o", str(dst), "-q", "--method", "sv_fro", "--param", "0.8"]) == 0
    out, _ = load_st(dst)
    ranks = {k[: -len(".lora_A.weight")]: v.shape[0] for k, v in out.items() if k.endswith(".lora_A.weight")}
    assert len(set(ranks.values())) > 1  # per-module ranks: the config must describe each one
    transformer = tiny_sd3()
    with loader_messages() as msgs:
        transformer.load_lora_adapter(str(dst), prefix="transformer", adapter_name="small", use_safetensors=True)
    assert msgs == []  # no key left unloaded (a bias or magnitude the config did not announce is dropped)
    wrappers = dict(transformer.named_modules())
    for name, k in ranks.items():
        path = name[len("transformer."):]
        layer = wrappers[path]
        a_in, b_in = sd[name + ".lora_A.weight"].double(), sd[name + ".lora_B.weight"].double()
        want = best_rank_k(b_in @ a_in * scales[path], k)
        got = (layer.lora_B["small"].weight.detach().double() @ layer.lora_A["small"].weight.detach().double()
               * layer.scaling["small"])
        assert layer.lora_A["small"].weight.shape[0] == k and rel_err(got, want) < TOL, (name, rel_err(got, want))
        if feature == "lora_bias":
            assert torch.equal(layer.lora_B["small"].bias.detach(), sd[name + ".lora_B.bias"]), name
            assert layer.scaling["small"] == pytest.approx(scales[path], rel=1e-12)  # the bias' scale is kept
        if feature == "dora":
            assert layer.use_dora["small"], name
            assert torch.equal(layer.lora_magnitude_vector["small"].weight.detach(),
                               sd[name + ".lora_magnitude_vector"]), name
