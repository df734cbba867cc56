"""`preview`: what each setting does to the pictures. One prompt and seed rendered by the base model alone, with the
original LoRA, then with each setting's resized tensors (`lora_resize.resized`, applied in memory: nothing is
written but the grid and the report), each with its file size, its effect error (ops/effect.py, measured at probes
of the same prompt and seed) and the SSIM of its picture to the original-LoRA picture (scikit-image's
`structural_similarity` over the RGB channels, 1 = identical)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from ..core.schedule import Progress
from ..errors import require
from ..options import ResizeOptions
from ..results import DEFAULT_MAX_EFFECT_ERROR, DEFAULT_RENDER_STEPS, Analysis, SettingRow
from ..units import format_size
from .effect import EffectMeter, InMemory, Probing, as_planned, check_steps, needs_base, written_key

# the blog's sv_ratio sweep, from the largest file to the smallest: a setting never keeps more than the input's
# rank, so each is capped by it
DEFAULT_SETTINGS = (("sv_ratio", 128), ("sv_ratio", 32), ("sv_ratio", 8), ("sv_ratio", 4), ("sv_ratio", 2))
SSIM = "SSIM to the original-LoRA image (scikit-image, 1 = identical)"


@dataclass
class Picture:
    """One rendered picture: `kind` 'base', 'original' or 'setting' (then `row`: its analysis row, with its
    size and effect error), the PIL image, and `ssim` to the original-LoRA picture (None for the original)."""
    kind: str
    image: object
    row: SettingRow | None = None
    output_bytes: int | None = None
    ssim: float | None = None

    def label(self) -> str:
        """The picture's label, one fact a line: what it is, its file size, its effect error, its SSIM."""
        from ..report.text import effect_percent
        if self.kind == "base":
            lines = ["base model", "no LoRA"]
        elif self.kind == "original":
            lines = ["original LoRA", format_size(self.output_bytes)]
        else:
            lines = [self.row.label, format_size(self.output_bytes),
                     f"effect error {effect_percent(self.row.effect_error)}"]
        if self.ssim is not None:
            lines.append(f"SSIM to original {self.ssim:.3f}")
        return "\n".join(lines)


@dataclass
class Preview:
    """What `preview` made: the pictures (base, original, each setting in order), `analysis` (the settings as
    analyze rows, effect errors measured, recommended among them), the rendering's prompt, seed, steps and size,
    and timings: `seconds` in all, `picture_seconds` per picture in order."""
    src: Path
    base: str
    prompt: str
    seed: int
    steps: int
    size: tuple[int, int]
    pictures: list[Picture]
    analysis: Analysis
    seconds: float
    picture_seconds: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def grid(self, columns: int = 0, min_width: int = 192):
        """The labelled grid of the pictures (a PIL image; report.grid.labelled_grid)."""
        from ..report.grid import labelled_grid
        return labelled_grid([p.image for p in self.pictures], [p.label() for p in self.pictures],
                             columns or len(self.pictures), min_width)

    def as_dict(self) -> dict:
        return {"src": str(self.src), "base": self.base, "prompt": self.prompt, "seed": self.seed,
                "steps": self.steps, "size": list(self.size), "seconds": self.seconds, "image_metric": SSIM,
                "pictures": [{"kind": p.kind, "label": p.label(), "output_bytes": p.output_bytes, "ssim": p.ssim,
                              "effect_error": p.row.effect_error if p.row else None,
                              "args": p.row.args if p.row else None, "seconds": s}
                             for p, s in zip(self.pictures, self.picture_seconds)],
                "recommended": self.analysis.recommended.args if self.analysis.recommended else None,
                "recommended_reason": self.analysis.recommended_reason, "notes": self.notes}


def ssim(image, reference) -> float:
    """The structural similarity of two PIL images of one size (scikit-image, RGB channels, data range 255)."""
    import numpy as np
    require("skimage", "the image difference of preview (SSIM)")
    from skimage.metrics import structural_similarity
    a, b = np.asarray(image.convert("RGB")), np.asarray(reference.convert("RGB"))
    return float(structural_similarity(a, b, channel_axis=-1, data_range=255))


