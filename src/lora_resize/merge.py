"""Merge several LoRAs into one of a chosen size, exactly: a weighted sum of low-rank products is itself one,
with the weighted factors stacked side by side (up = [w1 s1 up1 | w2 s2 up2 | ...], down = [down1; down2; ...]),
so the resize engine reduces it without ever forming the dense update."""
from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ._version import __version__
from .errors import LoraStructureError, OptionsError
from .formats import Layout, LowRankLayer, Module, detect, key_family
from .formats.convert import convert
from .metadata import OUR_KEY
from .options import PRECISIONS, ResizeOptions
from .pipeline import (Progress, Unit, as_options, check_output_path, clamp_notes, factor_bytes, local_path,
                       precision_of, resolve_input, run_units, write_output)
from .result import LayerResult, ResizeResult
from .rules import is_dropped, rule_hits, rule_notes
from .tensorfile import TensorSource, open_tensor_file


@dataclass(frozen=True)
class Source:
    """One input of a merge and its weight."""
    path: Path
    weight: float = 1.0


def parse_source(text: str) -> Source:
    """'file.safetensors:0.8' -> Source(file, 0.8); without ':weight' the weight is 1."""
    local_path(text, "input")
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return Source(Path(head), float(tail))
        except ValueError:
            pass
    return Source(Path(text), 1.0)


def _stack(name: str, parts: list[tuple[float, LowRankLayer]]) -> LowRankLayer:
    """One low-rank layer for sum_i w_i * scale_i * up_i @ down_i (shapes checked), in float64."""
    first = parts[0][1]
    ups, downs = [], []
    for w, layer in parts:
        if (layer.up.shape[0], layer.down.shape[1], layer.kernel) != (first.up.shape[0], first.down.shape[1],
                                                                       first.kernel):
            raise LoraStructureError(
                f"layer {name} has different shapes in the inputs: out x in {first.up.shape[0]} x "
                f"{first.down.shape[1]} (kernel {first.kernel}) vs {layer.up.shape[0]} x {layer.down.shape[1]} "
                f"(kernel {layer.kernel}); these LoRAs are for different models")
        true_scale = layer.alpha / layer.rank if layer.alpha is not None else 1.0
        ups.append(layer.up.to(torch.float64) * (w * true_scale))
        downs.append(layer.down.to(torch.float64))
    return LowRankLayer(up=torch.cat(ups, dim=1), down=torch.cat(downs, dim=0), alpha=None, kernel=first.kernel,
                        in_channels=first.in_channels)


def _unit(name: str, members: list[tuple[float, Module, TensorSource]]) -> Unit:
    def load() -> LowRankLayer:
        return _stack(name, [(w, m.load(src)) for w, m, src in members])
    return Unit(name, load, members[0][1].emit, sum(factor_bytes(m, src) for _, m, src in members))


