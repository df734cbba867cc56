"""`lora-resize analyze IN`: decompose once, then size and fidelity for a sweep of settings (text or --json), with
an optional HTML report and PNG curve. Heavy imports stay inside run()."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import add_rank_arguments, add_report_arguments
    p.description = ("Decompose every layer once, then print the exact output size, parameter count and fidelity "
                     "of a sweep of settings (sv_ratio 2..128, sv_fro and sv_cumulative 0.5..0.99, fixed ranks "
                     "1..256, target_fro and target_size budgets). --rank/--conv-rank cap every setting as in "
                     "resize; a method, rank or target names the chosen setting, marked in the table and report.")
    p.add_argument("input", help="LoRA file to analyze (.safetensors; .pt/.ckpt read weights-only)")
    add_rank_arguments(p)
    add_report_arguments(p)


def run(args: argparse.Namespace) -> int:
    from .analyze import analyze
    from .cli import _progress
    from .errors import OptionsError
    from .report import analysis_table, strict_json

    if args.output:
        raise OptionsError("analyze writes no LoRA (drop -o); it prints the sweep, and --report/--plot write "
                           "pictures; run `lora-resize resize` with the flags of the row you pick")
    if args.report or args.plot:
        from .report_html import check_paths
        check_paths(args.report, args.plot)
    fields = dict(rank=args.rank, conv_rank=args.conv_rank, method=args.method, param=args.param, rule=args.rule,
                  precision=args.precision, device=args.device, threads=args.threads,
                  block_rules=tuple(args.block_rules or ()), target_size=args.target_size,
                  target_fro=args.target_fro)
    a = analyze(args.input, progress=_progress(args.quiet, "decomposing"), **fields)
    written = []
    if args.report:
        from .report_html import write_html
        written.append(f"report written to {write_html(a, args.report)}")
    if args.plot:
        from .report_html import write_png
        written.append(f"plot written to {write_png(a, args.plot)}")
    if args.json:
        print(strict_json(a.as_dict()))
    else:
        print(analysis_table(a, verbose=args.verbose))
        for line in written:
            print(line)
    return 0
