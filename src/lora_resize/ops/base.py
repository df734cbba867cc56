"""`--base MODEL`: the base weight each LoRA module patches, and its norms, so a resize's loss can be measured
against the model rather than against the update alone.

Each module's weight is found in the base by formats.weights.locate_modules (its name read as the weight it
updates, looked up under that weight's name in the base's own layout: a single-file checkpoint's or a diffusers
folder's; rows of a fused weight, or the concatenation of a fused module's parts). Unmatched modules are listed,
never guessed; a base whose weights do not have the LoRA's shapes is refused as another architecture's.

For each matched module: ||W||_F and the spectral norm ||W||_2 (W flattened to out x in*kernel, as the update;
||W||_2 exactly from the smaller Gram matrix, or by Lanczos for sides above 256), one weight per core at a time."""
from __future__ import annotations

import contextlib
import math
import os
from typing import Mapping

import torch

from ..errors import InputFileError
from ..formats import Layout
from ..formats.weights import Piece, locate_modules
from ..io.checkpoint import Checkpoint
from ..io.reader import TensorInfo
from ..core.decompose import sym_gram
from ..core.parallel import available_cores, ordered_map, torch_threads
from ..results import BaseNorms

EXACT_SIDE = 256  # ||W||_2 from the eigenvalues of the smaller Gram matrix up to this side, Lanczos beyond
LANCZOS_STEPS = 400


class WithTextEncoders:
    """A single-file base (a Flux.1 transformer file holds the denoiser alone) with the text encoders of `config`,
    the diffusers folder of its model (--base-config, where the in-memory pipeline of --effect takes them from):
    the keys and weights (`in`, `matrix`) of the file, else the folder's under `text_encoder*.`."""

    def __init__(self, ck: Checkpoint, config: Checkpoint):
        self.ck, self.config = ck, config

    def __contains__(self, key: str) -> bool:
        return key in self.ck or (key.startswith("text_encoder") and key in self.config)

    def matrix(self, key: str) -> torch.Tensor:
        return self.ck.matrix(key) if key in self.ck else self.config.matrix(key)


def base_norms(layout: Layout, infos: Mapping[str, TensorInfo], metadata: Mapping[str, str],
               base: str | os.PathLike, arch_name: str | None = None, variant: str | None = None,
               config: str | os.PathLike | None = None) -> tuple[dict[str, BaseNorms], list[str]]:
    """(module name -> the norms of the base weight it patches, notes) for `layout`'s modules; `variant`: the
    weight files of a diffusers folder to read (io.checkpoint.Checkpoint); `config`: with a single-file base, the
    diffusers folder of its model, whose text encoders are read where the file has none (WithTextEncoders).
    Raises LoraStructureError when the LoRA's model is not known, or the base is another model's (formats.weights.
    Located.check); InputFileError for a base that cannot be read."""
    norms: dict[str, BaseNorms] = {}
    unmatched, mismatched, found = [], [], []
    with contextlib.ExitStack() as stack:
        ck = stack.enter_context(Checkpoint(base, variant))
        if config is not None and not os.path.isdir(base):
            ck = WithTextEncoders(ck, stack.enter_context(Checkpoint(config)))
        located = locate_modules(layout, infos, metadata, ck, arch_name)
        for m, pieces in located.modules:
            out, (inp, *kernel) = m.weight_shape(infos)
            if pieces is None:
                unmatched.append(m.name)
            else:
                found.append((m.name, pieces, (out, inp * math.prod(kernel))))

        def measure(item) -> tuple[str, list[Piece], tuple, BaseNorms | None]:
            name, pieces, want = item
            W = matrix(ck, pieces)
            if tuple(W.shape) != want:
                return name, pieces, tuple(W.shape), None
            if not bool(torch.isfinite(W).all()):
                raise InputFileError(f"--base {base}: {pieces[0].key} holds NaN or Inf values; the checkpoint is "
                                     "damaged - use another copy")
            return name, pieces, want, BaseNorms(", ".join(p.label() for p in pieces), float(W.norm()),
                                                 spectral_norm(W))
        with torch_threads(1):  # one weight per core at a time: bounded memory, no oversubscription
            for name, pieces, shape, bn in ordered_map(measure, found, available_cores()):
                if bn is None:
                    want = next(w for nm, _, w in found if nm == name)
                    mismatched.append((name, pieces, shape, want))
                else:
                    norms[name] = bn
    left = unmatched + [x[0] for x in mismatched]
    example = left[0] if left else None
    if mismatched and len(mismatched) >= len(norms):  # the shapes differ: say which, the likeliest cause
        name, pieces, got, want = mismatched[0]
        example = f"{name} updates {want[0]} x {want[1]}, the base's {pieces[0].key} is {got[0]} x {got[1]}"
    located.check(len(norms), f"--base {base}", example)
    notes = []
    if left:
        notes.append(f"{len(left)} module(s) have no weight of their shape in the base and are measured without it "
                     f"(e.g. {left[0]})")
    return norms, notes


def matrix(ck: Checkpoint, pieces: list[Piece]) -> torch.Tensor:
    """The base weight the pieces make, float64, out x in*kernel."""
    parts = []
    for p in pieces:
        W = ck.matrix(p.key)
        if p.start is not None:
            W = W[p.start:p.stop]
        if p.swap:
            h = W.shape[0] // 2
            W = torch.cat([W[h:], W[:h]])
        parts.append(W)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def spectral_norm(W: torch.Tensor) -> float:
    """||W||_2, exactly: the largest eigenvalue of the smaller Gram matrix (W W^T or W^T W, computed by halves) when
    its side is at most EXACT_SIDE; else Lanczos on W^T W with full reorthogonalisation until the largest Ritz
    value changes by less than 1e-12 relative (it converges from below)."""
    m, n = W.shape
    p = min(m, n)
    if p <= EXACT_SIDE:
        G = sym_gram(W if m <= n else W.T)
        return math.sqrt(max(0.0, float(torch.linalg.eigvalsh(G)[-1])))
    A = W if m >= n else W.T  # tall: iterate on the small side
    g = torch.Generator().manual_seed(0)
    q = torch.randn(A.shape[1], generator=g, dtype=torch.float64)
    Q = [q / q.norm()]
    alphas, betas, theta = [], [], 0.0
    for _ in range(LANCZOS_STEPS):
        w = A.T @ (A @ Q[-1])
        alphas.append(float(w @ Q[-1]))
        B = torch.stack(Q, 1)
        for _ in range(2):
            w = w - B @ (B.T @ w)
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        new = float(torch.linalg.eigvalsh(T)[-1])
        beta = float(w.norm())
        if abs(new - theta) <= 1e-12 * new or beta <= 1e-14 * math.sqrt(max(new, 0.0)):
            return math.sqrt(max(new, 0.0))
        theta = new
        betas.append(beta)
        Q.append(w / beta)
    return math.sqrt(max(theta, 0.0))
