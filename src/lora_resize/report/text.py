"""Text for people: sd-scripts' verbose per-layer lines, and the closing summary."""
from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path

import numpy as np

from ..errors import one_line
from ..ranks.budgets import BUDGETS
from ..ranks.constraints import CONSTRAINTS
from ..results import FIDELITY, MEASURES, LayerResult, ResizeResult
from ..units import format_size


def strict_json(obj, indent: int | None = 1) -> str:
    """JSON that strict parsers accept: NaN and infinities (a zero layer's ratios) become null."""
    def clean(x):
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(obj), indent=indent, default=str, allow_nan=False)


def fidelity_legend() -> str:
    """What each fidelity measure is, under the names every printout uses (results.MEASURES)."""
    return "fidelity = Frobenius norm kept per layer; " + "; ".join(f"{n}: {what}" for n, what in MEASURES.values())


def fidelity_figures(values: dict) -> str:
    """'w-mean 91.81%, mean 91.66%, global 91.46%, min 90.94%' from the measures' values (a result's
    `fidelity`, a sweep row's fields)."""
    return ", ".join(f"{name} {percent(values[key])}" for key, (name, _) in MEASURES.items())


def verbose_line(row: LayerResult, dynamic: bool) -> str:
    """A per-layer line in sd-scripts' resize_lora.py --verbose format; a layer with no update (all zeros, or
    alpha 0) says so instead of ratios of nothing, and a figure that is not a number prints as '-'."""
    if row.zero:
        line = f"{one_line(row.name):75} | zero layer (no update): kept as rank-{row.new_rank} zeros"
    else:
        line = (f"{one_line(row.name):75} | sum(S) retained: {_figure(row.sum_retained, '.1%')}, fro retained: "
                f"{_figure(row.fro_retained, '.1%')}, max(S) ratio: {_figure(row.max_ratio, '0.1f')}")
    if dynamic:
        line += f", dynamic | dim: {row.new_rank}, alpha: {row.new_alpha}"
    return line


def _figure(x: float, spec: str) -> str:
    return format(x, spec) if math.isfinite(x) else "-"


def shown_paths(paths: list[Path]) -> list[str]:
    """How a printout names files: by their names, unless two of them share a name (`resize k.safetensors -o
    od/`: 'k.safetensors -> k.safetensors' reads as if the input was overwritten); then by their paths, relative to
    the working directory for those under it."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    cwd = Path.cwd()
    return [os.path.relpath(p, cwd) if Path(os.path.abspath(p)).is_relative_to(cwd) else str(p) for p in paths]


def _inputs_and_output(result: ResizeResult) -> str:
    """'k.safetensors -> od/k.safetensors', or a merge's 'a.safetensors:0.8 + b.safetensors:0.5 -> ab.safetensors'
    (the inputs it used, with their weights, however many; its merge method when not the sum)."""
    sources = [(Path(p), w) for p, w in result.options.get("sources") or () if w != 0]
    if not sources:  # not a merge (a merge of one input is named as one, with its weight and method)
        src, dst = shown_paths([result.src, result.dst])
        return f"{src} -> {dst}"
    *srcs, dst = shown_paths([p for p, _ in sources] + [result.dst])
    return " + ".join(f"{s}:{w:g}" for s, (_, w) in zip(srcs, sources)) + f" -> {dst}" + _merge_method(result)


def _merge_method(result: ResizeResult) -> str:
    """' (merge method ties, density 0.3)': a merge's method other than the sum, with the parameters it read (the
    result's `merge_label`, core.merging.MergeSettings.label())."""
    label = result.options.get("merge_label")
    return f" (merge method {label})" if label and result.options.get("merge_method", "sum") != "sum" else ""


def average_line(result: ResizeResult) -> str:
    """sd-scripts' closing verbose line."""
    return f"Average Frobenius norm retention: {result.mean_fro:.2%} | std: {result.std_fro:0.3f}"


