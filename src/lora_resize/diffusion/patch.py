"""A LoRA applied in memory to a model's named weights: for each module, its dense update scale * up @ down added
to the base weight it updates (found by formats.weights.locate_modules, the lookup `--base` uses), and every
touched weight restored bit for bit afterwards. Needs torch only (no diffusers)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

from ..errors import LoraStructureError
from ..formats import detect
from ..formats.base import DORA_KIND, Layout
from ..formats.weights import Piece, locate_modules
from ..io.reader import MemorySource


@dataclass
class PatchReport:
    """What `patched` did: `modules` the LoRA's modules, `matched` how many were applied, `weights` the base
    weights touched; `unmatched` the modules with no weight in the base, `mismatched` those whose weight there has
    another shape (name: why) - listed, never guessed; `not_applied` the LoRA's other tensors by kind (bias diffs,
    set weights: copied unchanged by a resize, so the same in every setting) with their counts."""
    modules: int = 0
    matched: int = 0
    weights: int = 0
    unmatched: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    not_applied: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: 'applied 12 of 14 modules (2 not in the base, e.g. ...)'."""
        text = f"applied {self.matched} of {self.modules} LoRA modules to {self.weights} base weights"
        left = self.unmatched + self.mismatched
        if left:
            text += f"; {len(left)} not applied (no weight of theirs in the base, e.g. {left[0]})"
        if self.not_applied:
            text += "; other tensors not applied: " + ", ".join(f"{n} {k}" for k, n in self.not_applied.items())
        return text


def parse(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None, path: Path | None = None
          ) -> tuple[MemorySource, Layout]:
    """A LoRA state dict as a TensorSource and its parsed layout (formats.detect; LoraStructureError when it holds
    no LoRA). `path`: where the tensors' file is (or would be), so a family that reads a companion file beside it
    (PEFT's adapter_config.json: its scale) finds it."""
    src = MemorySource(dict(tensors), dict(metadata or {}))
    return src, detect(src.infos(), src.metadata, path)


def dense_updates(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None,
                  weights: Mapping[str, torch.Tensor], base: str, arch: str | None = None,
                  path: Path | None = None) -> tuple[Iterator[tuple[str, slice, torch.Tensor]], PatchReport]:
    """The updates a LoRA makes to `weights` (key -> the base's weight tensor, keyed as a diffusers folder is:
    `unet.down_blocks.0....weight`, `text_encoder.text_model....weight`) and the report, which is complete before
    any update is computed. The updates come one module at a time (a 12B model's LoRA never has all its dense
    updates in memory at once) as (key, rows, delta): delta = scale * up @ down in float64 on the weight's device,
    its rows for weight[rows] in the base's order (swapped halves swapped back), shaped as weight[rows] (conv
    kernels included). `base` names the model in errors; `path` as `parse`. Raises LoraStructureError when no
    module matches (or for a DoRA, whose magnitudes replace the updated weight's column norms: its factors alone
    are another model)."""
    src, layout = parse(tensors, metadata, path)
    if any(layout.known.get(k) == DORA_KIND for k in layout.passthrough):
        raise LoraStructureError("this LoRA is a DoRA (it stores magnitude vectors): its effect is not measured "
                                 "here - resize it without --effect / preview")
    located = locate_modules(layout, src.infos(), src.metadata, weights, arch)
    report = PatchReport(modules=len(layout.modules))
    for k in layout.passthrough:
        kind = layout.known.get(k, "other")
        report.not_applied[kind] = report.not_applied.get(kind, 0) + 1
    matched = []
    for module, pieces in located.modules:
        if pieces is None:
            report.unmatched.append(module.name)
            continue
        out, rest = module.weight_shape(src.infos())
        why = _fits(pieces, weights, out, math.prod(rest))
        if why is not None:
            report.mismatched.append(f"{module.name}: {why}")
            continue
        matched.append((module, pieces))
    located.check(len(matched), base, (report.unmatched + report.mismatched + [None])[0])
    report.matched = len(matched)
    report.weights = len({id(weights[p.key]) for _, pieces in matched for p in pieces})

    def updates() -> Iterator[tuple[str, slice, torch.Tensor]]:
        for module, pieces in matched:
            layer = module.load(src)
            W = weights[pieces[0].key]
            delta = layer.scale * (layer.up.to(W.device, torch.float64) @ layer.down.to(W.device, torch.float64))
            start = 0
            for p in pieces:
                target = weights[p.key]
                rows = slice(p.start, p.stop) if p.start is not None else slice(0, target.shape[0])
                n = rows.stop - rows.start
                chunk = delta[start:start + n]
                start += n
                if p.swap:
                    chunk = torch.cat([chunk[n // 2:], chunk[:n // 2]])
                yield p.key, rows, chunk.reshape(target[rows].shape)
    return updates(), report


def _fits(pieces: list[Piece], weights: Mapping[str, torch.Tensor], out: int, inp: int) -> str | None:
    """None when the pieces make an out x inp weight (rows stacked, each flattened to its inputs), else why not."""
    rows = 0
    for p in pieces:
        W = weights[p.key]
        n = (p.stop - p.start) if p.start is not None else W.shape[0]
        if p.start is not None and p.stop > W.shape[0]:
            return f"{p.label()} is out of {p.key}'s {W.shape[0]} rows"
        if math.prod(W.shape[1:]) != inp:
            return f"updates {out} x {inp}, {p.key} is {W.shape[0]} x {math.prod(W.shape[1:])}"
        rows += n
    return None if rows == out else f"updates {out} rows, the base's {', '.join(p.label() for p in pieces)} have {rows}"


class Patch:
    """Updates applied to weights in place (each added in float64 and rounded once to the weight's dtype), with
    the touched weights saved first, in host memory (once per tensor, however many keys name it); `restore` puts
    them back bit for bit."""

    def __init__(self, weights: Mapping[str, torch.Tensor], updates: Iterable[tuple[str, slice, torch.Tensor]]):
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(weight) -> (weight, its copy)
        with torch.no_grad():
            try:
                for key, rows, delta in updates:
                    W = weights[key]
                    if id(W) not in self.saved:  # kept in host memory: a GPU holds the model once
                        self.saved[id(W)] = (W, W.detach().to("cpu", copy=True))
                    part = W.data[rows]
                    part.copy_((part.to(torch.float64) + delta).to(W.dtype))
            except BaseException:
                self.restore()
                raise

    def restore(self) -> None:
        with torch.no_grad():
            for W, copy in self.saved.values():
                W.data.copy_(copy)
        self.saved = {}
