"""`--base MODEL`: the base weight each LoRA module patches, and its norms, so a resize's loss can be measured
against the model rather than against the update alone.

Each module is read as the weight it updates (formats/convert.py: its architecture's native, ComfyUI or diffusers
name, or Stable Diffusion's component and path) and found in the base under that weight's name in the base's own
layout: SD/SDXL single-file checkpoints by the original UNet's paths (`model.diffusion_model.input_blocks.4.1...`)
and CLIP's (`cond_stage_model.transformer.`, `conditioner.embedders.0.transformer.`; SD2's and SDXL's second
OpenCLIP encoder by its `resblocks`, q/k/v as thirds of `attn.in_proj_weight`); DiT checkpoints by native paths
under `model.diffusion_model.`, `diffusion_model.` or none; diffusers folders by diffusers paths under their
component. A module whose weight is part of a fused one gets its rows (q of a qkv, Flux's uneven linear1 parts),
a fused module the concatenation of its parts. Unmatched modules are listed, never guessed; a base whose weights
do not have the LoRA's shapes is refused as another architecture's.

For each matched module: ||W||_F and the spectral norm ||W||_2 (W flattened to out x in*kernel, as the update;
||W||_2 exactly from the smaller Gram matrix, or by Lanczos for sides above 256), one weight per core at a time."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import InputFileError, LoraStructureError
from ..formats import Layout
from ..formats.convert import Name, detect_arch, read_name, scheme_of, tables
from ..io.checkpoint import Checkpoint
from ..io.reader import TensorInfo
from ..core.decompose import sym_gram
from ..core.parallel import available_cores, ordered_map, torch_threads
from ..models import SD, Architecture
from ..models import sd as sdm
from ..results import BaseNorms

DIT_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
EXACT_SIDE = 256  # ||W||_2 from the eigenvalues of the smaller Gram matrix up to this side, Lanczos beyond
LANCZOS_STEPS = 400


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of base weight `key` (None: all), their two halves swapped when `swap`."""
    key: str
    start: int | None = None
    stop: int | None = None
    swap: bool = False

    def label(self) -> str:
        return self.key + (f"[{self.start}:{self.stop}]" if self.start is not None else "")


def base_norms(layout: Layout, infos: Mapping[str, TensorInfo], metadata: Mapping[str, str],
               base: str | os.PathLike, arch_name: str | None = None, variant: str | None = None
               ) -> tuple[dict[str, BaseNorms], list[str]]:
    """(module name -> the norms of the base weight it patches, notes) for `layout`'s modules; `variant`: the
    weight files of a diffusers folder to read (io.checkpoint.Checkpoint). Raises LoraStructureError when the
    LoRA's model is not known, or the base is another model's; InputFileError for a base that cannot be read."""
    scheme = scheme_of(layout)
    try:
        arch = detect_arch(layout, scheme, arch_name, infos, metadata)
    except LoraStructureError as e:
        raise LoraStructureError(f"--base needs to know which model the LoRA is for: {e}") from None
    read = [(m, read_name(m.name, scheme, arch)) for m in layout.modules]
    hint = " ".join(metadata.get(k, "") for k in ("modelspec.architecture", "ss_base_model_version"))
    sdxl = arch is None and sdm.is_sdxl([m.name for m in layout.modules],
                                        [(n.component, n.path) for _, n in read if n is not None], hint)
    norms: dict[str, BaseNorms] = {}
    unmatched, mismatched, found = [], [], []
    with Checkpoint(base, variant) as ck:
        for m, n in read:
            out, (inp, *kernel) = m.weight_shape(infos)
            pieces = locate(n, arch, out, inp, ck, sdxl) if n is not None else None
            if pieces is None:
                unmatched.append(m.name)
            else:
                found.append((m.name, pieces, (out, inp * math.prod(kernel))))

        def measure(item) -> tuple[str, list[Piece], tuple, BaseNorms | None]:
            name, pieces, want = item
            W = matrix(ck, pieces)
            if tuple(W.shape) != want:
                return name, pieces, tuple(W.shape), None
            if not bool(torch.isfinite(W).all()):
                raise InputFileError(f"--base {base}: {pieces[0].key} holds NaN or Inf values; the checkpoint is "
                                     "damaged - use another copy")
            return name, pieces, want, BaseNorms(", ".join(p.label() for p in pieces), float(W.norm()),
                                                 spectral_norm(W))
        with torch_threads(1):  # one weight per core at a time: bounded memory, no oversubscription
            for name, pieces, shape, bn in ordered_map(measure, found, available_cores()):
                if bn is None:
                    want = next(w for nm, _, w in found if nm == name)
                    mismatched.append((name, pieces, shape, want))
                else:
                    norms[name] = bn
    if mismatched and len(mismatched) >= len(norms):
        name, pieces, got, want = mismatched[0]
        raise LoraStructureError(f"--base {base} is not this LoRA's model: {name} updates a {want[0]} x {want[1]} "
                                 f"weight, the base's {pieces[0].key} is {got[0]} x {got[1]} "
                                 f"({len(mismatched)} of {len(layout.modules)} modules differ); give the base "
                                 "the LoRA was trained on")
    if not norms:
        example = layout.modules[0].name if layout.modules else "?"
        raise LoraStructureError(f"--base {base}: no module of this LoRA has its weight there (e.g. {example}); is "
                                 f"it the {arch.title if arch else 'Stable Diffusion'} model the LoRA was trained on?")
    notes = []
    left = unmatched + [x[0] for x in mismatched]
    if left:
        notes.append(f"{len(left)} module(s) have no weight of their shape in the base and are measured without it "
                     f"(e.g. {left[0]})")
    return norms, notes


