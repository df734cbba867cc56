"""Stable Diffusion 1.x/2.x and SDXL: the UNet and the CLIP text encoders under kohya's names and diffusers'.

kohya names a UNet module by its diffusers path with '.' as '_' (`lora_unet_down_blocks_0_attentions_0_proj_in`) -
for SDXL also by the original (sgm) UNet's path (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
sd-scripts' own SDXL files) - and a text-encoder module by its CLIP path (`lora_te_text_model_encoder_layers_0_
self_attn_q_proj`; `lora_te1_` / `lora_te2_` with SDXL's two). diffusers keys them `unet.<path>`,
`text_encoder.<path>`, `text_encoder_2.<path>`. Reading a flattened name back needs the names' grammar: below."""
from __future__ import annotations

import re

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
UNET_TOP = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding", "add_embedding")

_TAIL = (r"(proj_in|proj_out|conv1|conv2|time_emb_proj|conv_shortcut|"
         r"transformer_blocks_(\d+)_(attn[12])_(to_q|to_k|to_v|to_out_0)|transformer_blocks_(\d+)_ff_net_(0_proj|2))")
_UNET = [
    (re.compile(rf"^(down_blocks|up_blocks)_(\d+)_(attentions|resnets)_(\d+)_{_TAIL}$"), "block"),
    (re.compile(rf"^mid_block_(attentions|resnets)_(\d+)_{_TAIL}$"), "mid"),
    (re.compile(r"^(down_blocks|up_blocks)_(\d+)_(downsamplers|upsamplers)_0_conv$"), "sampler"),
    (re.compile(r"^(conv_in|conv_out)$"), "top"),
    (re.compile(r"^(time_embedding|add_embedding)_linear_(1|2)$"), "embedding"),
]
_CLIP = re.compile(r"^text_model_encoder_layers_(\d+)_(self_attn_(q|k|v|out)_proj|mlp_fc(1|2))$")
SGM_RESNET = {"in_layers_2": "conv1", "emb_layers_1": "time_emb_proj", "out_layers_3": "conv2",
              "skip_connection": "conv_shortcut"}


def _tail(t: str) -> str:
    t = re.sub(r"^transformer_blocks_(\d+)_", r"transformer_blocks.\1.", t)
    return (t.replace("attn1_", "attn1.").replace("attn2_", "attn2.").replace("to_out_0", "to_out.0")
            .replace("ff_net_0_proj", "ff.net.0.proj").replace("ff_net_2", "ff.net.2"))


def unet_path(flat: str) -> str | None:
    """The dotted diffusers UNet path of a kohya name's flattened diffusers path, or None."""
    for rx, kind in _UNET:
        m = rx.match(flat)
        if not m:
            continue
        g = m.groups()
        if kind == "block":
            return f"{g[0]}.{g[1]}.{g[2]}.{g[3]}.{_tail(g[4])}"
        if kind == "mid":
            return f"mid_block.{g[0]}.{g[1]}.{_tail(g[2])}"
        if kind == "sampler":
            return f"{g[0]}.{g[1]}.{g[2]}.0.conv"
        if kind == "top":
            return g[0]
        return f"{g[0]}.linear_{g[1]}"
    return None


def sgm_to_flat(flat: str, layers: int = 2) -> str | None:
    """kohya SDXL's sgm UNet name (without `lora_unet_`) as the flattened diffusers path (SDXL: 2 layers per
    block), or None when it is not one."""
    m = re.match(r"^middle_block_(\d)_(.*)$", flat)
    if m:
        rest = SGM_RESNET.get(m.group(2), m.group(2))
        return f"mid_block_{['resnets_0', 'attentions_0', 'resnets_1'][int(m.group(1))]}_{rest}"
    m = re.match(r"^(input_blocks|output_blocks)_(\d+)_(\d+)_(.*)$", flat)
    if not m:
        top = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1",
               "time_embed_2": "time_embedding_linear_2", "label_emb_0_0": "add_embedding_linear_1",
               "label_emb_0_2": "add_embedding_linear_2"}
        return top.get(flat)
    kind, i, inner, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    rest = SGM_RESNET.get(rest, rest)
    if kind == "input_blocks":
        if i == 0:
            return None
        b, j = (i - 1) // (layers + 1), (i - 1) % (layers + 1)
        if rest == "op":
            return f"down_blocks_{b}_downsamplers_0_conv"
        return f"down_blocks_{b}_{['resnets', 'attentions'][inner]}_{j}_{rest}"
    b, j = i // (layers + 1), i % (layers + 1)
    if rest == "conv":
        return f"up_blocks_{b}_upsamplers_0_conv"
    return f"up_blocks_{b}_{['resnets', 'attentions'][inner]}_{j}_{rest}"


SGM_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2"}
RESNET_SGM = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
              "conv_shortcut": "skip_connection"}


