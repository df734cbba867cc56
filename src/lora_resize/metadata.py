"""Metadata written beside the tensors: sd-scripts' `ss_*` strings, and our own record."""
from __future__ import annotations

import json
from typing import Mapping

from .options import ResizeOptions
from .result import LayerResult

OUR_KEY = "lora_resize"


def sd_scripts_fields(opts: ResizeOptions, old_dim: int, last_alpha: float, comment: str) -> dict[str, str]:
    """ss_training_comment / ss_network_dim / ss_network_alpha exactly as sd-scripts' resize_lora.py writes them.
    A budget (--target-size/--target-fro) or per-block rank rules make ranks differ per layer: written as a
    dynamic resize (dim and alpha 'Dynamic'), the comment naming the budget or the rules."""
    ranked_rules = [str(r) for r in opts.block_rules if r.action != "drop"]
    if opts.has_target:
        what = (f"target_size: {opts.target_size}" if opts.target_size is not None
                else f"target_fro: {opts.target_fro}")
        return {"ss_training_comment": f"Dynamic resize with {what} from {old_dim}; {comment}",
                "ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"}
    if ranked_rules:
        base = f"{opts.method}: {opts.param}" if opts.method else f"rank {opts.rank}"
        return {"ss_training_comment": f"Dynamic resize with {base} and rules {', '.join(ranked_rules)} from "
                                       f"{old_dim}; {comment}",
                "ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"}
    if opts.method is None:
        conv = "" if opts.rank == opts.conv_rank else f" (conv: {opts.conv_rank})"
        return {"ss_training_comment": f"dimension is resized from {old_dim} to {opts.rank}{conv}; {comment}",
                "ss_network_dim": str(opts.rank), "ss_network_alpha": str(last_alpha)}
    return {"ss_training_comment": f"Dynamic resize with {opts.method}: {opts.param} from {old_dim}; {comment}",
            "ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"}


def our_record(version: str, opts: ResizeOptions, precision: str, source: str, fmt: str,
               layers: list[LayerResult]) -> str:
    """JSON for our metadata key: settings and every layer's old and new rank."""
    return json.dumps({
        "version": version, "source": source, "format": fmt, "method": opts.method or "fixed", "param": opts.param,
        "rule": opts.rule, "rank": opts.rank, "conv_rank": opts.conv_rank, "precision": precision,
        **budget_fields(opts),
        "layers": {x.name: [x.old_rank, x.new_rank] for x in layers},
    }, separators=(",", ":"))


def budget_fields(opts: ResizeOptions) -> dict:
    """Our record's entries for per-block rules and budget policies (none when unused, so old records stay)."""
    out: dict = {}
    if opts.block_rules:
        out["rules"] = [str(r) for r in opts.block_rules]
    if opts.target_size is not None:
        out["target_size"] = opts.target_size
    if opts.target_fro is not None:
        out["target_fro"] = opts.target_fro
    return out


def updated(original: Mapping[str, str], fields: Mapping[str, str]) -> dict[str, str]:
    """The input's metadata with `fields` written over it (stale hashes dropped)."""
    out = {k: v for k, v in original.items() if k not in ("sshs_model_hash", "sshs_legacy_hash")}
    out.update(fields)
    return out
