"""`lora-resize demo`: synthesize an SD1.5 LoCon and resize it (no download)."""
from __future__ import annotations

import argparse

from .flags import progress

HELP = "synthesize an SD1.5 LoCon and resize it (no download)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="lora-resize-demo", help="where to write the files (default ./lora-resize-demo)")
    p.add_argument("--full", action="store_true", help="the full 1.16 GB rank-512 LoCon instead of a small one")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..ops.demo import demo
    return demo(args.dir, full=args.full, progress=progress(args.quiet, "resizing"),
                synth_progress=progress(args.quiet, "synthesizing"))