def unet_to_sgm(path: str, sdxl: bool) -> str | None:
    """The original (sgm) UNet's module path of a diffusers UNet path (`down_blocks.1.attentions.0.proj_in` ->
    `input_blocks.4.1.proj_in`), as SD checkpoints (`model.diffusion_model.<path>`) and sd-scripts' SDXL files key
    them; None for a path it has no counterpart for. Two layers per block (SD 1.x/2.x and SDXL); an up block
    upsamples through its third sub-block, except SD 1.x/2.x's first, which has no attentions."""
    if path in SGM_TOP:
        return SGM_TOP[path]
    m = re.match(r"^mid_block\.(resnets\.0|attentions\.0|resnets\.1)\.(.*)$", path)
    if m:
        rest = RESNET_SGM.get(m.group(2), m.group(2)) if m.group(1).startswith("resnets") else m.group(2)
        return f"middle_block.{['resnets.0', 'attentions.0', 'resnets.1'].index(m.group(1))}.{rest}"
    m = re.match(r"^(down|up)_blocks\.(\d+)\.(downsamplers|upsamplers)\.0\.conv$", path)
    if m:
        b = int(m.group(2))
        if m.group(1) == "down":
            return f"input_blocks.{3 * b + 3}.0.op"
        return f"output_blocks.{3 * b + 2}.{1 if b == 0 and not sdxl else 2}.conv"
    m = re.match(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$", path)
    if not m:
        return None
    b, j, rest = int(m.group(2)), int(m.group(4)), m.group(5)
    inner = 0 if m.group(3) == "resnets" else 1
    if inner == 0:
        rest = RESNET_SGM.get(rest, rest)
    i = 3 * b + j + 1 if m.group(1) == "down" else 3 * b + j
    return f"{'input' if m.group(1) == 'down' else 'output'}_blocks.{i}.{inner}.{rest}"


def flat_to_sgm(flat: str) -> str:
    """The SDXL (sgm) UNet name of a flattened diffusers UNet path (what sd-scripts' SDXL files are keyed by);
    `flat` itself when it has none. The inverse of sgm_to_flat for SDXL."""
    path = unet_path(flat)
    sgm = unet_to_sgm(path, sdxl=True) if path else None
    return sgm.replace(".", "_") if sgm else flat


def is_sdxl(names: list[str], paths: list[tuple[str, str]], hint: str | None) -> bool:
    """Whether Stable Diffusion modules are SDXL's: sgm-named kohya modules, a second text encoder, an added
    embedding or a UNet transformer deeper than one block (SD 1.x/2.x have depth 1), or metadata saying so."""
    if hint and re.search(r"xl", hint, re.IGNORECASE):
        return True
    if any(re.match(r"^lora_unet_(input_blocks|output_blocks|middle_block)_", n) for n in names):
        return True
    return any(c == "text_encoder_2" or p.startswith("add_embedding") or re.search(r"transformer_blocks\.[1-9]", p)
               for c, p in paths)


def clip_path(flat: str) -> str | None:
    """The dotted CLIP path of a kohya text-encoder name's flattened path, or None."""
    m = _CLIP.match(flat)
    if not m:
        return None
    layer, what = m.group(1), m.group(2)
    what = what.replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
    return f"text_model.encoder.layers.{layer}.{what}"


def from_kohya(name: str) -> tuple[str, str] | None:
    """(diffusers component, dotted path) of a kohya SD module name, or None."""
    if name.startswith("lora_unet_"):
        flat = name[len("lora_unet_"):]
        path = unet_path(flat) or unet_path(sgm_to_flat(flat) or "")
        return ("unet", path) if path else None
    m = re.match(r"^lora_te(\d?)_(.*)$", name)
    if m:
        path = clip_path(m.group(2))
        return (("text_encoder_2" if m.group(1) == "2" else "text_encoder"), path) if path else None
    return None


def to_kohya(component: str, path: str, sdxl: bool) -> str | None:
    """kohya's name for a diffusers SD module (None for a component it has no prefix for): SDXL's UNet by its sgm
    names and its text encoders as lora_te1_ / lora_te2_, as sd-scripts writes them."""
    prefix = KOHYA_PREFIX.get(component)
    if prefix is None:
        return None
    if component == "text_encoder" and sdxl:
        prefix = "lora_te1_"
    path = path.replace(".processor.", ".")  # diffusers' old attention-processor keys
    if component.startswith("text_encoder"):  # ... which name CLIP's q/k/v/out_proj to_q/to_k/to_v/to_out
        path = re.sub(r"\.self_attn\.to_(q|k|v)$", r".self_attn.\1_proj", path)
        path = re.sub(r"\.self_attn\.to_out$", ".self_attn.out_proj", path)
    elif path.endswith(".to_out"):
        path += ".0"
    flat = path.replace(".", "_")
    return prefix + (flat_to_sgm(flat) if sdxl and component == "unet" else flat)
