"""`lora-resize batch IN_DIR OUT_DIR [resize options]`: a folder of LoRAs, in parallel and resumable."""
from __future__ import annotations

import argparse
import sys

from .flags import INPUT_FLAGS, OUTPUT_FLAGS, add_option_groups, add_output_flags, is_url, options_from, progress, refuse

HELP = "resize every LoRA under a folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("in_dir", help="folder with LoRA files (searched recursively), or an fsspec URL")
    p.add_argument("out_dir", help="where to write them, same relative layout, as .safetensors (folder or URL)")
    p.add_argument("--workers", type=int, default=1, help="files resized at once, each in its own process")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="memory budget for files in flight, e.g. 8GB (10^9 bytes) or 8GiB (default: no limit)")
    p.add_argument("--dask", metavar="ADDRESS", help="run one task per file on a Dask cluster, e.g. "
                                                     "tcp://scheduler:8786 (pip install 'lora-resize[dask]')")
    p.add_argument("--force", action="store_true", help="redo files already done with the same options")
    for dest in ("in_dir", "out_dir"):
        p.requires(dest, "fsspec", "a folder given as a URL", when=is_url)
    p.requires("dask", "distributed", "--dask")
    add_option_groups(p, "rank", "output", "compute")
    add_output_flags(p, None)
    refuse(p, *INPUT_FLAGS, why="batch reads every LoRA under IN_DIR; give the folder as the first argument")
    refuse(p, *OUTPUT_FLAGS, why="batch writes into OUT_DIR; give the folder as the second argument")
    refuse(p, "-v", "--verbose", nargs=0, why="batch prints one line per file; per-layer lines are for "
           "`lora-resize resize -v`")


def run(args: argparse.Namespace) -> int:
    from ..errors import OptionsError, one_line
    from ..ops.batch import BASE_MEMORY, run_batch
    from ..report.text import percent
    from ..units import format_size, parse_size

    opts = options_from(args)
    budget = parse_size(args.max_memory, "--max-memory") if args.max_memory else None
    if budget is not None and budget < BASE_MEMORY:  # not even one worker (a process with torch) fits in it
        raise OptionsError(f"--max-memory {args.max_memory} is too small: one worker (a process with torch) "
                           f"needs about {format_size(BASE_MEMORY)}; give at least {format_size(BASE_MEMORY)} (e.g. "
                           "--max-memory 4GB), or leave it out for no limit")

    def status(row) -> None:
        if args.json:
            return
        if row.status == "ok":
            detail = (f"{format_size(row.in_bytes)} -> {format_size(row.out_bytes)}, Frobenius retained mean "
                      f"{percent(row.mean_fro)}, "
                      f"{row.seconds:.1f} s")
        elif row.status == "skipped":
            detail = "already done (same input and options)"
        else:
            detail = row.error
        from tqdm import tqdm
        tqdm.write(one_line(f"{row.status:7} {row.file}: {detail}"), file=sys.stdout)  # names never drive the terminal

    result = run_batch(args.in_dir, args.out_dir, opts, workers=args.workers, max_memory=budget, force=args.force,
                       dask=args.dask, progress=progress(args.quiet, "files", unit="file"), on_file=status)
    if args.json:
        from dataclasses import asdict

        from ..report.text import strict_json
        print(strict_json({"files": [asdict(f) for f in result.files], "manifest": str(result.manifest),
                           "seconds": result.seconds}))
    else:
        total_in = sum(f.in_bytes for f in result.files if f.status == "ok")
        total_out = sum(f.out_bytes or 0 for f in result.files if f.status == "ok")
        print(one_line(f"{len(result.files)} files: {result.count('ok')} resized ({format_size(total_in)} -> "
                       f"{format_size(total_out)}), {result.count('skipped')} skipped, {result.count('error')} "
                       f"failed; {result.seconds:.1f} s; manifest {result.manifest}"))
    return 0 if result.count("error") == 0 else 2
