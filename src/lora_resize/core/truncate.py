"""From a decomposition to the new factors, in the save dtype: the best rank-k approximation of the scaled update,
split as up = U_k sqrt(c S_k), down = sqrt(c S_k) V_k^T (sd-scripts puts all of S into up; splitting the square
root keeps both factors within the save dtype's range for much larger updates), with c folding any difference
between the layer's scale and the scale the output will be loaded with into the factors."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from ..errors import NumericalError
from .decompose import Decomposition

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}
# the default save precision of factors stored in a dtype: fp8 factors (LoRAs trained on fp8 bases) are saved as bf16,
# the smallest dtype that every tested loader applies (fp8 output is not offered); anything else as float
PRECISION_OF_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float8_e4m3fn: "bf16",
                      torch.float8_e5m2: "bf16"}
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def sd_scripts_alpha(name: str, alpha: float | None, rank: int, k: int) -> float:
    """The resized layer's alpha as sd-scripts computes it: (alpha / old rank, in float32) * k; k without alpha,
    so alpha / k keeps the layer's strength. Raises NumericalError when it overflows float32."""
    if alpha is None:
        return float(k)
    with np.errstate(over="ignore"):
        value = float(np.float32(np.float32(alpha) / np.float32(rank)) * np.float32(k))
    if not math.isfinite(value):
        raise NumericalError(f"layer {name}: alpha {alpha} times rank {k} overflows float32; the file is "
                             "damaged - re-export it")
    return value


@dataclass(frozen=True)
class AlphaRule:
    """How an output's alphas are chosen (for key families that store one). `uniform` None: per layer as
    sd-scripts does, (alpha / old rank) * k, so layers of one scale get different alphas when their ranks differ;
    else one value for every layer, each layer's own ratio going into its factors. One alpha loads at the intended
    strength in every consumer, including those that give layers the file's most common alpha (diffusers' kohya
    converter does so for SD UNet attention and CLIP layers)."""
    uniform: float | None = None

    def __call__(self, name: str, alpha: float | None, rank: int, k: int) -> float:
        return self.uniform if self.uniform is not None else sd_scripts_alpha(name, alpha, rank, k)

    @classmethod
    def one_for_all(cls, scales: Sequence[float], rank: int) -> "AlphaRule":
        """One alpha for all: the most common input scale (float32, as sd-scripts computes alpha / rank; zero
        scales left out) times `rank` - so a fixed-rank resize of a file whose layers share a scale writes the
        alphas sd-scripts writes."""
        live = [float(np.float32(s)) for s in scales if s != 0 and math.isfinite(s)]
        s = Counter(live).most_common(1)[0][0] if live else 1.0
        with np.errstate(over="ignore"):
            value = float(np.float32(s) * np.float32(rank))
        if not math.isfinite(value):
            raise NumericalError(f"alpha {s} x rank {rank} overflows float32; the file is damaged - re-export it")
        return cls(value)


def retention(S: np.ndarray, k: int) -> tuple[float, float, float]:
    """(sum(S) retained, Frobenius retained, S[0] / S[k-1]) when the k leading singular values are kept."""
    total, total2 = float(S.sum()), float((S * S).sum())
    kept = S[:k]
    max_ratio = (float(S[0]) / float(S[k - 1]) if k <= len(S) and S[k - 1] > 0 else
                 (float("inf") if S.size and S[0] > 0 else float("nan")))
    return (float(kept.sum()) / total if total > 0 else float("nan"),
            math.sqrt(float((kept * kept).sum()) / total2) if total2 > 0 else float("nan"), max_ratio)


@dataclass
class NewFactors:
    """A resized layer's tensors in the save dtype: up (out x k) and down (k x in*prod(kernel)) as matrices, and
    its alpha as a 0-d tensor (alpha / k is the scale the factors were made for, unless the output's key family
    loads it with a fixed scale). `kernel` and `in_channels` give the conv shapes back. `kept`: tensors of the
    module written beside the factors with their values as read (a LoKr's W1, formats/lycoris.py), by part name;
    empty when sizing on meta tensors (the module then emits their shapes)."""
    up: torch.Tensor
    down: torch.Tensor
    alpha: torch.Tensor
    kernel: tuple[int, ...] | None
    in_channels: int
    kept: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def shaped(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) in the layer's tensor shapes: conv down (k, in, *kernel), up (out, k, 1, ...)."""
        if self.kernel is None:
            return self.up, self.down
        k = self.down.shape[0]
        return (self.up.reshape(self.up.shape[0], k, *([1] * len(self.kernel))),
                self.down.reshape(k, self.in_channels, *self.kernel))


