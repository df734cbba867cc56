"""The layers LoRA trainers adapt in common architectures, under the key names they write: a list of
ModuleShape(name, out, in, kernel) per architecture. Every size is a parameter (defaults: the real model), so
tests and benchmarks can build the same names and structure at a tiny scale.

    sd15        kohya LoCon on the SD1.x UNet (diffusers names) + CLIP-L `lora_te_`
    sdxl        kohya on SDXL's sgm UNet (`input_blocks`/`middle_block`/`output_blocks`) + `lora_te1_` (CLIP-L)
                and `lora_te2_` (OpenCLIP bigG)
    sd3         diffusers/PEFT on SD3's MMDiT (`transformer.transformer_blocks.N.attn.to_q`, ...)
    flux_dev    kohya on Flux-dev: 19 double blocks, 38 single blocks, `lora_te1_` (CLIP-L), `lora_te3_` (T5-XXL)
    wan21       kohya/musubi on Wan 2.1 T2V 14B (`lora_unet_blocks_N_self_attn_q`, ...)
    llama       PEFT on a Llama-style LLM (`model.layers.N.self_attn.q_proj`, ...; PEFT adds `base_model.model.`)

LoRA files for these lists are made in loras.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class ModuleShape:
    """A layer to adapt: kohya name, output features, input channels, square kernel size (1 for linear)."""
    name: str
    out: int
    inp: int
    kernel: int = 1
    conv: bool = False


# ----------------------------------------------------------------------------------------------------------------
# UNets


def _resnet(p: str, cin: int, cout: int, temb: int, sgm: bool) -> list[ModuleShape]:
    conv1, emb, conv2, short = (("in_layers_2", "emb_layers_1", "out_layers_3", "skip_connection") if sgm else
                                ("conv1", "time_emb_proj", "conv2", "conv_shortcut"))
    mods = [ModuleShape(p + conv1, cout, cin, 3, True), ModuleShape(p + emb, cout, temb),
            ModuleShape(p + conv2, cout, cout, 3, True)]
    if cin != cout:
        mods.append(ModuleShape(p + short, cout, cin, 1, True))
    return mods


def _transformer(p: str, d: int, ctx: int, depth: int, linear_proj: bool) -> list[ModuleShape]:
    proj = (lambda n: ModuleShape(p + n, d, d)) if linear_proj else (lambda n: ModuleShape(p + n, d, d, 1, True))
    mods = [proj("proj_in")]
    for t in range(depth):
        tb = f"{p}transformer_blocks_{t}_"
        mods += [ModuleShape(tb + f"attn1_{n}", d, d) for n in ("to_q", "to_k", "to_v", "to_out_0")]
        mods += [ModuleShape(tb + "attn2_to_q", d, d), ModuleShape(tb + "attn2_to_k", d, ctx),
                 ModuleShape(tb + "attn2_to_v", d, ctx), ModuleShape(tb + "attn2_to_out_0", d, d),
                 ModuleShape(tb + "ff_net_0_proj", 8 * d, d), ModuleShape(tb + "ff_net_2", d, 4 * d)]
    return mods + [proj("proj_out")]


def _clip(prefix: str, width: int, layers: int, mlp: int) -> list[ModuleShape]:
    mods = []
    for i in range(layers):
        p = f"{prefix}text_model_encoder_layers_{i}_"
        mods += [ModuleShape(p + f"self_attn_{n}_proj", width, width) for n in ("q", "k", "v", "out")]
        mods += [ModuleShape(p + "mlp_fc1", mlp, width), ModuleShape(p + "mlp_fc2", width, mlp)]
    return mods


def _unet(ch: Sequence[int], layers: int, depth: Sequence[int], mid_depth: int, ctx: int, linear_proj: bool,
          sgm: bool) -> list[ModuleShape]:
    """A UNet2DConditionModel's adapted layers. depth[b]: transformer blocks per attention in down block b (0: no
    attention); the up blocks mirror it. Time embedding width 4 * ch[0]."""
    n, temb, u = len(ch), 4 * ch[0], "lora_unet_"
    mods: list[ModuleShape] = []
    cin, idx = ch[0], 1
    for b, c in enumerate(ch):
        for j in range(layers):
            rp = f"{u}input_blocks_{idx}_0_" if sgm else f"{u}down_blocks_{b}_resnets_{j}_"
            mods += _resnet(rp, cin if j == 0 else c, c, temb, sgm)
            if depth[b]:
                ap = f"{u}input_blocks_{idx}_1_" if sgm else f"{u}down_blocks_{b}_attentions_{j}_"
                mods += _transformer(ap, c, ctx, depth[b], linear_proj)
            idx += 1
        if b < n - 1:
            name = f"{u}input_blocks_{idx}_0_op" if sgm else f"{u}down_blocks_{b}_downsamplers_0_conv"
            mods.append(ModuleShape(name, c, c, 3, True))
            idx += 1
        cin = c
    top = ch[-1]
    mid = [f"{u}middle_block_{i}_" for i in range(3)] if sgm else [
        f"{u}mid_block_resnets_0_", f"{u}mid_block_attentions_0_", f"{u}mid_block_resnets_1_"]
    mods += (_resnet(mid[0], top, top, temb, sgm) + _transformer(mid[1], top, ctx, mid_depth, linear_proj)
             + _resnet(mid[2], top, top, temb, sgm))
    rev, rdepth = list(ch[::-1]), list(depth[::-1])
    prev = rev[0]
    for b, c in enumerate(rev):
        skip_in = rev[min(b + 1, n - 1)]
        for j in range(layers + 1):
            idx = b * (layers + 1) + j
            res_in = prev if j == 0 else c
            skip = skip_in if j == layers else c
            rp = f"{u}output_blocks_{idx}_0_" if sgm else f"{u}up_blocks_{b}_resnets_{j}_"
            mods += _resnet(rp, res_in + skip, c, temb, sgm)
            if rdepth[b]:
                ap = f"{u}output_blocks_{idx}_1_" if sgm else f"{u}up_blocks_{b}_attentions_{j}_"
                mods += _transformer(ap, c, ctx, rdepth[b], linear_proj)
            if j == layers and b < n - 1:
                name = (f"{u}output_blocks_{idx}_{2 if rdepth[b] else 1}_conv" if sgm else
                        f"{u}up_blocks_{b}_upsamplers_0_conv")
                mods.append(ModuleShape(name, c, c, 3, True))
        prev = c
    return mods


def sd15(ch: Sequence[int] = (320, 640, 1280, 1280), layers: int = 2, ctx: int = 768,
         te: tuple[int, int, int] = (768, 12, 3072)) -> list[ModuleShape]:
    """kohya LoCon on SD1.x: UNet (diffusers names, conv 1x1 proj_in/out) and CLIP-L (`lora_te_`)."""
    depth = [1] * (len(ch) - 1) + [0]
    return _unet(ch, layers, depth, 1, ctx, False, False) + _clip("lora_te_", *te)


def sdxl(ch: Sequence[int] = (320, 640, 1280), layers: int = 2, depth: Sequence[int] = (0, 2, 10), ctx: int = 2048,
         te1: tuple[int, int, int] = (768, 12, 3072), te2: tuple[int, int, int] = (1280, 32, 5120)
         ) -> list[ModuleShape]:
    """kohya LoCon on SDXL: sgm UNet names (linear proj_in/out), `lora_te1_` CLIP-L, `lora_te2_` OpenCLIP bigG."""
    return _unet(ch, layers, depth, depth[-1], ctx, True, True) + _clip("lora_te1_", *te1) + _clip("lora_te2_", *te2)


# ----------------------------------------------------------------------------------------------------------------
# DiTs


def sd3(width: int = 1536, blocks: int = 24, prefix: str = "transformer.") -> list[ModuleShape]:
    """diffusers/PEFT LoRA on SD3-medium's MMDiT: every attention and feed-forward linear of the joint blocks; the
    last block's context stream is pre-only (no to_add_out, no ff_context)."""
    d, mods = width, []
    for i in range(blocks):
        p = f"{prefix}transformer_blocks.{i}."
        last = i == blocks - 1
        mods += [ModuleShape(p + f"attn.{n}", d, d) for n in ("to_q", "to_k", "to_v", "to_out.0")]
        mods += [ModuleShape(p + f"attn.{n}", d, d) for n in ("add_q_proj", "add_k_proj", "add_v_proj")]
        if not last:
            mods.append(ModuleShape(p + "attn.to_add_out", d, d))
        mods += [ModuleShape(p + "ff.net.0.proj", 4 * d, d), ModuleShape(p + "ff.net.2", d, 4 * d)]
        if not last:
            mods += [ModuleShape(p + "ff_context.net.0.proj", 4 * d, d), ModuleShape(p + "ff_context.net.2", d, 4 * d)]
    return mods


