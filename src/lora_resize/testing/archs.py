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
    """A layer to adapt: its name, output features, input channels, and for a conv its kernel (a square size, or
    the kernel's dims: (kt, kh, kw) for a conv3d)."""
    name: str
    out: int
    inp: int
    kernel: int | tuple[int, ...] = 1
    conv: bool = False

    @property
    def kernel_dims(self) -> tuple[int, ...]:
        """The conv kernel's dims, () for a linear layer."""
        if not self.conv:
            return ()
        return tuple(self.kernel) if isinstance(self.kernel, tuple) else (self.kernel, self.kernel)

    @property
    def flat_in(self) -> int:
        """Input channels times the kernel's size: the columns of the layer's update as a matrix."""
        n = self.inp
        for k in self.kernel_dims:
            n *= k
        return n

    @property
    def spatial(self) -> bool:
        """A conv whose kernel is more than 1x1 (what --conv-rank and LoCon's conv_dim are about)."""
        return any(k > 1 for k in self.kernel_dims)


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


# ----------------------------------------------------------------------------------------------------------------
# 2025-26 DiTs under their native module paths (the model code's names, as ComfyUI's `diffusion_model.<path>` and
# kohya/musubi's `lora_unet_<path with _>` key them; FORMATS.md §3b). Every size is a parameter: the defaults are
# the real model's, and the same structure at a tiny width keeps the ratios (fused widths, MLP ratios, gated MLPs,
# experts).


def _lin(path: str, out: int, inp: int) -> ModuleShape:
    return ModuleShape(path, out, inp)


def flux1(width: int = 3072, double: int = 19, single: int = 38, mlp_ratio: int = 4, chroma: bool = False,
          in_channels: int = 64, context: int = 4096) -> list[ModuleShape]:
    """Flux.1 dev / Kontext (same modules) or Chroma (`chroma`: no modulation layers): per double block the image
    and text streams' attention qkv (d -> 3d) and proj, MLP 0 (d -> 4d) and 2, modulation lin (d -> 6d); per single
    block linear1 (d -> 3d + 4d: q, k, v, MLP), linear2 (d + 4d -> d), modulation lin (d -> 3d)."""
    d, h = width, mlp_ratio * width
    mods = [_lin("img_in", d, in_channels), _lin("txt_in", d, context)]
    for i in range(double):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}_"
            mods += [_lin(p + "attn.qkv", 3 * d, d), _lin(p + "attn.proj", d, d), _lin(p + "mlp.0", h, d),
                     _lin(p + "mlp.2", d, h)]
            if not chroma:
                mods.append(_lin(p + "mod.lin", 6 * d, d))
    for i in range(single):
        p = f"single_blocks.{i}."
        mods += [_lin(p + "linear1", 3 * d + h, d), _lin(p + "linear2", d, d + h)]
        if not chroma:
            mods.append(_lin(p + "modulation.lin", 3 * d, d))
    return mods


def flux2(width: int = 6144, double: int = 8, single: int = 48, mlp_ratio: int = 3, in_channels: int = 128,
          context: int = 15360) -> list[ModuleShape]:
    """Flux.2 dev (Klein 9B: width 4096, 8 + 24 blocks; Klein 4B: 3072, 5 + 20): no biases, SwiGLU MLPs
    (img_mlp.0: d -> 2 x 3d, img_mlp.2: 3d -> d), single-block linear1 d -> 3d + 6d, linear2 4d -> d, and the
    modulations shared by all blocks of a kind."""
    d, h = width, mlp_ratio * width
    mods = [_lin("img_in", d, in_channels), _lin("txt_in", d, context),
            _lin("double_stream_modulation_img.lin", 6 * d, d), _lin("double_stream_modulation_txt.lin", 6 * d, d),
            _lin("single_stream_modulation.lin", 3 * d, d)]
    for i in range(double):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}_"
            mods += [_lin(p + "attn.qkv", 3 * d, d), _lin(p + "attn.proj", d, d), _lin(p + "mlp.0", 2 * h, d),
                     _lin(p + "mlp.2", d, h)]
    for i in range(single):
        p = f"single_blocks.{i}."
        mods += [_lin(p + "linear1", 3 * d + 2 * h, d), _lin(p + "linear2", d, d + h)]
    return mods


