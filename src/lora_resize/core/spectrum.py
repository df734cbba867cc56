"""A decomposed layer as the rank planning and the analysis keep it: its singular values and what scales them."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .layer import LowRankLayer


@dataclass
class Spectrum:
    """Singular values S of up @ down (unscaled, descending, float64) of the layer `name`, its shape, rank, alpha
    and scale (the strength the model applies: dW = scale * up @ down). A layer whose scale is 0 (alpha 0: switched
    off in training or by hand) applies no update, so its S is all zeros (`of`): every rank rule, budget and
    fidelity measure then treats it as a zero layer, as its loaders do.

    A partial spectrum (a dense difference decomposed for its leading values only, core.dense) holds those leading
    values in S and the rest of the energy, sum of the remaining S^2, in `tail_energy` (0.0: S is the whole
    spectrum): `energy`, `fro_retained` and `base_losses` count it, `kept(k)` is exact for k <= len(S), and
    planning reads `with_tail()`."""
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
    base: object | None = None  # the patched base weight's norms (results.BaseNorms: key, fro, spectral), --base
    tail_energy: float = 0.0  # sum of S^2 past the leading values S of a partial spectrum (unscaled)

    def __post_init__(self) -> None:
        self.S = np.asarray(self.S, dtype=np.float64)
        self._cs = np.concatenate([[0.0], np.cumsum(self.S)])  # kept sum(S) for each rank k (index k)
        self._cs2 = np.concatenate([[0.0], np.cumsum(self.S * self.S)])  # kept sum(S^2)

    @classmethod
    def of(cls, name: str, layer: LowRankLayer, S: np.ndarray, base: object | None = None) -> "Spectrum":
        S = np.zeros_like(np.asarray(S, dtype=np.float64)) if layer.scale == 0 else S
        return cls(name, layer.kind, layer.up.shape[0], layer.down.shape[1], layer.rank, layer.alpha, layer.scale,
                   layer.kernel, layer.in_channels, S, base)

    def base_losses(self, k: int) -> tuple[float, float] | None:
        """(||dW - dW_k||_F / ||W||_F, ||dW - dW_k||_2 / ||W||_2) against the base weight W, or None without one:
        the tail's Frobenius norm is sqrt of the dropped sum of S^2, its spectral norm the (k+1)-th singular value,
        both scaled."""
        if self.base is None:
            return None
        j = min(int(k), len(self.S))
        tail = math.sqrt(max(0.0, float(self._cs2[-1] + self.tail_energy - self._cs2[j]))) * abs(self.scale)
        nxt = (float(self.S[j]) if j < len(self.S) else 0.0) * abs(self.scale)
        return _ratio(tail, self.base.fro), _ratio(nxt, self.base.spectral)

    def base_strength(self) -> tuple[float, float] | None:
        """(||dW||_F / ||W||_F, ||dW||_2 / ||W||_2), or None without a base weight."""
        if self.base is None:
            return None
        top = (float(self.S[0]) if len(self.S) else 0.0) * abs(self.scale)
        return _ratio(math.sqrt(self.energy), self.base.fro), _ratio(top, self.base.spectral)

    def base_weighted_S(self) -> np.ndarray:
        """The scaled singular values relative to the base weight's Frobenius norm (S * |scale| / ||W||_F): what
        the base-relative method and budgets rank by."""
        return self.S * abs(self.scale) / self.base.fro if self.base is not None and self.base.fro > 0 else \
            np.full_like(self.S, np.inf)

    def kept(self, k: int) -> tuple[float, float]:
        """(sum of the k leading singular values, sum of their squares); of a partial spectrum, for k <= len(S)."""
        j = min(int(k), len(self.S))
        return float(self._cs[j]), float(self._cs2[j])

    def with_tail(self) -> np.ndarray:
        """full_size values for planning: S, then (a partial spectrum) full_size - len(S) equal values that carry
        tail_energy, each at most S[-1] so the order holds. A rank decided within the leading values (a count of
        values above a fraction of S_0, a share of the total energy) is then the one the whole spectrum gives;
        ranks.plan.values_needed says which decisions those are. A complete spectrum is returned as it is."""
        rest = self.full_size - len(self.S)
        if self.tail_energy <= 0 or rest <= 0 or not len(self.S) or self.S[-1] <= 0:
            return self.S
        return np.concatenate([self.S, np.full(rest, min(math.sqrt(self.tail_energy / rest), float(self.S[-1])))])

    @property
    def conv(self) -> bool:
        return self.kernel is not None

    @property
    def full_size(self) -> int:
        """min(out, in*prod(kernel)): the largest rank the layer can have."""
        return min(self.out_features, self.in_features)

    @property
    def energy(self) -> float:
        """Squared Frobenius norm of the scaled update dW = scale * up @ down (a partial spectrum's tail included)."""
        return (float(self._cs2[-1]) + self.tail_energy) * self.scale ** 2

    def fro_retained(self, k: int) -> float:
        """sqrt(kept sum S^2 / sum S^2) at rank k (NaN for a zero layer; a partial spectrum's tail in the sum)."""
        total = float(self._cs2[-1]) + self.tail_energy
        return math.sqrt(self.kept(k)[1] / total) if total > 0 else float("nan")

    def as_dict(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "out_features": self.out_features,
             "in_features": self.in_features, "old_rank": self.rank, "alpha": self.alpha, "scale": self.scale,
             "fro_norm": math.sqrt(self.energy), "numerical_rank": int(np.count_nonzero(self.S))}
        if self.base is not None:
            strength, spectral = self.base_strength()
            d.update(base=self.base.key, base_fro_norm=self.base.fro, base_spectral_norm=self.base.spectral,
                     strength=strength, spectral_ratio=spectral)
        return d


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (0.0 if a == 0 else float("inf"))
