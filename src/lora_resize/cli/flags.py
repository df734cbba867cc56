"""The CLI's flags, generated from the options' fields (options.py: each field's flags, help, choices and group),
and the argparse pieces every subcommand shares. A subcommand adds the groups it honours; a flag it does not
honour is refused by argparse, or with a reason where one helps (`refuse`)."""
from __future__ import annotations

import argparse
import difflib
import re
import shlex
import sys
from typing import Callable

from ..errors import OptionsError, require
from ..options import GROUPS, ResizeOptions, option_fields


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (OptionsError, which main() prints as usual) that point to the parser's own
    help; an unknown option is reported before a missing required one, with a hint (`hint`); an option given twice
    with different values is refused (StoreOnce); and the optional dependencies that the given flags need
    (`requires`) are checked once the line is parsed, before any work."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Paragraphs)
        super().__init__(*args, **kwargs)
        # a value that starts with a minus and a digit (`--steps -5,1`, `--beta -1e-3`) is a value, never an option
        # (no flag of ours looks like one): argparse's own test takes only plain numbers, then says "expected one
        # argument" instead of our message about the value
        self._negative_number_matcher = NUMBER
        for name in (None, "store"):  # every plain option of every subcommand (argument groups share the registry)
            self.register("action", name, StoreOnce)
        self.needs: list[tuple[str, str, str, Callable | None]] = []  # (dest, module, feature, when)
        self.siblings: dict[str, argparse.ArgumentParser] = {}  # the other subcommands' parsers (build_parser)

    def error(self, message: str):  # noqa: D102
        raise OptionsError(f"{self._subject()}{message}; see {self.prog} -h")

    def _subject(self) -> str:
        """'analyze: ' for the parser of `lora-resize analyze` (main() already says 'lora-resize: error:')."""
        sub = self.prog.partition(" ")[2]
        return f"{sub}: " if sub else ""

    def parse_args(self, args=None, namespace=None):  # noqa: D102
        ns, extras = self.parse_known_args(args, namespace)
        vars(ns).pop(StoreOnce.GIVEN, None)
        missing = vars(ns).pop(MISSING, [])
        active = self._active(ns)
        if extras:
            active.unknown(extras)
        if missing:
            active.error(f"the following arguments are required: {', '.join(missing)}")
        for parser in {id(p): p for p in (self, active)}.values():
            parser.check_needs(ns)
        return ns

    def parse_known_args(self, args=None, namespace=None):  # noqa: D102
        # A required option is checked after the line is read (parse_args), so that an unknown option - maybe the
        # required one mistyped, `--too` for `--to` - is reported first; argparse would stop at the missing one.
        required = [a for a in self._actions if a.required and a.option_strings]
        for a in required:
            a.required = False
        try:
            ns, extras = super().parse_known_args(args, namespace)
        finally:
            for a in required:
                a.required = True
        missing = ["/".join(a.option_strings) for a in required if getattr(ns, a.dest, None) is None]
        if missing:
            vars(ns).setdefault(MISSING, []).extend(missing)
        return ns, extras

    def _active(self, ns: argparse.Namespace) -> "Parser":
        """The parser of the subcommand `ns` was parsed by (self when there is none)."""
        for a in self._actions:
            if isinstance(a, argparse._SubParsersAction) and getattr(ns, a.dest, None) in a.choices:
                sub = a.choices[getattr(ns, a.dest)]
                return sub._active(ns) if isinstance(sub, Parser) else self
        return self

    def unknown(self, extras: list[str]):
        """The error for arguments this parser does not know: the first unknown option with the closest known
        one, else the unexpected arguments."""
        option = next((x for x in extras if x.startswith("-") and not NUMBER.match(x)), None)
        if option is None:
            self.error(f"unrecognized argument{'s' if len(extras) > 1 else ''} {' '.join(extras)}")
        name = option.partition("=")[0]
        self.error(f"unknown option {name}{self.hint(name)}")

    def hint(self, name: str) -> str:
        """What an unknown option `name` was probably meant as: where another subcommand has it for a setting
        this one has under another flag (convert's --to is --output-format here: the same dest), that flag;
        else the closest known option (difflib on the names without their dashes, which would make any two
        options look alike); else the subcommands that have it. '' when nothing fits."""
        visible = [a for a in self._actions if a.help != argparse.SUPPRESS and a.option_strings]
        mine = {a.dest: a for a in reversed(visible)}  # the first flag of a setting where two set it
        elsewhere = {cmd: a for cmd, p in self.siblings.items() if p is not self for a in p._actions
                     if name in a.option_strings}
        same = [mine[a.dest] for a in elsewhere.values() if a.dest in mine]
        if same:
            flag = next((s for s in same[0].option_strings if s.startswith("--")), same[0].option_strings[0])
            return f" (did you mean {flag}? {name} means {flag} on {' and '.join(elsewhere)})"
        known = {s.lstrip("-"): s for a in visible for s in a.option_strings}
        close = difflib.get_close_matches(name.lstrip("-"), known, n=1, cutoff=HINT_CUTOFF)
        if close:
            return f" (did you mean {known[close[0]]}?)"
        if elsewhere:
            return f" (an option of {' and '.join(f'lora-resize {c}' for c in elsewhere)})"
        return ""

    def requires(self, dest: str | None, module: str, feature: str, when: Callable | None = None) -> None:
        """Declare that `feature` needs the optional `module` (errors.EXTRAS names its extra): always (dest None),
        or when the flag or argument `dest` is given (and `when(value)` holds)."""
        self.needs.append((dest, module, feature, when))

    def check_needs(self, ns: argparse.Namespace) -> None:
        """Raise MissingDependency for the first declared need of the parsed line that cannot be imported."""
        for dest, module, feature, when in self.needs:
            value = getattr(ns, dest, None) if dest else True
            if value not in (None, False) and (when is None or when(value)):
                require(module, feature)


