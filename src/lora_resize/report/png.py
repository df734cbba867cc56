"""The size-vs-fidelity curves as a PNG, with matplotlib (an optional dependency: pip install 'lora-resize[plot]')."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import require
from ..io.files import atomic_output
from ..ranks.budgets import BUDGETS
from ..units import format_size
from .html import CURVE_NOTES, LOSS_FLOOR, MARK_COLOURS, METRICS, check_out, lost, marked, retained_tick, series
from .svg import Scale


def write_png(a, path: str | os.PathLike, metrics: tuple[str, ...] = ("fro_weighted", "fro_global")) -> Path:
    """The size-vs-fidelity curves (one line per method; the recommended setting ringed in green, the chosen one,
    if any, in black) as a PNG with matplotlib: one panel per fidelity measure (size-weighted mean, global), each
    drawn as the report draws it (html.curve_svg): the part lost, 1 - F, on a log scale labelled in F, and titled
    with what the measure is (the budgets maximise the global one, so the panels rank them differently); with
    effect errors measured (analyze --effect) a last panel of the effect error (log scale, lower is better)."""
    path = Path(path)
    check_out(path, (".png",))
    require("matplotlib", "--plot").use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
    effect = any(r.effect_error is not None for r in a.rows)
    fig, all_axs = plt.subplots(1, len(metrics) + effect, figsize=(6.5 * (len(metrics) + effect), 5.8), dpi=110,
                                squeeze=False)
    axs = all_axs[0][:len(metrics)]
    for ax in axs[1:]:
        ax.sharey(axs[0])
    losses = [lost(getattr(r, m)) for r in a.rows for m in metrics if getattr(r, m) == getattr(r, m)]
    floor = max(min([v for v in losses if v > 0] or [LOSS_FLOOR]) / 1.5, LOSS_FLOOR)
    top = min(1.0, max(losses or [1.0]) * 1.5)
    for ax, m in zip(axs, metrics):
        def y(r):
            return max(lost(getattr(r, m)), floor)
        for method, (color, name) in series().items():
            pts = sorted((r for r in a.rows if r.method == method and getattr(r, m) == getattr(r, m)),
                         key=lambda r: r.output_bytes)
            if pts:
                ax.plot([r.output_bytes for r in pts], [y(r) for r in pts], marker="o",
                        ms=4, color=color, ls="--" if method in BUDGETS else "-", label=name)
        for n, (r, kind) in enumerate(marked(a)):
            if getattr(r, m) == getattr(r, m):
                ax.plot([r.output_bytes], [y(r)], marker="o", ms=14 + 5 * n, mfc="none", mec=MARK_COLOURS[kind],
                        mew=2, ls="none", label=f"{kind}: {r.label}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(top, floor)  # the smallest loss at the top: the curves rise towards 100%
        ticks = [v for v in Scale(floor, top, 0, 1, log=True).ticks()]
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: retained_tick(v)))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_size(v)))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: format_size(v) if f"{v:.0e}"[0] in "25" else ""))
        ax.set_xlabel("output size (log scale)")
        ax.set_title(f"Frobenius retained, {METRICS[m]}\n{CURVE_NOTES[m]}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axs[0].set_ylabel("Frobenius retained (log scale of the part lost, 1 - F)")
    axs[-1].legend(loc="upper left", fontsize=9)  # the corner no curve reaches: small files that keep all
    if effect:
        _effect_panel(all_axs[0][-1], a)
    fig.suptitle(f"{a.src.name}: output size against fidelity ({a.precision}, rule {a.shared.rank_rule})")
    fig.tight_layout()
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path


def _effect_panel(ax, a) -> None:
    """Size against effect error (both log; an error of 0 drawn at the floor), one line per method, the marked
    settings ringed."""
    from matplotlib.ticker import FuncFormatter
    measured = [r for r in a.rows if r.effect_error is not None]
    floor = min([r.effect_error for r in measured if r.effect_error > 0] or [1e-6]) / 3

    def y(r):
        return max(r.effect_error, floor)
    for method, (color, name) in series().items():
        pts = sorted((r for r in measured if r.method == method), key=lambda r: r.output_bytes)
        if pts:
            ax.plot([r.output_bytes for r in pts], [y(r) for r in pts], marker="o", ms=4, color=color,
                    ls="--" if method in BUDGETS else "-", label=name)
    for n, (r, kind) in enumerate(marked(a)):
        if r.effect_error is not None:
            ax.plot([r.output_bytes], [y(r)], marker="o", ms=14 + 5 * n, mfc="none", mec=MARK_COLOURS[kind], mew=2,
                    ls="none", label=f"{kind}: {r.label}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_size(v)))
    ax.set_xlabel("output size (log scale)")
    ax.set_ylabel("effect error (log scale; lower is better)")
    ax.set_title("effect error: the share of the LoRA's change to the\ndenoiser's prediction that the setting loses",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
