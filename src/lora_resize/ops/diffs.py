"""Dense updates as layer jobs: a weight difference (extract) or a full diff stored in a LoRA file
(--diffs-to-lora) read as a kohya-form pair of full rank (DenseSource), so the key families, the model tables, the
layout conversions and the rules read it as any LoRA module, and decomposed as the dense matrix it is
(core.dense.decompose_dense: LayerJob.decompose) rather than by the factored engine."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import torch

from ..core.decompose import NAN_MESSAGE
from ..core.dense import decompose_dense
from ..core.layer import LowRankLayer
from ..core.spectrum import Spectrum
from ..core.truncate import FP8
from ..errors import LoraStructureError, NumericalError
from ..formats import detect
from ..formats.base import Module
from ..formats.companions import companion_kind
from ..formats.kohya import DOWN, UP
from ..io.reader import TensorInfo, TensorSource
from ..options import ResizeOptions
from ..ranks.plan import rank_decider, values_needed
from ..ranks.rules import RuleOutcome
from .job import LayerJob, checked, factor_bytes, module_job, with_strength


@dataclass(frozen=True)
class Dense:
    """A dense tensor a DenseSource serves: its shape and dtype as stated (the dtype sets the default save
    precision: fp8 is stated as bf16), and how to read it (float64, any shape holding its entries)."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]


class DenseSource:
    """A TensorSource that presents dense updates as kohya-form pairs of full rank: module `<name>` of `updates`
    has `<name>.lora_up.weight` @ `<name>.lora_down.weight` = the update (as a matrix, out x in*prod(kernel)), one
    of the two the identity on its smaller side - so the key families, the model tables, the layout conversions
    (renamed, split, fused) and the rules read it as any LoRA module, and no identity larger than the update is
    made; `extra` keys are served as they are (a bias diff); every other key is the `inner` source's, less
    `hidden` ones (the `.diff` tensors a pair replaces). Data is read when asked for, one tensor at a time."""

    def __init__(self, path: Path, metadata: dict[str, str], updates: Mapping[str, Dense],
                 extra: Mapping[str, Dense] | None = None, inner: TensorSource | None = None,
                 hidden: frozenset[str] = frozenset()):
        self.path, self.metadata, self.inner = path, metadata, inner
        self._infos = {k: v for k, v in (inner.infos() if inner is not None else {}).items() if k not in hidden}
        self._own: dict[str, tuple[Dense, str]] = {}  # key -> (what it reads, "eye" / "dense" / "extra")
        for module, d in updates.items():
            out, n = d.shape[0], math.prod(d.shape[1:])
            r, dtype, ones = min(out, n), _stated(d.dtype), [1] * (len(d.shape) - 2)
            self._own[module + UP] = (Dense((out, r, *ones), dtype, d.read), "eye" if out <= n else "dense")
            self._own[module + DOWN] = (Dense((r, *d.shape[1:]), dtype, d.read), "dense" if out <= n else "eye")
        for key, d in (extra or {}).items():
            self._own[key] = (Dense(d.shape, _stated(d.dtype), d.read), "extra")
        self._infos.update({k: TensorInfo(d.shape, d.dtype) for k, (d, _) in self._own.items()})
        self.dense_keys = frozenset(k for k, (_, what) in self._own.items() if what != "extra")

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def get(self, key: str) -> torch.Tensor:
        if key not in self._own:
            return self.inner.get(key)
        d, what = self._own[key]
        if what == "eye":
            return torch.eye(d.shape[0], dtype=torch.float64).reshape(d.shape)
        t = d.read().reshape(d.shape)
        return t.to(d.dtype) if what == "extra" else t

    def close(self) -> None:
        pass