class StoreOnce(argparse._StoreAction):
    """argparse's `store`, refusing an option given twice with different values (under any of its spellings:
    `--rank 4 --new_rank 8`) instead of keeping the last one silently; the same value twice is harmless.
    Options meant to repeat use `append` (--rule). The OptionsError carries the setting as `dest`."""

    GIVEN = "_given_once"  # the namespace's record of what each dest was given as; parse_args removes it

    def __call__(self, parser, namespace, values, option_string=None):
        given = vars(namespace).setdefault(self.GIVEN, {})
        if self.option_strings and self.dest in given and given[self.dest][1] != values:
            first, value = given[self.dest]
            try:
                parser.error(f"{first} given twice with different values ({first} {_shown(value)}, {option_string} "
                             f"{_shown(values)}); give it once")
            except OptionsError as e:
                e.dest = self.dest
                raise
        given[self.dest] = (option_string, values)
        super().__call__(parser, namespace, values, option_string)


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


class Paragraphs(argparse.HelpFormatter):
    """Help text whose descriptions keep their paragraphs (argparse joins them into one)."""

    def _fill_text(self, text, width, indent):
        return "\n\n".join(super(Paragraphs, self)._fill_text(par, width, indent) for par in text.split("\n\n"))


NUMBER = re.compile(r"^-\d|^-\.\d")  # a negative number, not an option
HINT_CUTOFF = 0.7  # difflib ratio for "did you mean": --rnak -> --rank (0.75); --force -/-> --rule (0.44)
MISSING = "_missing_required"  # the namespace's list of required options not given; parse_args removes it


def is_url(value: str) -> bool:
    """A location given as a URL (fsspec: s3://, memory://, file://, ...)."""
    return "://" in str(value)


# The input and output of a subcommand, with sd-scripts' spellings (networks/resize_lora.py: --model, --save_to),
# added by every subcommand that takes one; `refuse` uses the same spellings where a subcommand has none.
INPUT_FLAGS = ("--model",)
OUTPUT_FLAGS = ("-o", "--output", "--save_to")


def add_input(p: argparse.ArgumentParser, what: str) -> None:
    """The input, as INPUT or with --model (read with `input_of`)."""
    p.add_argument("input", nargs="?", help=what)
    p.add_argument(*INPUT_FLAGS, dest="model", metavar="INPUT", help="same as INPUT (sd-scripts spelling)")


def input_of(args: argparse.Namespace, usage: str) -> str:
    """The input given as INPUT or --model (OptionsError when neither or two different ones are given)."""
    if args.input and args.model and args.input != args.model:
        raise OptionsError("give the input once: either as INPUT or with --model")
    if not (args.input or args.model):
        raise OptionsError(f"no input file: {usage}")
    return args.input or args.model


def add_output(p: argparse.ArgumentParser, what: str, required: bool = False) -> None:
    """-o/--output (sd-scripts: --save_to)."""
    p.add_argument(*OUTPUT_FLAGS, dest="output", required=required, help=what)


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


def options_from_flags(line: str, where: str | None = None) -> ResizeOptions:
    """The options one line of `lora-resize resize` flags gives (`--method sv_ratio --param 32 --rank 64`), read
    as the resize subcommand reads them: the same flags and sd-scripts spellings (shell quoting, as shlex.split),
    the same checks and one-line errors. For consumers that take a setting as text (the ComfyUI sweep node).
    `where`: how the caller names this line (`--setting "--rank 0"`), put before the error so that a user with
    several lines knows which one failed.

    Raises OptionsError: the line cannot be split, holds something that is not a resize option (an input, -o, -h),
    or its options do not fit together."""
    try:
        try:
            words = shlex.split(line)
        except ValueError as e:
            raise OptionsError(f"cannot read the flags {line!r}: {e}") from None
        p = Parser(prog="lora-resize resize", add_help=False)
        add_option_groups(p, "rank", "output", "compute")
        return options_from(p.parse_args(words))
    except OptionsError as e:
        if where is None:
            raise
        raise OptionsError(f"{where}: {e}") from None


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
    p.add_argument("--plot", metavar="OUT.png", help="write the size-vs-fidelity curve as a PNG (matplotlib: pip "
                                                     "install 'lora-resize[plot]')")
    p.requires("plot", "matplotlib", "--plot")