def qwen_image(width: int = 3072, blocks: int = 60, text: int = 3584, in_channels: int = 64) -> list[ModuleShape]:
    """Qwen-Image (and -Edit): the same names native and in diffusers; image and text streams per block."""
    d = width
    mods = [_lin("img_in", d, in_channels), _lin("txt_in", d, text)]
    for i in range(blocks):
        p = f"transformer_blocks.{i}."
        mods += [_lin(p + f"attn.{n}", d, d) for n in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                       "add_k_proj", "add_v_proj", "to_add_out")]
        for s in ("img", "txt"):
            mods += [_lin(p + f"{s}_mod.1", 6 * d, d), _lin(p + f"{s}_mlp.net.0.proj", 4 * d, d),
                     _lin(p + f"{s}_mlp.net.2", d, 4 * d)]
    return mods


def z_image(dim: int = 3840, layers: int = 30, refiners: int = 2, ffn: int = 10240) -> list[ModuleShape]:
    """Z-Image: layers, noise refiners and context refiners (no modulation) of attention q/k/v/out and a gated
    feed-forward (w1, w3: d -> ffn; w2); adaLN_modulation.0 reads min(d, 256) features."""
    mods = []
    for group, n, ada in (("layers", layers, True), ("noise_refiner", refiners, True),
                          ("context_refiner", refiners, False)):
        for i in range(n):
            p = f"{group}.{i}."
            mods += [_lin(p + f"attention.{t}", dim, dim) for t in ("to_q", "to_k", "to_v", "to_out.0")]
            mods += [_lin(p + "feed_forward.w1", ffn, dim), _lin(p + "feed_forward.w2", dim, ffn),
                     _lin(p + "feed_forward.w3", ffn, dim)]
            if ada:
                mods.append(_lin(p + "adaLN_modulation.0", 4 * dim, min(dim, 256)))
    return mods


def wan(width: int = 5120, ffn: int = 13824, blocks: int = 40, i2v: bool = False, text: int = 4096,
        in_channels: int = 16, out_channels: int = 16, patch: tuple[int, int, int] = (1, 2, 2),
        freq: int = 256) -> list[ModuleShape]:
    """Wan 2.1 / 2.2 (14B defaults; 1.3B: 1536, 8960, 30): per block self and cross attention q, k, v, o (I2V adds
    cross_attn.k_img / v_img), ffn.0 (d -> ffn), ffn.2; time_projection.1 (d -> 6d), the text and time
    embeddings, head.head, and patch_embedding, a Conv3d with a (1, 2, 2) kernel."""
    d = width
    kernel = 1
    for k in patch:
        kernel *= k
    mods = [ModuleShape("patch_embedding", d, in_channels, tuple(patch), True),
            _lin("text_embedding.0", d, text), _lin("text_embedding.2", d, d), _lin("time_embedding.0", d, freq),
            _lin("time_embedding.2", d, d), _lin("time_projection.1", 6 * d, d),
            _lin("head.head", out_channels * kernel, d)]
    for i in range(blocks):
        p = f"blocks.{i}."
        for a in ("self_attn", "cross_attn"):
            mods += [_lin(p + f"{a}.{n}", d, d) for n in ("q", "k", "v", "o")]
        if i2v:
            mods += [_lin(p + "cross_attn.k_img", d, d), _lin(p + "cross_attn.v_img", d, d)]
        mods += [_lin(p + "ffn.0", ffn, d), _lin(p + "ffn.2", d, ffn)]
    return mods


def hunyuan_video15(width: int = 2048, blocks: int = 54, mlp_ratio: int = 4) -> list[ModuleShape]:
    """HunyuanVideo 1.5 under its native names as musubi-tuner trains it: split img_attn_q/k/v, img_attn_proj,
    img_mlp.fc1 (d -> 4d) / fc2, img_mod.linear (d -> 6d), and the same for txt."""
    d, h = width, mlp_ratio * width
    mods = []
    for i in range(blocks):
        p = f"double_blocks.{i}."
        for s in ("img", "txt"):
            mods += [_lin(p + f"{s}_attn_{n}", d, d) for n in ("q", "k", "v", "proj")]
            mods += [_lin(p + f"{s}_mlp.fc1", h, d), _lin(p + f"{s}_mlp.fc2", d, h),
                     _lin(p + f"{s}_mod.linear", 6 * d, d)]
    return mods