def _t5(prefix: str, d_model: int, layers: int, inner: int, d_ff: int) -> list[ModuleShape]:
    mods = []
    for i in range(layers):
        p = f"{prefix}encoder_block_{i}_layer_"
        mods += [ModuleShape(p + f"0_SelfAttention_{n}", inner, d_model) for n in ("q", "k", "v")]
        mods += [ModuleShape(p + "0_SelfAttention_o", d_model, inner),
                 ModuleShape(p + "1_DenseReluDense_wi_0", d_ff, d_model),
                 ModuleShape(p + "1_DenseReluDense_wi_1", d_ff, d_model),
                 ModuleShape(p + "1_DenseReluDense_wo", d_model, d_ff)]
    return mods


def flux_dev(width: int = 3072, double: int = 19, single: int = 38, mlp_ratio: int = 4,
             te1: tuple[int, int, int] | None = (768, 12, 3072),
             te3: tuple[int, int, int, int] | None = (4096, 24, 4096, 10240)) -> list[ModuleShape]:
    """kohya LoRA on Flux-dev: per double block img/txt attn qkv (d->3d), proj, mlp_0 (d->4d), mlp_2, mod_lin
    (d->6d); per single block linear1 (d->3d+4d), linear2 (d+4d->d), modulation_lin (d->3d); text encoders
    `lora_te1_` (CLIP-L) and `lora_te3_` (T5-XXL: d_model, layers, inner, d_ff). None leaves one out."""
    d, h = width, mlp_ratio * width
    mods = []
    for i in range(double):
        for s in ("img", "txt"):
            p = f"lora_unet_double_blocks_{i}_{s}_"
            mods += [ModuleShape(p + "attn_qkv", 3 * d, d), ModuleShape(p + "attn_proj", d, d),
                     ModuleShape(p + "mlp_0", h, d), ModuleShape(p + "mlp_2", d, h),
                     ModuleShape(p + "mod_lin", 6 * d, d)]
    for i in range(single):
        p = f"lora_unet_single_blocks_{i}_"
        mods += [ModuleShape(p + "linear1", 3 * d + h, d), ModuleShape(p + "linear2", d, d + h),
                 ModuleShape(p + "modulation_lin", 3 * d, d)]
    if te1:
        mods += _clip("lora_te1_", *te1)
    if te3:
        mods += _t5("lora_te3_", *te3)
    return mods


