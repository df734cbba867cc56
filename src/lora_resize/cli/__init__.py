"""Command line: one module per subcommand (`add_arguments(parser)` and `run(args) -> exit status`), the
sd-scripts form (sdscripts.py) and the flags generated from the options (flags.py). `main` is the only place
where errors become exit codes.

    lora-resize resize IN -o OUT --method sv_fro --param 0.9 --rank 64
    lora-resize --model IN --save_to OUT --new_rank 32 --dynamic_method sv_ratio --dynamic_param 8   (sd-scripts form)
    lora-resize convert IN -o OUT --to comfy
    lora-resize average A-000004 A-000008 -o OUT --weighting ema --beta 0.8    (one run's checkpoints, averaged)
    lora-resize extract --base BASE --tuned TUNED -o OUT --rank 32    (a LoRA of a fine-tune's difference)
    lora-resize preview IN --base MODEL --prompt "a cat"    (pictures per setting; pip install 'lora-resize[preview]')
    lora-resize demo
    lora-resize ui                      (a local web page; pip install 'lora-resize[ui]')
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Sequence

from .._version import __version__
from ..errors import LoraResizeError

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
COMMANDS = ("resize", "extract", "convert", "merge", "average", "analyze", "preview", "batch", "demo", "ui")
# the module of each subcommand: cli/<name>.py, except the web page's, which lives in the room above (ui/)
MODULES = {**{c: f"{__name__}.{c}" for c in COMMANDS}, "ui": "lora_resize.ui.command"}


def build_parser():
    from .flags import Parser
    p = Parser(prog="lora-resize", description="Make LoRA files smaller, exactly and fast.",
               epilog="Without a subcommand the sd-scripts resize_lora.py flags are accepted verbatim.")
    p.add_argument("--version", action="version", version=f"lora-resize {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=Parser)
    for name in COMMANDS:
        module = importlib.import_module(MODULES[name])
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=description(module)))
    for parser in sub.choices.values():  # for the hints on an option another subcommand has
        parser.siblings = sub.choices
    return p


def description(module) -> str:
    """A subcommand's description: its HELP line (the one `lora-resize -h` lists), then its DESCRIPTION paragraph
    where it has one."""
    line = module.HELP[:1].upper() + module.HELP[1:] + "."
    more = getattr(module, "DESCRIPTION", None)
    return f"{line}\n\n{more}" if more else line


def mistyped_command(word: str) -> str | None:
    """The subcommand `word` (the line's first word) looks like a typo of, or None. Without a subcommand the line
    is the sd-scripts form, whose first word is a flag or the input file: a word that is a flag, an existing path,
    or has the look of a path (a suffix, a folder, a URL) is never taken for a command."""
    import difflib
    if word.startswith("-") or any(c in word for c in "./\\:") or os.path.exists(word):
        return None
    close = difflib.get_close_matches(word.lower(), COMMANDS, n=1, cutoff=0.6)
    return close[0] if close else None


def dispatch(argv: list[str]) -> int:
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        from . import sdscripts
        guess = mistyped_command(argv[0])
        if guess is not None:
            from ..errors import OptionsError
            raise OptionsError(f"unknown command {argv[0]} (did you mean {guess}?); see lora-resize -h")
        return sdscripts.run(argv)
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return EXIT_USAGE
    return importlib.import_module(MODULES[args.command]).run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lora-resize` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return dispatch(argv)
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
