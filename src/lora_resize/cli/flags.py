"""The CLI's flags, generated from the options' fields (options.py: each field's flags, help, choices and group),
and the argparse pieces every subcommand shares. A subcommand adds the groups it honours; a flag it does not
honour is refused by argparse, or with a reason where one helps (`refuse`)."""
from __future__ import annotations

import argparse
import sys

from ..errors import OptionsError
from ..options import GROUPS, ResizeOptions, option_fields


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (OptionsError, which main() prints as usual)."""

    def error(self, message: str):  # noqa: D102
        raise OptionsError(f"{message} (see {self.prog} --help)")


def choices_of(spec):
    if spec == "conversions":  # the layouts --output-format can write (named without importing torch)
        from ..models import LAYOUTS
        return sorted(LAYOUTS)
    return list(spec()) if callable(spec) else spec


def add_option_groups(p: argparse.ArgumentParser, *groups: str) -> None:
    """The options of `groups` ('rank', 'output', 'compute'), as argument groups, from the options' fields."""
    defaults = ResizeOptions.__dataclass_fields__
    for group in groups:
        g = p.add_argument_group(GROUPS[group])
        for f in option_fields():
            meta = f.metadata
            if meta["group"] != group:
                continue
            kwargs = dict(meta["argparse"])
            if "choices" in kwargs:
                kwargs["choices"] = choices_of(kwargs["choices"])
            default = defaults[f.name].default
            if kwargs.get("action") == "append":
                default = []
            g.add_argument(*meta["flags"], dest=f.name, default=default, help=meta["help"], **kwargs)


def option_values(args: argparse.Namespace) -> dict:
    """The option fields the parsed flags set (None where a flag was not given)."""
    fields = {f.name: getattr(args, f.name) for f in option_fields() if hasattr(args, f.name)}
    if "block_rules" in fields:
        fields["block_rules"] = tuple(fields["block_rules"] or ())
    return fields


def options_from(args: argparse.Namespace, **overrides) -> ResizeOptions:
    """The validated options the parsed flags give (OptionsError when they don't fit together)."""
    return ResizeOptions(**{**option_values(args), **overrides})


def refuse(p: argparse.ArgumentParser, *flags: str, why: str, nargs="?") -> None:
    """A flag this subcommand has no use for, refused with `why` rather than a bare 'unrecognized arguments'."""
    class Refuse(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            raise OptionsError(f"{option_string}: {why}")
    p.add_argument(*flags, action=Refuse, nargs=nargs, help=argparse.SUPPRESS)


def add_output_flags(p: argparse.ArgumentParser, verbose: str | None) -> None:
    """-v (when the subcommand has per-layer lines: `verbose` says what), -q, --json."""
    if verbose:
        p.add_argument("-v", "--verbose", action="store_true", help=verbose)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the full result as JSON on stdout")


def add_picture_flags(p: argparse.ArgumentParser) -> None:
    """--report / --plot: pictures of the size-vs-fidelity sweep (resize and analyze)."""
    p.add_argument("--report", metavar="OUT.html",
                   help="write a self-contained HTML report: size-vs-fidelity curves, rank map, spectra, settings")
    p.add_argument("--plot", metavar="OUT.png", help="write the size-vs-fidelity curve as a PNG (matplotlib)")


def progress(quiet: bool, desc: str, unit: str = "layer"):
    """A tqdm progress bar on stderr (only on a terminal, and not with -q), as a `progress(iterable, total)`."""
    from tqdm import tqdm

    def wrap(iterable, total):
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                    disable=quiet or not sys.stderr.isatty())
    return wrap


def write_line(line: str) -> None:
    """A line on stdout that does not break a progress bar."""
    from tqdm import tqdm
    tqdm.write(line, file=sys.stdout)
