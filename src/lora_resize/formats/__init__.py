"""Key families as plug-ins, in one registry. `detect` asks every registered family how many keys it recognises and
parses the file with the best (ties: the higher priority). Then every tensor of the file ends in exactly one of:
a module's factor (resized), a known non-factor that is copied (bit for bit) and listed by kind (a DoRA magnitude, a
bias diff, a module kind that cannot be resized, ...), an unknown tensor that does not look like part of a LoRA
(copied, listed as 'other') - or an error naming it, when it looks like part of a LoRA (a family marks it, its name
carries a LoRA token, or it pairs with another unknown tensor as down/up factors do), so LoRA factors are never
copied through unresized without a word."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping

from ..errors import LoraStructureError, OptionsError
from ..io.metadata import rewrites_module
from ..io.reader import TensorInfo
from ..registry import Registry
from . import convert as _convert
from .base import Format, Layout, Module
from .companions import companion_kind
from .controllora import ControlLora
from .diffusers import Diffusers
from .kohya import Kohya
from .lycoris import Lycoris, kept_lokr
from .peft import Peft
from .xlabs import XLabs

FORMATS: Registry[Format] = Registry("key family")


def register(fmt: Format) -> Format:
    """Add a key family. Raises ValueError when its name or its priority is taken (ties must be decided)."""
    clash = next((f for f in FORMATS.values() if f.priority == fmt.priority), None)
    if clash is not None:
        raise ValueError(f"key family {fmt.name!r} has the priority of {clash.name!r}; give it another")
    return FORMATS.add(fmt.name, fmt)


register(Kohya())
register(Lycoris())  # reads kohya's keys too; on a plain kohya file the two tie and kohya (higher priority) wins
register(Peft())  # base_model.model.*.lora_A/lora_B + adapter_config.json
register(Diffusers())  # unet./text_encoder./transformer.*.lora_A/B, .lora.down/.up (not base_model.model.)
register(XLabs())  # double_blocks.N.processor.qkv_lora1.down.weight / .up.weight
register(ControlLora())  # <module>.down / <module>.up


def key_family(name: str) -> str:
    """The family whose key names a family's output uses: one that covers another writes its keys (lycoris ->
    kohya)."""
    fmt = FORMATS.get(name)
    return fmt.covers[0] if fmt is not None and fmt.covers else name


def output_formats() -> list[str]:
    """What --output-format may name: the layouts a conversion writes (models.LAYOUTS)."""
    return sorted(_convert.TARGETS)


def convert_layout(layout: Layout, target: str | None, infos: Mapping[str, TensorInfo], metadata: Mapping[str, str],
            arch: str | None = None) -> Layout:
    """`layout` (parsed from a file with tensors `infos` and `metadata`) written in the `target` layout
    (formats/convert.py; None: unchanged), its architecture `arch` (--arch) or detected. Raises OptionsError for
    an unknown target or a direction that is not defined, LoraStructureError for modules without a name there."""
    if target is not None and target not in output_formats():
        raise OptionsError(f"--output-format must be one of {', '.join(output_formats())}, got {target!r}")
    return _convert.as_layout(layout, target, key_family(layout.format), infos, metadata, FORMATS, arch)


def read_layout(infos: Mapping[str, TensorInfo], metadata: Mapping[str, str], path: Path | None,
                output_format: str | None = None, arch: str | None = None, as_lora: bool = False) -> Layout:
    """A file's layout as its family parses it (detect), written in `output_format` when one is given (convert_layout);
    without one, and unless `as_lora`, a LyCORIS LoKr module that is smaller so stays LoKr (lycoris.kept_lokr)."""
    parsed = detect(infos, metadata, path)
    if output_format is None and not as_lora:
        parsed = kept_lokr(parsed, infos)
    layout = convert_layout(parsed, output_format, infos, metadata, arch)
    if layout.arch is None and rewrites_module(metadata):  # the written metadata depends on the architecture
        layout.arch = _convert.keys_arch(parsed, infos, metadata, arch)
    return layout


def detect(infos: Mapping[str, TensorInfo], metadata: Mapping[str, str], path: Path | None = None) -> Layout:
    """Parse the file's keys with the family that recognises most of them (LoraStructureError when none does, or
    when a tensor that looks like part of a LoRA module fits no module)."""
    best = max(FORMATS.values(), key=lambda f: (f.claims(infos), f.priority))
    if best.claims(infos) == 0:
        sample = ", ".join(sorted(infos)[:3]) or "no tensors at all"
        examples = "; ".join(f"{f.name}: {f.example}" for f in FORMATS.values() if f.example)
        raise LoraStructureError(f"no LoRA layers found (keys like {sample}); supported key families: {examples}")
    layout = best.parse(infos, metadata, path)
    unknown = {}
    for key in sorted(k for k in layout.passthrough if k not in layout.known):
        kind = companion_kind(key)
        if kind is not None:
            layout.known[key] = kind
        else:
            check_unknown(best, key, infos[key])
            unknown[key] = infos[key]
    check_unknown_pairs(best, unknown)
    return layout


LORA_TOKEN = re.compile(r"(?i)(^|[._])(lora|loha|lokr|lycoris|hada|dora)(\d+|_[a-z0-9]+)?([._]|$)")
HALVES = re.compile(r"^(.*?)[._](down|up|a|b)(\.weight)?$", re.IGNORECASE)


def check_unknown(fmt: Format, key: str, info: TensorInfo) -> None:
    """An unknown tensor in a `fmt` file: a LoraStructureError when it looks like part of a LoRA module (some
    family marks it, or its name carries a LoRA token), since copying it unchanged would leave LoRA factors
    unresized."""
    if not (any(f.marks(key) for f in FORMATS.values()) or LORA_TOKEN.search(key)):
        return
    other = next((f for f in FORMATS.values() if f is not fmt and f.name not in fmt.covers
                  and f.claims({key: info})), None)
    mixed = (f" (it is a {other.name} key: mixed key families are not supported - split the file or convert it to "
             "one family)" if other is not None else "")
    raise LoraStructureError(
        f"{key} looks like part of a LoRA layer but does not fit the {fmt.title or fmt.name} layout (no partner "
        f"key, or a key form this tool does not know){mixed}; nothing was written - re-export the file, or report "
        "the format")


def check_unknown_pairs(fmt: Format, unknown: Mapping[str, TensorInfo]) -> None:
    """Unknown tensors named like down/up (or A/B) halves of one module whose shapes chain as LoRA factors do
    (down r x n, up m x r): a LoraStructureError naming them - a LoRA pair of a layout no family knows."""
    halves: dict[str, dict[str, str]] = {}
    for key in unknown:
        m = HALVES.match(key)
        if m:
            side = {"down": "down", "a": "down", "up": "up", "b": "up"}[m.group(2).lower()]
            halves.setdefault(m.group(1), {})[side] = key
    for name, got in sorted(halves.items()):
        if len(got) < 2:
            continue
        d, u = unknown[got["down"]].shape, unknown[got["up"]].shape
        if len(d) >= 2 and len(u) == len(d) and d[0] == u[1] and d[0] < min(u[0], math.prod(d[1:])):
            raise LoraStructureError(
                f"{got['down']} and {got['up']} look like the down/up factors of a LoRA layer (shapes {list(d)} and "
                f"{list(u)}) in a layout the {fmt.title or fmt.name} family does not know; nothing was written - "
                "report the format (it would otherwise be copied unresized)")


__all__ = ["FORMATS", "Format", "Layout", "Module", "convert_layout", "detect", "key_family", "output_formats",
           "read_layout", "register"]
