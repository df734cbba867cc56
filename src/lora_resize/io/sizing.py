"""The exact size of the file a job would write, from shapes alone: each module's tensors as its key family emits
them at a rank (emitted on meta tensors, which have a shape and a dtype and no data), the copied tensors, and the
header that the writer would lay out with the job's metadata (io/metadata.py). Budgets plan on it and analyze
predicts with it, so both are exact to the byte."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..core.spectrum import Spectrum
from ..core.truncate import NewFactors
from .writer import copied_dtype, header_bytes, ordered

META = torch.device("meta")


class Stub:
    """Shape and dtype of a tensor, enough for the writer's header (no data)."""
    __slots__ = ("shape", "dtype", "_n", "_size")

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype):
        self.shape, self.dtype = tuple(shape), dtype
        self._n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        self._size = dtype.itemsize

    def numel(self) -> int:
        return self._n

    def element_size(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        return self._n * self._size


class OutputSizer:
    """Sizes the output of `modules` (each with `emit(NewFactors) -> {key: tensor}`, one per spectrum, in order)
    saved in `dtype`, with the copied tensors `passthrough` ({key: (shape, dtype) as saved}) and the metadata
    `metadata_for(ranks)` gives (hashes included). Emitted shapes are cached per (layer, rank); `with_metadata`
    makes a sizer for other metadata (another setting) that shares the cache."""

    def __init__(self, modules: Sequence, spectra: Sequence[Spectrum], passthrough: Mapping[str, Stub],
                 dtype: torch.dtype, metadata_for: Callable[[np.ndarray], dict[str, str]]):
        self.modules, self.spectra, self.passthrough = list(modules), list(spectra), dict(passthrough)
        self.dtype, self.metadata_for = dtype, metadata_for
        self._cache: dict[tuple[int, int], dict[str, Stub]] = {}

    def with_metadata(self, metadata_for: Callable[[np.ndarray], dict[str, str]]) -> "OutputSizer":
        """The same output with other metadata (the emitted shapes' cache shared)."""
        twin = object.__new__(OutputSizer)
        twin.__dict__.update(self.__dict__, metadata_for=metadata_for)
        return twin

    def emitted(self, i: int, k: int) -> dict[str, Stub]:
        """The tensors layer `i` is written as at rank `k`, as stubs."""
        got = self._cache.get((i, k))
        if got is None:
            sp = self.spectra[i]
            new = NewFactors(torch.empty(sp.out_features, k, dtype=self.dtype, device=META),
                             torch.empty(k, sp.in_features, dtype=self.dtype, device=META),
                             torch.empty((), dtype=self.dtype, device=META), sp.kernel, sp.in_channels)
            got = {key: Stub(tuple(t.shape), t.dtype) for key, t in self.modules[i].emit(new).items()}
            self._cache[(i, k)] = got
        return got

    def layer_bytes(self, i: int, k: int) -> int:
        """Bytes of layer `i`'s tensors at rank `k`."""
        return sum(t.nbytes for t in self.emitted(i, k).values())

    def file_size(self, ranks: Sequence[int]) -> tuple[int, int, int]:
        """(file bytes, header bytes, parameters) of the .safetensors file with these per-layer ranks."""
        tensors: dict[str, Stub] = {}
        for i, k in enumerate(ranks):
            tensors.update(self.emitted(i, int(k)))
        for key, stub in self.passthrough.items():
            tensors.setdefault(key, stub)
        head = header_bytes(tensors, ordered(tensors), self.metadata_for(np.asarray(ranks)))
        data = sum(t.nbytes for t in tensors.values())
        return len(head) + data, len(head), sum(t.numel() for t in tensors.values())


def saved_stub(shape: tuple[int, ...], dtype: torch.dtype, cast: torch.dtype | None) -> Stub:
    """A copied tensor as it is saved (io.writer.copied_dtype): in its own dtype, or floating point cast to `cast`
    (an explicit --precision)."""
    return Stub(shape, copied_dtype(dtype, cast))
