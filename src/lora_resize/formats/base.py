"""What every key family provides: modules found in a file's keys, turned into an up/down pair to decompose,
and written back in the same family's keys."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from ..tensorfile import TensorInfo, TensorSource


@dataclass
class LowRankLayer:
    """dW = scale * up @ down, with up (out x r) and down (r x in*kh*kw) as matrices. `kernel` is (kh, kw) for a
    conv layer, None for a linear one; `alpha` is the stored alpha (None when the file has none)."""
    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None
    kernel: tuple[int, int] | None
    in_channels: int

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        """alpha / rank as sd-scripts computes it (float32 arithmetic), 1.0 without alpha."""
        return 1.0 if self.alpha is None else float(torch.tensor(self.alpha, dtype=torch.float32) / self.rank)


@dataclass
class Module(ABC):
    """One adapted layer of a LoRA file: its display name and the input keys it owns."""
    name: str
    keys: list[str] = field(default_factory=list)

    @abstractmethod
    def load(self, src: TensorSource) -> LowRankLayer:
        """Read this module's tensors and return its low-rank form (raises LoraStructureError on bad shapes)."""

    @abstractmethod
    def emit(self, layer: LowRankLayer, up: torch.Tensor, down: torch.Tensor, alpha: torch.Tensor
             ) -> dict[str, torch.Tensor]:
        """Output tensors, keyed in this module's family, for new matrix factors and a 0-d alpha tensor."""


@dataclass
class Layout:
    """A file's content as a key family sees it: its modules, the keys it leaves alone, and notes for the user
    (e.g. kept DoRA magnitudes, modules of kinds that cannot be resized). A family that writes more than the
    tensors (a sidecar config, a metadata entry) subclasses it and overrides the two hooks."""
    format: str
    modules: list[Module]
    passthrough: list[str]
    notes: list[str] = field(default_factory=list)

    def finish_metadata(self, meta: dict[str, str], rows: list) -> None:
        """Adjust the output's metadata in place before it is written (rows: the LayerResults)."""

    def write_sidecars(self, dst: Path, rows: list) -> list[str]:
        """Write companion files beside `dst` after it is written (atomically); return notes for the user."""
        return []


class Format(ABC):
    """A key family (kohya, PEFT, ...). Registered in formats/__init__.py; detect() picks the best claimant."""
    name: str
    example: str = ""  # one key of this family, for the "no LoRA layers found" message
    covers: tuple[str, ...] = ()  # families whose keys this one also handles (and may pass through on purpose)

    @abstractmethod
    def claims(self, infos: Mapping[str, TensorInfo]) -> int:
        """How many keys of the file this family recognises (0: not this family)."""

    @abstractmethod
    def parse(self, infos: Mapping[str, TensorInfo], metadata: Mapping[str, str], path: Path | None = None
              ) -> Layout:
        """Group keys into modules; raise LoraStructureError for keys that half-match (e.g. an unpaired down).
        `path` is the input file, for families that read a companion file (PEFT's adapter_config.json)."""
