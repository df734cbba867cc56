"""What an architecture is to lora-resize: which weights its LoRA modules update, under two names - the model
code's own ("native": ComfyUI's `diffusion_model.<path>`, kohya/musubi's `lora_unet_<path with _>`) and
diffusers' - and how the two correspond, weight by weight: one native weight may hold several diffusers weights as
blocks of its output rows (a fused qkv is to_q, to_k and to_v; Flux's single-block linear1 is q, k, v and the MLP
in, of uneven sizes), and a few hold theirs in another order (a final adaLN's shift and scale)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

@dataclass(frozen=True)
class QkvMlp:
    """A fused weight of q, k, v (each as wide as the layer's input) and an MLP's in-projection of `ratio` times
    that (Flux.1's single-block linear1: 3d + 4d rows)."""
    ratio: int = 4

    def sizes(self, out: int, inp: int) -> tuple[int, ...]:
        return inp, inp, inp, out - 3 * inp

    def fused(self, j: int, rows: int, inp: int) -> tuple[int, int]:
        """(start, total rows) of part j, of `rows` rows, in the fused weight."""
        mlp = rows if j == 3 else self.ratio * inp
        return j * inp, 3 * inp + mlp


@dataclass(frozen=True)
class Mapping:
    """A native weight `native` (a template: `{i}`, `{j}` stand for block and expert indices) and the diffusers
    weight(s) holding it: one (renamed), or several holding blocks of its output rows in order - equal blocks, or as
    `split` divides them. `swap`: the one diffusers weight holds the two halves of the rows swapped. `shape`: what
    (out, in) the native weight has in this family (tells families with the same names apart)."""
    native: str
    diffusers: tuple[str, ...]
    split: QkvMlp | None = None
    swap: bool = False
    shape: Callable[[int, int], bool] | None = None

    def parts(self, out: int, inp: int) -> list[tuple[int, int]]:
        """(start, stop) of each diffusers part's rows in the native weight (ValueError when they do not fit)."""
        n = len(self.diffusers)
        sizes = self.split.sizes(out, inp) if self.split else (out // n,) * n
        if sum(sizes) != out or min(sizes) <= 0:
            raise ValueError(f"{out} rows do not split as {sizes}")
        bounds, start = [], 0
        for s in sizes:
            bounds.append((start, start + s))
            start += s
        return bounds

    def fused(self, j: int, rows: int, inp: int) -> tuple[int, int]:
        """(start, total rows) of diffusers part j, of `rows` rows, in the fused native weight."""
        if self.split is not None:
            return self.split.fused(j, rows, inp)
        return j * rows, len(self.diffusers) * rows


def _regex(template: str, sep: str) -> re.Pattern:
    """A template's regex; sep '.' for dotted paths, '[._]' for kohya's flattened names."""
    out = ""
    for piece in re.split(r"(\{[ij]\})", template):
        if piece in ("{i}", "{j}"):
            out += rf"(?P<{piece[1]}>\d+)"
        else:
            out += re.escape(piece).replace(r"\.", sep)
    return re.compile(out + "$")


@dataclass
class Architecture:
    """A model family: its mappings, native templates that only it has (`signature`, for detection), whether a
    native path with no mapping keeps its name in diffusers (`same_names`), its diffusers component, and `comfy`:
    the same family under ComfyUI's module names where they differ from its trainers' (None: ComfyUI's are these);
    `parts`: the models beside the denoiser a LoRA of the family may also train (text encoders, a text connector)."""
    name: str
    title: str
    mappings: list[Mapping]
    signature: tuple[str, ...] = ()
    diffusers_signature: tuple[str, ...] = ()
    same_names: bool = False
    component: str = "transformer"
    comfy: "Architecture | None" = None
    parts: tuple["Part", ...] = ()
    _native: list = field(default_factory=list, repr=False)
    _diffusers: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        for m in self.mappings:
            self._native.append((_regex(m.native, r"\."), _regex(m.native, "[._]"), m))
            for j, d in enumerate(m.diffusers):
                self._diffusers.append((_regex(d, r"\."), _regex(d, "[._]"), m, j))

    # -- names ---------------------------------------------------------------------------------------------------
    def native_of(self, name: str, flat: bool = False) -> tuple[str, Mapping | None] | None:
        """The dotted native path of `name` (a native path, or kohya's flattened one) and its mapping, or None."""
        for dotted, flattened, m in self._native:
            hit = (flattened if flat else dotted).match(name)
            if hit:
                return _fill(m.native, hit), m
        return None

    def diffusers_of(self, name: str, flat: bool = False) -> tuple[str, Mapping, int, dict] | None:
        """(dotted diffusers path, mapping, part index, indices) of a diffusers module name, or None."""
        for dotted, flattened, m, j in self._diffusers:
            hit = (flattened if flat else dotted).match(name)
            if hit:
                return _fill(m.diffusers[j], hit), m, j, hit.groupdict()
        return None

    def to_diffusers(self, native: str, out: int, inp: int) -> list[tuple[str, tuple[int, int], bool]]:
        """The diffusers weights a native weight is: (path, its rows in the native weight, swapped halves).
        Raises KeyError for a path this architecture does not map."""
        found = self.native_of(native)
        if found is None:
            if self.same_names:
                return [(native, (0, out), False)]
            raise KeyError(native)
        path, m = found
        hit = next(d.match(path) for d, _, mm in self._native if mm is m and d.match(path))
        return [(_fill(d, hit), rows, m.swap) for d, rows in zip(m.diffusers, m.parts(out, inp))]

    def native_for(self, diffusers: str) -> tuple[str, Mapping, int] | None:
        """(native path, mapping, part index) for a dotted diffusers path (same name where the architecture keeps
        names and maps nothing else to it), or None."""
        found = self.diffusers_of(diffusers)
        if found is not None:
            _, m, j, idx = found
            return _fill_dict(m.native, idx), m, j
        return (diffusers, None, 0) if self.same_names else None

    def shape_ok(self, native: str, out: int, inp: int) -> bool:
        """A native weight of this shape can be this family's (its mapping's shape rule, when it has one)."""
        found = self.native_of(native)
        return found is None or found[1].shape is None or found[1].shape(out, inp)

    def part(self, component: str) -> "Part | None":
        """The part whose diffusers pipeline component is `component` (None: none of this family's)."""
        return next((p for p in self.parts if p.table.component == component), None)

    def evidence(self, paths: set[str], space: str, flat: bool) -> int:
        """How many of `paths` (native or diffusers, dotted or flattened) match templates only this family has."""
        sig = (self.signature + (self.comfy.signature if self.comfy else ()) if space == "native"
               else self.diffusers_signature)
        regs = [_regex(t, "[._]" if flat else r"\.") for t in sig]
        return sum(1 for p in paths if any(r.search(p) for r in regs))


@dataclass(frozen=True)
class Part:
    """A model beside a family's denoiser that its LoRAs may train: `table` holds its weights (native: the model
    code's paths, as kohya and ComfyUI read them; diffusers'), its `component` the diffusers pipeline component
    (`text_encoder_2`); `kohya`: the prefix sd-scripts and ComfyUI key it by (`lora_te1_` + its path with `_`;
    None: it has none); `onetrainer`: OneTrainer's where it differs; `native_prefix`: the prefix of its dotted
    native names in a ComfyUI-layout file where it has no kohya name (LTX-2's `text_embedding_projection.`);
    `diffusers`: whether diffusers' pipeline loads a LoRA on it (a T5 encoder: no)."""
    table: Architecture
    kohya: str | None = None
    onetrainer: str | None = None
    native_prefix: str | None = None
    diffusers: bool = True  # diffusers' pipeline loads a LoRA on it (its _lora_loadable_modules name it)

    def prefix(self, target: str) -> str | None:
        """The prefix this part's flattened names carry in a kohya-style `target` layout (None: it has none)."""
        return (self.onetrainer or self.kohya) if target == "onetrainer" else self.kohya


def _fill(template: str, hit: re.Match) -> str:
    return _fill_dict(template, hit.groupdict())


def _fill_dict(template: str, idx: dict) -> str:
    out = template
    for k, v in idx.items():
        out = out.replace("{" + k + "}", v)
    return out
