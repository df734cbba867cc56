"""Pictures side by side with their labels, as one image (Pillow, an optional dependency: the `preview` extra):
the grid of `lora-resize preview` and of the ComfyUI tile node."""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Sequence

from ..errors import require
from ..io.files import atomic_output

GAP = 6  # pixels between cells
_FEATURE = "the picture grid (preview)"


MAX_LABEL_LINES = 8  # lines of a label shown under its picture


def _rgb(a):
    """An H x W (x 1, 3 or 4) uint8 array as H x W x 3: grey repeated, alpha dropped."""
    import numpy as np
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[..., None]
    return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a[..., :3]


def labelled_grid(pictures: Sequence, labels: Sequence[str], columns: int = 0, min_width: int = 0, gap: int = GAP):
    """A PIL image: the pictures (PIL images, or H x W (x 1/3/4) uint8 arrays) in rows of `columns` (0: about square)
    on white cells of the largest one's size (each picture centred in its cell; a picture narrower than
    `min_width` pixels is first scaled up by a whole factor, nearest neighbour, so its label fits under it), each
    label (its lines split at newlines, each wrapped between words to the cell's width; at most MAX_LABEL_LINES
    lines, the rest cut with "...") under its picture in
    black; `gap` pixels between cells. So the image is columns x cell wide and rows x cell high, less one gap each.
    Raises ValueError for no pictures or a label count that differs; MissingDependency without Pillow."""
    if not pictures or len(pictures) != len(labels):
        raise ValueError(f"a grid needs one label per picture (got {len(pictures)} pictures, {len(labels)} labels)")
    require("PIL", _FEATURE)
    from PIL import Image, ImageDraw, ImageFont
    images = [p if isinstance(p, Image.Image) else Image.fromarray(_rgb(p)) for p in pictures]
    images = [im.convert("RGB") for im in images]
    if min_width:
        images = [im.resize((im.width * f, im.height * f), Image.NEAREST) if (f := math.ceil(min_width / im.width))
                  > 1 else im for im in images]
    n = len(images)
    cols = max(1, min(columns or math.ceil(math.sqrt(n)), n))
    rows = math.ceil(n / cols)
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    try:
        font = ImageFont.load_default(size=max(12, w // 28))  # Pillow >= 10.1: a scalable font
    except TypeError:
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [[part for line in label.split("\n") for part in _wrap(draw, line, font, w - 8)] for label in labels]
    wrapped = [x if len(x) <= MAX_LABEL_LINES else x[:MAX_LABEL_LINES - 1] + [x[MAX_LABEL_LINES - 1] + " ..."]
               for x in wrapped]  # a label longer than that is cut, so the strip stays a strip
    line = draw.textbbox((0, 0), "Ag", font=font)[3] + 4
    strip = 8 + line * max(len(x) for x in wrapped)
    grid = Image.new("RGB", (cols * (w + gap) - gap, rows * (h + strip + gap) - gap), "white")
    pen = ImageDraw.Draw(grid)
    for i, (im, lines) in enumerate(zip(images, wrapped)):
        x, y = (i % cols) * (w + gap), (i // cols) * (h + strip + gap)
        grid.paste(im, (x + (w - im.width) // 2, y + (h - im.height) // 2))
        for j, text in enumerate(lines):
            pen.text((x + 4, y + h + 4 + j * line), text, fill="black", font=font)
    return grid


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """`text` in lines no wider than `width` pixels, broken between words (a longer word stands alone)."""
    lines: list[str] = []
    for word in text.split() or [""]:
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def png_bytes(image) -> bytes:
    """A PIL image as PNG file bytes (for a data URI)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_grid(image, path: str | os.PathLike) -> Path:
    """Write a grid (a PIL image) to `path` as a PNG, atomically; returns the path."""
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_bytes(png_bytes(image))
    return path