def default_settings(shared: ResizeOptions) -> list[ResizeOptions]:
    """DEFAULT_SETTINGS with the options every setting shares (precision, rank rule, caps, device)."""
    return [shared.with_setting(method=m, param=float(v)) for m, v in DEFAULT_SETTINGS]


def preview(src: str | os.PathLike, probing: Probing, settings: Sequence[ResizeOptions] | None = None, *,
            prompt: str | None = None, steps: int = DEFAULT_RENDER_STEPS,
            max_effect_error: float = DEFAULT_MAX_EFFECT_ERROR,
            progress: Progress | None = None, picture_progress: Progress | None = None) -> Preview:
    """Render `prompt` (default: the first of the probes' prompts, else lora_resize.diffusion's first default) with
    the base of `probing` alone, with the LoRA at `src`, and with each setting (default: `default_settings`),
    all with `probing.seed` and `steps` sampling steps at `probing.size`; measure each setting's size, effect
    error (probes of the same prompt) and SSIM to the original-LoRA picture. `progress` wraps the decomposition
    of the LoRA, `picture_progress(iterable, total)` the pictures.

    Raises OptionsError (bad settings, probing or `steps`: check_steps), InputFileError (a LoRA or base that
    cannot be read; a base that is not a model), LoraStructureError (a LoRA for another model),
    MissingDependency (the `preview` extra)."""
    from ..diffusion.pipeline import DEFAULT_PROMPTS
    from .analyze import analyze, recommend
    from .resize import resized
    t0 = time.perf_counter()
    steps = check_steps(steps, "--steps")
    prompt = prompt or (probing.prompts[0] if probing.prompts else DEFAULT_PROMPTS[0])
    probing = Probing(**{**vars(probing), "prompts": (prompt,)})
    shared = ResizeOptions(method=DEFAULT_SETTINGS[0][0], param=float(DEFAULT_SETTINGS[0][1]), device=probing.device)
    settings = list(settings) if settings else default_settings(shared)
    # one decomposition for every setting: read under the weight-space base where a setting ranks by it
    based = next((o for o in settings if needs_base(o)), None)
    base = dict(base=based.base, base_variant=based.base_variant) if based else dict(base=None, base_variant=None)
    settings = [replace(o, **base) for o in settings]
    a = analyze(src, settings[0], progress=progress, sweep={})
    a.rows = [a.evaluate(o) for o in settings]
    a.chosen = None
    pictures: list[Picture] = []
    seconds: list[float] = []
    with EffectMeter(src, probing, settings[0]) as meter:
        bm = meter.model
        size = meter.probes.size
        jobs = ["base", "original", *range(len(a.rows))]
        done: dict[tuple, tuple] = {}
        names = [sp.name for sp in a.layers]
        for job in (picture_progress or (lambda it, total: it))(jobs, len(jobs)):
            t = time.perf_counter()
            if job == "base":
                pictures.append(Picture("base", bm.render(prompt, probing.seed, steps, size)))
            elif job == "original":
                with meter.original.applied(bm):
                    pictures.append(Picture("original", bm.render(prompt, probing.seed, steps, size),
                                            output_bytes=a.input_bytes))
            else:
                row = a.rows[job]
                key = written_key(row)
                if key not in done:
                    with InMemory.of(resized(src, as_planned(row, names))).applied(bm):
                        done[key] = (meter.error_of(bm.predict(meter.probes)),
                                     bm.render(prompt, probing.seed, steps, size))
                row.effect_error, image = done[key]
                pictures.append(Picture("setting", image, row, row.output_bytes))
            seconds.append(time.perf_counter() - t)
        report = meter.report.summary()
    original = pictures[1].image
    for p in pictures:
        if p.kind != "original":
            p.ssim = ssim(p.image, original)
    a.recommended, a.recommended_reason = recommend(a.rows, max_effect_error, a.input_bytes)
    return Preview(a.src, probing.base, prompt, probing.seed, steps, tuple(size), pictures, a,
                   time.perf_counter() - t0, seconds, [f"effect error: {report}"])
