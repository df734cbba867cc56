"""Command line: parse, call the library, render. The only place that maps errors to exit codes.

    lora-resize resize IN -o OUT --method sv_fro --param 0.9 --rank 64
    lora-resize --model IN --save_to OUT --new_rank 32 --dynamic_method sv_ratio --dynamic_param 8   (sd-scripts form)
    lora-resize demo
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ._version import __version__
from .errors import LoraResizeError, OptionsError
from .options import DEVICES, ResizeOptions
from .policies import POLICIES, RULES

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
SD_SCRIPTS_DEFAULT_RANK = 4
CORE_COMMANDS = ("resize", "merge", "demo")
# More subcommands, each in its own module: `add_arguments(parser)` and `run(args) -> exit status`. A module
# keeps its heavy imports inside run(), so building the parser stays cheap.
PLUGIN_COMMANDS = {
    "analyze": ("lora_resize.cli_analyze", "decompose once; sizes and fidelity for a sweep of settings"),
    "batch": ("lora_resize.cli_batch", "resize every LoRA under a folder"),
}


def plugin_modules() -> dict:
    """The plugin command modules that exist in this installation."""
    import importlib
    found = {}
    for name, (module, _) in PLUGIN_COMMANDS.items():
        try:
            found[name] = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return found


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str):  # noqa: D102
        raise OptionsError(f"{message} (see {self.prog} --help)")


def add_rank_arguments(p: argparse.ArgumentParser) -> None:
    """The rank, precision and output options shared by resize and merge, under modern and sd-scripts names."""
    p.add_argument("-o", "--output", "--save_to", dest="output", help="output file (.safetensors or .pt/.pth/.ckpt)")
    p.add_argument("--rank", "--new_rank", dest="rank", type=int,
                   help="fixed rank, or the cap of a dynamic method (sd-scripts form: default 4)")
    p.add_argument("--conv-rank", "--new_conv_rank", dest="conv_rank", type=int,
                   help="the same for conv (4-D) layers; default: --rank")
    p.add_argument("--method", "--dynamic_method", dest="method", choices=[m for m in POLICIES if m != "fixed"],
                   help="choose each layer's rank from its singular values")
    p.add_argument("--param", "--dynamic_param", dest="param", type=float,
                   help="the method's parameter: sv_ratio >= 1; sv_cumulative, sv_fro in (0, 1]")
    p.add_argument("--rank-rule", dest="rule", choices=RULES, default="exact",
                   help="exact: smallest rank meeting the criterion (default); kohya: sd-scripts v0.10.1's "
                        "choice, off-by-one included")
    p.add_argument("--rule", dest="block_rules", action="append", default=[], metavar="PATTERN=SPEC",
                   help="per-block rule, repeatable, first match wins: 'PATTERN=RANK' (fixed rank), "
                        "'PATTERN=cap:RANK' (the method with this cap) or 'PATTERN=drop' (leave the module out); "
                        "PATTERN is a glob over module names, e.g. 'lora_te_*=8', '*attn2*=cap:64'")
    p.add_argument("--target-size", dest="target_size", metavar="SIZE",
                   help="budget: the best global fidelity whose file fits SIZE (50MB = 10^6 bytes per MB, 48MiB, or "
                        "bytes); ranks allocated across layers by kept energy per byte; --rank caps")
    p.add_argument("--target-fro", dest="target_fro", type=float, metavar="X",
                   help="budget: the smallest ranks whose global Frobenius retention (all layers together, scaled "
                        "by alpha/rank) reaches X in (0, 1]; --rank caps")
    p.add_argument("--precision", "--save_precision", dest="precision", choices=["fp16", "bf16", "float"],
                   help="output dtype; default: the input's (sd-scripts defaults to float)")
    p.add_argument("--output-format", dest="output_format", choices=["kohya", "peft", "diffusers"],
                   help="write under another key family's names where the mapping is defined (diffusers -> kohya)")
    p.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICES)} (default auto: CUDA if present)")
    p.add_argument("--threads", type=int, help="layers to decompose at once on the CPU (default: one per core)")
    p.add_argument("-v", "--verbose", action="store_true", help="per-layer lines in sd-scripts' format")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the full result as JSON on stdout")


def add_resize_arguments(p: argparse.ArgumentParser) -> None:
    """resize's options: the input, then the shared ones."""
    p.add_argument("input", nargs="?", help="LoRA file to resize (.safetensors; .pt/.ckpt read weights-only)")
    p.add_argument("--model", dest="model", help="same as INPUT (sd-scripts spelling)")
    p.add_argument("--svd_lowrank_niter", type=int, help=argparse.SUPPRESS)  # sd-scripts flag; we are always exact
    add_rank_arguments(p)
    add_report_arguments(p)


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    """--report / --plot: pictures of the size-vs-fidelity sweep (resize and analyze)."""
    p.add_argument("--report", metavar="OUT.html",
                   help="write a self-contained HTML report: size-vs-fidelity curves, rank map, spectra, settings")
    p.add_argument("--plot", metavar="OUT.png", help="write the size-vs-fidelity curve as a PNG (matplotlib)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="lora-resize", description="Make LoRA files smaller, exactly and fast.",
               epilog="Without a subcommand the sd-scripts resize_lora.py flags are accepted verbatim.")
    p.add_argument("--version", action="version", version=f"lora-resize {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=Parser)
    add_resize_arguments(sub.add_parser("resize", help="resize one LoRA file"))
    mp = sub.add_parser("merge", help="merge weighted LoRAs into one of a chosen size",
                        description="Merge LoRAs: each layer becomes the best rank-k approximation of the weighted "
                                    "sum. Example: lora-resize merge a.safetensors:0.8 b.safetensors:0.5 -o ab.safetensors "
                                    "--method sv_fro --param 0.95")
    mp.add_argument("sources", nargs="+", metavar="FILE[:WEIGHT]", help="inputs with weights (default 1; may be "
                                                                       "negative; 0 leaves the input out)")
    add_rank_arguments(mp)
    for name, module in plugin_modules().items():
        module.add_arguments(sub.add_parser(name, help=PLUGIN_COMMANDS[name][1]))
    d = sub.add_parser("demo", help="synthesize an SD1.5 LoCon and resize it (no download)")
    d.add_argument("--dir", default="lora-resize-demo", help="where to write the files (default ./lora-resize-demo)")
    d.add_argument("--full", action="store_true", help="the full 1.16 GB rank-512 LoCon instead of a small one")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def _progress(quiet: bool, desc: str, unit: str = "layer"):
    from tqdm import tqdm

    def wrap(iterable, total):
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                    disable=quiet or not sys.stderr.isatty())
    return wrap


