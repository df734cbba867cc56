"""The convert job: a LoRA written in another layout (formats/convert.py: names converted, fused and split modules
rebuilt exactly). Without a rank setting every layer keeps all of its rank: its factors and alpha are copied bit
for bit where the target layout holds them (a file already in that layout included), else re-rounded once to the
save precision; with one (ResizeOptions.rank_settings: a rank, a method, a budget, rank rules)
converting and resizing are one pass, and the layers it does not cover keep their full rank."""
from __future__ import annotations

import os
from typing import Callable

from ..core.schedule import Progress
from ..errors import OptionsError
from ..options import ResizeOptions
from ..results import LayerResult, ResizeResult
from .resize import resize


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, options: ResizeOptions | None = None, *,
            progress: Progress | None = None, on_layer: Callable[[LayerResult], None] | None = None,
            **option_fields) -> ResizeResult:
    """Write the LoRA at `src` to `dst` in layout `to` (kohya, comfy, diffusers, onetrainer, peft, or a key
    family's own names), its architecture detected or given as arch=. Options as for `resize` (a ResizeOptions
    or its fields), every one honoured as resize honours it (--rank-rule also picks the alpha convention: one
    alpha for all, or sd-scripts' per layer); a layer that no rank setting covers (none given, or a --conv-rank
    or rules that leave it out) keeps its full rank (each output module's numerical rank: a renamed or split
    module its own, a fused one the sum of its parts').

    Raises: OptionsError (an unknown layout, a direction that is not defined), InputFileError, LoraStructureError
    (modules without a name in the target layout), NumericalError, OutputFileError, DeviceError."""
    if options is not None:
        if option_fields:
            raise OptionsError("pass either options=ResizeOptions(...) or option fields, not both")
        option_fields = {f: getattr(options, f) for f in options.__dataclass_fields__}
    if option_fields.get("output_format") not in (None, to):
        raise OptionsError(f"give the layout once: to={to!r} (--to), not also output_format=")
    opts = ResizeOptions(**{**option_fields, "output_format": to, "keep_unranked": True})
    result = resize(src, dst, opts, progress=progress, on_layer=on_layer)
    if not any(n.startswith("key names") for n in result.notes):
        result.notes.append(f"{result.src.name} is already in the {to} layout: its modules keep their names")
    return result
