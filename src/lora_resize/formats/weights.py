"""Where a LoRA module's weight is in a base model, by the base's keys: what `--base` measures against
(ops/base.py reads the weights from a checkpoint) and what the diffusion room patches in a loaded pipeline.

Each module is read as the weight it updates (convert.read_name: its architecture's native, ComfyUI or diffusers
name, or Stable Diffusion's component and path) and looked up under that weight's name in the base's own layout:
SD/SDXL single-file checkpoints by the original UNet's paths (`model.diffusion_model.input_blocks.4.1...`) and
CLIP's (`cond_stage_model.transformer.`, `conditioner.embedders.0.transformer.`; SD2's and SDXL's second OpenCLIP
encoder by its `resblocks`, q/k/v as thirds of `attn.in_proj_weight`); DiT checkpoints by native paths under
`model.diffusion_model.`, `diffusion_model.` or none; diffusers folders and pipelines by diffusers paths under
their component (`unet.`, `transformer.`, a text encoder's `text_encoder_2.`). A module whose weight is part of a
fused one gets its rows (q of a qkv, Flux's uneven linear1 parts), a fused module the concatenation of its parts
(Piece). Unmatched modules get None, never a guess."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Container, Mapping

from ..errors import LoraStructureError
from ..io.reader import TensorInfo
from ..models import SD, Architecture
from ..models import sd as sdm
from .base import Layout, Module
from .convert import Name, detect_arch, read_name, scheme_of, table_of, tables

DIT_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of base weight `key` (None: all), their two halves swapped when `swap`. A module's update
    is its pieces' rows stacked in order (each piece's rows swapped back where `swap`)."""
    key: str
    start: int | None = None
    stop: int | None = None
    swap: bool = False

    def label(self) -> str:
        return self.key + (f"[{self.start}:{self.stop}]" if self.start is not None else "")


@dataclass(frozen=True)
class Located:
    """The base weights of a parsed LoRA: its architecture (None: Stable Diffusion) and, per module, the pieces
    of the base weight it updates (None: not in the base); `model` the LoRA's model in words."""
    arch: Architecture | None
    modules: list[tuple[Module, list[Piece] | None]]
    model: str = "Stable Diffusion"

    def check(self, matched: int, base: str, example: str | None) -> None:
        """Refuse a base that is not the LoRA's model: LoraStructureError when fewer than half of the LoRA's
        modules (`matched` of them) have a weight of their shape in `base` - a LoRA for another model shares a few
        names (CLIP-L, a block's path) with it, never most; a LoRA of the base's with a few modules it lacks still
        passes (they are listed by the caller). `example`: a module that did not match. The one rule of every
        --base lookup (ops/base.py's norms, diffusion/patch.py's in-memory patch)."""
        total = len(self.modules)
        if 2 * matched < total:
            raise LoraStructureError(f"{base} is not this {self.model} LoRA's model: only {matched} of its {total} "
                                     f"modules have a weight of their shape there ({total - matched} without, e.g. "
                                     f"{example}); give the base model the LoRA was trained on")


def locate_modules(layout: Layout, infos: Mapping[str, TensorInfo], metadata: Mapping[str, str],
                   keys: Container[str], arch_name: str | None = None) -> Located:
    """Each module of `layout` (parsed from tensors `infos` with `metadata`) with the pieces of the base weight it
    updates among the base's `keys` (module docstring); `arch_name`: --arch, else detected. Raises
    LoraStructureError when the LoRA's model is not known."""
    scheme = scheme_of(layout)
    try:
        arch = detect_arch(layout, scheme, arch_name, infos, metadata)
    except LoraStructureError as e:
        raise LoraStructureError(f"--base needs to know which model the LoRA is for: {e}") from None
    read = [(m, read_name(m.name, scheme, arch)) for m in layout.modules]
    hint = " ".join(metadata.get(k, "") for k in ("modelspec.architecture", "ss_base_model_version"))
    sdxl = arch is None and sdm.is_sdxl([m.name for m in layout.modules],
                                        [(n.component, n.path) for _, n in read if n is not None], hint)
    found = []
    for m, n in read:
        out, (inp, *_) = m.weight_shape(infos)
        found.append((m, locate(n, arch, out, inp, keys, sdxl) if n is not None else None))
    return Located(arch, found, arch.title if arch else "SDXL" if sdxl else "Stable Diffusion")


def locate(n: Name, arch: Architecture | None, out: int, inp: int, keys: Container[str], sdxl: bool
           ) -> list[Piece] | None:
    """The pieces of the base weight module `n` (out rows, `inp` input features) patches among `keys`, or None."""
    candidates = _sd_candidates(n, sdxl, inp) if n.space == SD else _dit_candidates(n, arch, out, inp)
    for pieces in candidates:
        for form in (pieces, _unwrapped(pieces)):
            if form and all(p.key in keys for p in form):
                return form
    return None


