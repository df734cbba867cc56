"""`lora-resize batch IN_DIR OUT_DIR [resize options]`: a folder of LoRAs, in parallel and resumable."""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import add_rank_arguments
    p.add_argument("in_dir", help="folder with LoRA files (searched recursively)")
    p.add_argument("out_dir", help="where to write them, same relative layout, as .safetensors")
    p.add_argument("--workers", type=int, default=1, help="files resized at once, each in its own process")
    p.add_argument("--max-memory", help="memory budget for files in flight, e.g. 8GB (default: no limit)")
    p.add_argument("--dask", metavar="ADDRESS", help="run one task per file on a Dask cluster, e.g. "
                                                     "tcp://scheduler:8786 (pip install 'lora-resize[dask]')")
    p.add_argument("--force", action="store_true", help="redo files already done with the same options")
    add_rank_arguments(p)


def run(args: argparse.Namespace) -> int:
    from .batch import parse_size, run_batch
    from .cli import EXIT_OK, EXIT_USAGE, _progress, options_from
    from .errors import OptionsError
    from .report import human_bytes

    if args.output:
        raise OptionsError("batch writes into OUT_DIR; -o/--output is not used here")
    opts = options_from(args, args.rank)
    budget = parse_size(args.max_memory) if args.max_memory else None

    def status(row) -> None:
        if args.json:
            return
        if row.status == "ok":
            detail = (f"{human_bytes(row.in_bytes)} -> {human_bytes(row.out_bytes)}, fro mean {row.mean_fro:.1%}, "
                      f"{row.seconds:.1f} s")
        elif row.status == "skipped":
            detail = "already done (same input and options)"
        else:
            detail = row.error
        from tqdm import tqdm
        tqdm.write(f"{row.status:7} {row.file}: {detail}", file=sys.stdout)

    result = run_batch(args.in_dir, args.out_dir, opts, workers=args.workers, max_memory=budget, force=args.force,
                       dask=args.dask,
                       progress=_progress(args.quiet, "files", unit="file"), on_file=status)
    if args.json:
        from dataclasses import asdict

        from .report import strict_json
        print(strict_json({"files": [asdict(f) for f in result.files], "manifest": str(result.manifest),
                           "seconds": result.seconds}))
    else:
        total_in = sum(f.in_bytes for f in result.files if f.status == "ok")
        total_out = sum(f.out_bytes or 0 for f in result.files if f.status == "ok")
        print(f"{len(result.files)} files: {result.count('ok')} resized ({human_bytes(total_in)} -> "
              f"{human_bytes(total_out)}), {result.count('skipped')} skipped, {result.count('error')} failed; "
              f"{result.seconds:.1f} s; manifest {result.manifest}")
    return EXIT_OK if result.count("error") == 0 else EXIT_USAGE
