"""The sd-scripts form: `lora-resize --model IN --save_to OUT --new_rank 32 --dynamic_method sv_ratio
--dynamic_param 8 ...`, the flags of sd-scripts' networks/resize_lora.py, verbatim (sd-scripts v0.10.1,
networks/resize_lora.py `setup_parser`): a resize with
sd-scripts' defaults. Every line sd-scripts accepts is accepted, with a one-line note for what is ignored or read
differently: --dynamic_param without --dynamic_method (sd-scripts ignores it: a fixed-rank resize), a parameter
outside its method's range (sd-scripts' formulas then keep everything or the least: the nearest valid value gives
the same rank), --device cuda where there is no CUDA (the same exact result on the CPU), --svd_lowrank_niter
(unnecessary: always exact) and the save precision's default (the input's dtype, not float32)."""
from __future__ import annotations

from typing import Sequence

from . import resize
from .flags import Parser

SD_SCRIPTS_DEFAULT_RANK = 4


def run(argv: Sequence[str]) -> int:
    from ..ranks.policies import get_policy

    p = Parser(prog="lora-resize", description="sd-scripts resize_lora.py compatible form")
    resize.add_arguments(p)
    args = p.parse_args(list(argv))
    notes = []
    overrides = {}
    if args.rank is None:
        overrides["rank"] = SD_SCRIPTS_DEFAULT_RANK
        notes.append(f"--new_rank defaults to {SD_SCRIPTS_DEFAULT_RANK} as in sd-scripts"
                     + (" and caps the dynamic method" if args.method else "") + "; pass --new_rank N to change it")
    if args.param is not None and args.method is None:
        overrides["param"] = None
        notes.append(f"--dynamic_param {args.param:g} is ignored without --dynamic_method, as in sd-scripts: a "
                     "fixed-rank resize")
    elif args.method is not None and args.param is not None:
        policy = get_policy(args.method)
        why = policy.check_param(args.param)
        rank = args.rank if args.rank is not None else SD_SCRIPTS_DEFAULT_RANK
        if why and args.method in ("sv_fro", "sv_cumulative") and args.param > 1:
            overrides.update(method=None, param=None)  # sd-scripts then keeps every singular value, up to the cap
            notes.append(f"--dynamic_param {args.param:g} for {args.method} {why}; above 1 sd-scripts keeps every "
                         f"singular value up to --new_rank: a fixed-rank resize at {rank}")
        elif why:
            overrides["param"] = policy.nearest(args.param)
            notes.append(f"--dynamic_param {args.param:g} for {args.method} {why}; {overrides['param']:g} gives the "
                         "rank sd-scripts' formula gives")
    if args.precision is None:
        notes.append("--save_precision not given: saved in the input's precision (sd-scripts saves float32, which "
                     "doubles an fp16 file); pass --save_precision float for that")
    if str(args.device).startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            overrides["device"] = "cpu"
            notes.append(f"--device {args.device}: CUDA is not available here; computed on the CPU (the same exact "
                         "result)")
    return resize.run(args, notes, **overrides)