def ltx2(width: int = 4096, audio: int = 2048, blocks: int = 48, in_channels: int = 128,
         audio_in: int = 128) -> list[ModuleShape]:
    """LTX-2: video and audio streams per block: self attention (attn1, audio_attn1), cross attention to text
    (attn2, audio_attn2), audio_to_video_attn (q from video), video_to_audio_attn (k, v from video), and their
    feed-forwards (4x); patchify_proj and audio_patchify_proj."""
    v, a = width, audio
    mods = [_lin("patchify_proj", v, in_channels), _lin("audio_patchify_proj", a, audio_in)]
    for i in range(blocks):
        p = f"transformer_blocks.{i}."
        for att, w in (("attn1", v), ("attn2", v), ("audio_attn1", a), ("audio_attn2", a)):
            mods += [_lin(p + f"{att}.{n}", w, w) for n in ("to_q", "to_k", "to_v", "to_out.0")]
        mods += [_lin(p + "audio_to_video_attn.to_q", a, v), _lin(p + "audio_to_video_attn.to_k", a, a),
                 _lin(p + "audio_to_video_attn.to_v", a, a), _lin(p + "audio_to_video_attn.to_out.0", v, a),
                 _lin(p + "video_to_audio_attn.to_q", a, a), _lin(p + "video_to_audio_attn.to_k", a, v),
                 _lin(p + "video_to_audio_attn.to_v", a, v), _lin(p + "video_to_audio_attn.to_out.0", a, a),
                 _lin(p + "ff.net.0.proj", 4 * v, v), _lin(p + "ff.net.2", v, 4 * v),
                 _lin(p + "audio_ff.net.0.proj", 4 * a, a), _lin(p + "audio_ff.net.2", a, 4 * a)]
    return mods


def hidream(width: int = 2560, double: int = 16, single: int = 32, experts: int = 4, ffn: int = 6912
            ) -> list[ModuleShape]:
    """HiDream-I1: mixture-of-experts feed-forwards (ff_i.experts.e and ff_i.shared_experts: w1, w3 d -> ffn,
    w2), the text stream's ff_t and attention (to_q_t, ...) in double blocks; adaLN_modulation.1 (d -> 12d double,
    6d single)."""
    d = width

    def moe(p: str) -> list[ModuleShape]:
        out = []
        for e in [f"experts.{j}" for j in range(experts)] + ["shared_experts"]:
            out += [_lin(p + f"ff_i.{e}.w1", ffn, d), _lin(p + f"ff_i.{e}.w2", d, ffn), _lin(p + f"ff_i.{e}.w3", ffn, d)]
        return out
    mods = []
    for i in range(double):
        p = f"double_stream_blocks.{i}.block."
        mods += [_lin(p + f"attn1.{n}", d, d) for n in ("to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t",
                                                        "to_v_t", "to_out_t")]
        mods += moe(p) + [_lin(p + "ff_t.w1", ffn, d), _lin(p + "ff_t.w2", d, ffn), _lin(p + "ff_t.w3", ffn, d),
                          _lin(p + "adaLN_modulation.1", 12 * d, d)]
    for i in range(single):
        p = f"single_stream_blocks.{i}.block."
        mods += [_lin(p + f"attn1.{n}", d, d) for n in ("to_q", "to_k", "to_v", "to_out")]
        mods += moe(p) + [_lin(p + "adaLN_modulation.1", 6 * d, d)]
    return mods


def sd35(width: int = 2432, blocks: int = 38) -> list[ModuleShape]:
    """SD3.5 (Large; Medium: 1536, 24) MMDiT under its native names: per joint block x_block and context_block
    attn.qkv (d -> 3d), attn.proj, mlp.fc1 (d -> 4d), mlp.fc2, adaLN_modulation.1 (d -> 6d); the last context
    block is pre-only (adaLN d -> 2d, no proj or MLP)."""
    d = width
    mods = []
    for i in range(blocks):
        for b in ("x_block", "context_block"):
            p = f"joint_blocks.{i}.{b}."
            if b == "context_block" and i == blocks - 1:
                mods += [_lin(p + "attn.qkv", 3 * d, d), _lin(p + "adaLN_modulation.1", 2 * d, d)]
                continue
            mods += [_lin(p + "attn.qkv", 3 * d, d), _lin(p + "attn.proj", d, d), _lin(p + "mlp.fc1", 4 * d, d),
                     _lin(p + "mlp.fc2", d, 4 * d), _lin(p + "adaLN_modulation.1", 6 * d, d)]
    return mods



