"""`--output-format`: writing a file's modules under another key family's names, where the mapping is defined.

Defined: diffusers -> kohya for the UNet and the text encoders. kohya's SD-family names are the diffusers module
paths with '.' turned into '_' (`unet.down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_
proj_in`, `text_encoder.text_model...` -> `lora_te_text_model...`, `lora_te1_`/`lora_te2_` when there are two).
Not defined, and refused with the reason: kohya -> anything (its names do not say where the dots were), diffusers
`transformer.` components (kohya's Flux/SD3/video names follow the original model code, not diffusers'), PEFT
adapters (they name modules of an arbitrary model)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import LoraStructureError, OptionsError
from ..io.metadata import SideOutputs
from .base import Layout, Module
from .diffusers import METADATA_KEY
from .kohya import DOWN, kohya_module

OUTPUT_FORMATS = ("kohya",)  # the layouts --output-format can write (from the layouts listed in `convert`)
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
UNET_TOP = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding", "add_embedding")


@dataclass
class Renamed(Module):
    """A module read in its own family and written under another family's keys."""
    source: Module | None = None
    target: Module | None = None

    @property
    def output_scale(self) -> float | None:
        return self.target.output_scale

    def load(self, src):
        return self.source.load(src)

    def scale_and_rank(self, src):
        return self.source.scale_and_rank(src)

    def emit(self, new):
        return self.target.emit(new)


class ConvertedLayout(Layout):
    """The converted modules; the source family's own metadata entry is dropped (it describes the old keys)."""

    def side_outputs(self, rows) -> SideOutputs:
        return SideOutputs(metadata={METADATA_KEY: None})


def kohya_name(name: str, two_text_encoders: bool) -> str:
    """kohya's name for a diffusers module `<component>.<path>` (a UNet's own top-level path, as old
    `save_attn_procs` / `pytorch_lora_weights` files write it, counts as `unet.<path>`)."""
    comp, dot, path = name.partition(".")
    if comp in UNET_TOP and dot:
        comp, path = "unet", name
    prefix = KOHYA_PREFIX.get(comp) if dot else None
    if prefix is None:
        raise LoraStructureError(f"{name}: no kohya name is defined for this module (kohya's names for "
                                 f"{comp or 'component-less'} models follow the original model code); "
                                 "leave out --output-format")
    if comp == "text_encoder" and two_text_encoders:
        prefix = "lora_te1_"
    path = path.replace(".processor.", ".")  # diffusers' old attention-processor keys
    if comp.startswith("text_encoder"):  # ... which name CLIP's q/k/v/out_proj to_q/to_k/to_v/to_out
        path = re.sub(r"\.self_attn\.to_(q|k|v)$", r".self_attn.\1_proj", path)
        path = re.sub(r"\.self_attn\.to_out$", ".self_attn.out_proj", path)
    elif path.endswith(".to_out"):
        path += ".0"
    return prefix + path.replace(".", "_")


def convert(layout: Layout, target: str | None, family: str) -> Layout:
    """`layout` with its modules written under `target`'s key names (None or the layout's own key `family`:
    unchanged). Raises OptionsError for a direction that is not defined, LoraStructureError for modules that
    have no name in the target."""
    if target is None or family == target:
        return layout
    if target != "kohya" or layout.format != "diffusers":
        raise OptionsError(f"--output-format {target} from a {layout.format} file is not defined: only diffusers "
                           "-> kohya maps module names without the model (kohya names lose the dots; PEFT names "
                           "belong to an arbitrary model)")
    if layout.passthrough:
        raise LoraStructureError(f"{len(layout.passthrough)} tensor(s) such as {sorted(layout.passthrough)[0]} "
                                 "have no kohya equivalent; convert a file without them")
    two = any(m.name.startswith("text_encoder_2.") for m in layout.modules)
    modules, seen = [], {}
    for m in layout.modules:
        k = kohya_name(m.name, two)
        if k in seen:
            raise LoraStructureError(f"{m.name} and {seen[k]} both map to the kohya name {k}")
        seen[k] = m.name
        modules.append(Renamed(k, list(m.keys), m, kohya_module(k, [], False)))
    modules.sort(key=lambda m: m.name + DOWN)
    notes = list(layout.notes) + [f"key names converted from {layout.format} to {target}"]
    return ConvertedLayout(target, modules, [], notes)
