"""What every key family provides. A family is pure: `parse` groups a file's keys into modules (reading no tensor
data), a module's `load` turns its tensors into a low-rank layer, `emit` turns new factors into its output tensors
and returns them (nothing else), and the layout derives what else the output needs from the new ranks
(`side_outputs`: metadata entries, companion files) as data that io writes."""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..core.layer import LowRankLayer
from ..core.truncate import NewFactors
from ..io.metadata import SideOutputs
from ..io.reader import TensorInfo, TensorSource


DORA_KIND = "DoRA magnitude"  # the kind every family lists DoRA magnitude vectors as
BIAS_KIND = "LoRA bias"  # ... and PEFT's lora_B bias vectors (lora_bias=True) as


@dataclass
class Module(ABC):
    """One adapted layer of a LoRA file: its display name and the input keys it owns. `output_scale`: None when
    the output stores an alpha (the loader applies alpha / rank), else the fixed scale the output's loader applies
    whatever the rank (a PEFT config's scale, or 1 for a family without alphas); the new factors absorb it."""
    name: str
    keys: list[str] = field(default_factory=list)

    @property
    def output_scale(self) -> float | None:
        return None

    def output_scale_at(self, k: int) -> float | None:
        """`output_scale` for the output written at rank k: the same at every rank, except for a module whose
        written form changes with k (a LoKr kept as LoKr whose W2 is written whole: scale 1, formats/lycoris.py)."""
        return self.output_scale

    @abstractmethod
    def load(self, src: TensorSource) -> LowRankLayer:
        """Read this module's tensors and return its low-rank form (raises LoraStructureError on bad shapes)."""

    @abstractmethod
    def scale_and_rank(self, src: TensorSource) -> tuple[float, int]:
        """The strength the model applies to this module and its trained rank (what `load` gives as the layer's
        scale and rank), read without its factors (an alpha, a config, shapes)."""

    @abstractmethod
    def weight_shape(self, infos: Mapping[str, TensorInfo]) -> tuple[int, tuple[int, ...]]:
        """(out features, (in features, *kernel)) of the weight this module updates, from its keys' shapes alone
        (conv: in channels and the kernel; linear: (in,))."""

    @abstractmethod
    def emit(self, new: NewFactors) -> dict[str, torch.Tensor]:
        """The output tensors of this module, keyed in its family, for its new factors (works on meta tensors)."""


@dataclass
class Layout:
    """A file's content as a key family sees it: its modules, the keys it copies unchanged (`passthrough`), what
    it knows those to be (`known`: key -> kind, e.g. 'DoRA magnitude'; a passthrough key not in it is an unknown
    tensor) and notes for the user. Families that derive more than tensors from the new ranks override
    `side_outputs`."""
    format: str
    modules: list[Module]
    passthrough: list[str]
    notes: list[str] = field(default_factory=list)
    known: dict[str, str] = field(default_factory=dict)
    file_name: str | None = None  # the name its consumers load from a folder (PEFT: adapter_model.safetensors)
    copies_modules: bool = False  # modules of a kind that cannot be written as factors are copied through
    # the architecture its keys read as (a models name, 'sd': convert.keys_arch; a conversion's, its target's),
    # read where the output's metadata depends on it (io.metadata.rewrites_module); None: not read
    arch: str | None = None

    def written_network(self) -> str | None:
        """What the output's tensors are, for its metadata's network fields (io.metadata.network_fields): every
        module emits plain down/up(/alpha) pairs, so 'lora', or 'dora' beside copied DoRA magnitudes; None when
        modules of another kind are copied through as they are (the input's network fields still describe them)."""
        if self.copies_modules:
            return None
        return "dora" if any(self.known.get(k) == DORA_KIND for k in self.passthrough) else "lora"

    def side_outputs(self, rows: Sequence) -> SideOutputs:
        """Metadata entries and companion files for the new ranks (`rows`: the LayerResults, by module name)."""
        return SideOutputs()


class Format(ABC):
    """A key family (kohya, PEFT, ...), registered in formats/__init__.py; detect() picks the family that claims
    most keys, ties going to the higher `priority`. `markers` match keys that are part of this family's modules:
    a key any family marks that the chosen family leaves unowned and unknown is an error, never copied silently.
    `covers`: families whose keys this one also reads and writes (lycoris reads kohya's)."""
    name: str
    title: str = ""  # the name people know it by, for messages
    example: str = ""  # one key of this family, for the "no LoRA layers found" message
    priority: int = 0
    covers: tuple[str, ...] = ()
    markers: tuple[re.Pattern, ...] = ()

    def marks(self, key: str) -> bool:
        """`key` looks like part of one of this family's modules."""
        return any(m.search(key) for m in self.markers)

    @abstractmethod
    def claims(self, infos: Mapping[str, TensorInfo]) -> int:
        """How many keys of the file this family recognises (0: not this family)."""

    @abstractmethod
    def parse(self, infos: Mapping[str, TensorInfo], metadata: Mapping[str, str], path: Path | None = None
              ) -> Layout:
        """Group keys into modules; raise LoraStructureError for keys that half-match (e.g. an unpaired down).
        `path` is the input file, for families that read a companion file (PEFT's adapter_config.json)."""
