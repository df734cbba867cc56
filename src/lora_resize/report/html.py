"""Pictures of an analysis: one self-contained HTML report (inline SVG, inline CSS and a few lines of inline
script; nothing is fetched when it is viewed) and the main curve as a PNG (matplotlib).

The report holds: the recommended setting and why, the size-vs-fidelity curve of every method with the recommended
and the chosen setting marked (fidelity switchable between the size-weighted mean, the global and the worst layer;
drawn as the part lost on a log scale), the per-layer rank map grouped by block, the singular-value spectra of the
heaviest layers with the kept part shaded, the shown setting at each precision, and the table of settings."""
from __future__ import annotations

import base64
import math
import os
import shlex
from pathlib import Path

from .._version import __version__
from ..errors import OptionsError, OutputFileError
from ..io.files import atomic_output
from ..ranks.budgets import BUDGETS
from ..ranks.policies import POLICIES
from ..results import FIDELITY, MEASURES
from ..units import format_size as human_bytes
from .svg import Scale, axes, esc, polyline, svg
from .text import effect_percent, fidelity_figures, fidelity_legend, percent

METRICS = {m: MEASURES[m][0] for m in ("fro_weighted", "fro_global", "fro_min")}  # results.MEASURES' names
BASE_METRICS = {"base_loss": "loss vs base, global", "base_loss_max": "loss vs base, worst layer"}  # with --base
# with --base MODEL --effect (and in preview): a loss too, drawn as BASE_METRICS are
EFFECT_METRIC = {"effect_error": "effect error: share of the LoRA's change to the output lost"}
LOSSES = {**BASE_METRICS, **EFFECT_METRIC}
HEAVIEST = 6


def series() -> dict[str, tuple[str, str]]:
    """Every policy and budget that a sweep row can belong to: name -> (colour, legend label), from the
    registries, in their order."""
    return {**{n: (p.colour, p.label) for n, p in POLICIES.items()},
            **{n: (b.colour, b.label) for n, b in BUDGETS.items()}}


def _block_order(block: str) -> tuple:
    kind = block.split(" ")[0]
    num = int(block.split(" ")[-1]) if block.split(" ")[-1].isdigit() else 0
    rank = {"text": 0, "down": 1, "mid": 2, "up": 3, "double": 4, "single": 5}.get(kind, 6)
    return rank, num, block


# ----------------------------------------------------------------------------------------------------------------
# Charts


LOSS_FLOOR = 1e-4  # fidelity curves: a setting that loses less (keeps >= 99.99%) is drawn on the top edge


def lost(f: float) -> float:
    """The part of the Frobenius norm a fidelity measure F says is lost, 1 - F (>= 0; NaN stays NaN): what the
    curves draw on a log scale, so that 99.4% and 99.8% (losses 0.6% and 0.2%) lie half a decade apart where a
    linear axis from 50% to 100% put them two pixels apart."""
    return f if f != f else max(0.0, 1.0 - f)


def retained_tick(loss: float) -> str:
    """A loss tick labelled as the fidelity it leaves, with the digits it needs: 0.002 -> '99.8%', 0.01 -> '99%'."""
    digits = max(0, math.ceil(-math.log10(loss) - 1e-9) - 2) if loss > 0 else 2
    return f"{1 - loss:.{digits}%}"


# what each curve's measure is, for its panel's title: the budgets maximise the global measure, so on it they lie
# above the policies; they reach it by cutting the layers whose update carries little energy, which the per-layer
# measures (w-mean, min) count as much as any other, so on those they lie below: the panels answer two questions
CURVE_NOTES = {
    "fro_weighted": "each layer's own share, weighted by its size: budgets rank lower here, they cut weak layers",
    "fro_global": "all layers as one update: what --target-size and --target-fro maximise",
    "fro_min": "the worst layer: what the weight-space recommendation and --method sv_fro hold",
}


