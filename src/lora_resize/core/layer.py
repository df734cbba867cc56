"""The low-rank layer every key family reads into: dW = scale * up @ down, as matrices."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRankLayer:
    """dW = scale * up @ down, up (out x f) and down (f x in*prod(kernel)) as matrices, f the factor size.

    `rank` is the number alpha is divided by: the trained rank (down's rows for a LoRA; for a LoHa or LoKr, whose
    exact up/down pair has a larger factor size, the rank of its halves). `alpha` is the stored alpha (None when
    the file has none), `scale` the strength the model applies, computed once by the key family that read the
    layer (alpha / rank, the scale of a PEFT config, or 1). `kernel` is the conv kernel ((kh, kw), or (kt, kh, kw))
    or None for a linear layer; `in_channels` the layer's input channels (in_features for a linear layer)."""
    up: torch.Tensor
    down: torch.Tensor
    rank: int
    alpha: float | None
    scale: float
    kernel: tuple[int, ...] | None
    in_channels: int

    @classmethod
    def with_alpha(cls, up: torch.Tensor, down: torch.Tensor, alpha: float | None, *, rank: int | None = None,
                   kernel: tuple[int, ...] | None = None, in_channels: int | None = None) -> "LowRankLayer":
        """A layer whose scale is alpha / rank (1 without alpha); rank defaults to the factor size."""
        rank = down.shape[0] if rank is None else rank
        return cls(up, down, rank, alpha, alpha / rank if alpha is not None else 1.0, kernel,
                   down.shape[1] if in_channels is None else in_channels)

    @classmethod
    def with_scale(cls, up: torch.Tensor, down: torch.Tensor, scale: float, *,
                   kernel: tuple[int, ...] | None = None, in_channels: int | None = None) -> "LowRankLayer":
        """A layer whose scale is given outright (a PEFT config's); its alpha is reported as scale * rank."""
        rank = down.shape[0]
        return cls(up, down, rank, scale * rank, scale, kernel, down.shape[1] if in_channels is None else in_channels)

    @property
    def factor_size(self) -> int:
        """The inner size of the up/down pair (at least the layer's rank, larger for a LoHa or LoKr)."""
        return self.down.shape[0]

    @property
    def kind(self) -> str:
        """'linear', or 'conv<kh>x<kw>' ('conv<kt>x<kh>x<kw>' for conv3d)."""
        return "linear" if self.kernel is None else "conv" + "x".join(str(k) for k in self.kernel)
