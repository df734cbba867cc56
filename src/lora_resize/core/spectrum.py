"""A decomposed layer as the rank planning and the analysis keep it: its singular values and what scales them."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .layer import LowRankLayer


@dataclass
class Spectrum:
    """Singular values S of up @ down (unscaled, descending, float64) of the layer `name`, its shape, rank, alpha
    and scale (the strength the model applies: dW = scale * up @ down)."""
    name: str
    kind: str
    out_features: int
    in_features: int  # in_channels * prod(kernel)
    rank: int
    alpha: float | None
    scale: float
    kernel: tuple[int, ...] | None
    in_channels: int
    S: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        self.S = np.asarray(self.S, dtype=np.float64)
        self._cs = np.concatenate([[0.0], np.cumsum(self.S)])  # kept sum(S) for each rank k (index k)
        self._cs2 = np.concatenate([[0.0], np.cumsum(self.S * self.S)])  # kept sum(S^2)

    @classmethod
    def of(cls, name: str, layer: LowRankLayer, S: np.ndarray) -> "Spectrum":
        return cls(name, layer.kind, layer.up.shape[0], layer.down.shape[1], layer.rank, layer.alpha, layer.scale,
                   layer.kernel, layer.in_channels, S)

    def kept(self, k: int) -> tuple[float, float]:
        """(sum of the k leading singular values, sum of their squares)."""
        j = min(int(k), len(self.S))
        return float(self._cs[j]), float(self._cs2[j])

    @property
    def conv(self) -> bool:
        return self.kernel is not None

    @property
    def full_size(self) -> int:
        """min(out, in*prod(kernel)): the largest rank the layer can have."""
        return min(self.out_features, self.in_features)

    @property
    def energy(self) -> float:
        """Squared Frobenius norm of the scaled update dW = scale * up @ down."""
        return float(self._cs2[-1]) * self.scale ** 2

    def fro_retained(self, k: int) -> float:
        """sqrt(kept sum S^2 / sum S^2) at rank k (NaN for a zero layer)."""
        total = float(self._cs2[-1])
        return math.sqrt(self.kept(k)[1] / total) if total > 0 else float("nan")

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "out_features": self.out_features,
                "in_features": self.in_features, "old_rank": self.rank, "alpha": self.alpha, "scale": self.scale,
                "fro_norm": math.sqrt(self.energy), "numerical_rank": int(np.count_nonzero(self.S))}