def marked(a) -> list[tuple[object, str]]:
    """The settings the curves ring: (row, 'recommended' | 'chosen'), the recommended one first."""
    return [(r, kind) for r, kind in ((a.recommended, "recommended"), (a.chosen, "chosen")) if r is not None]


MARK_COLOURS = {"recommended": "#2ca02c", "chosen": "#000"}


def curve_svg(a, metric: str, ident: str, width: int = 760, height: int = 420) -> str:
    """Size (log) against what each setting loses (log), one line per method, points with tooltips, the
    recommended setting ringed in green and the chosen one (if any) in black. A fidelity measure F (METRICS) is
    drawn as its loss 1 - F on a log scale that rises towards 100% and is labelled in F; a base-relative loss
    (BASE_METRICS) or the effect error (EFFECT_METRIC) as it is, lower being better. A loss of 0 sits on the edge
    of the plot."""
    base = metric in LOSSES

    def loss(r):
        v = getattr(r, metric)
        return float("nan") if v is None else v if base else lost(v)
    rows = [r for r in a.rows if loss(r) == loss(r)]
    marks = [(r, kind) for r, kind in marked(a) if loss(r) == loss(r)]
    everything = rows + [r for r, _ in marks]
    sizes = [r.output_bytes for r in everything] or [1]
    pos = [loss(r) for r in everything if loss(r) > 0] or [1e-4, 1.0]
    L, R, T, B = 70, width - 180, 20, height - 50
    x = Scale(min(sizes) / 1.15, max(sizes) * 1.15, L, R, log=True)
    floor = min(pos) / 3
    if base:
        y = Scale(floor, max(pos) * 1.5, B, T, log=True)
        body = [axes(x, y, lambda v: human_bytes(v), lambda v: f"{v:.0e}", "output size (log scale)",
                     f"{LOSSES[metric]} (log scale; lower is better)")]
        title = f"output size against {LOSSES[metric]}"
    else:
        floor = max(min(pos) / 1.5, LOSS_FLOOR)
        y = Scale(floor, min(1.0, max(pos) * 1.5), T, B, log=True)  # losses: the smallest at the top
        body = [axes(x, y, lambda v: human_bytes(v), retained_tick, "output size (log scale)",
                     f"Frobenius retained, {METRICS[metric]} (log scale of 1 - F)")]
        title = f"output size against Frobenius retained, {METRICS[metric]}: {CURVE_NOTES[metric]}"

    def yy(r):
        return y(max(loss(r), floor))

    def shown(r):
        return f"{getattr(r, metric):.2e}" if base else percent(getattr(r, metric))
    legend_y = T + 8
    for method, (color, name) in series().items():
        pts = sorted((r for r in rows if r.method == method), key=lambda r: r.output_bytes)
        if not pts:
            continue
        body.append(f'<g class="series" data-method="{method}">')
        body.append(polyline([(x(r.output_bytes), yy(r)) for r in pts], color,
                             dash="5,3" if method in BUDGETS else None))
        for r in pts:
            body.append(
                f'<circle cx="{x(r.output_bytes):.1f}" cy="{yy(r):.1f}" r="4" fill="{color}" '
                f'class="point" data-row="row{a.rows.index(r)}"><title>{esc(r.label)}: '
                f'{esc(human_bytes(r.output_bytes))}, {shown(r)}\n{esc(r.args)}</title></circle>')
        body.append("</g>")
        body.append(f'<line x1="{R + 16}" y1="{legend_y}" x2="{R + 36}" y2="{legend_y}" stroke="{color}" '
                    f'class="series"/><circle cx="{R + 26}" cy="{legend_y}" r="4" fill="{color}"/>'
                    f'<text x="{R + 42}" y="{legend_y + 4}" class="legend">{esc(name)}</text>')
        legend_y += 20
    for n, (r, kind) in enumerate(marks):
        px, py, colour = x(r.output_bytes), yy(r), MARK_COLOURS[kind]
        left = px < (L + R) / 2  # the label goes on the side with room
        ident_row = "chosen" if kind == "chosen" else f"row{a.rows.index(r)}"
        body.append(f'<g class="{kind}" data-row="{ident_row}"><circle cx="{px:.1f}" cy="{py:.1f}" r="{9 + 4 * n}" '
                    f'fill="none" stroke="{colour}" stroke-width="2.5"/><circle cx="{px:.1f}" cy="{py:.1f}" r="3" '
                    f'fill="{colour}"/><text x="{px + 12 if left else px - 12:.1f}" y="{py + 16 + 14 * n:.1f}" '
                    f'class="chosen-label" text-anchor="{"start" if left else "end"}" fill="{colour}">{kind}: '
                    f'{esc(r.label)}</text><title>{kind}: {esc(r.label)}: '
                    f'{esc(human_bytes(r.output_bytes))}, {shown(r)}</title></g>')
        body.append(f'<circle cx="{R + 26}" cy="{legend_y}" r="7" fill="none" stroke="{colour}" stroke-width="2"/>'
                    f'<text x="{R + 42}" y="{legend_y + 4}" class="legend">{kind} setting</text>')
        legend_y += 20
    return svg(width, height, "\n".join(body), ident, title)


