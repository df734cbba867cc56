"""How layers go through the engine: in windows of consecutive layers. A window's layers are loaded, decomposed as
batches of one shape (`decompose_many`), every layer's follow-up work is queued, and only then does anything wait
for the device. On the CPU, windows are small (large layers go alone) and run one per core side by side, torch
single-threaded in each: per-layer overhead is shared by small layers and nothing oversubscribes the cores. On a
GPU, windows are large, so it is not left idle between small kernels, and the next window loads while one
computes."""
from __future__ import annotations

import contextlib
from itertools import chain
from typing import Callable, Iterable, Iterator, Protocol, TypeVar

import torch

from ..errors import DeviceError, NumericalError, OptionsError
from .decompose import Decomposition, NonFiniteFactors, decompose_many
from .layer import LowRankLayer
from .parallel import available_cores, ordered_map, release_free_memory, torch_threads

H = TypeVar("H")
X = TypeVar("X")
Progress = Callable[[Iterable[X], int], Iterable[X]]
LARGEST_STORABLE_SV = float(torch.finfo(torch.float32).max) ** 2  # sqrt(S) splits must fit float32
TRIM_EVERY = 8  # layers between hand-backs of freed heap memory (each costs a heap walk and fresh page faults)
WINDOW_LAYERS = 256  # a window: at most this many layers ...
CPU_WINDOW_BYTES = 32 << 20  # ... and about this many bytes of float64 factors
GPU_WINDOW_BYTES = 512 << 20
CPU_ALONE_ABOVE = 4 << 20  # on the CPU, a layer with more float64 factor bytes than this goes alone


class Loadable(Protocol):
    """A layer job: its name, how to read its low-rank form, and about how many bytes of float64 factors it has
    (`nbytes`, optional: it sizes the windows); optionally its own `decompose(layer, device, vectors)` (a dense
    update's: decompositions)."""
    name: str

    def load(self) -> LowRankLayer: ...


def decompose_layers(named: list[tuple[str, LowRankLayer]], device: torch.device, vectors: bool = True
                     ) -> list[Decomposition]:
    """The engine on layers (batched by shape), with NaN/Inf in a layer's factors, or an update no save
    precision can hold, reported as a NumericalError naming the layer. `vectors` False: singular values only."""
    try:
        decs = decompose_many([(layer.up, layer.down) for _, layer in named], device, vectors)
    except NonFiniteFactors as e:
        raise NumericalError(f"layer {named[e.index][0]} {e}") from None
    for (name, _), dec in zip(named, decs):
        if dec.S.size and dec.S[0] > LARGEST_STORABLE_SV:
            raise NumericalError(f"layer {name} has an update too large for any save precision (largest singular "
                                 f"value {dec.S[0]:.3g}); the file is damaged - re-export it")
    return decs


def decompositions(batch: list[Loadable], layers: list[LowRankLayer], device: torch.device, vectors: bool) -> list:
    """Each job's decomposition, in order: a job with its own `decompose(layer, device, vectors)` (a dense weight
    difference: core.dense) through it, the others through the engine, batched (decompose_layers)."""
    own = [getattr(u, "decompose", None) for u in batch]
    engine = iter(decompose_layers([(u.name, layer) for u, layer, d in zip(batch, layers, own) if d is None],
                                   device, vectors))
    return [next(engine) if d is None else d(layer, device, vectors) for d, layer in zip(own, layers)]


def through_engine(jobs: list[Loadable], device: torch.device, start: Callable[[Loadable, LowRankLayer,
                   Decomposition], H], finish: Callable[[H], X], threads: int | None = None,
                   progress: Progress | None = None, vectors: bool = True) -> Iterator[X]:
    """finish(start(job, layer, decomposition)) for every layer job, in order. `start` may queue device work
    without waiting for it; a window's finishes run after all its starts. `vectors` False: the decompositions
    hold singular values only (what planning and analysis need)."""
    cpu = device.type == "cpu"

    def window(batch: list[Loadable]) -> list[X]:
        try:
            layers = [u.load() for u in batch]
            with torch.no_grad():
                decs = decompositions(batch, layers, device, vectors)
                handles = [start(u, layer, dec) for u, layer, dec in zip(batch, layers, decs)]
                del decs, layers
                return [finish(h) for h in handles]
        except torch.OutOfMemoryError:  # the device's memory: retry in halves, down to one layer
            if len(batch) == 1:
                raise DeviceError(f"layer {batch[0].name} does not fit in the memory of {device}; use --device "
                                  "cpu (or free the GPU)") from None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(batch) // 2
            return window(batch[:half]) + window(batch[half:])

    workers = (threads or available_cores()) if cpu else 2  # on a GPU: one window loads while one computes
    loop: Iterable[X] = chain.from_iterable(ordered_map(window, windows(jobs, *window_bytes(device)), workers))
    if progress is not None:
        loop = progress(loop, len(jobs))
    with torch_threads(1) if cpu else contextlib.nullcontext():
        for i, x in enumerate(loop, 1):
            if i % TRIM_EVERY == 0:
                release_free_memory()
            yield x


def compute_device(name: str) -> torch.device:
    """The torch device for --device `name`: 'auto' picks CUDA when it is available. Raises OptionsError when
    CUDA is asked for and absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OptionsError(f"--device {name} was asked for but CUDA is not available here; use --device cpu or auto")
    return torch.device(name)


def window_bytes(device: torch.device) -> tuple[int, int]:
    """(bytes of float64 factors a window holds, size above which a layer goes alone). On the CPU, small layers
    are batched (sharing the per-layer overhead) and large ones go alone (batching them only adds copies and
    memory); on a GPU, windows are large enough to keep it busy."""
    if device.type == "cpu":
        return CPU_WINDOW_BYTES, CPU_ALONE_ABOVE
    return GPU_WINDOW_BYTES, GPU_WINDOW_BYTES


def windows(jobs: list[Loadable], nbytes: int, alone_above: int | None = None) -> Iterator[list[Loadable]]:
    """Consecutive runs of jobs of at most WINDOW_LAYERS layers and about `nbytes` of float64 factors, a job of
    more than `alone_above` bytes in a window of its own (sizes from the jobs' `nbytes` where they know it: a
    layer counts as small otherwise)."""
    batch: list[Loadable] = []
    size = 0
    alone = nbytes if alone_above is None else alone_above
    for u in jobs:
        n = getattr(u, "nbytes", 0)
        if batch and (len(batch) >= WINDOW_LAYERS or size + n > nbytes or n > alone
                      or getattr(batch[-1], "nbytes", 0) > alone):
            yield batch
            batch, size = [], 0
        batch.append(u)
        size += n
    if batch:
        yield batch