def merge(sources: list[Source | str | os.PathLike], dst: str | os.PathLike, options: ResizeOptions | None = None, *,
          progress: Progress | None = None, on_layer: Callable[[LayerResult], None] | None = None,
          **option_fields) -> ResizeResult:
    """Merge `sources` (weighted LoRAs of the same model) into one LoRA at `dst`, reduced with the resize options.

    Each layer of the result is the best rank-k approximation of sum_i w_i * dW_i. Layers present in only some
    inputs are merged from those. A weight of 0 drops that input. Raises the same errors as `resize`."""
    t0 = time.perf_counter()
    opts = as_options(options, option_fields)
    if opts.has_target:
        raise OptionsError("--target-size/--target-fro are not available for merge yet; merge with --method or "
                           "--rank, then resize the result with the target")
    srcs = [s if isinstance(s, Source) else parse_source(s) if isinstance(s, str) else Source(Path(s))
            for s in sources]
    srcs = [Source(resolve_input(local_path(s.path, "input")), s.weight) for s in srcs]
    if not srcs:
        raise OptionsError("merge needs at least one input: A.safetensors:0.8 B.safetensors:0.5 ...")
    notes = [f"{s.path.name} has weight 0 and is left out" for s in srcs if s.weight == 0]
    live = [s for s in srcs if s.weight != 0]
    if not live:
        raise OptionsError("every input has weight 0: nothing to merge")
    dst = local_path(dst, "output")
    device = opts.resolve_device()
    with ExitStack() as stack:
        readers, layouts = [], []
        for s in live:
            r = open_tensor_file(s.path)
            stack.callback(r.close)
            check_output_path(s.path, dst)
            readers.append(r)
            layouts.append(convert(detect(r.infos(), r.metadata, s.path), opts.output_format))
        families = {key_family(lay.format) for lay in layouts}
        if len(families) > 1:
            raise LoraStructureError(f"the inputs are in different key families ({', '.join(sorted(families))}); "
                                     "merge files of one family")
        members: dict[str, list[tuple[float, Module, TensorSource]]] = {}
        for s, r, lay in zip(live, readers, layouts):
            for m in lay.modules:
                members.setdefault(m.name, []).append((s.weight, m, r))
        precision = opts.precision or precision_of(layouts[0], readers[0], None)
        save_dtype = PRECISIONS[precision]
        partial = sum(1 for v in members.values() if len(v) < len(live))
        if partial:
            notes.append(f"{partial} layer(s) are in only some of the inputs and are merged from those")
        names = sorted(members, key=lambda n: members[n][0][1].keys[0])
        hits, rule_warnings = rule_hits(opts.block_rules, names), rule_notes(opts.block_rules, names)
        names = [n for n in names if not is_dropped(opts.block_rules, n)]
        if not names:
            raise OptionsError("every module is dropped by the rules; nothing would be left to write")
        notes += rule_warnings
        units = [_unit(name, members[name]) for name in names]
        rows, out = run_units(units, opts, device, save_dtype, progress, on_layer)
        passthrough = []
        for s, r, lay in zip(live, readers, layouts):
            for key in lay.passthrough:
                if key not in out:
                    t = r.get(key)
                    out[key] = t.to(save_dtype) if t.is_floating_point() else t
                    passthrough.append(key)
        if passthrough:
            notes.append(f"{len(passthrough)} non-LoRA tensor(s) copied from the first input that has them")
        meta = merge_metadata(live, layouts[0], readers, opts, precision, rows)
        notes += write_output(dst, out, meta, layouts[0], rows) + clamp_notes(rows)
        return ResizeResult(src=live[0].path, dst=dst, format=layouts[0].format, precision=precision,
                            options={**vars(opts), "sources": [[str(s.path), s.weight] for s in srcs],
                                     "block_rules": [str(r) for r in opts.block_rules], "rule_hits": hits},
                            layers=rows, passthrough=passthrough,
                            input_bytes=sum(s.path.stat().st_size for s in live), output_bytes=dst.stat().st_size,
                            seconds=time.perf_counter() - t0, metadata=meta, notes=notes)


def merge_metadata(live: list[Source], layout: Layout, readers: list[TensorSource], opts: ResizeOptions,
                   precision: str, rows: list[LayerResult]) -> dict[str, str]:
    """sd-scripts-style ss_* fields and our record of the sources; hashes are added when writing."""
    ranks = {r.new_rank for r in rows}
    alphas = {r.new_alpha for r in rows}
    recipe = " + ".join(f"{s.path.name} x {s.weight:g}" for s in live)
    setting = f"{opts.method}: {opts.param}" if opts.method else f"rank {opts.rank}"
    meta = {k: v for k, v in readers[0].metadata.items() if k in ("ss_network_module", "ss_base_model_version")}
    meta.update({
        "ss_training_comment": f"merged with lora-resize ({setting}): {recipe}",
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
    })
    meta[OUR_KEY] = json.dumps({
        "version": __version__, "operation": "merge", "format": layout.format, "method": opts.method or "fixed",
        "param": opts.param, "rule": opts.rule, "rank": opts.rank, "conv_rank": opts.conv_rank,
        "precision": precision,
        "sources": [{"file": s.path.name, "weight": s.weight, "sshs_model_hash": r.metadata.get("sshs_model_hash")}
                    for s, r in zip(live, readers)],
        "layers": {x.name: [x.old_rank, x.new_rank] for x in rows},
    }, separators=(",", ":"))
    return meta