def strength_svg(a, pick, width: int = 760, height: int = 380) -> str:
    """With --base, one point per layer: the LoRA's strength there (||dW||_F / ||W||_F, x, log) against the
    loss of the chosen setting relative to the base weight (||dW - dW_k||_F / ||W||_F, y, log); the layers where
    the loss is largest are named."""
    pts = []
    for L, k in zip(a.layers, pick.ranks):
        if L.base is None:
            continue
        strength, _ = L.base_strength()
        pts.append((L, strength, L.base_losses(int(k))[0]))
    pos_s = [p[1] for p in pts if p[1] > 0] or [1e-3, 1.0]
    pos_l = [p[2] for p in pts if p[2] > 0] or [1e-6, 1.0]
    L_, R, T, B = 70, width - 20, 20, height - 50
    x = Scale(min(pos_s) / 1.5, max(pos_s) * 1.5, L_, R, log=True)
    floor = min(pos_l) / 3
    y = Scale(floor, max(pos_l) * 1.5, B, T, log=True)
    body = [axes(x, y, lambda v: f"{v:.0e}", lambda v: f"{v:.0e}", "LoRA strength ||dW|| / ||W|| (log)",
                 "loss ||dW - dW_k|| / ||W|| (log)")]
    worst = sorted(pts, key=lambda p: -p[2])[:5]
    for L, s_, loss in pts:
        hot = any(L is w[0] for w in worst)
        body.append(f'<circle cx="{x(max(s_, x.lo)):.1f}" cy="{y(max(loss, floor)):.1f}" r="{5 if hot else 3}" '
                    f'fill="{"#d62728" if hot else "#1f77b4"}" class="layer-point"><title>{esc(L.name)}\nstrength '
                    f'{s_:.3e}, loss {loss:.3e} ({esc(L.base.key)})</title></circle>')
    return svg(width, height, "\n".join(body), "strength", f"per-layer LoRA strength against loss, {pick.label}")


