"""A few primitives for charts as inline SVG text (no library, nothing fetched): scales, axes, marks."""
from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import Callable, Sequence


def esc(s: object) -> str:
    return escape(str(s), quote=True)


@dataclass
class Scale:
    """Maps data values in [lo, hi] to pixels in [a, b], linearly or on a log10 scale."""
    lo: float
    hi: float
    a: float
    b: float
    log: bool = False

    def __post_init__(self) -> None:
        if self.log:
            self.lo, self.hi = max(self.lo, 1e-300), max(self.hi, 1e-300)
        if self.hi == self.lo:
            pad = abs(self.lo) * 0.05 or 1.0
            self.lo, self.hi = (self.lo / 2, self.hi * 2) if self.log else (self.lo - pad, self.hi + pad)

    def __call__(self, v: float) -> float:
        if self.log:
            t = (math.log10(max(v, 1e-300)) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            t = (v - self.lo) / (self.hi - self.lo)
        return self.a + t * (self.b - self.a)

    def ticks(self, n: int = 6) -> list[float]:
        """Round tick values inside [lo, hi]: 1-2-5 steps (log: 1-2-5 x 10^k, or powers of ten when wide)."""
        if self.log:
            e0, e1 = math.floor(math.log10(self.lo)), math.ceil(math.log10(self.hi))
            out: list[float] = []
            for mults in (((1, 2, 5) if e1 - e0 <= 3 else (1,)), range(1, 10)):  # 1-2-5, else every digit
                out = [m * 10.0 ** e for e in range(e0, e1 + 1) for m in mults if self.lo <= m * 10.0 ** e <= self.hi]
                if len(out) >= 3:
                    break
            if len(out) > 2 * n:
                out = out[::math.ceil(len(out) / (2 * n))]
            return out
        span = self.hi - self.lo
        raw = span / max(n, 1)
        mag = 10 ** math.floor(math.log10(raw))
        step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
        first = math.ceil(self.lo / step) * step
        return [first + i * step for i in range(int((self.hi - first) / step + 1e-9) + 1)]


def axes(x: Scale, y: Scale, fmt_x: Callable[[float], str], fmt_y: Callable[[float], str], x_label: str,
         y_label: str, grid: bool = True) -> str:
    """Frame, grid lines, ticks with labels and axis titles, for a plot area spanning the two scales (either
    may run in either direction: a y scale whose lo maps to the top draws its smallest values there)."""
    left, right = min(x.a, x.b), max(x.a, x.b)
    top, bottom = min(y.a, y.b), max(y.a, y.b)
    parts = [f'<rect x="{left:.1f}" y="{top:.1f}" width="{right - left:.1f}" height="{bottom - top:.1f}" '
             'class="frame"/>']
    for v in x.ticks():
        px = x(v)
        if grid:
            parts.append(f'<line x1="{px:.1f}" y1="{top:.1f}" x2="{px:.1f}" y2="{bottom:.1f}" class="grid"/>')
        parts.append(f'<text x="{px:.1f}" y="{bottom + 16:.1f}" class="tick" text-anchor="middle">'
                     f'{esc(fmt_x(v))}</text>')
    for v in y.ticks():
        py = y(v)
        if grid:
            parts.append(f'<line x1="{left:.1f}" y1="{py:.1f}" x2="{right:.1f}" y2="{py:.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6:.1f}" y="{py + 4:.1f}" class="tick" text-anchor="end">'
                     f'{esc(fmt_y(v))}</text>')
    parts.append(f'<text x="{(left + right) / 2:.1f}" y="{bottom + 36:.1f}" class="label" text-anchor="middle">'
                 f'{esc(x_label)}</text>')
    parts.append(f'<text transform="translate({left - 48:.1f},{(top + bottom) / 2:.1f}) rotate(-90)" '
                 f'class="label" text-anchor="middle">{esc(y_label)}</text>')
    return "\n".join(parts)


def polyline(points: Sequence[tuple[float, float]], color: str, cls: str = "series", dash: str | None = None
             ) -> str:
    pts = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
    d = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<polyline points="{pts}" fill="none" stroke="{color}" class="{cls}"{d}/>'


def svg(width: int, height: int, body: str, ident: str, title: str) -> str:
    return (f'<svg id="{esc(ident)}" class="chart" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" role="img" aria-label="{esc(title)}">\n<title>{esc(title)}</title>\n{body}\n</svg>')
