"""Key families as plug-ins, in one registry. `detect` asks every registered family how many keys it recognises and
parses the file with the best (ties: the higher priority); then every tensor it leaves unowned is either known to
it (a DoRA magnitude, a module kind that cannot be resized, ...) and copied, or an unknown tensor - and an unknown
tensor that any family marks as part of a LoRA module is an error naming it, so LoRA factors are never copied
through unresized without a word."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from ..errors import LoraStructureError, OptionsError
from ..io.reader import TensorInfo
from ..registry import Registry
from . import convert as _convert
from .base import Format, Layout, Module
from .controllora import ControlLora
from .diffusers import Diffusers
from .kohya import Kohya
from .lycoris import Lycoris
from .peft import Peft

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
register(ControlLora())  # <module>.down / <module>.up


def key_family(name: str) -> str:
    """The family whose key names a family's output uses: one that covers another writes its keys (lycoris ->
    kohya)."""
    fmt = FORMATS.get(name)
    return fmt.covers[0] if fmt is not None and fmt.covers else name


def output_formats() -> list[str]:
    """What --output-format may name: every family's own keys, and the targets of the defined conversions."""
    return sorted({key_family(n) for n in FORMATS} | set(_convert.OUTPUT_FORMATS))


def convert(layout: Layout, target: str | None) -> Layout:
    """`layout` written under `target`'s key names (formats/convert.py). Raises OptionsError for an unknown
    target or a direction that is not defined, LoraStructureError for modules without a name there."""
    if target is not None and target not in output_formats():
        raise OptionsError(f"--output-format must be one of {', '.join(output_formats())}, got {target!r}")
    return _convert.convert(layout, target, key_family(layout.format))


def detect(infos: Mapping[str, TensorInfo], metadata: Mapping[str, str], path: Path | None = None) -> Layout:
    """Parse the file's keys with the family that recognises most of them (LoraStructureError when none does, or
    when a tensor that looks like part of a LoRA module fits no module)."""
    best = max(FORMATS.values(), key=lambda f: (f.claims(infos), f.priority))
    if best.claims(infos) == 0:
        sample = ", ".join(sorted(infos)[:3]) or "no tensors at all"
        examples = "; ".join(f"{f.name}: {f.example}" for f in FORMATS.values() if f.example)
        raise LoraStructureError(f"no LoRA layers found (keys like {sample}); supported key families: {examples}")
    layout = best.parse(infos, metadata, path)
    for key in sorted(k for k in layout.passthrough if k not in layout.known):
        check_unknown(best, key, infos[key])
    return layout


def check_unknown(fmt: Format, key: str, info: TensorInfo) -> None:
    """An unknown tensor in a `fmt` file: a LoraStructureError when it looks like part of a LoRA module (some
    family marks it), since copying it unchanged would leave LoRA factors unresized."""
    if not any(f.marks(key) for f in FORMATS.values()):
        return
    other = next((f for f in FORMATS.values() if f is not fmt and f.name not in fmt.covers
                  and f.claims({key: info})), None)
    mixed = (f" (it is a {other.name} key: mixed key families are not supported - split the file or convert it to "
             "one family)" if other is not None else "")
    raise LoraStructureError(
        f"{key} looks like part of a LoRA layer but does not fit the {fmt.title or fmt.name} layout (no partner key, or a key "
        f"form this tool does not know){mixed}; nothing was written - re-export the file, or report the format")


__all__ = ["FORMATS", "Format", "Layout", "Module", "convert", "detect", "key_family", "output_formats",
           "register"]