def progress(quiet: bool, desc: str, unit: str = "layer"):
    """A tqdm progress bar on stderr (only on a terminal, and not with -q), as a `progress(iterable, total)`."""
    from tqdm import tqdm

    def wrap(iterable, total):
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                    disable=quiet or not sys.stderr.isatty())
    return wrap


def write_line(line: str, args: argparse.Namespace | None = None) -> None:
    """A line for people that does not break a progress bar: on stdout, or on stderr when the parsed line asked
    for --json (stdout then holds the JSON alone, which a parser reads whole)."""
    from tqdm import tqdm
    tqdm.write(line, file=sys.stderr if getattr(args, "json", False) else sys.stdout)


def image_size(text: str) -> tuple[int, int]:
    """--size: 'W' (a square) or 'WxH' in pixels -> (width, height). Raises argparse.ArgumentTypeError (the
    parser's one-line error) for anything else."""
    w, sep, h = str(text).lower().partition("x")
    try:
        size = (int(w), int(h if sep else w))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in pixels; write e.g. 512 or 768x512 (width x "
                                         "height)") from None
    return size  # its bounds are checked where every caller's are: ops.effect.Probing


def add_model_output_flags(p: argparse.ArgumentParser, pictures: bool) -> None:
    """The flags of what a setting does to the base model's output (lora_resize.diffusion, the `preview` extra):
    analyze's --effect (`pictures` False) and preview's (`pictures` True: --steps for the rendered images; --base
    is preview's own flag there). --base itself is the rank group's on analyze."""
    from ..results import DEFAULT_PROBE_STEPS, DEFAULT_RENDER_STEPS, DEFAULT_SEED, MAX_SIDE, MAX_STEPS
    g = p.add_argument_group("the model's output (--base MODEL: a diffusers folder or a single-file SD1.5, SDXL or "
                             "Flux.1 checkpoint; pip install 'lora-resize[preview]')")
    if not pictures:
        g.add_argument("--effect", action="store_true",
                       help="with --base: measure every setting's effect error, the share of the LoRA's change to "
                            "the denoiser's prediction that the setting loses, at fixed probes (prompts, --seed, "
                            "--probe-steps timesteps); a column, a curve, and the recommendation's measure")
    g.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a prompt to probe (repeat for several; default: three stated prompts, a subject, a "
                        "style and a scene)" if not pictures else "the prompt of every picture (and of the probes)")
    # their defaults are None (applied in probing_from / the jobs), so a flag that was given is told from one that
    # was not: analyze refuses every --effect-only flag given without --effect (cli/analyze.py EFFECT_ONLY)
    g.add_argument("--seed", type=int, help=f"seed of the initial noise, 0 to 2**63 - 1 (default {DEFAULT_SEED})")
    g.add_argument("--probe-steps", type=int, metavar="N",
                   help=f"denoiser calls recorded per prompt, spread over the schedule (1 to {MAX_STEPS}, default "
                        f"{DEFAULT_PROBE_STEPS})")
    if pictures:
        g.add_argument("--steps", type=int, metavar="N",
                       help=f"sampling steps of each picture (1 to {MAX_STEPS}, default {DEFAULT_RENDER_STEPS})")
    g.add_argument("--size", type=image_size, metavar="W[xH]",
                   help=f"picture and probe size in pixels, 8 to {MAX_SIDE} a side and a multiple of the model's "
                        "latent scale (8; Flux.1 16) (default: the model's own, at most 512)")
    g.add_argument("--base-config", metavar="DIR",
                   help="with a single-file --base: a diffusers folder of that model (its configs and tokenizers), "
                        "read instead of the Hugging Face Hub")
    dest = None if pictures else "effect"
    p.requires(dest, "diffusers", "the model's output (--effect, preview)")
    p.requires(dest, "transformers", "the model's output (--effect, preview)")


def probing_from(args: argparse.Namespace, base: str):
    """The ops.effect.Probing the parsed model-output flags give, for `base` (the defaults where not given; the
    values are checked there). Raises OptionsError."""
    from ..ops.effect import Probing
    from ..results import DEFAULT_PROBE_STEPS, DEFAULT_SEED
    return Probing(base=base, config=args.base_config, variant=getattr(args, "base_variant", None),
                   prompts=tuple(args.prompt) if args.prompt else None,
                   seed=DEFAULT_SEED if args.seed is None else args.seed,
                   timesteps=DEFAULT_PROBE_STEPS if args.probe_steps is None else args.probe_steps,
                   size=args.size, device=getattr(args, "device", "cpu") or "cpu")