def rank_map_svg(a, pick, width: int = 980) -> str:
    """One row per block (text encoder, down, mid, up ...), one bar per layer: height = new rank (log scale,
    up to the largest old rank), colour = Frobenius retained, the old rank as a grey outline."""
    groups: dict[str, list[int]] = {}
    for i, block in enumerate(a.blocks):
        groups.setdefault(block, []).append(i)
    order = sorted(groups, key=_block_order)
    top = max(max(L.rank for L in a.layers), 2)
    row_h, label_w = 46, 110
    widest = max(len(v) for v in groups.values())
    cell = max(2.0, min(14.0, (width - label_w - 20) / widest))
    height = 30 + row_h * len(order) + 40
    ys = Scale(1, top, row_h - 8, 4, log=True)  # within a row: rank 1 at the bottom, the top rank at the top
    body = []
    for gi, g in enumerate(order):
        y0 = 24 + gi * row_h
        body.append(f'<g class="block" data-block="{esc(g)}"><text x="{label_w - 8}" y="{y0 + row_h / 2:.1f}" '
                    f'class="tick" text-anchor="end">{esc(g)} ({len(groups[g])})</text>')
        for j, i in enumerate(groups[g]):
            L = a.layers[i]
            k = int(pick.ranks[i])
            tot = L.kept(len(L.S))[1]
            fro = math.sqrt(L.kept(k)[1] / tot) if tot > 0 else float("nan")
            x0 = label_w + j * cell
            y_old, y_new = y0 + ys(L.rank), y0 + ys(max(k, 1))
            base = y0 + row_h - 6
            body.append(f'<rect x="{x0:.1f}" y="{y_old:.1f}" width="{max(cell - 1, 1):.1f}" '
                        f'height="{max(base - y_old, 0.5):.1f}" class="old"/>')
            body.append(f'<rect x="{x0:.1f}" y="{y_new:.1f}" width="{max(cell - 1, 1):.1f}" '
                        f'height="{max(base - y_new, 1):.1f}" fill="{_fro_color(fro)}" class="layer">'
                        f'<title>{esc(L.name)}\nrank {L.rank} -> {k}, Frobenius kept '
                        f'{"n/a" if fro != fro else f"{fro:.2%}"}</title></rect>')
        body.append("</g>")
    ly = 24 + len(order) * row_h + 14
    for t, v in enumerate((0.5, 0.7, 0.8, 0.9, 0.95, 0.99)):
        body.append(f'<rect x="{label_w + t * 70}" y="{ly}" width="14" height="12" fill="{_fro_color(v)}"/>'
                    f'<text x="{label_w + t * 70 + 18}" y="{ly + 10}" class="legend">{v:.0%}</text>')
    body.append(f'<text x="{label_w + 6 * 70 + 10}" y="{ly + 10}" class="legend">bar height: new rank (log, '
                f'grey: old rank); colour: Frobenius kept</text>')
    return svg(width, height, "\n".join(body), "rankmap", f"per-layer ranks, {pick.label}")


def _fro_color(f: float) -> str:
    """Red (<= 50% kept) through yellow to green (100%)."""
    if f != f:
        return "#bbbbbb"
    t = min(1.0, max(0.0, (f - 0.5) / 0.5)) ** 1.5
    r, g = (220, int(60 + 170 * t / 0.5)) if t < 0.5 else (int(220 - 190 * (t - 0.5) / 0.5), 200)
    return f"#{r:02x}{min(g, 230):02x}{50:02x}"


