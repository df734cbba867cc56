"""Tiny diffusers pipelines with random weights, built from configs (no download): an SD1.5-like one (UNet + CLIP-L),
an SDXL-like one (two CLIP text encoders, the second with a projection) and a Flux.1-like one (MMDiT transformer,
CLIP + T5), each at a few thousand parameters per module so that one 32x32 render takes well under a second on a
CPU; savers for the two forms users have a base model in (a diffusers folder; one single-file checkpoint in the
original LDM / sgm / BFL key layout); and a kohya-named LoRA for each with decaying spectra.

    pipe = tiny_pipeline("sd1" | "sdxl" | "flux", seed=0)
    save_folder(pipe, path) -> path;  save_single_file(pipe, path) -> path
    tiny_lora(pipe, path, rank=8, seed=0, text_encoder=True, strength=0.5, decay=0.7, alpha=None) -> path
    lora_targets(pipe, text_encoder=True) -> {kohya name: base weight};  merge_lora(pipe, tensors) (the reference)

diffusers and transformers are imported inside the functions: the core install does not need them."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..io.writer import write_safetensors
from ..models import sd as sd_names
from ..models.dit import FLUX1, FLUX1_NORMS

FAMILIES = ("sd1", "sdxl", "flux")
SIZE = 32  # the pixel size the tiny pipelines are built for (the VAE downsamples by 2: 16x16 latents)
_CLIP_WIDTH = 32
_CLIP2_WIDTH = 48  # SDXL's second (OpenCLIP bigG-like) text encoder
_CLIP_MAX = 77  # CLIP's context length, which SD pipelines pad every prompt to


def _byte_chars() -> list[str]:
    """The 256 printable characters byte-level BPE maps the bytes to (GPT-2's / CLIP's `bytes_to_unicode`)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + n))
            n += 1
    return chars


