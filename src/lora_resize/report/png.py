"""The size-vs-fidelity curves as a PNG, with matplotlib (an optional dependency: pip install 'lora-resize[plot]')."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import require
from ..io.files import atomic_output
from ..ranks.budgets import BUDGETS
from ..units import format_size
from .html import METRICS, check_out, series


def write_png(a, path: str | os.PathLike, metrics: tuple[str, ...] = ("fro_weighted", "fro_global")) -> Path:
    """The size-vs-fidelity curves (one line per method, the chosen setting ringed) as a PNG with matplotlib:
    one panel per fidelity measure (size-weighted mean, global), and with effect errors measured (--effect) a
    panel of the effect error (%, lower is better)."""
    path = Path(path)
    check_out(path, (".png",))
    require("matplotlib", "--plot").use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter
    effect = any(r.effect_error is not None for r in a.rows)
    panels = tuple(metrics) + (("effect_error",) if effect else ())
    fig, axs = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.5), dpi=110)
    pick = a.shown
    for ax, m in zip(axs, panels):
        for method, (color, name) in series().items():
            pts = sorted((r for r in a.rows if r.method == method and getattr(r, m) is not None
                          and getattr(r, m) == getattr(r, m)),
                         key=lambda r: r.output_bytes)
            if pts:
                ax.plot([r.output_bytes for r in pts], [100 * getattr(r, m) for r in pts], marker="o",
                        ms=4, color=color, ls="--" if method in BUDGETS else "-", label=name)
        if pick is not None and getattr(pick, m) is not None and getattr(pick, m) == getattr(pick, m):
            ax.plot([pick.output_bytes], [100 * getattr(pick, m)], marker="o", ms=14, mfc="none", mec="k",
                    mew=2, ls="none", label=f"chosen: {pick.label}" if pick.chosen else pick.label)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_size(v)))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: format_size(v) if f"{v:.0e}"[0] in "25" else ""))
        ax.set_xlabel("output size (log scale)")
        ax.set_title(f"Frobenius retained, {METRICS[m]}" if m in METRICS else "effect error (lower is better)",
                     fontsize=11)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axs[1:len(metrics)]:
        ax.sharey(axs[0])
    axs[0].set_ylabel("Frobenius retained (%)")
    if effect:
        axs[-1].set_ylabel("effect error (%): share of the LoRA's change to the output lost")
    axs[-1].legend(loc="lower right", fontsize=9)
    fig.suptitle(f"{a.src.name}: output size against fidelity ({a.precision}, rule {a.shared.rank_rule})")
    fig.tight_layout()
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