# 2026 families (issue 22): sources cited at each family's Architecture in models/dit.py.


def krea2(width: int = 6144, heads: int = 48, kv_heads: int = 12, blocks: int = 28, ffn: int = 16384,
          text: int = 2560, text_heads: int = 20, text_kv_heads: int = 20, text_ffn: int = 6912, text_layers: int = 12,
          fusion_blocks: int = 2, in_channels: int = 64, freq: int = 256) -> list[ModuleShape]:
    """Krea 2 under its native names: per block grouped-query attention (wq, wo, gate: d -> d; wk, wv: d -> d *
    kv_heads / heads) and a SwiGLU MLP (gate, up: d -> ffn; down); the text fusion's layerwise and refiner blocks
    (the same at the text width) and its projector over the `text_layers` tapped layers (text_layers -> 1); the
    embedders first (in -> d), tmlp (freq -> d -> d), tproj.1 (d -> 6d), txtmlp (text -> d -> d) and last.linear."""
    d = width

    def block(p: str, w: int, h: int, kv: int, f: int) -> list[ModuleShape]:
        return ([_lin(p + "attn.wq", w, w), _lin(p + "attn.wk", w * kv // h, w), _lin(p + "attn.wv", w * kv // h, w),
                 _lin(p + "attn.wo", w, w), _lin(p + "attn.gate", w, w)]
                + [_lin(p + f"mlp.{n}", f, w) for n in ("gate", "up")] + [_lin(p + "mlp.down", w, f)])
    mods = [_lin("first", d, in_channels), _lin("tmlp.0", d, freq), _lin("tmlp.2", d, d), _lin("tproj.1", 6 * d, d),
            _lin("txtmlp.1", d, text), _lin("txtmlp.3", d, d), _lin("last.linear", in_channels, d),
            _lin("txtfusion.projector", 1, text_layers)]
    for kind in ("layerwise_blocks", "refiner_blocks"):
        for i in range(fusion_blocks):
            mods += block(f"txtfusion.{kind}.{i}.", text, text_heads, text_kv_heads, text_ffn)
    for i in range(blocks):
        mods += block(f"blocks.{i}.", d, heads, kv_heads, ffn)
    return mods


def kandinsky5(width: int = 1792, ffn: int = 7168, time: int = 512, text: int = 3584, pooled: int = 768,
               text_blocks: int = 2, visual_blocks: int = 32, visual_in: int = 132, visual_out: int = 64
               ) -> list[ModuleShape]:
    """Kandinsky 5 (Video Lite's config: width 1792, 28 heads of 64; its visual input is 2 x 16 + 1 channels of a
    1x2x2 patch): text blocks (text_modulation.out_layer: time -> 6d, self attention, feed-forward d -> ffn -> d),
    visual blocks (visual_modulation.out_layer: time -> 9d, self and cross attention, feed-forward), the embeddings
    (time_embeddings d -> time -> time, text text -> d, pooled -> time, visual) and the out layer."""
    d = width
    attn = ("to_query", "to_key", "to_value", "out_layer")
    mods = [_lin("time_embeddings.in_layer", time, d), _lin("time_embeddings.out_layer", time, time),
            _lin("text_embeddings.in_layer", d, text), _lin("pooled_text_embeddings.in_layer", time, pooled),
            _lin("visual_embeddings.in_layer", d, visual_in), _lin("out_layer.modulation.out_layer", 2 * d, time),
            _lin("out_layer.out_layer", visual_out, d)]
    ff = [("feed_forward.in_layer", ffn, d), ("feed_forward.out_layer", d, ffn)]
    for i in range(text_blocks):
        p = f"text_transformer_blocks.{i}."
        mods += [_lin(p + "text_modulation.out_layer", 6 * d, time)]
        mods += [_lin(p + f"self_attention.{t}", d, d) for t in attn] + [_lin(p + n, o, k) for n, o, k in ff]
    for i in range(visual_blocks):
        p = f"visual_transformer_blocks.{i}."
        mods += [_lin(p + "visual_modulation.out_layer", 9 * d, time)]
        mods += [_lin(p + f"{a}.{t}", d, d) for a in ("self_attention", "cross_attention") for t in attn]
        mods += [_lin(p + n, o, k) for n, o, k in ff]
    return mods


def anima(width: int = 2048, blocks: int = 28, context: int = 1024, adaln: int = 256, in_flat: int = 68,
          out_flat: int = 64, mlp_ratio: int = 4) -> list[ModuleShape]:
    """Anima's DiT (Cosmos-Predict2 2B): per block self attention q/k/v/output_proj (d -> d), cross attention
    (k_proj, v_proj read the `context`-wide text), mlp.layer1 (d -> 4d) / layer2, and the three low-rank adaLN
    modulations (.1: d -> adaln, .2: adaln -> 3d); x_embedder.proj.1 ((16 + 1 mask channels) x 1x2x2 -> d),
    t_embedder.1 (d -> d -> 3d), the final layer (linear d -> 64, adaLN d -> adaln -> 2d)."""
    d, h = width, mlp_ratio * width
    mods = [_lin("x_embedder.proj.1", d, in_flat), _lin("t_embedder.1.linear_1", d, d),
            _lin("t_embedder.1.linear_2", 3 * d, d), _lin("final_layer.linear", out_flat, d),
            _lin("final_layer.adaln_modulation.1", adaln, d), _lin("final_layer.adaln_modulation.2", 2 * d, adaln)]
    for i in range(blocks):
        p = f"blocks.{i}."
        mods += [_lin(p + f"self_attn.{n}", d, d) for n in ("q_proj", "k_proj", "v_proj", "output_proj")]
        mods += [_lin(p + "cross_attn.q_proj", d, d), _lin(p + "cross_attn.k_proj", d, context),
                 _lin(p + "cross_attn.v_proj", d, context), _lin(p + "cross_attn.output_proj", d, d),
                 _lin(p + "mlp.layer1", h, d), _lin(p + "mlp.layer2", d, h)]
        for a in ("self_attn", "cross_attn", "mlp"):
            mods += [_lin(p + f"adaln_modulation_{a}.1", adaln, d), _lin(p + f"adaln_modulation_{a}.2", 3 * d, adaln)]
    return mods


def hunyuan_image(width: int = 3584, double: int = 20, single: int = 40, mlp_ratio: int = 4) -> list[ModuleShape]:
    """HunyuanImage 2.1 under sd-scripts' names (networks/lora_hunyuan_image.py trains the double and single
    blocks): per double block img/txt mod.linear (d -> 6d), attn_qkv (d -> 3d), attn_proj, mlp.fc1 (d -> 4d), fc2;
    per single block linear1 (d -> 3d + 4d), linear2 (d + 4d -> d), modulation.linear (d -> 3d)."""
    d, h = width, mlp_ratio * width
    mods = []
    for i in range(double):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}_"
            mods += [_lin(p + "mod.linear", 6 * d, d), _lin(p + "attn_qkv", 3 * d, d), _lin(p + "attn_proj", d, d),
                     _lin(p + "mlp.fc1", h, d), _lin(p + "mlp.fc2", d, h)]
    for i in range(single):
        p = f"single_blocks.{i}."
        mods += [_lin(p + "linear1", 3 * d + h, d), _lin(p + "linear2", d, d + h),
                 _lin(p + "modulation.linear", 3 * d, d)]
    return mods