def _write_line(line: str) -> None:
    from tqdm import tqdm
    tqdm.write(line, file=sys.stdout)


def options_from(args: argparse.Namespace, rank: int | None) -> ResizeOptions:
    return ResizeOptions(rank=rank, conv_rank=args.conv_rank, method=args.method, param=args.param,
                         rule=args.rule, precision=args.precision, device=args.device, threads=args.threads,
                         output_format=args.output_format,
                         block_rules=tuple(getattr(args, "block_rules", None) or ()),
                         target_size=getattr(args, "target_size", None), target_fro=getattr(args, "target_fro", None))


def render(result, args: argparse.Namespace, notes: list[str]) -> int:
    """Print the result: JSON, or sd-scripts' closing verbose line and our summary."""
    from .report import average_line, strict_json, summary
    result.notes.extend(notes)
    if args.json:
        print(strict_json(result.as_dict()))
        return EXIT_OK
    if args.verbose:
        print(average_line(result))
    print(summary(result))
    return EXIT_OK


def layer_printer(args: argparse.Namespace, dynamic: bool):
    from .report import verbose_line
    return (lambda row: _write_line(verbose_line(row, dynamic))) if args.verbose else None


def run_resize(args: argparse.Namespace, sd_scripts_form: bool) -> int:
    from .pipeline import resize

    if args.input and args.model and args.input != args.model:
        raise OptionsError("give the input once: either as INPUT or with --model")
    src = args.input or args.model
    if not src:
        raise OptionsError("no input file: lora-resize resize IN.safetensors -o OUT.safetensors")
    if not args.output:
        raise OptionsError("no output file: add -o OUT.safetensors (--save_to)")
    notes = []
    rank = args.rank
    if sd_scripts_form and rank is None:
        rank = SD_SCRIPTS_DEFAULT_RANK
        notes.append(f"--new_rank defaults to {rank} as in sd-scripts"
                     + (" and caps the dynamic method" if args.method else "") + "; pass --new_rank N to change it")
    if args.svd_lowrank_niter is not None:
        notes.append("--svd_lowrank_niter is ignored: lora-resize is always exact and already fast")
    opts = options_from(args, rank)
    if args.report or args.plot:
        from .report_html import check_paths
        check_paths(args.report, args.plot)
    result = resize(src, args.output, opts, progress=_progress(args.quiet, "resizing"),
                    on_layer=layer_printer(args, opts.method is not None or opts.has_target))
    if args.report or args.plot:
        from .report_html import write_pictures
        notes += write_pictures(result, args.report, args.plot)
    return render(result, args, notes)


def run_merge(args: argparse.Namespace) -> int:
    from .merge import merge

    if not args.output:
        raise OptionsError("no output file: add -o OUT.safetensors")
    opts = options_from(args, args.rank)
    result = merge(args.sources, args.output, opts, progress=_progress(args.quiet, "merging"),
                   on_layer=layer_printer(args, opts.method is not None))
    return render(result, args, [])


def run_demo(args: argparse.Namespace) -> int:
    from .demo import demo
    return demo(args.dir, full=args.full, progress=_progress(args.quiet, "resizing"),
                synth_progress=_progress(args.quiet, "synthesizing"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lora-resize` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv and argv[0] in CORE_COMMANDS + tuple(PLUGIN_COMMANDS) or not argv or argv[0] in ("-h", "--help", "--version"):
            args = parser.parse_args(argv)
            if args.command is None:
                parser.print_help()
                return EXIT_USAGE
            if args.command == "demo":
                return run_demo(args)
            if args.command == "merge":
                return run_merge(args)
            if args.command in PLUGIN_COMMANDS:
                return plugin_modules()[args.command].run(args)
            return run_resize(args, sd_scripts_form=False)
        legacy = Parser(prog="lora-resize", description="sd-scripts resize_lora.py compatible form")
        add_resize_arguments(legacy)
        return run_resize(legacy.parse_args(argv), sd_scripts_form=True)
    except LoraResizeError as e:
        print(f"lora-resize: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # stdout closed early (e.g. piped into head): stop quietly, like other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print("lora-resize: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug: one line unless asked for the traceback
        if os.environ.get("LORA_RESIZE_DEBUG"):
            raise
        print(f"lora-resize: internal error: {type(e).__name__}: {e} (set LORA_RESIZE_DEBUG=1 for details and "
              "please report it)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
