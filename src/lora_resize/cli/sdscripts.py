"""The sd-scripts form: `lora-resize --model IN --save_to OUT --new_rank 32 --dynamic_method sv_ratio
--dynamic_param 8 ...`, the flags of sd-scripts' networks/resize_lora.py, verbatim (FORMATS.md §1): a resize with
sd-scripts' defaults (--new_rank 4)."""
from __future__ import annotations

from typing import Sequence

from . import resize
from .flags import Parser

SD_SCRIPTS_DEFAULT_RANK = 4


def run(argv: Sequence[str]) -> int:
    p = Parser(prog="lora-resize", description="sd-scripts resize_lora.py compatible form")
    resize.add_arguments(p)
    args = p.parse_args(list(argv))
    notes = []
    overrides = {}
    if args.rank is None:
        overrides["rank"] = SD_SCRIPTS_DEFAULT_RANK
        notes.append(f"--new_rank defaults to {SD_SCRIPTS_DEFAULT_RANK} as in sd-scripts"
                     + (" and caps the dynamic method" if args.method else "") + "; pass --new_rank N to change it")
    return resize.run(args, notes, **overrides)
