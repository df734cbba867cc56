"""Text for people: sd-scripts' verbose per-layer lines, and the closing summary."""
from __future__ import annotations

import numpy as np

from .result import LayerResult, ResizeResult


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def verbose_line(row: LayerResult, dynamic: bool) -> str:
    """A per-layer line in sd-scripts' resize_lora.py --verbose format."""
    line = (f"{row.name:75} | sum(S) retained: {row.sum_retained:.1%}, fro retained: {row.fro_retained:.1%}, "
            f"max(S) ratio: {row.max_ratio:0.1f}")
    if dynamic:
        line += f", dynamic | dim: {row.new_rank}, alpha: {row.new_alpha}"
    return line


def average_line(result: ResizeResult) -> str:
    """sd-scripts' closing verbose line."""
    return f"Average Frobenius norm retention: {result.mean_fro:.2%} | std: {result.std_fro:0.3f}"


def summary(result: ResizeResult) -> str:
    """A few lines: sizes, ranks, fidelity, time, notes."""
    o = result.options
    ranks = np.array([x.new_rank for x in result.layers])
    old = np.array([x.old_rank for x in result.layers])
    method = o["method"] or "fixed"
    setting = f"{method} {o['param']}" if o["method"] else f"rank {o['rank']}"
    if o["conv_rank"] != o["rank"]:
        setting += f", conv rank {o['conv_rank']}"
    elif o["method"] and o["rank"] is not None:
        setting += f", cap {o['rank']}"
    worst = result.min_fro
    lines = [
        f"{result.src.name} -> {result.dst.name}: {human_bytes(result.input_bytes)} -> "
        f"{human_bytes(result.output_bytes)} ({result.output_bytes / max(result.input_bytes, 1):.1%}), "
        f"{result.seconds:.1f} s",
        f"  {len(result.layers)} layers ({result.format}), {setting}, rule {o['rule']}, saved as {result.precision}",
        f"  rank {old.min()}..{old.max()} -> {ranks.min()}..{ranks.max()} (mean {ranks.mean():.1f})",
        f"  Frobenius retained: mean {result.mean_fro:.2%}, min {worst.fro_retained:.2%} ({worst.name})"
        if worst else "  Frobenius retained: n/a (all layers are zero)",
    ]
    if result.passthrough:
        lines.append(f"  {len(result.passthrough)} other tensor(s) copied unchanged")
    lines += [f"  note: {n}" for n in result.notes]
    return "\n".join(lines)