def _stated(dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if dtype in FP8 else dtype


def full_diffs_as_pairs(reader: TensorSource) -> tuple[TensorSource, list[str]]:
    """--diffs-to-lora: `reader` with each module stored as a full diff (`<module>.diff`, 2-D to 5-D, no factors
    beside it; ComfyUI's comfy/lora.py `load_lora` adds it to the weight) presented as a pair of full rank
    (DenseSource), so it is planned, truncated and written as a low-rank layer; the notes say how many, and which
    diffs stay copied (one beside factors of its own module, whose update is their sum)."""
    infos = reader.infos()
    diffs = [k for k in infos if companion_kind(k) == "full diff" and infos[k].dtype.is_floating_point
             and 2 <= len(infos[k].shape) <= 5]
    if not diffs:
        return reader, ["--diffs-to-lora: the file has no full diffs (`.diff`): nothing to turn into pairs"]
    try:
        modules = {m.name for m in detect(infos, reader.metadata).modules}
    except LoraStructureError:  # no factors at all (a LyCORIS "full" file): every diff is alone
        modules = set()
    alone = [k for k in diffs if k[: -len(".diff")] not in modules]
    notes = [f"{len(alone)} full diff(s) (`.diff`) written as low-rank pairs (--diffs-to-lora)"] if alone else []
    beside = sorted(set(diffs) - set(alone))
    if beside:
        notes.append(f"{len(beside)} full diff(s) beside factors of their own module copied as they are (e.g. "
                     f"{beside[0]})")
    if not alone:
        return reader, notes

    def read(key: str) -> Callable[[], torch.Tensor]:
        def get() -> torch.Tensor:
            t = reader.get(key).to(torch.float64)
            if not bool(torch.isfinite(t).all()):
                raise NumericalError(f"{key} {NAN_MESSAGE}")
            return t
        return get
    return DenseSource(reader.path, reader.metadata,
                       {k[: -len(".diff")]: Dense(tuple(infos[k].shape), infos[k].dtype, read(k)) for k in alone},
                       inner=reader, hidden=frozenset(alone)), notes


def layer_job(m: Module, src: TensorSource, opts: ResizeOptions, certified: "Certified", converting: bool = False,
              partial: bool = True) -> LayerJob:
    """The job of output module `m`: a module fed by a DenseSource's pairs decomposes its dense update
    (core.dense.decompose_dense, recorded in `certified`; `partial`: only the leading values and vectors `opts`
    needs, ranks.plan.values_needed - False where factors are made at other settings' ranks) and is never copied
    as stored; any other, as resize's (ops.job.module_job)."""
    if not set(m.keys) & getattr(src, "dense_keys", frozenset()):
        return module_job(m, src, converting)
    need = values_needed(opts, len(m.weight_shape(src.infos())[1]) > 1, m.name) if partial else None
    return LayerJob(m.name, lambda: checked(m.name, m.load(src)), m, lambda: m.scale_and_rank(src),
                    factor_bytes(m, src.infos()), decompose=certified.decomposer(m.name, need, opts),
                    converting=converting)


def ruled_jobs(modules: Iterable[Module], src: TensorSource, opts: ResizeOptions, rules: RuleOutcome | None,
               certified: "Certified | None" = None, converting: bool = False, partial: bool = True
               ) -> list[LayerJob]:
    """The jobs (`layer_job`) of the `modules` that `rules` keeps, each at the strength `rules` gives it
    (ops.job.with_strength: scale rules, --block-weights); `rules` None: every module, at strength 1. The one way
    resize, analyze and extract turn a layout's modules into jobs."""
    kept = None if rules is None else set(rules.kept)
    strengths = {} if rules is None else rules.strengths
    certified = Certified() if certified is None else certified
    return [with_strength(layer_job(m, src, opts, certified, converting, partial), strengths.get(m.name, 1))
            for m in modules if kept is None or m.name in kept]


def dense_of(layer: LowRankLayer) -> torch.Tensor:
    """The dense update a DenseSource layer holds: its non-identity factor, or (a fused output module's
    block-diagonal stack) the product."""
    up, down = layer.up, layer.down
    for eye, other in ((up, down), (down, up)):
        n = eye.shape[0]
        if eye.shape == (n, n) and torch.equal(eye, torch.eye(n, dtype=eye.dtype, device=eye.device)):
            return other.to(torch.float64)
    return up.to(torch.float64) @ down.to(torch.float64)


@dataclass
class Certified:
    """What each dense layer's decomposition certified: name -> (complete, excess, fallback); `notes` says it."""
    layers: dict[str, tuple[bool, float, bool]] = field(default_factory=dict)

    def decomposer(self, name: str, need: int | None, opts: ResizeOptions) -> Callable:
        def decompose(layer: LowRankLayer, device: torch.device, vectors: bool):
            # a rank within the certified values' error of a threshold (a near-tie) sends the layer the exact route
            decide = rank_decider(Spectrum.of(name, layer, np.zeros(0)), opts) if need is not None else None
            dec = decompose_dense(dense_of(layer), need if vectors else None, device, decide)
            self.layers[name] = (dec.complete, dec.excess, dec.fallback)
            return dec
        return decompose

    def notes(self) -> list[str]:
        if not self.layers:
            return []
        exact = [n for n, (complete, excess, _) in self.layers.items() if complete and excess == 0]
        if len(exact) == len(self.layers):
            return [f"all {len(exact)} dense layer(s) decomposed exactly (the whole spectrum): each writes the best "
                    "rank-k approximation of its update"]
        worst = max(self.layers.items(), key=lambda kv: kv[1][1])
        fell = sum(1 for c in self.layers.values() if c[2])
        return [f"{len(exact)} dense layer(s) exact, {len(self.layers) - len(exact)} certified: each written layer's "
                f"squared error is at most (1 + {worst[1][1]:.2g}) x the best rank-k's (worst: {worst[0]})"
                + (f"; {fell} fell back to the exact route" if fell else "")]