def summary(result: ResizeResult) -> str:
    """A few lines: sizes, ranks, fidelity, time, notes."""
    o = result.options
    ranks = np.array([x.new_rank for x in result.layers])
    old = np.array([x.old_rank for x in result.layers])
    method = o["method"] or "fixed"
    setting = (f"{method} {o['param']}" if o["method"] else
               f"rank {o['rank']}" if o["rank"] is not None else "ranks kept")
    budget = next((b for b in BUDGETS.values() if o.get(b.name) is not None), None)
    if budget is not None:
        setting = budget.summary(o[budget.name])
    dynamic = o["method"] or budget is not None
    if o["conv_rank"] != o["rank"]:
        setting += f", conv rank {o['conv_rank']}"
    elif dynamic and o["rank"] is not None:
        setting += f", cap {o['rank']}"
    setting += "".join(f", {c.describe(o[c.name])}" for c in CONSTRAINTS.values() if o.get(c.name))
    fid = result.fidelity
    n_inputs = sum(1 for _, w in result.options.get("sources") or () if w != 0)
    lines = [
        f"{_inputs_and_output(result)}: {format_size(result.input_bytes)}"
        f"{f' ({n_inputs} inputs)' if n_inputs > 1 else ''} -> "
        f"{format_size(result.output_bytes)} ({result.output_bytes / max(result.input_bytes, 1):.1%}), "
        f"{result.seconds:.1f} s",
        f"  {len(result.layers)} layers ({result.format}), {setting}, rule {o['rank_rule']}, saved as {result.precision}",
        f"  rank {old.min()}..{old.max()} -> {ranks.min()}..{ranks.max()} (mean {ranks.mean():.1f})",
        f"  Frobenius retained: {fidelity_figures(fid)} ({fid['worst_layer']})"
        if fid["worst_layer"] else "  Frobenius retained: n/a (all layers are zero)",
        f"  {fidelity_legend()}",
    ]
    if o.get("rule_hits"):
        lines.append("  rules: " + "; ".join(f"{r}: {n} module{'s' if n != 1 else ''}"
                                            for r, n in o["rule_hits"].items()))
    lines += input_rules_lines(result) + input_lines(result)
    if result.zero_layers:
        zero_ranks = "/".join(str(k) for k in sorted({x.new_rank for x in result.layers if x.zero})) or "1"
        lines.append(f"  {len(result.zero_layers)} zero layer(s) (no update: untrained modules?) kept as "
                     f"rank-{zero_ranks} zeros, e.g. {result.zero_layers[0]}")
    unchanged, cast = result.unchanged_kinds, result.cast_kinds
    if unchanged:
        lines.append(f"  {sum(unchanged.values())} other tensor(s) copied unchanged: {_counted(unchanged)}")
    if result.summed_kinds:
        lines.append(f"  {sum(result.summed_kinds.values())} other tensor(s) loaders add to the model, summed with the "
                     f"merge weights: {_counted(result.summed_kinds)}")
    if cast:
        lines.append(f"  {sum(cast.values())} other tensor(s) cast to {result.precision} (--precision): "
                     f"{_counted(cast)}")
    based = [x for x in result.layers if x.base is not None]
    if based:
        strong = max(based, key=lambda x: x.strength)
        lossy = max(based, key=lambda x: x.base_loss_fro)
        lines.append(f"  against the base ({len(based)} of {len(result.layers)} layers): LoRA strength ||dW||/||W|| "
                     f"median {float(np.median([x.strength for x in based])):.3g}, max {strong.strength:.3g} "
                     f"({strong.name}); loss ||dW - dW_k||/||W|| max {lossy.base_loss_fro:.3g} ({lossy.name}), "
                     f"spectral max {max(x.base_loss_spectral for x in based):.3g}")
    lines += [f"  note: {n}" for n in result.notes]
    return "\n".join(one_line(line) for line in lines)  # names from the file never drive the terminal


def input_rules_lines(result: ResizeResult) -> list[str]:
    """A merge's per-input strengths (ops.merge.Source.rules / block_weights): what each input's rules hit."""
    lines = []
    for x in result.options.get("input_rules") or ():
        hits = [f"{r}: {n} module{'s' if n != 1 else ''}" for r, n in x["hits"].items()]
        if x.get("block_weights"):
            n = x.get("preset_modules", 0)
            hits.append(f"{x['block_weights']}: {n} module{'s' if n != 1 else ''}")
        lines.append(f"  input {x['input']} ({x['file']}) rules: " + "; ".join(hits))
    return lines