def wan21(width: int = 5120, ffn: int = 13824, blocks: int = 40, prefix: str = "lora_unet_") -> list[ModuleShape]:
    """kohya-style (musubi-tuner) LoRA on Wan 2.1 T2V 14B: per block self/cross attention q, k, v, o (d->d) and
    the feed-forward ffn_0 (d->ffn), ffn_2 (ffn->d)."""
    d, mods = width, []
    for i in range(blocks):
        p = f"{prefix}blocks_{i}_"
        for a in ("self_attn", "cross_attn"):
            mods += [ModuleShape(p + f"{a}_{n}", d, d) for n in ("q", "k", "v", "o")]
        mods += [ModuleShape(p + "ffn_0", ffn, d), ModuleShape(p + "ffn_2", d, ffn)]
    return mods


def llama(hidden: int = 4096, kv: int = 1024, inter: int = 14336, layers: int = 32) -> list[ModuleShape]:
    """PEFT targets on a Llama-style decoder (Llama-3-8B sizes): q/k/v/o_proj and gate/up/down_proj, named as
    in the model (PEFT's keys add `base_model.model.`)."""
    mods = []
    for i in range(layers):
        p = f"model.layers.{i}."
        mods += [ModuleShape(p + "self_attn.q_proj", hidden, hidden), ModuleShape(p + "self_attn.k_proj", kv, hidden),
                 ModuleShape(p + "self_attn.v_proj", kv, hidden), ModuleShape(p + "self_attn.o_proj", hidden, hidden),
                 ModuleShape(p + "mlp.gate_proj", inter, hidden), ModuleShape(p + "mlp.up_proj", inter, hidden),
                 ModuleShape(p + "mlp.down_proj", hidden, inter)]
    return mods


ARCHS: dict[str, tuple[Callable[..., list[ModuleShape]], str]] = {
    "sd15": (sd15, "kohya"),
    "sdxl": (sdxl, "kohya"),
    "sd3": (sd3, "diffusers"),
    "flux_dev": (flux_dev, "kohya"),
    "wan21": (wan21, "kohya"),
    "llama": (llama, "peft"),
}

# The same names and structure at a tiny width (for tests: every module kept, dims divided down).
TINY: dict[str, dict] = {
    "sd15": dict(ch=(8, 16, 32, 32), ctx=12, te=(16, 12, 32)),
    "sdxl": dict(ch=(8, 16, 32), ctx=24, te1=(16, 12, 32), te2=(16, 32, 40)),
    "sd3": dict(width=16),
    "flux_dev": dict(width=16, te1=(12, 12, 24), te3=(16, 24, 16, 40)),
    "wan21": dict(width=16, ffn=40),
    "llama": dict(hidden=24, kv=8, inter=40),
}