def hidream_o1(width: int = 4096, heads: int = 32, kv_heads: int = 8, layers: int = 36, ffn: int = 12288,
               patch: int = 32, freq: int = 256, prefix: str = "model.") -> list[ModuleShape]:
    """HiDream-O1 (Qwen3-VL-8B decoder) under musubi-tuner's names (`prefix` "model."; ComfyUI's model: ""): per
    decoder layer q_proj, o_proj (d -> d), k_proj, v_proj (d -> d * kv_heads / heads), the SwiGLU MLP (gate, up:
    d -> ffn; down); x_embedder.proj1 (3 x patch^2 RGB values -> d / 4), proj2 (d / 4 -> d), t_embedder1.mlp
    (freq -> d -> d) and final_layer2.linear (d -> 3 x patch^2)."""
    d, kv, pix = width, width * kv_heads // heads, 3 * patch * patch
    mods = [_lin(prefix + "x_embedder.proj1", d // 4, pix), _lin(prefix + "x_embedder.proj2", d, d // 4),
            _lin(prefix + "t_embedder1.mlp.0", d, freq), _lin(prefix + "t_embedder1.mlp.2", d, d),
            _lin(prefix + "final_layer2.linear", pix, d)]
    for i in range(layers):
        p = f"{prefix}language_model.layers.{i}."
        mods += [_lin(p + "self_attn.q_proj", d, d), _lin(p + "self_attn.k_proj", kv, d),
                 _lin(p + "self_attn.v_proj", kv, d), _lin(p + "self_attn.o_proj", d, d),
                 _lin(p + "mlp.gate_proj", ffn, d), _lin(p + "mlp.up_proj", ffn, d), _lin(p + "mlp.down_proj", d, ffn)]
    return mods


# The 2025-26 families at a tiny width, with the layouts their trainers write (loras.STYLES).
NATIVE: dict[str, tuple[Callable[..., list[ModuleShape]], dict, tuple[str, ...]]] = {
    "flux1": (flux1, dict(width=16, double=1, single=1, in_channels=4, context=12),
              ("musubi", "comfy", "ai_toolkit")),
    "chroma": (flux1, dict(width=16, double=1, single=1, chroma=True, in_channels=4, context=12),
               ("musubi", "comfy", "ai_toolkit")),
    "flux2": (flux2, dict(width=16, double=1, single=1, in_channels=4, context=12), ("musubi", "comfy", "ai_toolkit")),
    "qwen_image": (qwen_image, dict(width=16, blocks=1, text=12, in_channels=16),
                   ("musubi", "comfy", "ai_toolkit", "diffsynth")),
    "z_image": (z_image, dict(dim=16, layers=1, refiners=1, ffn=42), ("musubi", "comfy", "ai_toolkit", "diffsynth")),
    "wan": (wan, dict(width=16, ffn=32, blocks=1, text=12, in_channels=4, out_channels=4, freq=8),
            ("musubi", "musubi__", "comfy", "ai_toolkit", "diffsynth", "peft_dump")),
    "wan_i2v": (wan, dict(width=16, ffn=32, blocks=1, i2v=True, text=12, in_channels=8, out_channels=4, freq=8),
                ("musubi", "comfy", "ai_toolkit")),
    "hunyuan_video15": (hunyuan_video15, dict(width=16, blocks=1), ("musubi", "comfy", "ai_toolkit")),
    "ltx2": (ltx2, dict(width=16, audio=8, blocks=1, in_channels=4, audio_in=4), ("comfy", "ai_toolkit")),
    "hidream": (hidream, dict(width=16, double=1, single=1, ffn=256), ("comfy", "ai_toolkit")),
    "sd35": (sd35, dict(width=16, blocks=2), ("musubi", "comfy", "ai_toolkit")),
    # musubi-tuner (networks.lora_krea2: every Linear), ComfyUI / Krea's trainer `diffusion_model.`, ai-toolkit
    # `diffusion_model.` A/B and `base_model.model.`
    "krea2": (krea2, dict(width=16, heads=2, kv_heads=1, blocks=1, ffn=40, text=8, text_heads=2, text_kv_heads=2,
                          text_ffn=24, text_layers=3, fusion_blocks=1, in_channels=4, freq=8),
              ("musubi", "comfy", "ai_toolkit", "peft")),
    "kandinsky5": (kandinsky5, dict(width=16, ffn=40, time=8, text=12, pooled=12, text_blocks=1, visual_blocks=1,
                                    visual_in=16, visual_out=16), ("musubi", "comfy")),
    # sd-scripts `lora_unet_`, its ComfyUI converter's `diffusion_model.` (written here in both key forms)
    "anima": (anima, dict(width=16, blocks=1, context=12, adaln=8, in_flat=20, out_flat=16),
              ("musubi", "comfy", "ai_toolkit")),
    "hunyuan_image": (hunyuan_image, dict(width=16, double=1, single=1), ("musubi",)),
    "hidream_o1": (hidream_o1, dict(width=16, heads=2, kv_heads=1, layers=1, ffn=40, patch=2, freq=8),
                   ("musubi",)),
}


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