def clip_tokenizer(max_length: int = _CLIP_MAX) -> Any:
    """A CLIP tokenizer (transformers' CLIPTokenizer, byte-level BPE) loaded offline from a vocab.json and an empty
    merges.txt written here: every byte character alone and at a word's end (`</w>`), and CLIP's start/end tokens
    (each character a token). Ids stay below 514, so any text encoder with vocab_size >= 514 takes them."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    with tempfile.TemporaryDirectory() as d:
        Path(d, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        Path(d, "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(d, model_max_length=max_length, local_files_only=True)


def t5_tokenizer(max_length: int = 64) -> Any:
    """A T5 tokenizer (transformers' T5TokenizerFast) loaded offline from a tokenizer.json written here - the
    `tokenizers` library's serialized form (format "1.0") of a Unigram model like T5's sentencepiece one, with no
    sentencepiece file: T5's <pad>/</s>/<unk> (ids 0, 1, 2), the word-start mark `▁` and the printable ASCII
    characters alone and after the mark; words split and marked as sentencepiece does (Metaspace), each text
    ending in </s>."""
    from transformers import T5TokenizerFast

    mark = "\u2581"
    vocab = [["<pad>", 0.0], ["</s>", 0.0], ["<unk>", 0.0], [mark, -2.0]]
    for c in map(chr, range(33, 127)):
        vocab += [[c, -3.0], [mark + c, -3.5]]
    space = {"type": "Metaspace", "replacement": mark, "prepend_scheme": "always", "split": True}
    eos = {"SpecialToken": {"id": "</s>", "type_id": 0}}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(("<pad>", "</s>", "<unk>"))],
        "pre_tokenizer": space, "decoder": space,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"Sequence": {"id": "A", "type_id": 0}}, eos],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}, eos,
                                    {"Sequence": {"id": "B", "type_id": 0}}, eos],
                           "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}},
        "model": {"type": "Unigram", "unk_id": 2, "vocab": vocab, "byte_fallback": False}}
    config = {"model_max_length": max_length, "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
              "extra_ids": 0, "tokenizer_class": "T5Tokenizer"}
    with tempfile.TemporaryDirectory() as d:
        Path(d, "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
        Path(d, "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        return T5TokenizerFast.from_pretrained(d, local_files_only=True)


def _clip(projection: bool, seed: int, act: str = "quick_gelu", width: int = _CLIP_WIDTH) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=1000, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=_CLIP_MAX, hidden_act=act,
                         projection_dim=_CLIP_WIDTH, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae(seed: int, latent: int, flux: bool = False) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    extra = dict(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611) \
        if flux else {}
    return AutoencoderKL(block_out_channels=(32, 32), in_channels=3, out_channels=3, latent_channels=latent,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=32, sample_size=SIZE, **extra).eval()


def _sd1(seed: int) -> Any:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    # SD1.5's layout at width 32/64: two resnets per block, cross-attention in all but the deepest down block
    # (and the first up block), conv proj_in/proj_out, heads counted by attention_head_dim
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=_CLIP_WIDTH, attention_head_dim=2, norm_num_groups=32).eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=_vae(seed + 1, 4), text_encoder=_clip(False, seed + 2),
                                   tokenizer=clip_tokenizer(), unet=unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _sdxl(seed: int) -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    # SDXL's layout: no attention in the first block, a 2-deep transformer in the second, linear proj_in/out,
    # the added text-time embedding (pooled text 32 + 6 size/crop numbers x 8); the second text encoder is wider
    # than the first (48 and 32, as 1280 and 768), which is how diffusers' single-file loader tells them apart
    # (single_file_utils.create_diffusers_clip_model_from_ldm compares the position embedding's width)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        cross_attention_dim=_CLIP_WIDTH + _CLIP2_WIDTH, norm_num_groups=32).eval()
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=_vae(seed + 1, 4), text_encoder=_clip(False, seed + 2),
                                     text_encoder_2=_clip(True, seed + 3, act="gelu", width=_CLIP2_WIDTH),
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
                                     scheduler=sched, force_zeros_for_empty_prompt=True)


def _flux(seed: int) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    # Flux.1-dev's layout: two double and two single blocks, head dim 16 split over the 3 rope axes, guidance
    # embedding; 4 latent channels packed 2x2 into 16
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=_CLIP_WIDTH, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6)).eval()
    torch.manual_seed(seed + 4)
    t5 = T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=sched, vae=_vae(seed + 1, 4, flux=True), text_encoder=_clip(False, seed + 2),
                        tokenizer=clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tokenizer(),
                        transformer=transformer)


_BUILDERS = {"sd1": _sd1, "sdxl": _sdxl, "flux": _flux}


def tiny_pipeline(family: str, seed: int = 0) -> Any:
    """A diffusers pipeline of `family` ("sd1": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "flux":
    FluxPipeline) with random weights drawn from `seed`, float32 on the CPU, in eval mode, for 32x32-pixel images.

    Raises:
        ValueError: an unknown family."""
    if family not in _BUILDERS:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    pipe = _BUILDERS[family](seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def family_of(pipe: Any) -> str:
    """The family ("sd1", "sdxl", "flux") of a pipeline tiny_pipeline built."""
    name = type(pipe).__name__
    if name.startswith("Flux"):
        return "flux"
    return "sdxl" if "XL" in name else "sd1"


def save_folder(pipe: Any, path: str | Path) -> Path:
    """Save `pipe` as a diffusers folder (model_index.json, each component's config and safetensors weights, the
    tokenizers' files), which `DiffusionPipeline.from_pretrained(path, local_files_only=True)` loads back with
    the same weights bit for bit. Returns the folder."""
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# -- LoRA ------------------------------------------------------------------------------------------------------------
_SD_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
               "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
_CLIP_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                 "mlp.fc2")
# sd-scripts' `ss_base_model_version` values, which models.hinted reads
_BASE_VERSION = {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}
_FLUX_TARGETS = ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj", "img_mlp.0", "img_mlp.2",
                 "txt_mlp.0", "txt_mlp.2", "linear1", "linear2")


def _linears(model: torch.nn.Module, ends: tuple[str, ...]) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(n.endswith("." + e) for e in ends)}


def _targets(pipe: Any, text_encoder: bool) -> dict[str, list[tuple[torch.nn.Linear, tuple[int, int], bool]]]:
    """{kohya name: the diffusers linears its weight is, each with its rows in the (fused) weight and whether
    their halves are swapped}."""
    fam = family_of(pipe)
    out: dict[str, list] = {}
    if fam == "flux":
        mods = dict(pipe.transformer.named_modules())
        natives = {}
        for path, mod in mods.items():
            found = FLUX1.native_for(path) if isinstance(mod, torch.nn.Linear) else None
            if found is not None and any(found[0].endswith(e) for e in _FLUX_TARGETS):
                rows, _ = natives.get(found[0], (0, 0))
                natives[found[0]] = rows + mod.out_features, mod.in_features
        for native, (rows, inp) in natives.items():
            parts = FLUX1.to_diffusers(native, rows, inp)
            out["lora_unet_" + native.replace(".", "_")] = [(mods[p], r, sw) for p, r, sw in parts]
    else:
        for path, mod in _linears(pipe.unet, _SD_TARGETS).items():
            out[sd_names.to_kohya("unet", path, fam == "sdxl")] = [(mod, (0, mod.out_features), False)]
    # the CLIP encoders (Flux's T5 has no LoRA diffusers loads: models/dit.py FLUX1's parts)
    for comp in ("text_encoder", "text_encoder_2") if text_encoder else ():
        if fam == "flux" and not (FLUX1.part(comp) and FLUX1.part(comp).diffusers) or getattr(pipe, comp, None) is None:
            continue
        for path, mod in _linears(getattr(pipe, comp), _CLIP_TARGETS).items():
            path = clip_module_path(path)
            name = (FLUX1.part(comp).kohya + path.replace(".", "_") if fam == "flux"
                    else sd_names.to_kohya(comp, path, fam == "sdxl"))
            out[name] = [(mod, (0, mod.out_features), False)]
    return out


def clip_module_path(path: str) -> str:
    """A CLIP text encoder's module path as the original CLIPTextModel names it (`text_model.encoder.layers.0.
    mlp.fc1`), which kohya's `lora_te*_` names flatten (sd-scripts networks/lora.py) and SD checkpoints key
    (`cond_stage_model.transformer.text_model.`): transformers >= 5.6 builds CLIPTextModel without the
    `text_model` wrapper (CLIPTextModelWithProjection keeps it), so its own paths may lack the prefix."""
    return path if path.startswith("text_model.") or path.startswith("text_projection") else "text_model." + path


def _fused(parts: list[tuple[torch.nn.Linear, tuple[int, int], bool]]) -> torch.Tensor:
    ws = []
    for mod, _, swap in parts:
        w = mod.weight.detach()
        ws.append(torch.cat(w.chunk(2, 0)[::-1], 0) if swap else w)
    return torch.cat(ws, 0)


def lora_targets(pipe: Any, text_encoder: bool = True) -> dict[str, torch.Tensor]:
    """{kohya module name: the base weight (out, in) it updates} for the modules tiny_lora trains: the denoiser's
    attention and MLP linears (a Flux double block's fused qkv and single block's linear1 as one native weight,
    the diffusers parts stacked in row order, models/dit.py FLUX1), and with `text_encoder` the CLIP encoders'
    (kohya `lora_te_`, SDXL `lora_te1_`/`lora_te2_`, Flux `lora_te1_` - sd-scripts networks/lora.py,
    sdxl_train_network / lora_flux.py). Flux's T5 is left out (diffusers loads no LoRA on it)."""
    return {name: _fused(parts) for name, parts in _targets(pipe, text_encoder).items()}


def merge_lora(pipe: Any, lora: dict[str, torch.Tensor], multiplier: float = 1.0) -> int:
    """Add a kohya-named LoRA's update (up @ down * alpha / rank * multiplier, computed in float64) to `pipe`'s
    weights in place - the dense reference a LoRA loader must match, for the module names tiny_lora writes (fused
    Flux weights split into their diffusers parts). Returns the number of modules merged.

    Raises:
        KeyError: a LoRA module the pipeline has no target for."""
    targets = _targets(pipe, text_encoder=True)
    names = sorted({k.split(".", 1)[0] for k in lora})
    with torch.no_grad():
        for name in names:
            up, down = lora[name + ".lora_up.weight"].double(), lora[name + ".lora_down.weight"].double()
            alpha = lora.get(name + ".alpha")
            scale = (float(alpha) if alpha is not None else down.shape[0]) / down.shape[0]
            delta = (up.flatten(1) @ down.flatten(1)) * scale * multiplier
            for mod, (a, b), swap in targets[name]:
                d = delta[a:b]
                if swap:
                    d = torch.cat(d.chunk(2, 0)[::-1], 0)
                mod.weight.copy_((mod.weight.double() + d).to(mod.weight.dtype))
    return len(names)


def tiny_lora(pipe: Any, path: str | Path, rank: int = 8, seed: int = 0, text_encoder: bool = True,
              strength: float = 0.5, decay: float = 0.7, alpha: float | None = None) -> Path:
    """Write a kohya-named LoRA (.safetensors: `<name>.lora_down.weight` (rank, in), `.lora_up.weight` (out, rank),
    `.alpha`) for `pipe`'s modules (lora_targets) with `rank` and the given alpha (default rank / 2, so the scale
    alpha / rank is 0.5 and readers must apply it). Each module's update up @ down * alpha / rank has singular
    values decaying geometrically (s_k = s_0 * decay^k) in random orthonormal directions, and Frobenius norm
    `strength` times its base weight's, so it visibly changes the denoiser's output and truncating it loses a known
    share (sum of s_k^2 beyond the kept rank). float32. Returns the path."""
    g = torch.Generator().manual_seed(seed)
    alpha = rank / 2 if alpha is None else alpha
    scale = alpha / rank
    sd: dict[str, torch.Tensor] = {}
    s = decay ** torch.arange(rank, dtype=torch.float64)
    for name, w in sorted(lora_targets(pipe, text_encoder).items()):
        o, i = w.shape
        r = min(rank, o, i)
        u, _ = torch.linalg.qr(torch.randn(o, r, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(i, r, generator=g, dtype=torch.float64))
        sv = s[:r] * (strength * w.double().norm() / s[:r].norm())
        root = (sv / scale).sqrt()
        sd[name + ".lora_up.weight"] = (u * root).float().contiguous()
        sd[name + ".lora_down.weight"] = (root[:, None] * v.T).float().contiguous()
        sd[name + ".alpha"] = torch.tensor(float(alpha))
    path = Path(path)
    write_safetensors(path, sd, {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                 "ss_network_alpha": str(alpha),
                                 "ss_base_model_version": _BASE_VERSION[family_of(pipe)]})
    return path



# -- Flux: diffusers -> BFL names --------------------------------------------------------------------------------
def flux_native_state(diffusers_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel state dict under the BFL (flux1-dev.safetensors) names, by the tables of
    models/dit.py: FLUX1 (fused weights concatenated in row order, the final adaLN's halves swapped back to
    (shift, scale)) and FLUX1_NORMS (the q/k norms' `weight` as `scale`). Raises KeyError for a weight neither
    names."""
    groups: dict[str, dict[int, torch.Tensor]] = {}
    swap: dict[str, bool] = {}
    out: dict[str, torch.Tensor] = {}
    for key, t in diffusers_sd.items():
        module, leaf = key.rsplit(".", 1)
        found = FLUX1.native_for(module)
        if found is not None:
            native, mapping, j = found
            groups.setdefault(f"{native}.{leaf}", {})[j] = t
            swap[f"{native}.{leaf}"] = mapping.swap
            continue
        norm = FLUX1_NORMS.native_for(module)
        if norm is None or leaf != "weight":
            raise KeyError(key)
        out[f"{norm[0]}.scale"] = t
    for key, parts in groups.items():
        t = torch.cat([parts[j] for j in sorted(parts)], 0)
        if swap[key]:
            t = torch.cat(t.chunk(2, 0)[::-1], 0)
        out[key] = t
    return out


def flux_diffusers_state(native_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of flux_native_state: a BFL Flux.1 transformer state dict (flux1-dev.safetensors' keys, with or
    without ComfyUI's `model.diffusion_model.` prefix) under FluxTransformer2DModel's names, at any width - fused
    weights split by the row blocks of models/dit.py FLUX1 (a single block's linear1: q, k, v as wide as its input,
    the rest the MLP), the final adaLN's halves swapped. What diffusers' own converter does at Flux.1's width only
    (convert_flux_transformer_checkpoint_to_diffusers fixes inner_dim = 3072). Raises KeyError for a key neither
    table names."""
    out: dict[str, torch.Tensor] = {}
    for key, t in native_sd.items():
        module, leaf = key.removeprefix("model.diffusion_model.").rsplit(".", 1)
        if FLUX1.native_of(module) is not None:
            inp = t.shape[1] if t.ndim == 2 else None
            if inp is None:  # a bias: the split follows its weight's input width
                inp = native_sd[key[:-len(leaf)] + "weight"].shape[1]
            for path, (a, b), swap in FLUX1.to_diffusers(module, t.shape[0], inp):
                part = t[a:b]
                out[f"{path}.{leaf}"] = torch.cat(part.chunk(2, 0)[::-1], 0) if swap else part
            continue
        norm = FLUX1_NORMS.to_diffusers(module, t.shape[0], t.shape[0])  # KeyError when it names none
        if leaf != "scale":
            raise KeyError(key)
        out[f"{norm[0][0]}.weight"] = t
    return out


# -- single-file checkpoints in the original layouts --------------------------------------------------------------
# Facts read from diffusers' single-file conversion (loaders/single_file_utils.py: convert_ldm_unet_checkpoint,
# convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint,
# convert_flux_transformer_checkpoint_to_diffusers), written here in the other direction.
_RESNET_NORMS = {"norm1": "in_layers.0", "norm2": "out_layers.0"}  # ldm openaimodel.ResBlock


def _ldm_unet(unet_sd: dict[str, torch.Tensor], sdxl: bool) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict under the original (ldm / sgm) UNet's names, without the
    `model.diffusion_model.` prefix: module paths through models/sd.py unet_to_sgm, plus the weights no LoRA
    targets (resnet norms, the output norm)."""
    out = {}
    for key, t in unet_sd.items():
        module, leaf = key.rsplit(".", 1)
        m = module.rsplit(".", 1)
        if len(m) == 2 and ".resnets." in module and m[1] in _RESNET_NORMS:
            module = f"{m[0]}.{_RESNET_NORMS[m[1]]}"
        native = "out.0" if module == "conv_norm_out" else sd_names.unet_to_sgm(module, sdxl)
        if native is None:
            raise KeyError(key)
        out[f"{native}.{leaf}"] = t
    return out


def _ldm_vae(vae_sd: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict under the original (ldm `first_stage_model`) names, without the prefix:
    down.i.block.j / up.(n-1-i).block.j / mid.block_k / mid.attn_1 with its q/k/v/proj_out as 1x1 convolutions."""
    import re

    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, t in vae_sd.items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                   lambda m: f"decoder.up.{blocks - 1 - int(m.group(1))}.block.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{blocks - 1 - int(m.group(1))}.upsample.", k)
        k = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", k)
        hit = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)$", k)
        if hit:
            k = f"{hit.group(1)}.mid.attn_1.{attn[hit.group(2)]}.{hit.group(3)}"
            if t.ndim == 2:
                t = t[:, :, None, None]
        out[k] = t
    return out


def _open_clip(te_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection state dict under OpenCLIP's names (SDXL's `conditioner.embedders.1.model.`,
    without the prefix): q/k/v fused into attn.in_proj_weight/bias, text_projection transposed."""
    import re

    top = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
           "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
           "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}
    inner = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    out, qkv = {}, {}
    for key, t in te_sd.items():
        key = clip_module_path(key)
        if key in top:
            out[top[key]] = t
            continue
        if key == "text_projection.weight":
            out["text_projection"] = t.T.contiguous()
            continue
        hit = re.match(r"^text_model\.encoder\.layers\.(\d+)\.(.*)\.(weight|bias)$", key)
        if hit is None:
            raise KeyError(key)
        i, module, leaf = hit.groups()
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault(f"transformer.resblocks.{i}.attn.in_proj_{leaf}", {})[module[-6]] = t
            continue
        out[f"transformer.resblocks.{i}.{inner[module]}.{leaf}"] = t
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


def _prefixed(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def single_file_state(pipe: Any) -> dict[str, torch.Tensor]:
    """The tensors of `pipe` as the single-file checkpoint users download has them: SD1.5 (ldm:
    `model.diffusion_model.`, `cond_stage_model.transformer.`, `first_stage_model.`), SDXL (sgm:
    `model.diffusion_model.`, `conditioner.embedders.0.transformer.` CLIP-L, `conditioner.embedders.1.model.`
    OpenCLIP, `first_stage_model.`) or Flux.1 (the BFL transformer alone, as flux1-dev.safetensors)."""
    fam = family_of(pipe)
    if fam == "flux":
        return flux_native_state(pipe.transformer.state_dict())
    sdxl = fam == "sdxl"
    te = {clip_module_path(k): v for k, v in pipe.text_encoder.state_dict().items()}
    sd = _prefixed("model.diffusion_model.", _ldm_unet(pipe.unet.state_dict(), sdxl))
    sd.update(_prefixed("first_stage_model.",
                        _ldm_vae(pipe.vae.state_dict(), len(pipe.vae.config.up_block_types))))
    if sdxl:
        sd.update(_prefixed("conditioner.embedders.0.transformer.", te))
        sd.update(_prefixed("conditioner.embedders.1.model.", _open_clip(pipe.text_encoder_2.state_dict())))
    else:
        sd.update(_prefixed("cond_stage_model.transformer.", te))
    return sd


def save_single_file(pipe: Any, path: str | Path) -> Path:
    """Write `pipe` as one .safetensors checkpoint in its original layout (single_file_state). SD1.5 / SDXL:
    diffusers' `StableDiffusion(XL)Pipeline.from_single_file(path, config=<the folder save_folder wrote>,
    local_files_only=True)` reads it back to the same weights bit for bit. Flux: the keys and row orders are the
    ones diffusers' converter reads, but diffusers (0.42) cannot load the tiny file -
    `single_file_utils.convert_flux_transformer_checkpoint_to_diffusers` splits a single block's linear1 at
    Flux.1's width (inner_dim = 3072), whatever the config says; a loader of tiny Flux files must map the BFL
    names itself. Returns the path."""
    path = Path(path)
    sd = {k: v.detach().contiguous() for k, v in single_file_state(pipe).items()}
    write_safetensors(path, sd, {"format": "pt"})
    return path
