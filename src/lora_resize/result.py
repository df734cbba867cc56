"""What a resize reports: one row per layer, and totals."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class LayerResult:
    """One resized layer. Retained fractions are of sum(S) and of the Frobenius norm of dW."""
    name: str
    kind: str  # "linear" or "conv<kh>x<kw>"
    out_features: int
    in_features: int  # in_channels * kh * kw
    old_rank: int
    new_rank: int
    old_alpha: float | None
    new_alpha: float
    sum_retained: float
    fro_retained: float
    max_ratio: float
    clamped: bool = False
    zero: bool = False
    underflow: bool = False  # non-zero layer whose saved factors are all zeros (too small for the save dtype)
    singular_values: np.ndarray | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("singular_values")
        return d


@dataclass
class ResizeResult:
    """The outcome of `resize`: per-layer rows, sizes, timing, and what was passed through untouched."""
    src: Path
    dst: Path
    format: str
    precision: str
    options: dict
    layers: list[LayerResult]
    passthrough: list[str]
    input_bytes: int
    output_bytes: int
    seconds: float
    metadata: dict[str, str]
    notes: list[str] = field(default_factory=list)

    @property
    def mean_fro(self) -> float:
        """Plain mean of per-layer Frobenius retention (sd-scripts' 'Average Frobenius norm retention')."""
        v = [x.fro_retained for x in self.layers if x.fro_retained == x.fro_retained]
        return float(np.mean(v)) if v else float("nan")

    @property
    def std_fro(self) -> float:
        v = [x.fro_retained for x in self.layers if x.fro_retained == x.fro_retained]
        return float(np.std(v)) if v else float("nan")

    @property
    def min_fro(self) -> LayerResult | None:
        """The layer that keeps least of its Frobenius norm."""
        v = [x for x in self.layers if x.fro_retained == x.fro_retained]
        return min(v, key=lambda x: x.fro_retained) if v else None

    @property
    def clamped(self) -> list[LayerResult]:
        return [x for x in self.layers if x.clamped]

    def as_dict(self) -> dict:
        worst = self.min_fro
        return {
            "src": str(self.src), "dst": str(self.dst), "format": self.format, "precision": self.precision,
            "options": self.options, "input_bytes": self.input_bytes, "output_bytes": self.output_bytes,
            "seconds": self.seconds, "mean_fro_retained": self.mean_fro,
            "min_fro_retained": worst.fro_retained if worst else None, "min_fro_layer": worst.name if worst else None,
            "passthrough": self.passthrough, "notes": self.notes, "layers": [x.as_dict() for x in self.layers],
        }
