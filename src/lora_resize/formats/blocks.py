"""Display groups of module names, for reports: UNet 'down N' / 'mid' / 'up N' (diffusers and sgm names), DiT
'double' / 'single' blocks, 'text encoder' (1, 2, ...), else 'other' (block_of, by the name alone).

And the block of --block-weights' notation (ranks/block_weights.py) each module is in (module_blocks): each module
is read as the weight it updates (convert.read_name, in whatever layout its name is in) and that weight's path
gives the block.

Stable Diffusion: the UNet's blocks are the original (sgm) UNet's (`input_blocks.N` -> INnn, `middle_block` ->
MID, `output_blocks.N` -> OUTnn; models.sd.unet_to_sgm maps a diffusers path there, so kohya's diffusers-style
and sgm-style names, ComfyUI's and diffusers' all agree), the text encoders are BASE (LBW's `encoder` /
`embedders` keys). Flux.1: native `double_blocks.N` -> D<N>, `single_blocks.N` -> S<N> (a diffusers name,
`transformer_blocks.N` / `single_transformer_blocks.N`, through its native weight), `*_in` embedders -> IN,
`final_layer` -> OUT, the CLIP-L text encoder (diffusers' `text_encoder`) -> CLIP, T5-XXL (`text_encoder_2`) -> T5
(LBW's `get_flux_blocks`)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from ..errors import LoraStructureError, OptionsError
from ..io.reader import TensorInfo
from ..models import SD, Architecture
from ..models import sd as sdm
from .base import Layout
from .convert import Name, detect_arch, read_name, scheme_of

_BLOCK_PATTERNS = [
    (re.compile(r"(?:^|_)(?:down_blocks|input_blocks)_(\d+)"), "down {}"),
    (re.compile(r"(?:^|_)(?:mid_block|middle_block)"), "mid"),
    (re.compile(r"(?:^|_)(?:up_blocks|output_blocks)_(\d+)"), "up {}"),
    (re.compile(r"(?:^|_)double_blocks_(\d+)"), "double"),
    (re.compile(r"(?:^|_)single_blocks_(\d+)"), "single"),
    (re.compile(r"^(?:lora_)?te(\d?)_|^text_encoders?(?:_(\d))?_|^(?:lora_)?text_encoder(?:_(\d))?_"), "te"),
]


def block_of(name: str) -> str:
    """The display group of module `name`."""
    n = name.replace(".", "_")
    for rx, label in _BLOCK_PATTERNS:
        m = rx.search(n)
        if not m:
            continue
        if label == "te":
            digit = next((g for g in m.groups() if g), "")
            return f"text encoder {digit}".strip()
        return label.format(*m.groups()) if m.groups() else label
    return "other"


FLUX_TEXT = {"text_encoder": "CLIP", "text_encoder_2": "T5"}  # diffusers' FluxPipeline components


@dataclass(frozen=True)
class ModuleBlocks:
    """A LoRA's model as the block presets name it ('sd15', 'sdxl', or a models architecture name), in words
    (`title`), and each module's block (None: in no block, or a name that does not read as the model's)."""
    model: str
    title: str
    blocks: dict[str, str | None]


def module_blocks(layout: Layout, infos: Mapping[str, TensorInfo], metadata: Mapping[str, str],
                  arch_name: str | None = None) -> ModuleBlocks:
    """Each module's block (module docstring). `arch_name`: --arch, else the layout's own (a conversion's), else
    detected from the keys. Raises OptionsError when the LoRA's model cannot be read (naming --arch)."""
    scheme = scheme_of(layout)
    try:
        arch = detect_arch(layout, scheme, arch_name or layout.arch, infos, metadata)
    except LoraStructureError as e:
        raise OptionsError(f"--block-weights needs to know which model the LoRA is for: {e}") from None
    read = {m.name: read_name(m.name, scheme, arch) for m in layout.modules}
    if arch is not None:
        return ModuleBlocks(arch.name, arch.title, {name: dit_block(arch, n) for name, n in read.items()})
    hint = " ".join(metadata.get(k, "") for k in ("modelspec.architecture", "ss_base_model_version"))
    sdxl = sdm.is_sdxl(list(read), [(n.component, n.path) for n in read.values() if n is not None], hint)
    return ModuleBlocks("sdxl" if sdxl else "sd15", "SDXL" if sdxl else "Stable Diffusion 1.x/2.x",
                        {name: sd_block(n, sdxl) for name, n in read.items()})


def sd_block(n: Name | None, sdxl: bool) -> str | None:
    """A Stable Diffusion module's block: BASE for a text encoder's, INnn / MID / OUTnn for the UNet's, None for a
    UNet module outside the blocks (the time embedding, conv_out) or a name that does not read."""
    if n is None or n.space != SD:
        return None
    if n.component.startswith("text_encoder"):
        return "BASE"
    sgm = sdm.unet_to_sgm(n.path, sdxl) or ""
    hit = re.match(r"(input|output)_blocks\.(\d+)\.", sgm)
    if hit:
        return f"{'IN' if hit.group(1) == 'input' else 'OUT'}{int(hit.group(2)):02d}"
    return "MID" if sgm.startswith("middle_block.") else None


def dit_block(arch: Architecture, n: Name | None) -> str | None:
    """A Flux-style module's block (D<N>, S<N>, IN, OUT, CLIP, T5), or None."""
    if n is None:
        return None
    if n.component != arch.component:
        return FLUX_TEXT.get(n.component)
    path = n.path
    if n.space == "diffusers":
        native = arch.native_for(path)
        path = native[0] if native is not None else path
    hit = re.match(r"(double|single)_blocks\.(\d+)\.", path)
    if hit:
        return f"{hit.group(1)[0].upper()}{int(hit.group(2)):02d}"
    head = path.split(".", 1)[0]
    return "IN" if head.endswith("_in") else "OUT" if head == "final_layer" else None
