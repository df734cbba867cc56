"""The 2025-26 diffusion transformers: native module paths and their diffusers names (facts from the model code
and diffusers' own LoRA converters; FORMATS.md §3b)."""
from __future__ import annotations

from .base import Architecture, Mapping, Part, QkvMlp

M = Mapping


def same(*templates: str) -> list[Mapping]:
    """Weights with the same name natively and in diffusers (listed so kohya's flattened names can be read)."""
    return [Mapping(t, (t,)) for t in templates]


def each(prefix: str, *names: str) -> list[str]:
    return [prefix + n for n in names]


QKVO = ("to_q", "to_k", "to_v", "to_out.0")


def clip(component: str) -> Architecture:
    """A CLIP text encoder (CLIP-L, OpenCLIP bigG) as transformers' CLIPTextModel names it, in diffusers pipelines
    and in kohya's `lora_te1_text_model_encoder_layers_0_self_attn_q_proj` alike."""
    return Architecture(component, f"CLIP text encoder ({component})", same(
        *[f"text_model.encoder.layers.{{i}}.{w}" for w in ("self_attn.q_proj", "self_attn.k_proj",
                                                            "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                                                            "mlp.fc2")]), component=component)


def t5(component: str) -> Architecture:
    """A T5 v1.1 encoder (T5-XXL) as transformers' T5EncoderModel names it (`encoder.block.0.layer.0.SelfAttention.q`;
    kohya: `lora_te3_encoder_block_0_layer_0_SelfAttention_q`)."""
    return Architecture(component, f"T5 text encoder ({component})", same(
        *[f"encoder.block.{{i}}.layer.0.SelfAttention.{w}" for w in "qkvo"],
        *[f"encoder.block.{{i}}.layer.1.DenseReluDense.{w}" for w in ("wi_0", "wi_1", "wo")]), component=component)

# Flux.1 and Flux.2 double blocks: the same attention, fused qkv natively, q/k/v in diffusers
FLUX_DOUBLE_ATTENTION = [
    M("double_blocks.{i}.img_attn.qkv", ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                                        "transformer_blocks.{i}.attn.to_v")),
    M("double_blocks.{i}.txt_attn.qkv", ("transformer_blocks.{i}.attn.add_q_proj",
                                        "transformer_blocks.{i}.attn.add_k_proj",
                                        "transformer_blocks.{i}.attn.add_v_proj")),
    M("double_blocks.{i}.img_attn.proj", ("transformer_blocks.{i}.attn.to_out.0",)),
    M("double_blocks.{i}.txt_attn.proj", ("transformer_blocks.{i}.attn.to_add_out",)),
]

FLUX1 = Architecture("flux1", "Flux.1 (dev, Kontext, Chroma)", [
    *FLUX_DOUBLE_ATTENTION,
    M("double_blocks.{i}.img_mlp.0", ("transformer_blocks.{i}.ff.net.0.proj",), shape=lambda o, i: o == 4 * i),
    M("double_blocks.{i}.img_mlp.2", ("transformer_blocks.{i}.ff.net.2",)),
    M("double_blocks.{i}.txt_mlp.0", ("transformer_blocks.{i}.ff_context.net.0.proj",), shape=lambda o, i: o == 4 * i),
    M("double_blocks.{i}.txt_mlp.2", ("transformer_blocks.{i}.ff_context.net.2",)),
    M("double_blocks.{i}.img_mod.lin", ("transformer_blocks.{i}.norm1.linear",)),
    M("double_blocks.{i}.txt_mod.lin", ("transformer_blocks.{i}.norm1_context.linear",)),
    M("single_blocks.{i}.linear1", ("single_transformer_blocks.{i}.attn.to_q", "single_transformer_blocks.{i}.attn.to_k",
                                    "single_transformer_blocks.{i}.attn.to_v", "single_transformer_blocks.{i}.proj_mlp"),
      QkvMlp(4), shape=lambda o, i: o == 7 * i),
    M("single_blocks.{i}.linear2", ("single_transformer_blocks.{i}.proj_out",)),
    M("single_blocks.{i}.modulation.lin", ("single_transformer_blocks.{i}.norm.linear",)),
    M("img_in", ("x_embedder",)),
    M("txt_in", ("context_embedder",)),
    M("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    M("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    M("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    M("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    M("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    M("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    M("final_layer.linear", ("proj_out",)),
    M("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True),  # native (shift, scale); diffusers swaps
], signature=("double_blocks.{i}.img_mlp.0", "single_blocks.{i}.linear1", "double_blocks.{i}.img_attn.qkv"),
   diffusers_signature=("single_transformer_blocks.{i}.proj_mlp", "single_transformer_blocks.{i}.attn.to_q"),
   # sd-scripts networks/lora_flux.py: CLIP-L `lora_te1`, T5-XXL `lora_te3`; ComfyUI comfy/lora.py
   # model_lora_keys_clip also reads OneTrainer's T5 as `lora_te2_`; diffusers FluxPipeline: text_encoder (CLIP),
   # text_encoder_2 (T5); diffusers' FluxLoraLoaderMixin loads transformer and text_encoder only
   parts=(Part(clip("text_encoder"), "lora_te1_"),
          Part(t5("text_encoder_2"), "lora_te3_", "lora_te2_", diffusers=False)))

# Flux.1's q/k RMS norms, which no LoRA trains but a whole checkpoint holds: BFL's `<attn>.norm.query_norm.scale`
# (flux/modules/layers.py QKNorm), diffusers' `attn.norm_q.weight` (scripts/convert_flux_to_diffusers.py). Not in
# ARCHITECTURES: only a checkpoint's conversion reads it (the weight is `scale` natively, `weight` in diffusers).
FLUX1_NORMS = Architecture("flux1_norms", "Flux.1 q/k norms (checkpoints)", [
    M("double_blocks.{i}.img_attn.norm.query_norm", ("transformer_blocks.{i}.attn.norm_q",)),
    M("double_blocks.{i}.img_attn.norm.key_norm", ("transformer_blocks.{i}.attn.norm_k",)),
    M("double_blocks.{i}.txt_attn.norm.query_norm", ("transformer_blocks.{i}.attn.norm_added_q",)),
    M("double_blocks.{i}.txt_attn.norm.key_norm", ("transformer_blocks.{i}.attn.norm_added_k",)),
    M("single_blocks.{i}.norm.query_norm", ("single_transformer_blocks.{i}.attn.norm_q",)),
    M("single_blocks.{i}.norm.key_norm", ("single_transformer_blocks.{i}.attn.norm_k",)),
])

FLUX2 = Architecture("flux2", "Flux.2 (dev, Klein)", [
    *FLUX_DOUBLE_ATTENTION,
    M("double_blocks.{i}.img_mlp.0", ("transformer_blocks.{i}.ff.linear_in",), shape=lambda o, i: o == 6 * i),
    M("double_blocks.{i}.img_mlp.2", ("transformer_blocks.{i}.ff.linear_out",)),
    M("double_blocks.{i}.txt_mlp.0", ("transformer_blocks.{i}.ff_context.linear_in",), shape=lambda o, i: o == 6 * i),
    M("double_blocks.{i}.txt_mlp.2", ("transformer_blocks.{i}.ff_context.linear_out",)),
    M("single_blocks.{i}.linear1", ("single_transformer_blocks.{i}.attn.to_qkv_mlp_proj",),
      shape=lambda o, i: o == 9 * i),
    M("single_blocks.{i}.linear2", ("single_transformer_blocks.{i}.attn.to_out",)),
    M("double_stream_modulation_img.lin", ("double_stream_modulation_img.linear",)),
    M("double_stream_modulation_txt.lin", ("double_stream_modulation_txt.linear",)),
    M("single_stream_modulation.lin", ("single_stream_modulation.linear",)),
    M("img_in", ("x_embedder",)),
    M("txt_in", ("context_embedder",)),
    M("final_layer.linear", ("proj_out",)),
    M("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True),
], signature=("double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin"),
   diffusers_signature=("single_transformer_blocks.{i}.attn.to_qkv_mlp_proj", "transformer_blocks.{i}.ff.linear_in",
                        "double_stream_modulation_img.linear"))

WAN = Architecture("wan", "Wan 2.1 / 2.2", [
    *[M(f"blocks.{{i}}.self_attn.{n}", (f"blocks.{{i}}.attn1.{d}",))
      for n, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))],
    *[M(f"blocks.{{i}}.cross_attn.{n}", (f"blocks.{{i}}.attn2.{d}",))
      for n, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("k_img", "add_k_proj"),
                   ("v_img", "add_v_proj"))],
    M("blocks.{i}.ffn.0", ("blocks.{i}.ffn.net.0.proj",)),
    M("blocks.{i}.ffn.2", ("blocks.{i}.ffn.net.2",)),
    M("text_embedding.0", ("condition_embedder.text_embedder.linear_1",)),
    M("text_embedding.2", ("condition_embedder.text_embedder.linear_2",)),
    M("time_embedding.0", ("condition_embedder.time_embedder.linear_1",)),
    M("time_embedding.2", ("condition_embedder.time_embedder.linear_2",)),
    M("time_projection.1", ("condition_embedder.time_proj",)),
    M("img_emb.proj.1", ("condition_embedder.image_embedder.ff.net.0.proj",)),
    M("img_emb.proj.3", ("condition_embedder.image_embedder.ff.net.2",)),
    M("head.head", ("proj_out",)),
    M("patch_embedding", ("patch_embedding",)),
], signature=("blocks.{i}.self_attn.q", "blocks.{i}.cross_attn.q", "blocks.{i}.ffn.0"),
   diffusers_signature=("blocks.{i}.attn1.to_q", "blocks.{i}.ffn.net.0.proj"))

QWEN = Architecture("qwen_image", "Qwen-Image", same(
    "img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    *each("transformer_blocks.{i}.", *(f"attn.{n}" for n in (*QKVO, "add_q_proj", "add_k_proj", "add_v_proj",
                                                             "to_add_out")),
          "img_mod.1", "txt_mod.1", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")),
    same_names=True,
                    signature=("transformer_blocks.{i}.img_mod.1", "transformer_blocks.{i}.img_mlp.net.0.proj"),
                    diffusers_signature=("transformer_blocks.{i}.img_mod.1", "transformer_blocks.{i}.img_mlp.net.0.proj"))

def _z_image(comfy: bool) -> list[Mapping]:
    """Z-Image's weights: musubi-tuner and diffusers name them alike (attention to_q/to_k/to_v/to_out.0); ComfyUI's
    model fuses the attention's q, k, v into `attention.qkv` and names its output `attention.out`."""
    groups = ("layers", "noise_refiner", "context_refiner")
    fused = []
    if comfy:
        for g in groups:
            p = f"{g}.{{i}}.attention."
            fused += [M(p + "qkv", (p + "to_q", p + "to_k", p + "to_v")), M(p + "out", (p + "to_out.0",))]
    attn = () if comfy else QKVO
    return fused + same(*[f"{g}.{{i}}.{n}" for g in groups
                          for n in (*(f"attention.{t}" for t in attn), "feed_forward.w1", "feed_forward.w2",
                                    "feed_forward.w3", "adaLN_modulation.0")],
                        "t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.1")


Z_IMAGE_SIGNATURE = ("layers.{i}.feed_forward.w1", "noise_refiner.{i}.", "context_refiner.{i}.")
Z_IMAGE = Architecture("z_image", "Z-Image", _z_image(False), same_names=True, signature=Z_IMAGE_SIGNATURE,
                       diffusers_signature=Z_IMAGE_SIGNATURE,
                       comfy=Architecture("z_image", "Z-Image (ComfyUI)", _z_image(True), same_names=True,
                                          signature=("layers.{i}.attention.qkv",)))

LTX2 = Architecture("ltx2", "LTX-2", [
    M("patchify_proj", ("proj_in",)),
    M("audio_patchify_proj", ("audio_proj_in",)),
    *[M(f"{n}adaln_single.{t}", (f"{n}time_embed.{t}",)) for n in ("", "audio_")
      for t in ("linear", "emb.timestep_embedder.linear_1", "emb.timestep_embedder.linear_2")],
    *same(*[f"transformer_blocks.{{i}}.{a}.{t}" for a in ("attn1", "attn2", "audio_attn1", "audio_attn2",
                                                          "audio_to_video_attn", "video_to_audio_attn") for t in QKVO],
          *each("transformer_blocks.{i}.", "ff.net.0.proj", "ff.net.2", "audio_ff.net.0.proj", "audio_ff.net.2"),
          "proj_out", "audio_proj_out", "caption_projection.linear_1", "caption_projection.linear_2",
          "audio_caption_projection.linear_1", "audio_caption_projection.linear_2"),
], same_names=True, signature=("transformer_blocks.{i}.audio_attn1.to_q", "audio_patchify_proj"),
   diffusers_signature=("transformer_blocks.{i}.audio_attn1.to_q", "audio_proj_in"),
   # the text connector: the checkpoint's top-level `text_embedding_projection.*` (musubi-tuner's ComfyUI files key
   # it so, without `diffusion_model.`); diffusers' LTX2 pipeline holds it as `connectors` and renames
   # aggregate_embed to text_proj_in (lora_conversion_utils._convert_non_diffusers_ltx2_lora_to_diffusers)
   parts=(Part(Architecture("connectors", "text connector", [
       M(f"{s}aggregate_embed", (f"{s}text_proj_in",)) for s in ("", "video_", "audio_")], component="connectors"),
       native_prefix="text_embedding_projection."),))

def _hidream_block(p: str, text: bool) -> list[str]:
    attn = ["to_q", "to_k", "to_v", "to_out"] + (["to_q_t", "to_k_t", "to_v_t", "to_out_t"] if text else [])
    ff = [f"ff_i.experts.{{j}}.{w}" for w in ("w1", "w2", "w3")] + [f"ff_i.shared_experts.{w}" for w in ("w1", "w2", "w3")]
    ff += [f"ff_t.{w}" for w in ("w1", "w2", "w3")] if text else []
    return each(p, *(f"attn1.{a}" for a in attn), *ff, "adaLN_modulation.1")


HIDREAM = Architecture("hidream", "HiDream-I1", same(
    *_hidream_block("double_stream_blocks.{i}.block.", True), *_hidream_block("single_stream_blocks.{i}.block.", False),
    "x_embedder.proj", "t_embedder.timestep_embedder.linear_1", "t_embedder.timestep_embedder.linear_2",
    "p_embedder.pooled_embedder.linear_1", "p_embedder.pooled_embedder.linear_2", "caption_projection.{i}.linear",
    "final_layer.linear", "final_layer.adaLN_modulation.1"), same_names=True,
                       signature=("double_stream_blocks.{i}.block.", "single_stream_blocks.{i}.block."),
                       diffusers_signature=("double_stream_blocks.{i}.block.", "single_stream_blocks.{i}.block."))

SD3 = Architecture("sd3", "SD3 / SD3.5", [
    M("joint_blocks.{i}.x_block.attn.qkv", ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                                           "transformer_blocks.{i}.attn.to_v")),
    M("joint_blocks.{i}.x_block.attn.proj", ("transformer_blocks.{i}.attn.to_out.0",)),
    M("joint_blocks.{i}.x_block.attn2.qkv", ("transformer_blocks.{i}.attn2.to_q", "transformer_blocks.{i}.attn2.to_k",
                                            "transformer_blocks.{i}.attn2.to_v")),
    M("joint_blocks.{i}.x_block.attn2.proj", ("transformer_blocks.{i}.attn2.to_out.0",)),
    M("joint_blocks.{i}.x_block.mlp.fc1", ("transformer_blocks.{i}.ff.net.0.proj",)),
    M("joint_blocks.{i}.x_block.mlp.fc2", ("transformer_blocks.{i}.ff.net.2",)),
    M("joint_blocks.{i}.x_block.adaLN_modulation.1", ("transformer_blocks.{i}.norm1.linear",)),
    M("joint_blocks.{i}.context_block.attn.qkv", ("transformer_blocks.{i}.attn.add_q_proj",
                                                 "transformer_blocks.{i}.attn.add_k_proj",
                                                 "transformer_blocks.{i}.attn.add_v_proj")),
    M("joint_blocks.{i}.context_block.attn.proj", ("transformer_blocks.{i}.attn.to_add_out",)),
    M("joint_blocks.{i}.context_block.mlp.fc1", ("transformer_blocks.{i}.ff_context.net.0.proj",)),
    M("joint_blocks.{i}.context_block.mlp.fc2", ("transformer_blocks.{i}.ff_context.net.2",)),
    M("joint_blocks.{i}.context_block.adaLN_modulation.1", ("transformer_blocks.{i}.norm1_context.linear",)),
], signature=("joint_blocks.{i}.x_block.", "joint_blocks.{i}.context_block."), diffusers_signature=(),
   # sd-scripts networks/lora_sd3.py: CLIP-L `lora_te1`, CLIP-G `lora_te2`, T5-XXL `lora_te3` (OneTrainer the same);
   # diffusers StableDiffusion3Pipeline: text_encoder, text_encoder_2, text_encoder_3 (its LoRA loader: the first two)
   parts=(Part(clip("text_encoder"), "lora_te1_"), Part(clip("text_encoder_2"), "lora_te2_"),
          Part(t5("text_encoder_3"), "lora_te3_", diffusers=False)))

def _hv15_stream(s: str, attn: tuple[str, ...], proj: str, ff: str, norm: str, comfy: bool) -> list[Mapping]:
    """One stream (img or txt) of a HunyuanVideo 1.5 double block: musubi-tuner's split attention and `fc1/fc2`,
    `mod.linear` names, or ComfyUI's fused `attn.qkv` and `mlp.0/2`, `mod.lin` (and the `attn_qkv` spelling its key
    map also reads)."""
    p, t = f"double_blocks.{{i}}.{s}_", "transformer_blocks.{i}."
    qkv = tuple(t + f"attn.{a}" for a in attn)
    if comfy:
        return [M(p + "attn.qkv", qkv), M(p + "attn_qkv", qkv), M(p + "attn.proj", (t + f"attn.{proj}",)),
                M(p + "mlp.0", (t + f"{ff}.net.0.proj",)), M(p + "mlp.2", (t + f"{ff}.net.2",)),
                M(p + "mod.lin", (t + f"{norm}.linear",))]
    return [*[M(p + f"attn_{n}", (d,)) for n, d in zip("qkv", qkv)], M(p + "attn_proj", (t + f"attn.{proj}",)),
            M(p + "mlp.fc1", (t + f"{ff}.net.0.proj",)), M(p + "mlp.fc2", (t + f"{ff}.net.2",)),
            M(p + "mod.linear", (t + f"{norm}.linear",))]


def _hv15(comfy: bool) -> list[Mapping]:
    return (_hv15_stream("img", ("to_q", "to_k", "to_v"), "to_out.0", "ff", "norm1", comfy)
            + _hv15_stream("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out", "ff_context",
                           "norm1_context", comfy))


# ComfyUI's own HunyuanVideo 1.5 (its flux-style blocks): it maps no split q/k/v, so a ComfyUI-bound file fuses them
# (down stacked, up block-diagonal; alpha x3 under sd-scripts' rule, as musubi-tuner's converter does)
HUNYUAN_VIDEO15_COMFY = Architecture("hunyuan_video15", "HunyuanVideo 1.5 (ComfyUI)", _hv15(True),
                                     signature=("double_blocks.{i}.img_attn.qkv", "double_blocks.{i}.img_mlp.0"))
HUNYUAN_VIDEO15 = Architecture("hunyuan_video15", "HunyuanVideo 1.5", _hv15(False),
                               signature=("double_blocks.{i}.img_attn_q", "double_blocks.{i}.img_mlp.fc1"),
                               comfy=HUNYUAN_VIDEO15_COMFY)



# ---- the 2026 families (issue 22) ---------------------------------------------------------------------------------

def _krea2_attn_mlp(native: str, diffusers: str) -> list[Mapping]:
    """A Krea 2 block's attention (wq, wk, wv, wo and the output gate) and SwiGLU MLP (gate, up, down), natively and
    in diffusers (Krea2Attention to_q/to_k/to_v/to_out.0/to_gate, Krea2SwiGLU ff.gate/up/down)."""
    attn = (("wq", "to_q"), ("wk", "to_k"), ("wv", "to_v"), ("wo", "to_out.0"), ("gate", "to_gate"))
    return ([M(f"{native}attn.{n}", (f"{diffusers}attn.{d}",)) for n, d in attn]
            + [M(f"{native}mlp.{n}", (f"{diffusers}ff.{n}",)) for n in ("gate", "up", "down")])


# Krea 2 (krea-ai/krea-2): a single-stream DiT with grouped-query attention (wk, wv narrower than wq) and a small
# text-fusion transformer (`txtfusion`: layerwise and refiner blocks, a projector over the tapped text-encoder
# layers). Native names: diffusers' loaders/single_file_utils.py convert_krea2_transformer_checkpoint_to_diffusers;
# the LoRA names (ComfyUI / the reference trainer `diffusion_model.`, ai-toolkit `base_model.model.`) and their
# diffusers names: loaders/lora_conversion_utils.py _convert_non_diffusers_krea2_lora_to_diffusers;
# diffusers' model: models/transformers/transformer_krea2.py Krea2Transformer2DModel.
KREA2 = Architecture("krea2", "Krea 2", [
    *_krea2_attn_mlp("blocks.{i}.", "transformer_blocks.{i}."),
    *_krea2_attn_mlp("txtfusion.layerwise_blocks.{i}.", "text_fusion.layerwise_blocks.{i}."),
    *_krea2_attn_mlp("txtfusion.refiner_blocks.{i}.", "text_fusion.refiner_blocks.{i}."),
    M("txtfusion.projector", ("text_fusion.projector",)),
    M("first", ("img_in",)),
    M("tmlp.0", ("time_embed.linear_1",)),
    M("tmlp.2", ("time_embed.linear_2",)),
    M("tproj.1", ("time_mod_proj",)),
    M("txtmlp.1", ("txt_in.linear_1",)),
    M("txtmlp.3", ("txt_in.linear_2",)),
    M("last.linear", ("final_layer.linear",)),
], signature=("blocks.{i}.attn.wq", "blocks.{i}.attn.gate", "txtfusion.refiner_blocks.{i}.attn.wq"),
   diffusers_signature=("transformer_blocks.{i}.attn.to_gate", "transformer_blocks.{i}.ff.gate",
                        "text_fusion.refiner_blocks.{i}.attn.to_q"))

# Kandinsky 5 (kandinskylab/kandinsky-5; Lite 2B, Pro 19B): text (encoder) blocks and visual (decoder) blocks with
# to_query/to_key/to_value/out_layer attention, in_layer/out_layer feed-forwards and per-block modulations. The
# model code, musubi-tuner (src/musubi_tuner/kandinsky5/models/dit.py, nn.py; networks/lora_kandinsky.py trains the
# blocks' attention and feed-forwards, `lora_unet_`) and diffusers (models/transformers/transformer_kandinsky.py
# Kandinsky5Transformer3DModel) use the same module paths.
KANDINSKY5 = Architecture("kandinsky5", "Kandinsky 5", same(
    *each("text_transformer_blocks.{i}.", "text_modulation.out_layer",
          *(f"self_attention.{t}" for t in ("to_query", "to_key", "to_value", "out_layer")),
          "feed_forward.in_layer", "feed_forward.out_layer"),
    *each("visual_transformer_blocks.{i}.", "visual_modulation.out_layer",
          *(f"{a}.{t}" for a in ("self_attention", "cross_attention")
            for t in ("to_query", "to_key", "to_value", "out_layer")),
          "feed_forward.in_layer", "feed_forward.out_layer"),
    "time_embeddings.in_layer", "time_embeddings.out_layer", "text_embeddings.in_layer",
    "pooled_text_embeddings.in_layer", "visual_embeddings.in_layer", "out_layer.modulation.out_layer",
    "out_layer.out_layer"), same_names=True,
    signature=("visual_transformer_blocks.{i}.cross_attention.to_query",
               "visual_transformer_blocks.{i}.visual_modulation.out_layer",
               "text_transformer_blocks.{i}.self_attention.to_query"),
    diffusers_signature=("visual_transformer_blocks.{i}.cross_attention.to_query",
                         "visual_transformer_blocks.{i}.visual_modulation.out_layer",
                         "text_transformer_blocks.{i}.self_attention.to_query"))


def _anima() -> list[Mapping]:
    """Anima's DiT (NVIDIA Cosmos-Predict2's MiniTrainDIT) under its model code's names and diffusers'
    CosmosTransformer3DModel's (the renames of diffusers' loaders/lora_conversion_utils.py
    _convert_non_diffusers_anima_lora_to_diffusers)."""
    p, t = "blocks.{i}.", "transformer_blocks.{i}."
    attn = (("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"), ("output_proj", "to_out.0"))
    ada = (("self_attn", "norm1"), ("cross_attn", "norm2"), ("mlp", "norm3"))
    return [*[M(f"{p}{a}.{n}", (f"{t}{d_a}.{d}",)) for a, d_a in (("self_attn", "attn1"), ("cross_attn", "attn2"))
              for n, d in attn],
            M(p + "mlp.layer1", (t + "ff.net.0.proj",)), M(p + "mlp.layer2", (t + "ff.net.2",)),
            *[M(f"{p}adaln_modulation_{a}.{j}", (f"{t}{n}.linear_{j}",)) for a, n in ada for j in (1, 2)],
            M("x_embedder.proj.1", ("patch_embed.proj",)),
            M("t_embedder.1.linear_1", ("time_embed.t_embedder.linear_1",)),
            M("t_embedder.1.linear_2", ("time_embed.t_embedder.linear_2",)),
            M("final_layer.linear", ("proj_out",)),
            M("final_layer.adaln_modulation.1", ("norm_out.linear_1",)),
            M("final_layer.adaln_modulation.2", ("norm_out.linear_2",))]


# Anima (circlestone-labs): the Cosmos-Predict2 2B DiT with an LLM adapter. sd-scripts (networks/lora_anima.py:
# `lora_unet_` + the module path, its blocks by default) and its ComfyUI converter (networks/
# convert_anima_lora_to_comfy.py: `diffusion_model.<path>`); ComfyUI's model: comfy/ldm/anima/model.py. The LLM
# adapter (`llm_adapter.*`, diffusers' separate `text_conditioner` component) and the Qwen3 text encoder
# (`lora_te_`) are not mapped: their modules resize, but do not convert.
ANIMA = Architecture("anima", "Anima", _anima(),
                     signature=("blocks.{i}.self_attn.output_proj", "blocks.{i}.mlp.layer1",
                                "blocks.{i}.cross_attn.output_proj"),
                     diffusers_signature=("transformer_blocks.{i}.norm1.linear_1",
                                          "transformer_blocks.{i}.norm3.linear_2"))


def _hunyuan_image(comfy: bool) -> list[Mapping]:
    """HunyuanImage 2.1's double blocks (image and text streams: fused attention qkv, proj, MLP, modulation) and
    single blocks (linear1 = q, k, v and the MLP in, 3d + 4d rows; linear2; modulation), under sd-scripts' names
    (library/hunyuan_image_modules.py MMDoubleStreamBlock / MMSingleStreamBlock: `img_attn_qkv`, `img_mlp.fc1`,
    `img_mod.linear`, `modulation.linear`) or ComfyUI's (`img_attn.qkv`, `img_mlp.0`, `img_mod.lin`,
    `modulation.lin`: sd-scripts' networks/convert_hunyuan_image_lora_to_comfy.py), and diffusers'
    (models/transformers/transformer_hunyuanimage.py HunyuanImageTransformerBlock / SingleTransformerBlock)."""
    d, s = "double_blocks.{i}.", "single_blocks.{i}."
    t, u = "transformer_blocks.{i}.", "single_transformer_blocks.{i}."
    qkv, proj, fc1, fc2, mod, smod = (("attn.qkv", "attn.proj", "mlp.0", "mlp.2", "mod.lin", "modulation.lin") if comfy
                                      else ("attn_qkv", "attn_proj", "mlp.fc1", "mlp.fc2", "mod.linear",
                                            "modulation.linear"))
    out = []
    for stream, attn, o, ff, norm in (("img", ("to_q", "to_k", "to_v"), "to_out.0", "ff", "norm1"),
                                      ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out", "ff_context",
                                       "norm1_context")):
        out += [M(f"{d}{stream}_{qkv}", tuple(f"{t}attn.{a}" for a in attn)),
                M(f"{d}{stream}_{proj}", (f"{t}attn.{o}",)),
                M(f"{d}{stream}_{fc1}", (f"{t}{ff}.net.0.proj",), shape=lambda o_, i_: o_ == 4 * i_),
                M(f"{d}{stream}_{fc2}", (f"{t}{ff}.net.2",)),
                M(f"{d}{stream}_{mod}", (f"{t}{norm}.linear",))]
    return out + [M(s + "linear1", (u + "attn.to_q", u + "attn.to_k", u + "attn.to_v", u + "proj_mlp"), QkvMlp(4),
                    shape=lambda o_, i_: o_ == 7 * i_),
                  M(s + "linear2", (u + "proj_out",)),
                  M(s + smod, (u + "norm.linear",))]


# ComfyUI's names are Flux.1's (its HunyuanImage 2.1 runs on flux-style blocks), and sd-scripts' double-block names
# are HunyuanVideo 1.5's (flattened, `img_attn_qkv` too): only the single blocks' `modulation.linear` is this
# family's own. A file without it and without metadata reads as Flux.1 or HunyuanVideo 1.5, which key the same
# diffusers weights; the metadata (sd-scripts' modelspec `hunyuan-image-2.1`) or --arch tells them apart.
HUNYUAN_IMAGE_COMFY = Architecture("hunyuan_image", "HunyuanImage 2.1 (ComfyUI)", _hunyuan_image(True))
HUNYUAN_IMAGE = Architecture("hunyuan_image", "HunyuanImage 2.1", _hunyuan_image(False),
                             signature=("single_blocks.{i}.modulation.linear",), comfy=HUNYUAN_IMAGE_COMFY)

def _hidream_o1(prefix: str) -> list[Mapping]:
    """HiDream-O1's weights under `prefix` + the model's paths: the Qwen3-VL decoder layers' attention and MLP, the
    pixel patch embedding (x_embedder: proj1 down to a bottleneck, proj2 up), the timestep embedder and the final
    layer; diffusers' HiDreamO1Transformer2DModel keeps them under `model.`, as musubi-tuner's does."""
    layer = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")
    paths = [f"language_model.layers.{{i}}.{w}" for w in layer] + [
        "x_embedder.proj1", "x_embedder.proj2", "t_embedder1.mlp.0", "t_embedder1.mlp.2", "final_layer2.linear"]
    return [M(prefix + p, ("model." + p,)) for p in paths]


# HiDream-O1-Image (HiDream-ai): a pixel-space DiT on the Qwen3-VL-8B decoder. musubi-tuner trains the decoder
# layers and the pixel patch embedding / final layer (networks/lora_hidream_o1.py) of its Qwen3VLForConditional-
# Generation, so its names carry `model.` (`lora_unet_model_language_model_layers_0_self_attn_q_proj`; its
# hidream_o1_utils.py normalize_single_checkpoint_state_dict adds `model.` to Comfy-Org's checkpoint keys); ComfyUI's
# model (comfy/ldm/hidream_o1/model.py HiDreamO1Transformer) has the same modules without it; diffusers' model:
# models/transformers/transformer_hidream_o1.py (no LoRA loader there). The vision tower (reference-image
# training) is not mapped.
HIDREAM_O1_COMFY = Architecture("hidream_o1", "HiDream-O1 (ComfyUI)", _hidream_o1(""),
                                signature=("language_model.layers.{i}.self_attn.q_proj", "x_embedder.proj1",
                                           "final_layer2.linear"))
HIDREAM_O1 = Architecture("hidream_o1", "HiDream-O1", _hidream_o1("model."),
                          signature=("model.language_model.layers.{i}.self_attn.q_proj", "model.x_embedder.proj1",
                                     "model.final_layer2.linear"),
                          diffusers_signature=("model.language_model.layers.{i}.self_attn.q_proj",
                                               "model.x_embedder.proj1"),
                          comfy=HIDREAM_O1_COMFY)

ARCHITECTURES = (FLUX1, FLUX2, WAN, QWEN, Z_IMAGE, LTX2, HIDREAM, SD3, HUNYUAN_VIDEO15, KREA2, KANDINSKY5, ANIMA,
                 HUNYUAN_IMAGE, HIDREAM_O1)
