"""The convert job: a LoRA written in another layout (formats/convert.py: names converted, fused and split modules
rebuilt exactly). Without a rank setting every layer keeps all of its rank, so each output module applies its
input's update to float rounding; with one (a rank, a method, a budget) converting and resizing are one pass."""
from __future__ import annotations

import math
import os
from typing import Callable

from ..core.schedule import Progress
from ..errors import OptionsError
from ..formats import read_layout
from ..io.paths import local_path, resolve_input
from ..io.reader import open_tensor_file
from ..options import ResizeOptions
from ..results import LayerResult, ResizeResult
from .resize import resize

RANK_SETTINGS = ("rank", "method", "target_size", "target_fro", "ranks")


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, options: ResizeOptions | None = None, *,
            progress: Progress | None = None, on_layer: Callable[[LayerResult], None] | None = None,
            **option_fields) -> ResizeResult:
    """Write the LoRA at `src` to `dst` in layout `to` (kohya, comfy, diffusers, onetrainer, peft, or a key
    family's own names), its architecture detected or given as arch=. Options as for `resize` (a ResizeOptions
    or its fields); without a rank setting every layer keeps its full rank (each output module's numerical rank:
    a renamed or split module its own, a fused one the sum of its parts').

    Raises: OptionsError (an unknown layout, a direction that is not defined), InputFileError, LoraStructureError
    (modules without a name in the target layout), NumericalError, OutputFileError, DeviceError."""
    if options is not None:
        if option_fields:
            raise OptionsError("pass either options=ResizeOptions(...) or option fields, not both")
        option_fields = {f: getattr(options, f) for f in options.__dataclass_fields__}
    if option_fields.get("output_format") not in (None, to):
        raise OptionsError(f"give the layout once: to={to!r} (--to), not also output_format=")
    option_fields = {**option_fields, "output_format": to}
    if not any(option_fields.get(f) for f in RANK_SETTINGS):
        option_fields["ranks"] = full_ranks(src, to, option_fields.get("arch"))
    result = resize(src, dst, ResizeOptions(**option_fields), progress=progress, on_layer=on_layer)
    if not any(n.startswith("key names converted") for n in result.notes):
        result.notes.append(f"{result.src.name} is already in the {to} layout: its modules keep their names")
    return result


def full_ranks(src: str | os.PathLike, to: str, arch: str | None) -> dict[str, int]:
    """Each output module's full size, min(out, in x kernel): as an explicit rank it keeps every nonzero singular
    value (read from the header alone)."""
    path = resolve_input(local_path(src, "input"))
    with open_tensor_file(path) as reader:
        layout = read_layout(reader.infos(), reader.metadata, path, to, arch)
        ranks = {}
        for m in layout.modules:
            out, (inp, *kernel) = m.weight_shape(reader.infos())
            ranks[m.name] = max(1, min(out, inp * math.prod(kernel)))
    return ranks