def truncated_factors(dec: Decomposition, k: int, c: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-k factors of c * (up @ down), in `dtype`, on the compute device (not waited for):
    up = U_k sqrt(|c| S_k) sign(c), down = sqrt(|c| S_k) V_k^T."""
    U, Sk, Vh = dec.factors(k)
    sq = torch.sqrt(Sk * abs(c))
    return (U * (sq * math.copysign(1.0, c))).to(dtype), (sq[:, None] * Vh).to(dtype)


def largest_entry(S: np.ndarray, c: float) -> float:
    """A bound on every entry of the factors truncated_factors makes: sqrt(|c| S_0) (the singular vectors'
    entries are at most 1 in size)."""
    return math.sqrt(abs(c) * float(S[0])) if S.size else 0.0


def on_host(name: str, up: torch.Tensor, down: torch.Tensor, bound: float | None = None, exact: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors on the CPU, checked to fit their dtype (NumericalError naming the layer when not): no Inf or
    NaN (`bound`, largest_entry, well inside the dtype's range spares that scan), and, in fp16 and bf16, no
    factor of a live layer (bound > 0) rounded more than twice as coarsely as the dtype's normal numbers round
    (`held_precision`): below the smallest normal number a factor keeps only a few bits or none, and the update
    written would differ from the truncation the summary reports. `exact`: the factors are a bit-for-bit copy of
    the input's (no rounding happened), so only the first check applies. float32 is the widest save dtype: its
    subnormals (only from an input already below 1e-38) are kept as they are.

    Raises: NumericalError, one line naming --precision float where that holds the factors."""
    up, down = up.cpu(), down.cpu()
    if bound is None or bound >= 0.5 * torch.finfo(up.dtype).max:
        if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
            if up.dtype == torch.float32:
                raise NumericalError(f"layer {name} has values beyond float32's range after resizing; the file is "
                                     "damaged - re-export it")
            raise NumericalError(f"layer {name} does not fit the save precision ({up.dtype}) after resizing; "
                                 "use --precision float or bf16")
    if not exact and bound != 0 and up.dtype in (torch.float16, torch.bfloat16):  # bound 0: a switched-off layer
        for what, t in (("up", up), ("down", down)):
            worst = held_precision(t)
            if worst > 2.0:
                info, prec = torch.finfo(t.dtype), PRECISION_OF_DTYPE[t.dtype]
                how = (f"rounds to zero in {prec}" if math.isinf(worst) else
                       f"falls below {prec}'s smallest normal number ({info.tiny:.3g}) and would be rounded up to "
                       f"{worst:.3g} times more coarsely than its normal numbers round")
                raise NumericalError(f"layer {name} is too small for the save precision: its {what} factor {how}; "
                                     "use --precision float")
    return up, down


def held_precision(t: torch.Tensor) -> float:
    """How much worse than the dtype's normal numbers a rounded factor `t` may be, as a ratio of relative error
    bounds: 1 when every entry is a normal number (each within u = eps/2 of its exact value, so the factor within
    u in Frobenius norm), larger when entries fell below the smallest normal number `tiny` (subnormals and zeros
    are spaced 2u * tiny apart: each within u * tiny of its exact value, however small that was). The ratio is
    sqrt(sum_normal t^2 + n_below * tiny^2) / ||t||, the bound the stored values prove (IEEE 754-2019, 3.4 and
    4.3; Higham, "Accuracy and Stability of Numerical Algorithms", 2.1). An all-zero factor gives inf, a factor
    with no entries 1."""
    if t.numel() == 0:
        return 1.0
    tiny = torch.finfo(t.dtype).tiny
    x = t.float().abs().flatten()  # exact: float32 holds every fp16 and bf16 value
    top = float(x.max())
    if top == 0 or not math.isfinite(top):
        return float("inf") if top == 0 else float("nan")
    below = x < tiny
    n_below = int(below.sum())
    if n_below == 0:  # every entry a normal number
        return 1.0
    e = -math.frexp(top)[1]  # x * 2**e: the largest in [0.5, 1), so the squares stay within float32's range;
    half = e // 2  # in two exact steps (a bf16 subnormal's 2**133 is beyond float32)
    scale = math.ldexp(1.0, e)
    x2 = (x * math.ldexp(1.0, half) * math.ldexp(1.0, e - half)).square()
    total = float(x2.sum(dtype=torch.float64))
    normal2 = float(torch.where(below, 0.0, x2).sum(dtype=torch.float64))
    return math.sqrt((normal2 + n_below * (tiny * scale) ** 2) / total)
