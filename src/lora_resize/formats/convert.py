"""Layouts, and conversion between them, exactly.

A layout is how trainers and UIs key a module: under which name of the weight it updates (the model code's own,
"native", or diffusers'), in which form (kohya's `lora_down/lora_up/alpha`, or PEFT-style `lora_A/lora_B`) and
with which prefix:

| layout | names | form | written by |
|---|---|---|---|
| kohya | `lora_unet_<native path with _>` (SD: `lora_unet_`, `lora_te_` kohya names) | kohya + alpha | sd-scripts, musubi-tuner |
| comfy | `lora_unet_<ComfyUI's module path with _>` (SD: as kohya) | kohya + alpha | read by ComfyUI |
| diffusers | `transformer.<diffusers path>` (SD: `unet.`, `text_encoder.`) | A/B, config in metadata | diffusers, ai-toolkit, SimpleTuner |
| onetrainer | `lora_transformer_<diffusers path with _>` (SD: as kohya) | kohya + alpha | OneTrainer |

Reading any of these (and ai-toolkit's / DiffSynth's native A/B files), each module becomes the weight it updates
in its architecture (models/); writing it under another layout renames it, or splits it (a fused native weight ->
its diffusers parts: each part's rows of up with the shared down, exact) or fuses it (diffusers parts -> the fused
native weight: down stacked, up block-diagonal, rank the sum, exact). `comfy` keys ComfyUI's module paths the way
ComfyUI's key map (comfy/lora.py model_lora_keys_unet) reads them for every model and sd-scripts, musubi-tuner,
InvokeAI and Forge read them too wherever ComfyUI's paths are the trainers'. Each module is read by the layout its
own name is in (module_scheme): files mix them. Without a resize the factors are copied (Converted.exact), each
module keeping its own scale; with one, the new alpha follows the output's convention (one alpha for every layer),
so a converted file applies exactly its input's update, weight by weight."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Callable, Iterable, Mapping as TMapping

import torch

from ..core.layer import LowRankLayer
from ..core.truncate import NewFactors
from ..errors import LoraStructureError, OptionsError
from ..io.metadata import SideOutputs
from ..io.reader import TensorInfo, TensorSource
from ..models import ARCH_KEY, LAYOUTS, MODELS, SD, Architecture, architectures, hinted
from ..models import sd
from .base import Format, Layout, Module
from .diffusers import METADATA_KEY
from .lycoris import KeptLokr
from .pairs import PairModule
from .peft import PEFT_PREFIX, new_adapter

TARGETS = LAYOUTS


@dataclass(frozen=True)
class Name:
    """A module's name read canonically: the weight it updates (`space` 'native' or 'diffusers', or 'sd' with a
    diffusers component) and its dotted path."""
    space: str
    component: str
    path: str


# ----------------------------------------------------------------------------------------------------------------
# Reading a layout's names


# the layout a module's name prefix says, by key form (kohya's down/up/alpha, or A/B); a name with none of these is a
# bare model path (DiffSynth's; Qwen-Image Lightning's and Z-Image LoKr's kohya-form files), read as "diffsynth"
PREFIXES = {
    "kohya": (("diffusion_model.", "comfy"), ("lora_transformer_", "onetrainer"), ("lycoris_", "simpletuner"),
              ("lora_unet_", "kohya"), ("lora_te", "kohya")),
    "ab": (("diffusion_model.", "ai_toolkit"), ("lora_unet_", "kohya"), ("lora_te", "kohya")),
}
DIFFUSERS_COMPONENTS = ("transformer", "connectors", "text_encoder_3", *sd.KOHYA_PREFIX)
KEY_FORM = {"kohya": "kohya", "lycoris": "kohya", "comfy": "kohya", "onetrainer": "kohya", "simpletuner": "kohya",
        "diffusers": "ab", "ai_toolkit": "ab", "diffsynth": "ab", "peft": "peft"}


def module_scheme(name: str, form: str) -> str:
    """The layout one module's name is in, within a file of key form `form` ('kohya', 'ab', 'peft'; or any
    layout's name, standing for its form): a file may mix them (musubi-tuner's LTX-2 ComfyUI files key the text
    connector without the `diffusion_model.` every other module has; OneTrainer's SD3 files hold
    `lora_transformer_` and `lora_te1_` modules), so each module is read by its own."""
    form = KEY_FORM.get(form, form)
    if form == "peft":
        return "peft"
    for prefix, scheme in PREFIXES.get(form, ()):
        if name.startswith(prefix):
            return scheme
    if name.split(".", 1)[0] in DIFFUSERS_COMPONENTS and "." in name:
        return "diffusers"
    return "diffsynth"


def schemes_of(layout: Layout) -> list[str]:
    """Each module's layout (module_scheme), in the layout's order; [] for a key family no conversion reads."""
    if layout.format not in KEY_FORM:
        return []
    return [module_scheme(m.name, layout.format) for m in layout.modules]


def scheme_of(layout: Layout) -> str:
    """The layout a parsed file is in: its modules' (kohya, comfy, diffusers, onetrainer, simpletuner, ai_toolkit,
    diffsynth, peft), the most common one where they mix; its key family's name when no layout conversion applies
    to it."""
    found = schemes_of(layout)
    if not found:
        return layout.format
    return max(dict.fromkeys(found), key=found.count)


def read_name(name: str, scheme: str, arch: Architecture | None) -> Name | None:
    """The canonical reading of module `name` (of a file in layout `scheme`: the module's own layout is read from
    its name, module_scheme) as a weight of `arch` (None: Stable Diffusion), or None when it does not read."""
    scheme = module_scheme(name, scheme)
    if arch is None:  # Stable Diffusion
        if scheme == "comfy" and name.startswith("diffusion_model."):  # ComfyUI's own: the sgm UNet's paths
            name = "lora_unet_" + name.removeprefix("diffusion_model.").replace(".", "_")
        if scheme in ("kohya", "comfy", "onetrainer"):
            hit = sd.from_kohya(name)
            return Name(SD, *hit) if hit else None
        if scheme in ("diffusers", "diffsynth", "peft"):  # a pipeline's components, or one model's own paths
            name = name.removeprefix(PEFT_PREFIX).replace(".processor.", ".")
            comp, _, path = name.partition(".")
            if comp in sd.KOHYA_PREFIX and path:
                return Name(SD, comp, path)
            if comp in sd.UNET_TOP:
                return Name(SD, "unet", name)
            if comp == "text_model":
                return Name(SD, "text_encoder", name)
        return None
    part = _read_part(arch, name, scheme)
    if part is not None:
        return part
    if scheme == "kohya":
        for prefix in ("lora_unet__", "lora_unet_"):
            if name.startswith(prefix):
                return _flat(arch, name[len(prefix):], "native")
        return None
    if scheme in ("comfy", "ai_toolkit"):
        return _dotted(arch, name.removeprefix("diffusion_model."), "native")
    if scheme == "onetrainer":
        return _flat(arch, name.removeprefix("lora_transformer_"), "diffusers")
    if scheme == "simpletuner":
        return _flat(arch, name.removeprefix("lycoris_"), "diffusers")
    if scheme == "diffusers":
        comp, _, path = name.partition(".")
        return _dotted(arch, path, "diffusers") if comp == arch.component else None
    if scheme in ("diffsynth", "peft"):
        name = name.removeprefix(PEFT_PREFIX)
        return (_dotted(arch, name, "native", False) or _dotted(arch, name, "diffusers", False)
                or _dotted(arch, name, "native"))
    return None


def _read_part(arch: Architecture, name: str, scheme: str) -> Name | None:
    """`name` read as a weight of one of the family's parts (a text encoder, LTX-2's text connector): by its kohya
    or OneTrainer prefix, its diffusers component, or its native prefix; None when it is none of theirs."""
    for part in arch.parts:
        t = part.table
        if scheme == "kohya" or scheme == "onetrainer":
            for prefix in {part.kohya, part.onetrainer} - {None}:
                hit = t.native_of(name[len(prefix):], flat=True) if name.startswith(prefix) else None
                if hit:
                    return Name("native", t.component, hit[0])
        elif scheme == "diffusers" and name.startswith(t.component + "."):
            path = name[len(t.component) + 1:]
            if t.diffusers_of(path) is not None:
                return Name("diffusers", t.component, path)
        elif part.native_prefix and name.startswith(part.native_prefix):
            path = name[len(part.native_prefix):]
            if t.native_of(path) is not None:
                return Name("native", t.component, path)
    return None


def table_of(arch: Architecture, n: Name) -> Architecture:
    """The tables a canonical name reads in: the family's own, or its part's (n.component another model's)."""
    part = arch.part(n.component) if n.component != arch.component else None
    return part.table if part is not None else arch


def tables(arch: Architecture, space: str) -> Architecture:
    """The tables of a space: ComfyUI's own names ('comfy') where the family has them, else its native ones."""
    return arch.comfy if space == "comfy" and arch.comfy is not None else arch


def _native_spaces(arch: Architecture) -> tuple[str, ...]:
    return ("native", "comfy") if arch.comfy is not None else ("native",)


def _flat(arch: Architecture, flat: str, space: str) -> Name | None:
    if space == "diffusers":
        hit = arch.diffusers_of(flat, flat=True)
        return Name(space, arch.component, hit[0]) if hit else None
    for sp in _native_spaces(arch):
        hit = tables(arch, sp).native_of(flat, flat=True)
        if hit:
            return Name(sp, arch.component, hit[0])
    return None


def _dotted(arch: Architecture, path: str, space: str, same_names: bool = True) -> Name | None:
    """`path` read in `space` ('diffusers', or 'native': the trainers' or ComfyUI's names), through the tables or,
    for a family that keeps diffusers' names (`same_names`), as it is."""
    if space == "diffusers":
        known = arch.diffusers_of(path) is not None or (same_names and arch.same_names)
        return Name(space, arch.component, path) if known else None
    for sp in _native_spaces(arch):
        if tables(arch, sp).native_of(path) is not None:
            return Name(sp, arch.component, path)
    return Name("native", arch.component, path) if same_names and arch.same_names else None


def keys_arch(layout: Layout, infos: TMapping[str, TensorInfo], metadata: TMapping[str, str],
              wanted: str | None = None) -> str | None:
    """The name of the architecture the file's modules read as (detect_arch: the keys decide, the metadata only
    breaks ties; SD for Stable Diffusion), else the one its metadata names (models.hinted), else None."""
    try:
        arch = detect_arch(layout, scheme_of(layout), wanted, infos, metadata)
    except (LoraStructureError, OptionsError):
        return hinted(metadata)
    return SD if arch is None else arch.name


def detect_arch(layout: Layout, scheme: str, wanted: str | None, infos: TMapping[str, TensorInfo],
                metadata: TMapping[str, str] | None = None) -> Architecture | None:
    """The architecture a file's modules belong to (None: Stable Diffusion): `wanted` when given (--arch), else
    the family whose names (and shapes, where families share names) read most of them; ties go to the family the
    metadata names (models.hinted), then to the one whose own templates match more. Raises LoraStructureError
    when none reads them or two read them alike."""
    if wanted is not None:
        if wanted == SD:
            return None
        if wanted not in MODELS:
            raise OptionsError(f"--arch must be one of {', '.join(architectures())}, got {wanted!r}")
        return MODELS[wanted]
    names = [m.name for m in layout.modules]
    shapes = {m.name: m.weight_shape(infos) for m in layout.modules}
    own = {n: module_scheme(n, scheme) for n in names}
    hint = hinted(metadata or {})

    def denoiser(a: Architecture | None, name: str) -> bool | None:
        """True: `name` reads as a's denoiser (the UNet, the transformer); None: as a model beside it (a text
        encoder, which several families share: it decides nothing while a denoiser module is there)."""
        n = read_name(name, own[name], a)
        if n is None:
            return False
        if a is None:
            return True if n.component == "unet" else None
        if n.component != a.component:
            return None
        if not _own(a, name, own[name]):
            return False
        out, in_shape = shapes[name]
        return n.space == "diffusers" or tables(a, n.space).shape_ok(n.path, out, in_shape[0] if in_shape else 0)

    def evidence(a: Architecture) -> int:
        return sum(a.evidence({n}, "diffusers" if own[n] in ("diffusers", "onetrainer", "simpletuner") else "native",
                              own[n] in ("kohya", "onetrainer", "simpletuner")) for n in names)
    reads = {a: [denoiser(MODELS.get(a), n) for n in names] for a in (SD, *MODELS)}
    anything = any(True in r for r in reads.values())
    scores = []
    for a, r in reads.items():
        if anything:  # the denoiser's modules decide; the family's own text encoders are evidence
            hits, more = r.count(True), (1 if r.count(True) else 0) if a == SD else evidence(MODELS[a]) + r.count(None)
        else:  # a text-encoder-only file: its text encoders decide, Stable Diffusion's where others read them too
            hits, more = r.count(None), 1 if a == SD else evidence(MODELS[a])
        scores.append((hits, hint == a, more, a))
    scores.sort(reverse=True)
    best, second = scores[0], scores[1]
    if best[0] == 0:
        raise LoraStructureError(f"no module of this {scheme} file reads as a known architecture (keys like "
                                 f"{names[0] if names else '?'}); conversions are defined for "
                                 f"{', '.join(architectures())} - give --arch, or report the model")
    if best[:3] == second[:3]:
        raise LoraStructureError(f"this file's modules read as {best[3]} and as {second[3]} alike; give --arch "
                                 f"{best[3]} (or {second[3]})")
    return None if best[3] == SD else MODELS[best[3]]


def _own(arch: Architecture, name: str, scheme: str) -> bool:
    """A name that reads through the architecture's own tables (not only its same-names rule)."""
    if not arch.same_names:
        return True
    if scheme in ("kohya", "onetrainer", "simpletuner"):
        return True  # flattened names only read through the tables
    base = name.removeprefix("diffusion_model.").removeprefix(f"{arch.component}.").removeprefix(PEFT_PREFIX)
    return arch.native_of(base) is not None or arch.diffusers_of(base) is not None


# ----------------------------------------------------------------------------------------------------------------
# Writing: names, and the modules that read the source's modules into the target's


def key_base(target: str, n: Name, sdxl: bool = False, arch: Architecture | None = None) -> str:
    """The target layout's name for a canonical module in the target's space (`sdxl`: Stable Diffusion modules are
    SDXL's, which kohya names by the sgm UNet's paths; `arch`: the family, whose parts - text encoders, a text
    connector - kohya-style layouts key by their own prefixes). Raises LoraStructureError for a part the target
    has no name for."""
    if n.space == SD:
        if target == "diffusers":
            return f"{n.component}.{n.path}"
        if target == "peft":
            return PEFT_PREFIX + n.path
        base = sd.to_kohya(n.component, n.path, sdxl)
        if base is None:
            raise LoraStructureError(f"{n.component}.{n.path}: no kohya name is defined for this component")
        return base
    part = arch.part(n.component) if arch is not None and n.component != arch.component else None
    if part is not None and target == "diffusers" and not part.diffusers:
        raise LoraStructureError(f"{arch.title}'s {part.table.title} has no LoRA in diffusers' pipelines (their "
                                 f"loaders skip {n.component}.*); convert to kohya, comfy or onetrainer, or convert a "
                                 "file without it")
    if target == "diffusers":
        return f"{n.component}.{n.path}"
    if target == "peft":
        return PEFT_PREFIX + n.path
    if part is not None:
        prefix = part.prefix(target)
        if prefix is not None:
            return prefix + n.path.replace(".", "_")
        if target == "comfy" and part.native_prefix:
            return part.native_prefix + n.path
        raise LoraStructureError(f"{arch.title}'s {part.table.title} module {n.path} has no name known here in the "
                                 f"{target} layout; convert to comfy or diffusers")
    if target in ("kohya", "comfy"):  # comfy: ComfyUI's module paths, in the one form its key map shares with
        return "lora_unet_" + n.path.replace(".", "_")  # sd-scripts, musubi-tuner, InvokeAI and Forge
    return "lora_transformer_" + n.path.replace(".", "_")


def target_space(target: str, arch: Architecture | None, component: str | None = None) -> str:
    """The names a target layout keys modules by: the model code's own ('native': its trainers'), ComfyUI's
    ('comfy', where the family's differ; its denoiser's only), or diffusers'."""
    if target == "kohya":
        return "native"
    if target == "comfy":
        own = arch is not None and component in (None, arch.component)
        return "comfy" if own and arch.comfy is not None else "native"
    if target == "onetrainer" and arch is not None and component not in (None, arch.component):
        return "native"  # OneTrainer keys text encoders as kohya does (lora_te1_...)
    return "diffusers"


@dataclass
class Feed:
    """A source module feeding an output module: the rows `take` (start, stop) of its update (None: all of them),
    with their two halves swapped (`swap`), placed at rows `place` (start, stop) of the output (None: the output
    is this part alone)."""
    module: Module
    place: tuple[int, int] | None = None
    take: tuple[int, int] | None = None
    swap: bool = False

    def up(self, layer: LowRankLayer) -> torch.Tensor:
        """The rows of the layer's up factor this source gives."""
        up = layer.up if self.take is None else layer.up[self.take[0]:self.take[1]]
        if self.swap:
            half = up.shape[0] // 2
            up = torch.cat([up[half:], up[:half]])
        return up


@dataclass
class Converted(Module):
    """An output module in the target layout: `target` writes it (its keys, its scale convention), `sources`
    give its update: one source renamed or sliced, or several fused (block-diagonal, exact). A fused module's
    scale is its first part's (alpha / rank), each other part's ratio to it folded into its block of up; its rank
    is the sum of the parts' - so under `--rank-rule kohya` its alpha is that scale times the summed rank (alpha
    x3 for a fused qkv, ComfyUI's and musubi's convention), and by default the one alpha of the whole file."""
    target: Module | None = None
    sources: list[Feed] = field(default_factory=list)
    out_rows: int = 0
    in_shape: tuple[int, ...] = ()
    component: str | None = None  # the model it adapts (the pipeline's component: unet, text_encoder, ...)

    @property
    def output_scale(self) -> float | None:
        return self.target.output_scale

    @property
    def config_key(self) -> tuple[str, str] | None:
        """(component, module path) under which the target layout's config names it (PairModule.config_key)."""
        return getattr(self.target, "config_key", None)

    def emit(self, new):
        return self.target.emit(new)

    def weight_shape(self, infos) -> tuple[int, tuple[int, ...]]:
        return self.out_rows, self.in_shape

    @property
    def _renamed(self) -> bool:
        return len(self.sources) == 1 and self.sources[0].place is None

    def load(self, src: TensorSource) -> LowRankLayer:
        if self._renamed:
            s = self.sources[0]
            layer = s.module.load(src)
            return LowRankLayer(s.up(layer).contiguous(), layer.down, layer.rank, layer.alpha, layer.scale,
                                layer.kernel, layer.in_channels)
        layers = [(s, s.module.load(src)) for s in self.sources]
        scale = next((layer.scale for _, layer in layers if layer.scale != 0), 1.0)
        total = sum(layer.factor_size for _, layer in layers)
        first = layers[0][1]
        up = torch.zeros(self.out_rows, total, dtype=torch.float64)
        downs, col = [], 0
        for s, layer in layers:
            f = layer.factor_size
            up[s.place[0]:s.place[1], col:col + f] = s.up(layer).to(torch.float64) * (layer.scale / scale)
            downs.append(layer.down.to(torch.float64))
            col += f
        rank = sum(layer.rank for _, layer in layers)
        return LowRankLayer(up, torch.cat(downs), rank, scale * rank, scale, first.kernel, first.in_channels)

    def exact(self, src: TensorSource, dtype: torch.dtype) -> tuple[NewFactors | None, str]:
        """The output's factors by rearrangement alone (exact_factors)."""
        return exact_factors(self.sources, self.out_rows, self.output_scale, src, dtype)

    def scale_and_rank(self, src: TensorSource) -> tuple[float, int]:
        if self._renamed:
            return self.sources[0].module.scale_and_rank(src)
        found = [s.module.scale_and_rank(src) for s in self.sources]
        return next((sc for sc, _ in found if sc != 0), 1.0), sum(r for _, r in found)


def exact_factors(sources: list[Feed], out_rows: int, fixed: float | None, src: TensorSource, dtype: torch.dtype
              ) -> tuple[NewFactors | None, str]:
    """The output's factors by rearrangement alone, in `dtype`, with the alpha that rescales none of them:
    renamed or split, the input's rows of up (halves swapped where the model swaps them) and its down; fused
    parts that share one down (bit for bit), their ups stacked on it; other fused parts, their downs stacked
    and ups block-diagonal (zeros elsewhere), rank the sum. The alpha is the input's (no alpha: scale 1,
    alpha = rank; a PEFT config's scale: scale x rank; fused parts: their sum); a target loaded at a fixed
    scale (diffusers' and PEFT's A/B files: 1) gets up times the ratio, when every product is exact (a power of
    two such as alpha / rank = 1/2, barring underflow). Returns (factors, "") or (None, why not): a part that is
    not a plain down/up pair (a LoHa/LoKr/Tucker update is a product), fused parts of different scales (alpha /
    rank), a save precision narrower than the input's, a scale the save precision cannot hold."""
    if not all(isinstance(s.module, PairModule) for s in sources):
        return None, "its input is not a plain down/up pair (a LoHa, LoKr or Tucker update is a product)"
    renamed = len(sources) == 1 and sources[0].place is None
    layers = [(s, s.module.load(src)) for s in sources]
    if not all(_widens(t.dtype, dtype) for _, layer in layers for t in (layer.up, layer.down)):
        return None, "the save precision is narrower than the input's"
    first = layers[0][1]
    if len({layer.scale for _, layer in layers}) > 1:
        return None, "its fused parts have different scales (alpha / rank)"
    if renamed:
        up, down, rank, alpha = sources[0].up(first), first.down, first.rank, first.alpha
        keep = up.any(dim=0)
        if sources[0].take is not None and not bool(keep.all()) and bool(keep.any()):
            # a part of a block-diagonal fused weight: its own columns of up and rows of down (what
            # diffusers' converters do when the other blocks are exactly zero), if its scale fits an alpha
            r = int(keep.sum())
            a = torch.tensor(first.scale * r, dtype=torch.float32).to(dtype)
            if float(a) / r == first.scale:
                up, down, rank, alpha = up[:, keep], down[keep], r, first.scale * r
    else:
        shared = all(layer.down.shape == first.down.shape and torch.equal(layer.down, first.down)
                     for _, layer in layers)
        widths = [first.factor_size] if shared else [layer.factor_size for _, layer in layers]
        up = torch.zeros(out_rows, sum(widths), dtype=dtype)
        col = 0
        for (s, layer), w in zip(layers, widths * len(layers) if shared else widths):
            up[s.place[0]:s.place[1], col:col + w] = s.up(layer)
            col += 0 if shared else w
        down = first.down if shared else torch.cat([layer.down for _, layer in layers])
        rank = first.rank if shared else sum(layer.rank for _, layer in layers)
        alphas = [layer.alpha for _, layer in layers]
        alpha = first.alpha if shared else (None if None in alphas else sum(alphas))
    if fixed is not None and fixed != first.scale:  # a layout loaded at a fixed scale (A/B files: 1)
        c = first.scale / fixed
        scaled = up.to(torch.float64) * c
        up = scaled.to(dtype)
        if not bool(torch.equal(up.to(torch.float64), scaled)):
            return None, (f"the target layout loads it at scale {fixed:g}, and its up times its own scale "
                          f"{first.scale:g} is not exact in the save precision")
        alpha = None  # the scale is in up now: the fixed scale's alpha
    alpha = (fixed if fixed is not None else first.scale) * rank if alpha is None else alpha
    alpha_t = torch.tensor(alpha, dtype=torch.float32).to(dtype)
    own = sources[0].module
    if renamed and own.alpha_in_file and alpha == first.alpha and rank == first.rank and up.dtype == dtype:
        alpha_t = src.get(own.alpha_key)  # the input's alpha as stored (its dtype and bits), the factors' as theirs
    if fixed is None and float(alpha_t) / rank != first.scale:
        return None, f"its scale {first.scale:g} is no alpha / rank the save precision holds"
    return NewFactors(up.to(dtype).contiguous(), down.to(dtype).contiguous(), alpha_t, first.kernel,
                      first.in_channels), ""


def exact_copy(module: Module) -> Callable[[TensorSource, torch.dtype], tuple[NewFactors | None, str]] | None:
    """How a conversion copies `module`'s factors without arithmetic, as (source, save dtype) -> (factors, "") or
    (None, why not): a converted module's rearrangement (Converted.exact); a module the conversion keeps as it is
    (a file already in the target layout), its own pair as stored at its own scale (exact_factors), so every
    module of a conversion is copied, not only the renamed ones; None for a module of another kind."""
    if isinstance(module, Converted):
        return module.exact
    if isinstance(module, PairModule):
        return lambda src, dtype: exact_factors([Feed(module)], 0, module.output_scale, src, dtype)
    if isinstance(module, KeptLokr):  # a LoKr kept as LoKr: its W2 pair as stored, beside W1 as stored
        factors = [module.parts[p] for p in ("lokr_w1", "lokr_w2_a", "lokr_w2_b") if p in module.parts]

        def stored(src: TensorSource, dtype: torch.dtype) -> tuple[NewFactors | None, str]:
            if not all(_widens(src.infos()[k].dtype, dtype) for k in factors):
                return None, "the save precision is narrower than the input's"
            return module.stored_factors(src, dtype)
        return stored
    return None


def _widens(have: torch.dtype, want: torch.dtype) -> bool:
    """Whether every value of dtype `have` is one of `want` (a cast that changes no number)."""
    if have == want or want == torch.float64:
        return True
    return want == torch.float32 and have in (torch.float16, torch.bfloat16)


@dataclass
class ConvertedLayout(Layout):
    """The target layout's modules fed by the source's; the target family's side outputs (a diffusers config),
    and the source's own metadata entry removed (it described the old keys)."""
    target_layout: Layout | None = None
    arch: str = SD
    carried: dict = field(default_factory=dict)  # output key -> Carried: the input's non-factors that follow

    def side_outputs(self, rows) -> SideOutputs:
        # the target family's side outputs for the modules written (a merge's, from every input), not only those
        # this layout was built with
        out = (replace(self.target_layout, modules=self.modules).side_outputs(rows) if self.target_layout is not None
               else SideOutputs())
        return SideOutputs(metadata={METADATA_KEY: None, ARCH_KEY: self.arch, **out.metadata}, files=out.files)


def as_layout(layout: Layout, target: str | None, family: str, infos: TMapping[str, TensorInfo],
            metadata: TMapping[str, str], formats: TMapping[str, Format], arch_name: str | None = None) -> Layout:
    """`layout` (a parsed file, its key `family`) written in the `target` layout (None or its own: unchanged).
    Raises OptionsError for a target that is not a layout or a file whose layout converts to none, and
    LoraStructureError for modules that do not read as their architecture's weights."""
    if target is None:
        return layout
    scheme = scheme_of(layout)
    if target == family and target not in TARGETS:
        return layout
    if target not in TARGETS:
        raise OptionsError(f"--output-format {target} from a {layout.format} file is not defined: the layouts are "
                           f"{', '.join(TARGETS)} (a {target} file keeps its own names: leave out --output-format)")
    if scheme not in (*TARGETS, "ai_toolkit", "diffsynth", "simpletuner"):
        raise OptionsError(f"--output-format {target} from a {layout.format} file is not defined: its module names "
                           "are not read as a model's weights here (kohya, ComfyUI, diffusers, ai-toolkit, "
                           "OneTrainer, SimpleTuner and PEFT files are); leave out --output-format to keep its layout")
    try:
        arch = detect_arch(layout, scheme, arch_name, infos, metadata)
        target_used = "kohya" if arch is None and target in ("comfy", "onetrainer") else target  # ComfyUI and
        built = _build(layout, scheme, target_used, arch, infos, metadata, formats, target)  # OneTrainer key SD so
    except LoraStructureError:
        if set(schemes_of(layout)) == {target}:  # a file of a model no table knows, already in the target's form
            return layout
        raise
    # a file already keyed as the target keys every module (a prefix alone does not say so: ComfyUI's HunyuanVideo
    # 1.5 fuses what musubi's `diffusion_model.` files split) keeps its names, its other tensors, and its factors
    # (Converted.exact)
    if KEY_FORM.get(layout.format) == KEY_FORM[built.format] and all(m._renamed and m.sources[0].module.name == m.name
                                                                     for m in built.modules):  # lycoris keys as kohya
        if KEY_FORM[built.format] != "kohya":  # an A/B file keeps its own config (DoRA, rsLoRA, biases described)
            return layout
        built.notes, built.passthrough, built.known = list(layout.notes), list(layout.passthrough), layout.known
        return built
    carried, left = _carried(layout, built, infos)
    built.passthrough, built.carried = list(carried), carried
    built.known = {out: layout.known[c.pieces[0][0]] for out, c in carried.items()}
    if left and any(layout.known.get(k) not in (None, "other") for k in left):
        k = next(k for k in sorted(left) if layout.known.get(k) not in (None, "other"))
        also = (" (kohya, comfy and onetrainer carry a bias or full diff with its module)"
                if layout.known[k] in ROW_COMPANIONS.values() and KEY_FORM[built.format] != "kohya" else "")
        raise LoraStructureError(f"{k} ({layout.known[k]}) has no equivalent in the {target} layout here{also}; "
                                 "convert a file without it, or keep its layout")
    if left:
        raise LoraStructureError(f"{len(left)} tensor(s) such as {sorted(left)[0]} have no equivalent in the "
                                 f"{target} layout; convert a file without them")
    return built


def check_one_model(layout: Layout, kept: Iterable[str]) -> None:
    """A PEFT adapter adapts one model (PEFT's `get_peft_model` wraps one `nn.Module`): raise LoraStructureError
    when the modules of `layout` (converted to PEFT) named in `kept` - those the rules leave - are of several
    models, naming a drop rule that leaves one. Other layouts, and a file read as PEFT, pass."""
    if layout.format != "peft":
        return
    kept = set(kept)
    by: dict[str, list[str]] = {}
    for m in layout.modules:
        if m.name in kept and isinstance(m, Converted) and m.component is not None:
            by.setdefault(m.component, []).append(m.name)
    if len(by) < 2:
        return
    main = max(by, key=lambda c: len(by[c]))
    rules = []
    for c in sorted(c for c in by if c != main):
        prefix = os.path.commonprefix(by[c])
        pattern = (prefix[: prefix.rfind(".") + 1] if "." in prefix else prefix) + "*"
        if any(fnmatchcase(n, pattern) for n in by[main]):
            rules = []
            break
        rules.append(f"--rule '{pattern}=drop'")
    keep = (f"; keep {main}'s alone with {' '.join(rules)} (rules match the output's PEFT names)" if rules
            else "")
    raise LoraStructureError(f"a PEFT adapter holds one model, and the modules written are of {len(by)} "
                             f"({', '.join(sorted(by))}){keep}, or convert to diffusers (one file for the pipeline)")


ROW_COMPANIONS = {".diff_b": "bias diff", ".diff": "full diff"}  # added to the weight's bias / rows as they are


def _carried(layout: Layout, built: "ConvertedLayout", infos: TMapping[str, TensorInfo]
             ) -> tuple[dict[str, "Carried"], list[str]]:
    """The input's non-factor tensors that follow their module into the target layout, by output key, and the
    keys that cannot. A bias diff or full diff (`<module>.diff_b`, `<module>.diff`: ComfyUI's comfy/lora.py
    `load_lora` adds them to the weight's bias and rows as they are) is renamed as its module is, a split module's
    part takes its rows (halves swapped where the model swaps them), a fused module's parts are stacked at their
    rows (zeros for a part without one): rows moved, no number changed - in the kohya-style layouts (kohya, comfy,
    onetrainer), whose loaders read them (diffusers' and PEFT's drop such keys). DoRA magnitudes, LoRA biases,
    other kinds and tensors of no module of the file stay behind (the caller refuses them)."""
    if KEY_FORM[built.format] != "kohya":  # diffusers' and PEFT's loaders drop a `.diff_b` (not one of their keys)
        return {}, list(layout.passthrough)
    feeds: dict[str, list[tuple[Converted, Feed]]] = {}
    for cm in built.modules:
        for f in cm.sources:
            feeds.setdefault(f.module.name, []).append((cm, f))
    carried: dict[str, Carried] = {}
    left = []
    for k in layout.passthrough:
        suffix = next((x for x, kind in ROW_COMPANIONS.items() if k.endswith(x) and layout.known.get(k) == kind),
                      None)
        base = k[:-len(suffix)] if suffix else None
        info = infos[k]
        ok = base in feeds and info.shape and info.shape[0] == feeds[base][0][1].module.weight_shape(infos)[0]
        if not ok or any((cm.name + suffix) in carried and carried[cm.name + suffix].dtype != info.dtype
                         for cm, _ in feeds[base]):
            left.append(k)
            continue
        for cm, f in feeds[base]:
            c = carried.setdefault(cm.name + suffix, Carried(cm.out_rows, tuple(info.shape[1:]), info.dtype))
            c.pieces.append((k, f))
    for key, c in list(carried.items()):
        if any(tuple(infos[k].shape[1:]) != c.trailing for k, _ in c.pieces):
            left.extend(k for k, _ in c.pieces)
            del carried[key]
    return carried, left


@dataclass
class Carried:
    """An output tensor of rows moved from the input's (`pieces`: input key and the Feed that places its rows)."""
    rows: int
    trailing: tuple[int, ...]
    dtype: torch.dtype
    pieces: list[tuple[str, Feed]] = field(default_factory=list)

    def build(self, src: TensorSource) -> torch.Tensor:
        """The tensor: the input's as it is (renamed), or its rows taken, swapped and placed (the rest zeros)."""
        if len(self.pieces) == 1 and self.pieces[0][1].place is None:
            k, f = self.pieces[0]
            t = src.get(k)
            if f.take is None and not f.swap:
                return t
            return _rows(t, f).contiguous()
        out = torch.zeros((self.rows, *self.trailing), dtype=self.dtype)
        for k, f in self.pieces:
            out[f.place[0]:f.place[1]] = _rows(src.get(k), f)
        return out


def _rows(t: torch.Tensor, f: Feed) -> torch.Tensor:
    """The rows of `t` that Feed `f` takes, halves swapped where it swaps them (as Feed.up does to up's rows)."""
    t = t if f.take is None else t[f.take[0]:f.take[1]]
    if f.swap:
        half = t.shape[0] // 2
        t = torch.cat([t[half:], t[:half]])
    return t


class CarriedSource:
    """A TensorSource of a conversion's carried tensors (Carried), read from the input `src`."""

    def __init__(self, src: TensorSource, carried: dict[str, Carried]):
        self.src, self.carried = src, carried
        self.path, self.metadata = src.path, src.metadata

    def infos(self) -> dict[str, TensorInfo]:
        return {k: TensorInfo((c.rows, *c.trailing), c.dtype) for k, c in self.carried.items()}

    def get(self, key: str) -> torch.Tensor:
        return self.carried[key].build(self.src)

    def close(self) -> None:
        pass


def copied_sources(layout: Layout, src: TensorSource) -> dict[str, TensorSource]:
    """Where each of `layout`'s passthrough keys is read: the input `src`, or, for a conversion's carried tensors
    (renamed, split or fused rows of the input's), a CarriedSource over it."""
    carried = getattr(layout, "carried", None) or {}
    moved = CarriedSource(src, carried) if carried else None
    return {k: moved if k in carried else src for k in layout.passthrough}


def _build(layout: Layout, scheme: str, target: str, arch: Architecture | None, infos, metadata, formats,
           asked: str) -> Layout:
    outputs: dict[str, tuple[Name, list[Feed], int, tuple]] = {}  # target base -> (name, sources, rows, shapes)
    read = []
    for m in layout.modules:
        n = read_name(m.name, scheme, arch)
        if n is None:
            raise LoraStructureError(f"{m.name} does not read as a {arch.title if arch else 'Stable Diffusion'} "
                                     f"module in a {module_scheme(m.name, scheme)} name; give --arch if the model "
                                     "is another, or report the module")
        read.append((m, n))
    hint = " ".join(metadata.get(k, "") for k in ("modelspec.architecture", "ss_base_model_version"))
    sdxl = arch is None and sd.is_sdxl([m.name for m in layout.modules], [(n.component, n.path) for _, n in read],
                                       hint)
    for m, n in read:
        out_rows, in_shape = m.weight_shape(infos)
        for tn, src, rows in _targets(n, m, arch, target, out_rows, in_shape):
            base = key_base(target, tn, sdxl, arch)
            if base in outputs and src.place is None:
                raise LoraStructureError(f"{m.name} and another module both become {base} in the {target} layout")
            entry = outputs.setdefault(base, (tn, [], rows, in_shape))
            entry[1].append(src)
    for base, (tn, srcs, rows, in_shape) in outputs.items():
        if _one_weight(srcs, rows, infos):
            srcs[:] = [Feed(srcs[0].module)]
    # the target family's own modules, for its keys and conventions (alpha or not, a described config)
    ab = target in ("diffusers", "peft")
    dk, uk = (".lora_A.weight", ".lora_B.weight") if ab else (".lora_down.weight", ".lora_up.weight")
    synthetic: dict[str, TensorInfo] = {}
    for base, (tn, srcs, rows, in_shape) in outputs.items():
        r = len(srcs)  # any rank: the shapes only say which keys exist
        synthetic[base + dk] = TensorInfo((r, *in_shape), torch.float32)
        synthetic[base + uk] = TensorInfo((rows, r, *([1] * (len(in_shape) - 1))), torch.float32)
        if not ab:
            synthetic[base + ".alpha"] = TensorInfo((), torch.float32)
    target_layout = new_adapter(synthetic) if target == "peft" else formats[target if ab else "kohya"].parse(
        synthetic, {}, None)
    by_name = {tm.name: tm for tm in target_layout.modules}
    modules = []
    for base, (tn, srcs, rows, in_shape) in outputs.items():
        _check_fused(base, srcs, rows)
        modules.append(Converted(base, [k for s in srcs for k in s.module.keys], target=by_name[base], sources=srcs,
                                 out_rows=rows, in_shape=in_shape, component=tn.component))
    modules.sort(key=lambda m: m.name)
    same_form = KEY_FORM.get(layout.format) == KEY_FORM[target if ab else "kohya"]
    notes = (list(layout.notes) + _converted_note(modules, scheme, asked, target, same_form)
             + _unread_by(target, arch, outputs))
    return ConvertedLayout(target if ab else "kohya", modules, [], notes, file_name=target_layout.file_name,
                           target_layout=target_layout, arch=arch.name if arch else SD)


def _converted_note(modules: list[Converted], scheme: str, asked: str, target: str, same_form: bool) -> list[str]:
    """The note saying how the key names were converted - from one layout to another, or rewritten within one (a
    `diffusion_model.` file written with ComfyUI's `lora_unet_` names; one with a malformed name), with an
    example - or [] where every module keeps its name and its keys their form (`same_form`)."""
    changed = [m for m in modules if not (m._renamed and m.sources[0].module.name == m.name)]
    if not changed and same_form:
        return []
    if not changed:
        return [f"key names written in the {asked} layout's key form (every module keeps its name)"]
    if scheme == asked:
        m = changed[0]
        return [f"key names rewritten in the {asked} layout's form for {len(changed)} of {len(modules)} module(s) "
                f"(e.g. {m.sources[0].module.name} -> {m.name})"]
    return [f"key names converted from {scheme} to {asked}"
            + (" (kohya names: ComfyUI and OneTrainer read Stable Diffusion LoRAs so)" if asked != target else "")]


def _unread_by(target: str, arch: Architecture | None, outputs: dict) -> list[str]:
    """Notes on output names a consumer of another layout will not read, where no name serves both: ComfyUI's own
    fused names (sd-scripts and musubi-tuner key the split weights), a part with ComfyUI's name only."""
    if target != "comfy" or arch is None:
        return []
    notes = []
    own = [(tn.path, srcs) for tn, srcs, *_ in outputs.values() if tn.component == arch.component]
    unread = [(p, srcs) for p, srcs in own if arch.comfy is not None and arch.native_of(p) is None]
    if any(f.place is not None for _, srcs in unread for f in srcs):  # rows placed into a fused weight
        notes.append(f"{arch.title}: ComfyUI's model fuses what its trainers split, so these are ComfyUI's names "
                     "(musubi-tuner and sd-scripts do not read them; --to kohya writes theirs)")
    elif unread:  # renamed only (HiDream-O1: ComfyUI's model holds its trainers' `model.` modules at the top)
        notes.append(f"{arch.title}: these are ComfyUI's names for its model's modules, which differ from its "
                     f"trainers' (e.g. {unread[0][0]}; musubi-tuner and sd-scripts do not read them; --to kohya writes "
                     "theirs)")
    for tn, *_ in outputs.values():
        part = arch.part(tn.component) if tn.component != arch.component else None
        if part is not None and part.prefix("kohya") is None:
            notes.append(f"{arch.title}'s {part.table.title} keeps the name ComfyUI-layout files give it "
                         f"({part.native_prefix}...), which kohya-style loaders do not read")
            break
    return notes


def _targets(n: Name, m: Module, arch: Architecture | None, target: str, out_rows: int, in_shape: tuple):
    """(target name, source placement, target rows) for each output module that `m` (read as `n`) feeds: renamed
    when the target keys modules in `n`'s space, else through diffusers' names - a fused weight splits into its
    parts (rows of up, the shared down), and parts fuse into the target's fused weight (placed rows)."""
    space = target_space(target, arch, n.component)
    if n.space == SD or n.space == space:
        yield Name(space if n.space != SD else SD, n.component, n.path), Feed(m), out_rows
        return
    inp = in_shape[0] if in_shape else 0
    if n.space == "diffusers":
        parts = [(n.path, None, False, out_rows)]
    else:
        try:
            found = tables(table_of(arch, n), n.space).to_diffusers(n.path, out_rows, inp)
        except (KeyError, ValueError) as e:
            raise LoraStructureError(f"{m.name}: {arch.title}'s {n.path} has no diffusers equivalent known here "
                                     f"({e}); report the module") from None
        parts = [(path, None if rows == (0, out_rows) else rows, swap, rows[1] - rows[0])
                 for path, rows, swap in found]
    for path, take, swap, rows in parts:
        if space == "diffusers":
            yield Name("diffusers", n.component, path), Feed(m, take=take, swap=swap), rows
            continue
        found = tables(table_of(arch, n), space).native_for(path)
        if found is None:
            raise LoraStructureError(f"{m.name}: {arch.title}'s diffusers module {path} has no {space} name known "
                                     "here; report the module")
        native, mapping, j = found
        if mapping is None or len(mapping.diffusers) == 1:
            yield (Name(space, n.component, native), Feed(m, take=take, swap=swap != bool(mapping and mapping.swap)),
                   rows)
            continue
        start, total = mapping.fused(j, rows, inp)
        yield Name(space, n.component, native), Feed(m, place=(start, start + rows), take=take, swap=swap), total


def _one_weight(srcs: list[Feed], rows: int, infos) -> bool:
    """Parts of one source module, each placed at the rows it is taken from, filling the output and the source
    alike: the same fused weight in both layouts (HunyuanImage 2.1's qkv, sd-scripts' `img_attn_qkv` and ComfyUI's
    `img_attn.qkv`), which is renamed - its factors as they are, its rank kept - not split and fused again."""
    first = srcs[0].module
    if len(srcs) < 2 or any(s.module is not first or s.swap or s.place is None or s.take != s.place for s in srcs):
        return False
    bounds = sorted(s.place for s in srcs)
    tiled = bounds[0][0] == 0 and bounds[-1][1] == rows and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    return tiled and first.weight_shape(infos)[0] == rows


def _check_fused(base: str, srcs: list[Feed], rows: int) -> None:
    """A fused output's parts must not overlap (each diffusers part once)."""
    placed = sorted(s.place for s in srcs if s.place is not None)
    for (a0, a1), (b0, b1) in zip(placed, placed[1:]):
        if b0 < a1:
            raise LoraStructureError(f"{base}: two modules fill the same rows of the fused weight")
