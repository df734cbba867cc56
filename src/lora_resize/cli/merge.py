"""`lora-resize merge A.safetensors:0.8 B.safetensors:0.5 -o OUT [options]`: weighted LoRAs into one."""
from __future__ import annotations

import argparse

from .flags import INPUT_FLAGS, add_option_groups, add_output, add_output_flags, options_from, progress, refuse

HELP = "merge weighted LoRAs into one of a chosen size"
DESCRIPTION = ("Merge LoRAs: each layer becomes the best rank-k approximation of the weighted sum. Example: "
               "lora-resize merge a.safetensors:0.8 b.safetensors:0.5 -o ab.safetensors --method sv_fro --param 0.95")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", metavar="FILE[:WEIGHT]",
                   help="inputs with weights (default 1; may be negative; 0 leaves the input out)")
    add_output(p, "output file (.safetensors or .pt/.pth/.ckpt)")
    add_merge_method(p)
    add_input_strengths(p)
    add_option_groups(p, "rank", "output", "compute")
    add_output_flags(p, "per-layer lines in sd-scripts' format")
    refuse(p, *INPUT_FLAGS, why="merge takes its inputs as FILE[:WEIGHT] arguments, e.g. lora-resize merge "
           "a.safetensors:0.8 b.safetensors:0.5 -o ab.safetensors")


def add_merge_method(p: argparse.ArgumentParser) -> None:
    """--merge-method and the parameters the methods read, from their registry (core.merging)."""
    from ..core.merging import MERGE_METHODS, MERGE_PARAMS

    g = p.add_argument_group("merge method")
    g.add_argument("--merge-method", choices=list(MERGE_METHODS), default="sum",
                   help="how the weighted inputs' updates combine: "
                        + "; ".join(f"{m.name}: {m.help}" for m in MERGE_METHODS.values()))
    for param in MERGE_PARAMS.values():
        readers = ", ".join(n for n, m in MERGE_METHODS.items() if param.name in m.params) or "no method yet"
        g.add_argument(param.flag, dest=param.name, type=param.type, metavar=param.metavar, default=None,
                       help=f"{param.help} (read by {readers})")


def add_input_strengths(p: argparse.ArgumentParser) -> None:
    """--input-rule / --input-block-weights: one input's own block strengths (ops.merge.Source)."""
    g = p.add_argument_group("per-input strengths (applied to that input before the merge method; --rule and "
                             "--block-weights apply to the merged layer)")
    g.add_argument("--input-rule", action="append", default=[], metavar="N:PATTERN=scale:X",
                   help="a scale rule for input N only (1-based, in the order given), e.g. 2:'*attn2*=scale:0.5'; "
                        "PATTERN=drop leaves that input out of the matching layers (strength 0); repeatable, the "
                        "first matching rule of an input wins")
    g.add_argument("--input-block-weights", action="append", default=[], metavar="N:PRESET:W1,...",
                   help="block strengths for input N only, in --block-weights' notation, e.g. 1:SDXL:OUTALL; "
                        "they multiply that input's scale rules")


def numbered(texts: list[str], count: int, flag: str) -> dict[int, list[str]]:
    """'N:TEXT' values of `flag` by input number N (1..count). OptionsError naming the fix for a missing or
    out-of-range N."""
    from ..errors import OptionsError

    out: dict[int, list[str]] = {}
    for text in texts:
        head, sep, rest = text.partition(":")
        if not sep or not head.strip().isdigit() or not rest.strip():
            raise OptionsError(f"{flag} {text!r}: write N:{'RULE' if flag == '--input-rule' else 'PRESET:W1,...'} "
                               f"with N the input's position (1 to {count}), e.g. {flag} 2:"
                               + ("'*attn2*=scale:0.5'" if flag == "--input-rule" else "SDXL:OUTALL"))
        n = int(head)
        if not 1 <= n <= count:
            raise OptionsError(f"{flag} {text!r}: there is no input {n}; the merge has {count} input(s), numbered "
                               f"1 to {count} in the order given")
        out.setdefault(n, []).append(rest.strip())
    return out


def merge_sources(args: argparse.Namespace) -> list:
    """The inputs as ops.merge.Source, each with its own --input-rule / --input-block-weights. Raises
    OptionsError for a bad N, or two --input-block-weights for one input."""
    from ..ops.merge import parse_source

    sources = [parse_source(t) for t in args.sources]
    return strengthened(sources, numbered(args.input_rule, len(sources), "--input-rule"),
                        numbered(args.input_block_weights, len(sources), "--input-block-weights"),
                        lambda n, count: f"--input-block-weights is given {count} times for input {n}; give one "
                                         "preset per input (and scale rules with --input-rule)")


def strengthened(sources: list, rules: dict[int, list[str]], presets: dict[int, list[str]], too_many) -> list:
    """`sources` (numbered from 1) with the scale rules `rules` added to their own and the block weights preset of
    `presets` (by input number, `numbered`'s form); OptionsError(too_many(n, count)) when input n would have more
    than one preset (its own counted)."""
    from dataclasses import replace

    from ..errors import OptionsError

    for n, values in presets.items():
        if len(values) + (sources[n - 1].block_weights is not None) > 1:
            raise OptionsError(too_many(n, len(values)))
    return [replace(s, rules=(*s.rules, *rules.get(n, ())), block_weights=presets.get(n, [s.block_weights])[0])
            for n, s in enumerate(sources, 1)]


def input_strength_flags(text: str) -> list[str]:
    """The per-input strengths box of the page and the ComfyUI Merge node, one per line - 'N:PATTERN=scale:X' (a
    scale rule: a line with '=' after N) or 'N:PRESET:W1,...' (block weights) - as the flags that say the same:
    ['--input-rule', '2:*attn2*=scale:0.5', '--input-block-weights', '1:SDXL:OUTALL']. Blank lines and '#'
    comments are skipped."""
    words = []
    for line in (x.strip() for x in (text or "").splitlines()):
        if line and not line.startswith("#"):
            words += ["--input-rule" if "=" in line.partition(":")[2] else "--input-block-weights", line]
    return words


def with_input_strengths(sources: list, text: str) -> list:
    """`sources` (ops.merge.Source, in input order, numbered from 1) with the per-input strengths of `text`
    (`input_strength_flags`'s lines) added to their own. Raises OptionsError (one line) for a line without a valid
    N, an N past the last input, or two presets for one input."""
    words = input_strength_flags(text)
    given = {flag: numbered([v for f, v in zip(words[::2], words[1::2]) if f == flag], len(sources), flag)
             for flag in ("--input-rule", "--input-block-weights")}
    return strengthened(sources, given["--input-rule"], given["--input-block-weights"],
                        lambda n, count: f"input {n} has {count} block weights presets; give one per input (and "
                                         "scale rules as N:PATTERN=scale:X)")


def merge_settings(args: argparse.Namespace):
    """The MergeSettings of parsed arguments (OptionsError for a parameter the method does not read)."""
    from ..core.merging import MERGE_PARAMS, MergeSettings

    return MergeSettings(args.merge_method, **{p: getattr(args, p) for p in MERGE_PARAMS})


def run(args: argparse.Namespace) -> int:
    from ..errors import OptionsError
    from ..ops.merge import merge
    from .resize import layer_printer, render

    if not args.output:
        raise OptionsError("no output file: add -o OUT.safetensors")
    opts = options_from(args)
    result = merge(merge_sources(args), args.output, opts, progress=progress(args.quiet, "merging"),
                   on_layer=layer_printer(args, opts.dynamic), merge_method=merge_settings(args))
    return render(result, args, [])