def input_lines(result: ResizeResult) -> list[str]:
    """A merge's inputs in the written layers (LayerResult.input_shares / input_kept): per input, the layers it
    dominates (largest share) and the energy it keeps, sum_l kept_l ||tau_l||^2 / sum_l ||tau_l||^2."""
    rows = [x for x in result.layers if x.input_shares is not None]
    sources = [(Path(p), w) for p, w in result.options.get("sources") or () if w != 0]
    if not rows or len(sources) < 2 or len(rows[0].input_shares) != len(sources):
        return []
    names = shown_paths([p for p, _ in sources])
    parts = []
    for i, name in enumerate(names):
        dominated = sum(1 for x in rows if all(s == s for s in x.input_shares)
                        and max(range(len(names)), key=lambda j: x.input_shares[j]) == i)
        energy = sum(x.input_energy[i] for x in rows if x.input_kept[i] == x.input_kept[i])
        kept = sum(x.input_kept[i] * x.input_energy[i] for x in rows if x.input_kept[i] == x.input_kept[i])
        parts.append(f"{name} dominates {dominated} of {len(rows)} layers, keeps "
                     f"{percent(kept / energy if energy > 0 else math.nan)}")
    return ["  inputs (largest share of a layer; energy kept in the written layers): " + "; ".join(parts)]