def spectra_svg(a, pick, n: int = HEAVIEST, width: int = 980) -> str:
    """Small multiples: the scaled singular values (alpha/rank * S, log scale) of the n layers with the largest
    update norm, the kept ones shaded, a line at the chosen rank."""
    heavy = sorted(range(len(a.layers)), key=lambda i: -a.layers[i].energy)[:n]
    cols = 3
    pw, ph = (width - 20) // cols, 200
    height = ph * math.ceil(len(heavy) / cols) + 10
    body = []
    for t, i in enumerate(heavy):
        L = a.layers[i]
        k = int(pick.ranks[i])
        s = L.S * L.scale
        s = s[s > 0]
        if not len(s):
            continue
        ox, oy = 10 + (t % cols) * pw, 10 + (t // cols) * ph
        x = Scale(1, max(len(s), 2), ox + 58, ox + pw - 12)
        y = Scale(float(s.min()), float(s.max()), oy + ph - 46, oy + 22, log=True)
        body.append(f'<g class="spectrum" data-layer="{esc(L.name)}">')
        body.append(axes(x, y, lambda v: f"{v:g}", lambda v: f"{v:.0e}", "index", "", grid=False))
        kept = [(x(j + 1), y(float(v))) for j, v in enumerate(s[:k])]
        if kept:
            area = kept + [(kept[-1][0], y.a), (kept[0][0], y.a)]
            body.append('<polygon points="' + " ".join(f"{px:.1f},{py:.1f}" for px, py in area)
                        + '" class="kept"/>')
        body.append(polyline([(x(j + 1), y(float(v))) for j, v in enumerate(s)], "#1f4e79"))
        if k <= len(s):
            body.append(f'<line x1="{x(k):.1f}" y1="{y.b:.1f}" x2="{x(k):.1f}" y2="{y.a:.1f}" class="cut"/>')
        short = L.name if len(L.name) <= 44 else "..." + L.name[-41:]
        body.append(f'<text x="{ox + 58}" y="{oy + 14}" class="legend"><title>{esc(L.name)}</title>'
                    f'{esc(short)}</text>')
        body.append(f'<text x="{ox + pw - 14}" y="{oy + 34}" class="legend" text-anchor="end">rank {L.rank}'
                    f' -> {k}</text></g>')
    return svg(width, height, "\n".join(body), "spectra", "singular values of the heaviest layers")


# ----------------------------------------------------------------------------------------------------------------
# The page


def settings_table(a) -> str:
    """Every setting of the sweep (the recommended one with class "recommended"), then the chosen one, if any, with
    id "chosen"."""
    rows = [(f"row{n}", r) for n, r in enumerate(a.rows)] + ([("chosen", a.chosen)] if a.chosen is not None else [])
    effect = any(r.effect_error is not None for _, r in rows)
    head = ("<tr><th>setting</th><th>resize flags</th><th>bytes</th><th>size</th><th>params</th>"
            + "".join(f"<th>fro {name}</th>" for name, _ in MEASURES.values())
            + ("<th>effect error</th>" if effect else "") + "<th>worst layer</th></tr>")
    body = []
    for ident, r in rows:
        cls = ' class="chosen"' if ident == "chosen" else ' class="recommended"' if r is a.recommended else ""
        body.append(f'<tr id="{ident}"{cls} data-method="{r.method}"><td>{esc(r.label)}</td>'
                    f'<td><code>{esc(r.args)}</code></td><td class="n">{r.output_bytes:,}</td>'
                    f'<td class="n">{esc(human_bytes(r.output_bytes))}</td><td class="n">{r.params:,}</td>'
                    + "".join(f'<td class="n">{percent(getattr(r, key))}</td>' for key in MEASURES)
                    + (f'<td class="n">{effect_percent(r.effect_error)}</td>' if effect else "")
                    + f'<td class="w">{esc(r.worst_layer or "-")}</td></tr>')
    return (f'<div class="scroll"><table id="settings"><thead>{head}</thead><tbody>\n' + "\n".join(body)
            + "\n</tbody></table></div>")


def precision_table(a) -> str:
    """The shown setting (chosen, else recommended) at fp16, bf16 and float (Analysis.at_precisions): exact size,
    fidelity and the rounding each precision adds, with what the rounding was measured on; "" without one."""
    rows, note = a.at_precisions()
    if not rows:
        return ""
    head = ("<tr><th>precision</th><th>resize flags</th><th>bytes</th><th>size</th>"
            + "".join(f"<th>fro {name}</th>" for name, _ in MEASURES.values()) + "<th>rounding</th></tr>")
    body = [f'<tr id="precision-{r.precision}"><td>{esc(r.precision)}</td><td><code>{esc(r.args)}</code></td>'
            f'<td class="n">{r.output_bytes:,}</td><td class="n">{esc(human_bytes(r.output_bytes))}</td>'
            + "".join(f'<td class="n">{percent(getattr(r, key))}</td>' for key in MEASURES)
            + f'<td class="n">{"n/a" if r.rounding_error is None else f"{r.rounding_error:.2e}"}'
            + (f' <span class="meta">({esc(r.note)})</span>' if r.note else "") + "</td></tr>" for r in rows]
    return (f"<h2>{esc(a.shown.label)} at each precision</h2>"
            f'<div class="scroll"><table id="precisions"><thead>{head}</thead><tbody>' + "".join(body)
            + "</tbody></table></div><p class=meta>One decomposition: sizes exact, fidelity of the ranks each "
            "precision gets; rounding = ||dW_k,written - dW_k||_F / ||dW||_F, what storing the factors in that "
            f"precision adds to the truncation ({esc(note)}).</p>")


def setting_line(kind: str, r) -> str:
    """'recommended: <b>sv_fro 0.9</b>: 13.1 MB (13,080,692 bytes), Frobenius retained: w-mean ...' (HTML)."""
    line = (f"{kind}: <b>{esc(r.label)}</b>: {esc(human_bytes(r.output_bytes))} ({r.output_bytes:,} bytes), "
            f"Frobenius retained: {fidelity_figures(vars(r))}")
    if r.base_loss is not None:
        line += f"; loss vs base {r.base_loss:.2e} (global), worst layer {r.base_loss_max:.2e} ({esc(r.base_worst)})"
    if r.effect_error is not None:
        line += f"; effect error {effect_percent(r.effect_error)}"
    return line


def recommendation_html(a, ident: str) -> str:
    """The recommended setting, its size and fidelity, and the reason, as a paragraph with id `ident` (HTML)."""
    if a.recommended is None:
        return f'<p id="{ident}">recommended: none ({esc(a.recommended_reason)})</p>'
    return (f'<p id="{ident}" class="recommendation">{setting_line("recommended", a.recommended)}<br>'
            f'<span class="meta">why: {esc(a.recommended_reason)}</span></p>')


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px}
.meta{color:#555} code{font:12px ui-monospace,Menlo,Consolas,monospace}
.chart{max-width:100%;height:auto;background:#fff}
.frame{fill:none;stroke:#888} .grid{stroke:#e6e6e6} .tick{font-size:11px;fill:#444} .label{font-size:12px;fill:#222}
.legend{font-size:12px;fill:#222} .series{stroke-width:2} .point{cursor:pointer} .point:hover{r:6}
.chosen-label{font-size:12px;font-weight:600;paint-order:stroke;stroke:#fff;stroke-width:3px} .old{fill:#eee;stroke:#ccc;stroke-width:.5}
.kept{fill:#9ecae1;opacity:.55} .cut{stroke:#c00;stroke-dasharray:4,3}
.tabs button{margin-right:6px;padding:3px 10px;border:1px solid #999;background:#f4f4f4;border-radius:4px;cursor:pointer}
.tabs button.on{background:#1f4e79;color:#fff;border-color:#1f4e79}
table{border-collapse:collapse;font-size:12.5px;margin-top:8px} th,td{padding:3px 8px;border-bottom:1px solid #e4e4e4}
th{text-align:left;background:#f6f6f6;position:sticky;top:0} td.n{text-align:right;font-variant-numeric:tabular-nums}
td.w{color:#666;font-size:11.5px} tr.chosen{background:#ffe9a8;font-weight:600} tr.hl{background:#d7ecff}
tr.recommended{background:#dff3df;font-weight:600} .recommendation{border-left:4px solid #2ca02c;padding-left:8px}
.scroll{overflow-x:auto} td code{white-space:nowrap;font-size:11.5px}
.side{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start} .pics{display:flex;flex-wrap:wrap;gap:8px}
.pic{margin:0;cursor:pointer;font-size:11.5px} .pic img{width:160px;image-rendering:pixelated;display:block}
#cmd{margin:8px 0;padding:8px 10px;background:#f4f4f4;border-radius:4px}
"""

SCRIPT = """
(function () {
  var tabs = document.querySelectorAll('.tabs button');
  tabs.forEach(function (b) {
    b.addEventListener('click', function () {
      tabs.forEach(function (o) { o.classList.toggle('on', o === b); });
      document.querySelectorAll('.curve').forEach(function (c) {
        c.style.display = c.id === b.dataset.target ? '' : 'none';
      });
    });
  });
  var cmd = document.getElementById('cmd-flags');
  function pick(id) {
    document.querySelectorAll('#settings tr.hl').forEach(function (r) { r.classList.remove('hl'); });
    var row = document.getElementById(id);
    if (!row) { return; }
    row.classList.add('hl');
    cmd.textContent = row.querySelector('code').textContent;
    row.scrollIntoView({block: 'nearest'});
  }
  document.querySelectorAll('[data-row]').forEach(function (p) {
    p.addEventListener('click', function () { pick(p.getAttribute('data-row')); });
  });
  document.querySelectorAll('#settings tbody tr').forEach(function (r) {
    r.addEventListener('click', function () { pick(r.id); });
  });
  document.body.setAttribute('data-ready', '1');
})();
"""


def effect_section(a, pictures=None) -> str:
    """With effect errors measured: the size-vs-effect-error curve and, from `preview` (ops.preview.Preview),
    its pictures beside it, each embedded as a PNG data URI and labelled; a click on a picture of a setting picks
    it as a click on its point does. '' when nothing was measured."""
    if not any(r.effect_error is not None for r in a.rows):
        return ""
    figures = ""
    if pictures is not None:
        from .grid import png_bytes
        cells = []
        for p in pictures.pictures:
            row = f' data-row="row{a.rows.index(p.row)}"' if p.row is not None else ""
            uri = "data:image/png;base64," + base64.b64encode(png_bytes(p.image)).decode("ascii")
            cells.append(f'<figure class="pic"{row}><img src="{uri}" alt="{esc(p.label())}">'
                         f'<figcaption>{"<br>".join(esc(x) for x in p.label().splitlines())}</figcaption></figure>')
        figures = (f"<h3>Pictures: {esc(pictures.prompt)}, seed {pictures.seed}, {pictures.steps} steps</h3>"
                   f'<div class="pics">{"".join(cells)}</div><p class="meta">SSIM: structural similarity to the '
                   "original-LoRA image (scikit-image, 1 = identical).</p>")
    return (f"<h2>Output size against effect error</h2><div class=side>"
            f'<div>{curve_svg(a, "effect_error", "curve-svg-effect_error")}</div><div>{figures}</div></div>'
            f"<p class=meta>effect error: {esc(FIDELITY['effect_error'])}, at fixed probes of the base model.</p>")


def html_report(a, pictures=None) -> str:
    """The whole report as one HTML string; `pictures` (ops.preview.Preview): its pictures beside the effect
    curve."""
    pick = a.shown
    b = a.shared
    cap = "none" if b.rank is None and b.conv_rank is None else (
        f"{b.rank}" + (f" (conv {b.conv_rank})" if b.conv_rank != b.rank else ""))
    curves = []
    for n, metric in enumerate(METRICS):
        style = "" if n == 0 else ' style="display:none"'
        curves.append(f'<div class="curve" id="curve-{metric}"{style}>{curve_svg(a, metric, f"curve-svg-{metric}")}'
                      f'<p class="meta">{esc(METRICS[metric])}: {esc(CURVE_NOTES[metric])}.</p></div>')
    tabs = "".join(f'<button type="button" data-target="curve-{m}"{" class=on" if i == 0 else ""}>{esc(t)}</button>'
                   for i, (m, t) in enumerate(METRICS.items()))
    lines = [recommendation_html(a, "recommended")]
    if a.chosen is not None:
        lines.append(f'<p id="chosen-line">{setting_line("chosen", a.chosen)}</p>')
    rules = ""
    if a.rule_hits:
        rules = "<p>rules: " + "; ".join(f"<code>{esc(r)}</code>: {n} module{'s' if n != 1 else ''}"
                                          for r, n in a.rule_hits.items()) + "</p>"
    notes = "".join(f"<p class=meta>note: {esc(n)}</p>" for n in a.notes)
    based = any(L.base is not None for L in a.layers)
    if based:
        for metric in BASE_METRICS:
            curves.append(f'<div class="curve" id="curve-{metric}" style="display:none">'
                          f'{curve_svg(a, metric, f"curve-svg-{metric}")}</div>')
        tabs += "".join(f'<button type="button" data-target="curve-{m}">{esc(t)}</button>'
                        for m, t in BASE_METRICS.items())
    base_section = per_layer = ""
    if pick is not None:
        per_layer = (f"<h2>Ranks per layer ({esc(pick.label)})</h2>\n{rank_map_svg(a, pick)}\n"
                     f"<h2>Singular values of the heaviest layers</h2>\n{spectra_svg(a, pick)}")
    if based and pick is not None:
        worst = sorted(((L.base_losses(int(k))[0], L.name) for L, k in zip(a.layers, pick.ranks)
                        if L.base is not None), reverse=True)[:5]
        base_section = (f"<h2>Against the base model ({esc(pick.label)})</h2>{strength_svg(a, pick)}"
                        "<p class=meta>Each layer's update dW against the base weight W it patches (W flattened to "
                        "out x in*kernel): strength ||dW||_F / ||W||_F, and the loss the setting leaves, "
                        "||dW - dW_k||_F / ||W||_F. Largest losses: "
                        + "; ".join(f"<code>{esc(n)}</code> {v:.2e}" for v, n in worst) + "</p>")
    title = f"lora-resize analysis: {a.src.name}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style></head>
<body>
<h1>{esc(title)}</h1>
<p class="meta">{len(a.layers)} layers ({esc(a.format)}), input {esc(human_bytes(a.input_bytes))}; output
{esc(a.precision)}, rank rule {esc(b.rank_rule)}, cap {esc(cap)}; {len(a.rows)} settings from one decomposition
({a.decompose_seconds:.1f} s). lora-resize {esc(__version__)}.</p>
{"".join(lines)}{rules}{notes}
<div id="cmd">{esc(a.command or f"lora-resize resize {shlex.quote(a.src.name)} -o OUT.safetensors")} <code id="cmd-flags">{esc(pick.args if pick else "")}</code>
<span class="meta">(click a point or a row to pick another setting)</span></div>
{effect_section(a, pictures)}
<h2>Output size against fidelity</h2>
<div class="tabs">fidelity: {tabs}</div>
{''.join(curves)}
<p class="meta">Frobenius retained per layer: sqrt(kept sum S^2 / sum S^2). {esc(fidelity_legend())}.
Budget policies (dashed) put each byte where it keeps the most global energy.</p>
{base_section}
{per_layer}
{precision_table(a)}
<h2>Settings</h2>
{settings_table(a)}
<script>{SCRIPT}</script>
</body></html>
"""


def write_html(a, path: str | os.PathLike, pictures=None) -> Path:
    """Write the report to `path` (a .html file), with `preview`'s pictures if given; returns the path."""
    path = Path(path)
    check_out(path, (".html", ".htm"))
    text = html_report(a, pictures)
    _write_text(path, text)
    return path


def check_paths(report: str | os.PathLike | None, plot: str | os.PathLike | None) -> None:
    """Refuse unusable --report/--plot paths before any work is done."""
    if report:
        check_out(Path(report), (".html", ".htm"))
    if plot:
        check_out(Path(plot), (".png",))


def check_out(path: Path, suffixes: tuple[str, ...]) -> None:
    """Refuse a picture path with the wrong suffix (OptionsError) or an unusable place (OutputFileError)."""
    if path.suffix.lower() not in suffixes:
        raise OptionsError(f"{path} should end in {' or '.join(suffixes)}")
    if path.is_dir() or not path.parent.is_dir():
        raise OutputFileError(f"cannot write {path}: {'it is a directory' if path.is_dir() else 'its folder does not exist'}")


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