def matrix(ck: Checkpoint, pieces: list[Piece]) -> torch.Tensor:
    """The base weight the pieces make, float64, out x in*kernel."""
    parts = []
    for p in pieces:
        W = ck.matrix(p.key)
        if p.start is not None:
            W = W[p.start:p.stop]
        if p.swap:
            h = W.shape[0] // 2
            W = torch.cat([W[h:], W[:h]])
        parts.append(W)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def spectral_norm(W: torch.Tensor) -> float:
    """||W||_2, exactly: the largest eigenvalue of the smaller Gram matrix (W W^T or W^T W, computed by halves) when
    its side is at most EXACT_SIDE; else Lanczos on W^T W with full reorthogonalisation until the largest Ritz
    value changes by less than 1e-12 relative (it converges from below)."""
    m, n = W.shape
    p = min(m, n)
    if p <= EXACT_SIDE:
        G = sym_gram(W if m <= n else W.T)
        return math.sqrt(max(0.0, float(torch.linalg.eigvalsh(G)[-1])))
    A = W if m >= n else W.T  # tall: iterate on the small side
    g = torch.Generator().manual_seed(0)
    q = torch.randn(A.shape[1], generator=g, dtype=torch.float64)
    Q = [q / q.norm()]
    alphas, betas, theta = [], [], 0.0
    for _ in range(LANCZOS_STEPS):
        w = A.T @ (A @ Q[-1])
        alphas.append(float(w @ Q[-1]))
        B = torch.stack(Q, 1)
        for _ in range(2):
            w = w - B @ (B.T @ w)
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        new = float(torch.linalg.eigvalsh(T)[-1])
        beta = float(w.norm())
        if abs(new - theta) <= 1e-12 * new or beta <= 1e-14 * math.sqrt(max(new, 0.0)):
            return math.sqrt(max(new, 0.0))
        theta = new
        betas.append(beta)
        Q.append(w / beta)
    return math.sqrt(max(theta, 0.0))


# ----------------------------------------------------------------------------------------------------------------
# Where a module's weight is in a base


def locate(n: Name, arch: Architecture | None, out: int, inp: int, ck: Checkpoint, sdxl: bool
           ) -> list[Piece] | None:
    """The pieces of the base weight module `n` (out rows, `inp` input features) patches, or None."""
    candidates = _sd_candidates(n, sdxl, inp, ck) if n.space == SD else _dit_candidates(n, arch, out, inp, ck)
    for pieces in candidates:
        if all(p.key in ck for p in pieces):
            return pieces
    return None


def _sd_candidates(n: Name, sdxl: bool, inp: int, ck: Checkpoint):
    comp, path = n.component, n.path
    yield [Piece(f"{comp}.{path}.weight")]  # a diffusers folder
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
    import re
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


def _dit_candidates(n: Name, arch: Architecture, out: int, inp: int, ck: Checkpoint):
    folder_prefixes = (f"{arch.component}.", "")
    if n.space == "diffusers":
        for p in folder_prefixes:
            yield [Piece(f"{p}{n.path}.weight")]
        for space in ("native", "comfy"):
            found = tables(arch, space).native_for(n.path)
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
        parts = tables(arch, n.space).to_diffusers(n.path, out, inp)
    except (KeyError, ValueError):
        return
    for p in folder_prefixes:
        yield [Piece(f"{p}{path}.weight", swap=swap) for path, _, swap in parts]
    for space in ("native", "comfy"):
        if space == n.space or (space == "comfy" and arch.comfy is None):
            continue
        pieces = []
        for path, rows, swap in parts:
            found = tables(arch, space).native_for(path)
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