def _counted(kinds: dict[str, int]) -> str:
    """'3 bias diff, 1 other': counts by kind, the most common first."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items(), key=lambda x: (-x[1], x[0])))


def percent(x: float) -> str:
    """A fraction as every printout shows it: '91.81%', 'n/a' for NaN."""
    return "n/a" if x != x else f"{x:.2%}"


def effect_percent(x: float | None) -> str:
    """An effect error as every printout shows it: '3.21%', '3.1e-04%' below 0.01% (float rounding, not 0), '0%'
    for none at all, 'n/a' when not measured."""
    if x is None or x != x:
        return "n/a"
    return "0%" if x == 0 else f"{x:.2%}" if x >= 1e-4 else f"{x * 100:.1e}%"


def _sci(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{x:.2e}"


def _count(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def analysis_table(a, verbose: bool = False) -> str:
    """`lora-resize analyze` as text: one line per setting (the chosen one starred, the recommended one marked
    '>'), then the recommendation with its reason, and how to get it."""
    b = a.shared
    cap = "no cap" if b.rank is None and b.conv_rank is None else (
        f"cap {b.rank}" + (f", conv cap {b.conv_rank}" if b.conv_rank != b.rank else ""))
    lines = [f"{a.src.name}: {len(a.layers)} layers ({a.format}), {format_size(a.input_bytes)}; "
             f"output {a.precision}, rule {b.rank_rule}, {cap}; decomposed in {a.decompose_seconds:.1f} s, "
             f"{len(a.rows)} settings in {a.seconds - a.decompose_seconds:.1f} s",
             fidelity_legend(), ""]
    rows = list(a.rows) + ([a.chosen] if a.chosen is not None else [])
    based = any(r.base_loss is not None for r in rows)
    if based:
        lines.insert(-1, "vs base = loss relative to the base weights: global = sqrt(sum ||dW - dW_k||_F^2 / sum "
                         "||W||_F^2), max = the worst layer's ||dW - dW_k||_F / ||W||_F")
    width = max([30, *(len(r.label) for r in rows)])  # the whole label: settings differ at its end (constraints)
    head = (f"  {'setting':<{width}} {'bytes':>14} {'size':>9} {'params':>8} "
            + " ".join(f"{name:>7}" for name, _ in MEASURES.values()))
    effect = any(r.effect_error is not None for r in rows)
    if effect:
        lines.insert(-1, f"effect = {FIDELITY['effect_error']}")
        head += f" {'effect':>7}"
    head += f" {'vs base':>8} {'max':>8}  worst layer" if based else "  worst layer"
    lines.append(head)
    for r in rows:
        mark = "*" if r.chosen else ">" if r is a.recommended else " "
        line = (f"{mark} {r.label:<{width}} {r.output_bytes:>14,} {format_size(r.output_bytes):>9} "
                f"{_count(r.params):>8} " + " ".join(f"{percent(getattr(r, key)):>7}" for key in MEASURES))
        if effect:
            line += f" {effect_percent(r.effect_error):>7}"
        if based:
            line += f" {_sci(r.base_loss):>8} {_sci(r.base_loss_max):>8}  {r.base_worst or '-'}"
        else:
            line += f"  {r.worst_layer or '-'}"
        lines.append(line)
    lines += [f"note ({r.label}): {r.note}" for r in a.rows if r.note]
    resize = a.command or f"lora-resize resize {shlex.quote(str(a.src))} -o OUT.safetensors"
    lines.append("")
    if a.recommended is not None:
        lines += [f"> recommended: {a.recommended.args}  ({a.recommended_reason})", f"  {resize} {a.recommended.args}"]
    else:
        lines.append(f"recommended: none ({a.recommended_reason})")
    if a.chosen is not None:
        lines.append(f"* chosen: {resize} {a.chosen.args}")
    else:
        lines.append(f"or pick a row and run: {resize} <its flags> (--json lists every row's flags)")
    lines += precision_lines(a)
    if a.rule_hits:
        lines.append("rules: " + "; ".join(f"{r}: {n} module{'s' if n != 1 else ''}" for r, n in a.rule_hits.items()))
    if a.dropped:
        lines.append(f"{len(a.dropped)} module(s) dropped by rules and left out of every setting")
    lines += [f"note: {n}" for n in a.notes]
    text = "\n".join(one_line(line) for line in lines)
    return f"{text}\n\n{per_layer_table(a)}" if verbose else text


def precision_lines(a) -> list[str]:
    """The shown setting (chosen, else recommended) saved at fp16, bf16 and float, from the same decomposition:
    exact sizes, fidelity, and the rounding each precision adds (Analysis.at_precisions); [] without a setting."""
    rows, note = a.at_precisions()
    if not rows:
        return []
    lines = ["", f"{a.shown.label} at each precision (rounding = ||dW_k,written - dW_k||_F / ||dW||_F; {note}):",
             f"  {'precision':<10} {'bytes':>14} {'size':>9} "
             + " ".join(f"{name:>7}" for name, _ in MEASURES.values()) + f" {'rounding':>9}"]
    for r in rows:
        lines.append(f"  {r.precision:<10} {r.output_bytes:>14,} {format_size(r.output_bytes):>9} "
                     + " ".join(f"{percent(getattr(r, key)):>7}" for key in MEASURES)
                     + f" {_sci(r.rounding_error):>9}" + (f"  ({r.note})" if r.note else ""))
    return lines


def per_layer_table(a) -> str:
    """analyze -v: each layer's block, rank and the Frobenius norm kept under the chosen setting (or the
    recommended one)."""
    pick = a.shown
    if pick is None:
        return "per layer: no setting to show (every layer's update is zero)"
    lines = [f"per layer, {pick.label}:"]
    for L, block, k in zip(a.layers, a.blocks, pick.ranks):
        lines.append(f"  {L.name:75} {block:>15} rank {L.rank:>4} -> {int(k):>4}  fro {percent(L.fro_retained(k))}")
    return "\n".join(one_line(line) for line in lines)


def preview_lines(p) -> str:
    """`lora-resize preview` as text: one line per picture (seconds, size, effect error, SSIM), the metric, the
    recommendation among the settings."""
    lines = [f"{p.src.name} on {p.base}: {p.prompt!r}, seed {p.seed}, {p.steps} steps, {p.size[0]}x{p.size[1]}; "
             f"{len(p.pictures)} pictures in {p.seconds:.1f} s"]
    for pic, s in zip(p.pictures, p.picture_seconds):
        lines.append(f"  {pic.label().replace(chr(10), ', '):<90} {s:6.1f} s")
    a = p.analysis
    if a.recommended is not None:
        lines.append(f"> recommended: {a.recommended.args}  ({a.recommended_reason})")
    lines += [f"SSIM: structural similarity to the original-LoRA image (scikit-image, 1 = identical); effect error: "
              f"{FIDELITY['effect_error']}"] + [f"note: {n}" for n in p.notes]
    return "\n".join(one_line(line) for line in lines)