def _unwrapped(pieces: list[Piece]) -> list[Piece] | None:
    """`pieces` as a text encoder saved by transformers >= 5 names them: its CLIPTextModel has no `text_model`
    wrapper (`text_encoder.encoder.layers.0...` for `text_encoder.text_model.encoder.layers.0...`), in any
    family's diffusers folder; None when no piece is under such a wrapper."""
    out = []
    for p in pieces:
        comp, dot, rest = p.key.partition(".")
        if not (comp.startswith("text_encoder") and rest.startswith("text_model.")):
            return None
        out.append(Piece(f"{comp}.{rest.removeprefix('text_model.')}", p.start, p.stop, p.swap))
    return out


def _sd_candidates(n: Name, sdxl: bool, inp: int):
    comp, path = n.component, n.path
    yield [Piece(f"{comp}.{path}.weight")]  # a diffusers folder (or one saved by transformers >= 5: _unwrapped)
    if comp == "unet":
        sgm = sdm.unet_to_sgm(path, sdxl)
        if sgm is not None:
            yield [Piece(f"model.diffusion_model.{sgm}.weight")]
        return
    prefixes = (("conditioner.embedders.1.model.",) if comp == "text_encoder_2" else
                ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.", "cond_stage_model.model."))
    for prefix in prefixes:
        if prefix.endswith("model.model.") or comp == "text_encoder_2":  # OpenCLIP: SD2's, SDXL's second
            piece = _open_clip(path, inp)
            if piece is not None:
                yield [Piece(prefix + piece.key, piece.start, piece.stop)]
        else:
            yield [Piece(prefix + path + ".weight")]


def _open_clip(path: str, width: int) -> Piece | None:
    """OpenCLIP's name for a CLIP text-encoder weight (q, k, v: thirds of attn.in_proj_weight)."""
    m = re.match(r"^text_model\.encoder\.layers\.(\d+)\.(self_attn\.(q|k|v|out)_proj|mlp\.fc(1|2))$", path)
    if not m:
        return None
    block = f"transformer.resblocks.{m.group(1)}."
    if m.group(3) in ("q", "k", "v"):
        j = "qkv".index(m.group(3))
        return Piece(block + "attn.in_proj_weight", j * width, (j + 1) * width)
    if m.group(3) == "out":
        return Piece(block + "attn.out_proj.weight")
    return Piece(block + ("mlp.c_fc.weight" if m.group(4) == "1" else "mlp.c_proj.weight"))


def _dit_candidates(n: Name, arch: Architecture, out: int, inp: int):
    # a model beside the denoiser (a text encoder) reads in its own tables, under its own diffusers component
    table = table_of(arch, n)
    folder_prefixes = (f"{table.component}.", "")
    if n.space == "diffusers":
        for p in folder_prefixes:
            yield [Piece(f"{p}{n.path}.weight")]
        for space in ("native", "comfy"):
            found = tables(table, space).native_for(n.path)
            if found is None:
                continue
            native, mapping, j = found
            if mapping is not None and len(mapping.diffusers) > 1:
                start, _ = mapping.fused(j, out, inp)
                rows = (start, start + out)
            else:
                rows = (None, None)
            swap = bool(mapping and mapping.swap)
            for p in DIT_FILE_PREFIXES:
                yield [Piece(f"{p}{native}.weight", *rows, swap)]
        return
    for p in DIT_FILE_PREFIXES:  # a native (or ComfyUI-named) module in a checkpoint of the same names
        yield [Piece(f"{p}{n.path}.weight")]
    try:  # ... or through diffusers' names: its parts, in a diffusers folder or under the other native names
        parts = tables(table, n.space).to_diffusers(n.path, out, inp)
    except (KeyError, ValueError):
        return
    for p in folder_prefixes:
        yield [Piece(f"{p}{path}.weight", swap=swap) for path, _, swap in parts]
    for space in ("native", "comfy"):
        if space == n.space or (space == "comfy" and table.comfy is None):
            continue
        pieces = []
        for path, rows, swap in parts:
            found = tables(table, space).native_for(path)
            if found is None:
                break
            native, mapping, j = found
            if mapping is not None and len(mapping.diffusers) > 1:
                start, _ = mapping.fused(j, rows[1] - rows[0], inp)
                pieces.append((native, start, start + rows[1] - rows[0], swap != bool(mapping.swap)))
            else:
                pieces.append((native, None, None, swap != bool(mapping and mapping.swap)))
        else:
            for p in DIT_FILE_PREFIXES:
                yield [Piece(f"{p}{native}.weight", a, b, sw) for native, a, b, sw in pieces]
