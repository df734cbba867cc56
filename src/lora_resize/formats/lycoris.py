"""LyCORIS (KohakuBlueleaf/LyCORIS) networks: LoCon with a Tucker core, LoHa and LoKr, each resized exactly into
plain LoRA factors - except a LoKr that stays LoKr (its W2 truncated exactly: KeptLokr, at the end of this module,
chosen by `kept_lokr` unless --as-lora); kinds that need the base model to be written as low-rank factors pass
through untouched.

Keys are `<name>.<part>` with kohya-style names (`lora_unet_...`, `lora_te_...`, `lycoris_...`). Every resizable
module becomes one up/down pair whose product is the module's update, built from its factors without the dense
out x in matrix (conventions as lycoris-lora 4.x computes them in its module forward; scale = alpha / r, 1 without
alpha):

- LoCon (`lora_down`, `lora_up`, optional `lora_mid`): dW[o, c, kh, kw] = sum_ij up[o, i] mid[i, j, kh, kw]
  down[j, c]; the pair is up (out x r) and down' = mid contracted with down (r x in*kh*kw). r = down.shape[0].
- LoHa (`hada_w1_a/_b`, `hada_w2_a/_b`, Tucker `hada_t1/_t2`): dW = (A1 B1) * (A2 B2) (elementwise). The product of
  two rank-r1/r2 matrices is exactly up @ down with up[:, (k, l)] = A1[:, k] * A2[:, l] and
  down[(k, l), :] = B1[k, :] * B2[l, :] (row-wise Khatri-Rao products), of inner size r1*r2. Tucker halves are
  A = w_a^T, B = t contracted with w_b. r = hada_w1_b.shape[0].
- LoKr (`lokr_w1` or `lokr_w1_a/_b`, `lokr_w2` or `lokr_w2_a/_b`, Tucker `lokr_t2`): dW = kron(W1, W2) with W2
  flattened to (c x d*kh*kw). kron(U1 V1, U2 V2) = kron(U1, U2) kron(V1, V2) gives the pair; a full side M is
  I @ M or M @ I, whichever is thinner. r = lokr_w2_b.shape[0] (else lokr_w1_b.shape[0]); with both sides full
  LyCORIS ignores alpha, and so do we (scale 1). (The plain form, for --as-lora, conversions and merges.)
- LoHa stays plain factors: (A1 B1) * (A2 B2) has no truncation that keeps its form exactly (LOHA_WHY).

When the structured pair's inner size would exceed min(out, in*kh*kw) (e.g. a LoHa whose r1*r2 is large for a small
layer), the dense update is smaller than the factors: we form it and pair it with an identity on its shorter side.

LyCORIS stores non-Tucker LoHa/LoKr conv layers with the kernel flattened into the input dimension (lycoris-lora's
LohaModule: `hada_w1_b` (r, in*kh*kw); LokrModule: `lokr_w2_b` (r, d*kh*kw)); the columns are in conv order (in,
kh, kw), as LyCORIS reshapes the product to the weight's shape. Where the module's name says which conv it is
(a Stable Diffusion UNet's 3x3 convs, under kohya's, sgm's or SimpleTuner's names: `known_kernel`), it is written
as conv factors, down (k, in, kh, kw) and up (out, k, 1, 1): sd-scripts' `networks/lora.py` and musubi-tuner build
their modules from those shapes and fail on 2-D factors for a conv. Otherwise it is written as 2-D factors
(ComfyUI, A1111, Forge and InvokeAI reshape them to the layer).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

import torch

from ..core.layer import LowRankLayer
from ..core.truncate import NewFactors
from ..errors import LoraStructureError
from ..io.reader import TensorInfo, TensorSource
from ..models.sd import sgm_to_flat, unet_path
from .base import DORA_KIND, Format, Layout, Module
from .kohya import DOWN, UP
from .pairs import ALPHA, FACTOR_NDIMS, check_pair, check_scalar, emit_pair, matrices, read_alpha

LOCON = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2")
DORA = "dora_scale"
SHARED = ("alpha", DORA)
# Kinds that cannot become low-rank up/down factors without the base model: (display name, detecting parts,
# other parts). A module is one of these when it has a detecting part; all its parts are then copied unchanged.
# (Full and bias diffs and norms, which any family's file may carry, are companions: formats/companions.py.)
PASS_KINDS = (
    ("OFT/BOFT", ("oft_blocks", "oft_diag"), ("rescale",)),
    ("(IA)^3", ("on_input",), ("weight",)),
    ("GLoRA", ("a1.weight", "a2.weight", "b1.weight", "b2.weight"), ("bm.weight",)),
    ("T-LoRA", ("lambda_layer",), ("q_layer.weight", "p_layer.weight")),
)
KIND_OF = {**{s: "locon" for s in LOCON}, **{s: "loha" for s in LOHA}, **{s: "lokr" for s in LOKR}}
for _kind, _det, _rest in PASS_KINDS:
    KIND_OF.update({s: _kind for s in _det + _rest})
# Parts whose presence makes a module (longest first, so `x.lora_mid.weight` is never read as part `weight`).
DETECTORS = sorted(LOCON + LOHA + LOKR + (DORA,) + tuple(s for _, det, _ in PASS_KINDS for s in det),
                   key=len, reverse=True)
OTHER_CONV_NDIMS = (3, 5)  # conv1d/conv3d LoHa/LoKr modules pass through, listed (LoCon ones are resized)
SHOWN = 3  # module names quoted in a note
MARKERS = (re.compile(r"(^|[._])(lora_mid|dora_scale|hada_[wt]\d|lokr_[wt]\d)([._]|$)"),)


UNET_PREFIXES = ("lora_unet_", "lycoris_")  # kohya's UNet modules; SimpleTuner's LyCORIS names (diffusers paths)
CONV3X3 = ("conv1", "conv2", "conv_in", "conv_out", "conv")  # a diffusers UNet path's last part on its 3x3 convs


def known_kernel(name: str) -> tuple[int, ...] | None:
    """The kernel of the conv that module `name` adapts, when its name says: (3, 3) for a Stable Diffusion UNet's
    3x3 convs (resnets' conv1/conv2, conv_in, conv_out, the down/upsamplers' conv; diffusers' `UNet2DConditionModel`)
    under kohya's flattened diffusers or sgm names (`lora_unet_down_blocks_0_resnets_0_conv1`,
    `lora_unet_input_blocks_1_0_in_layers_2`) or SimpleTuner's `lycoris_` ones; None otherwise (a linear layer, or
    a 1x1 conv, which 2-D factors describe exactly)."""
    for prefix in UNET_PREFIXES:
        if name.startswith(prefix):
            flat = name[len(prefix):]
            path = unet_path(flat) or unet_path(sgm_to_flat(flat) or "")
            if path is not None and path.rsplit(".", 1)[-1] in CONV3X3:
                return (3, 3)
    return None


def unfolded(name: str, columns: int) -> tuple[tuple[int, ...] | None, int]:
    """(kernel, in channels) of module `name` whose factors have `columns` columns with any kernel folded in: the
    kernel its name says (known_kernel) when it divides them, else (None, columns) - a linear layer."""
    kernel = known_kernel(name)
    if kernel is not None and columns % math.prod(kernel) == 0:
        return kernel, columns // math.prod(kernel)
    return None, columns


def split_key(key: str) -> tuple[str, str] | None:
    """(module name, part) of a key ending in a part that makes a module, else None."""
    for part in DETECTORS:
        if key.endswith("." + part) and len(key) > len(part) + 1:
            return key[: -len(part) - 1], part
    return None


# ----------------------------------------------------------------------------------------------------------------
# Structure -> up/down pairs (float64, never the dense out x in update unless it is the smaller object)


def tucker_down(core: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """core (p x q x kh x kw) contracted with down (q x in) on q: a p x (in*kh*kw) matrix, columns in conv order."""
    return torch.einsum("ij...,jc->ic...", core, down.reshape(down.shape[0], -1)).reshape(core.shape[0], -1)


def dense_pair(dw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An exact up/down pair for a dense matrix: an identity on its shorter side."""
    m, n = dw.shape
    if m <= n:
        return torch.eye(m, dtype=dw.dtype), dw
    return dw, torch.eye(n, dtype=dw.dtype)


def khatri_rao_pair(a1, b1, a2, b2) -> tuple[torch.Tensor, torch.Tensor]:
    """up/down with up @ down = (a1 @ b1) * (a2 @ b2), inner size r1*r2 (or the dense update when that is smaller)."""
    m, n = a1.shape[0], b1.shape[1]
    p = a1.shape[1] * a2.shape[1]
    if p > min(m, n):
        return dense_pair((a1 @ b1) * (a2 @ b2))
    up = (a1[:, :, None] * a2[:, None, :]).reshape(m, p)
    down = (b1[:, None, :] * b2[None, :, :]).reshape(p, n)
    return up, down


def kron_pair(u1, v1, u2, v2) -> tuple[torch.Tensor, torch.Tensor]:
    """up/down with up @ down = kron(u1 @ v1, u2 @ v2) (or the dense update when that is smaller)."""
    u1, v1, u2, v2 = (x.contiguous() for x in (u1, v1, u2, v2))  # torch.kron needs contiguous inputs
    m, n = u1.shape[0] * u2.shape[0], v1.shape[1] * v2.shape[1]
    if u1.shape[1] * u2.shape[1] > min(m, n):
        return dense_pair(torch.kron(u1 @ v1, u2 @ v2))
    return torch.kron(u1, u2), torch.kron(v1, v2)


# ----------------------------------------------------------------------------------------------------------------
# Modules


@dataclass
class LycorisModule(Module):
    """One LyCORIS module that becomes plain LoRA factors. `parts` maps part name (`hada_w1_a`, ...) to its key."""
    kind: str = ""
    parts: dict[str, str] = field(default_factory=dict)
    label: str = ""  # what the notes call it: 'LoKr', 'Tucker LoHa', ...

    def _get(self, src: TensorSource, part: str) -> torch.Tensor | None:
        key = self.parts.get(part)
        return None if key is None else src.get(key).to(torch.float64)

    def scale_and_rank(self, src: TensorSource) -> tuple[float, int]:
        """alpha / the trained rank (lora_down's rows; hada_w1_b's; lokr_w2_b's, else lokr_w1_b's); scale 1
        without an alpha, and for a LoKr whose halves are both full (LyCORIS ignores its alpha: its rank is then
        that of its exact pair, min of the halves' products)."""
        infos = src.infos()
        rank_part = {"locon": "lora_down.weight", "loha": "hada_w1_b"}.get(self.kind) or next(
            (p for p in ("lokr_w2_b", "lokr_w1_b") if p in self.parts), None)
        if rank_part is None:
            return 1.0, self.load(src).rank
        rank = infos[self.parts[rank_part]].shape[0]
        alpha = self._alpha(src)
        return (1.0 if alpha is None else alpha / rank), rank

    def _alpha(self, src: TensorSource) -> float | None:
        key = self.parts.get("alpha")
        return None if key is None else read_alpha(src, key, self.name)

    def load(self, src: TensorSource) -> LowRankLayer:
        return {"locon": self._locon, "loha": self._loha, "lokr": self._lokr}[self.kind](src)

    def _locon(self, src: TensorSource) -> LowRankLayer:
        down, up, mid = (self._get(src, p) for p in LOCON)
        alpha = self._alpha(src)
        if mid is None:
            up_m, down_m, kernel = matrices(down, up)
            return LowRankLayer.with_alpha(up_m, down_m, alpha, kernel=kernel, in_channels=down.shape[1])
        return LowRankLayer.with_alpha(up.reshape(up.shape[0], -1), tucker_down(mid, down), alpha,
                                       rank=down.shape[0], kernel=tuple(mid.shape[2:]), in_channels=down.shape[1])

    def _loha(self, src: TensorSource) -> LowRankLayer:
        w1a, w1b, w2a, w2b, t1, t2 = (self._get(src, p) for p in LOHA)
        if t1 is not None:  # Tucker: w_a is (r x out), w_b (r x in), t (r x r x kh x kw)
            a1, b1, a2, b2 = w1a.T, tucker_down(t1, w1b), w2a.T, tucker_down(t2, w2b)
            kernel = tuple(t1.shape[2:])
        else:
            a1, b1 = w1a, w1b.reshape(w1b.shape[0], -1)
            a2, b2 = w2a, w2b.reshape(w2b.shape[0], -1)
            kernel = tuple(w1b.shape[2:]) if w1b.ndim == 4 else None
        in_channels = w1b.shape[1]
        if kernel is None:
            kernel, in_channels = unfolded(self.name, b1.shape[1])
        up, down = khatri_rao_pair(a1, b1, a2, b2)
        return LowRankLayer.with_alpha(up, down, self._alpha(src), rank=w1b.shape[0], kernel=kernel,
                                       in_channels=in_channels)

    def _w2(self, src: TensorSource) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...] | None, int, int | None]:
        """A LoKr's W2 as an exact pair (u2 @ v2 = W2, c x d*kh*kw with the kernel in the columns), its kernel
        (None: linear, or folded into lokr_w2_b's columns), its in channels d, and its rank (lokr_w2_b's rows;
        None when W2 is stored whole)."""
        w2, w2a, w2b, t2 = (self._get(src, p) for p in ("lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"))
        if w2 is not None:
            u2, v2 = dense_pair(w2.reshape(w2.shape[0], -1))
            return u2, v2, (tuple(w2.shape[2:]) if w2.ndim == 4 else None), w2.shape[1], None
        if t2 is not None:  # Tucker: w2_a is (r x c), w2_b (r x d), t2 (r x r x kh x kw)
            return w2a.T, tucker_down(t2, w2b), tuple(t2.shape[2:]), w2b.shape[1], w2b.shape[0]
        return (w2a, w2b.reshape(w2b.shape[0], -1), (tuple(w2b.shape[2:]) if w2b.ndim == 4 else None), w2b.shape[1],
                w2b.shape[0])

    def _lokr(self, src: TensorSource) -> LowRankLayer:
        w1, w1a, w1b = (self._get(src, p) for p in ("lokr_w1", "lokr_w1_a", "lokr_w1_b"))
        rank = None
        if w1 is not None:
            u1, v1 = dense_pair(w1)
        else:
            u1, v1, rank = w1a, w1b, w1b.shape[0]
        u2, v2, kernel, d, w2_rank = self._w2(src)
        rank = w2_rank if w2_rank is not None else rank
        up, down = kron_pair(u1, v1, u2, v2)
        alpha = self._alpha(src) if rank is not None else None  # both sides full: LyCORIS uses scale 1
        in_channels = v1.shape[1] * d
        if kernel is None:
            kernel, in_channels = unfolded(self.name, in_channels)
        return LowRankLayer.with_alpha(up, down, alpha, rank=rank, kernel=kernel, in_channels=in_channels)

    def weight_shape(self, infos: Mapping[str, TensorInfo]) -> tuple[int, tuple[int, ...]]:
        s = {p: tuple(infos[k].shape) for p, k in self.parts.items()}
        if self.kind == "locon":
            kernel = s["lora_mid.weight"][2:] if "lora_mid.weight" in s else s["lora_down.weight"][2:]
            return s["lora_up.weight"][0], (s["lora_down.weight"][1], *kernel)
        if self.kind == "loha":
            if "hada_t1" in s:  # Tucker: w_a r x out, w_b r x in
                return s["hada_w1_a"][1], (s["hada_w1_b"][1], *s["hada_t1"][2:])
            return s["hada_w1_a"][0], self._unfolded(s["hada_w1_b"][1], s["hada_w1_b"][2:])
        a, b = (s["lokr_w1"] if "lokr_w1" in s else (s["lokr_w1_a"][0], s["lokr_w1_b"][1]))
        if "lokr_w2" in s:
            c, d, kernel = s["lokr_w2"][0], s["lokr_w2"][1], s["lokr_w2"][2:]
        elif "lokr_t2" in s:  # Tucker: w2_a r x c, w2_b r x d
            c, d, kernel = s["lokr_w2_a"][1], s["lokr_w2_b"][1], s["lokr_t2"][2:]
        else:
            c, d, kernel = s["lokr_w2_a"][0], s["lokr_w2_b"][1], s["lokr_w2_b"][2:]
        return a * c, self._unfolded(b * d, kernel)

    def _unfolded(self, in_channels: int, kernel: tuple[int, ...]) -> tuple[int, ...]:
        """(in channels, *kernel) of the weight: a kernel the factors fold in taken from the name (unfolded)."""
        if kernel:
            return (in_channels, *kernel)
        kernel, in_channels = unfolded(self.name, in_channels)
        return (in_channels, *(kernel or ()))

    def emit(self, new: NewFactors) -> dict[str, torch.Tensor]:
        return emit_pair(new, self.name + DOWN, self.name + UP, self.name + ALPHA)


# ----------------------------------------------------------------------------------------------------------------
# Shape checks (before any data is read)


def _shape_error(name: str, kind: str, shapes: dict[str, tuple[int, ...]], why: str) -> LoraStructureError:
    listed = ", ".join(f"{p} {list(s)}" for p, s in shapes.items())
    return LoraStructureError(f"{kind} module {name}: {why} ({listed}); the file is damaged - re-export it")


def _check_locon(name: str, s: dict[str, tuple[int, ...]], infos: Mapping[str, TensorInfo], parts) -> None:
    if "lora_mid.weight" not in s:
        check_pair(name, infos[parts["lora_down.weight"]], infos[parts["lora_up.weight"]],
                   infos.get(parts.get("alpha", "")))
        return
    d, u, m = s["lora_down.weight"], s["lora_up.weight"], s["lora_mid.weight"]
    if not (len(d) == len(u) == len(m) == 4 and tuple(d[2:]) == (1, 1) and tuple(u[2:]) == (1, 1)):
        raise _shape_error(name, "Tucker LoCon", s, "down and up must be 1x1 convs and mid a 4-D core")
    if m[0] != u[1] or m[1] != d[0]:
        raise _shape_error(name, "Tucker LoCon", s, "mid's ranks do not chain with up and down")


def _check_loha(name: str, s: dict[str, tuple[int, ...]]) -> None:
    w1a, w1b, w2a, w2b = (s[p] for p in LOHA[:4])
    if "hada_t1" in s:
        t1, t2 = s["hada_t1"], s["hada_t2"]
        ok = (len(w1a) == len(w1b) == len(w2a) == len(w2b) == 2 and len(t1) == len(t2) == 4
              and t1[0] == w1a[0] and t1[1] == w1b[0] and t2[0] == w2a[0] and t2[1] == w2b[0]
              and w1a[1] == w2a[1] and w1b[1] == w2b[1] and t1[2:] == t2[2:])
        if not ok:
            raise _shape_error(name, "Tucker LoHa", s, "factors do not chain (w_a: r x out, w_b: r x in, "
                               "t: r x r x kh x kw)")
        return
    ok = (len(w1a) == len(w2a) == 2 and len(w1b) in FACTOR_NDIMS and len(w2b) == len(w1b)
          and w1a[1] == w1b[0] and w2a[1] == w2b[0] and w1a[0] == w2a[0] and w1b[1:] == w2b[1:])
    if not ok:
        raise _shape_error(name, "LoHa", s, "factors do not chain (w_a: out x r, w_b: r x in)")


def _check_lokr(name: str, s: dict[str, tuple[int, ...]]) -> None:
    if "lokr_w1" in s:
        ok1 = len(s["lokr_w1"]) == 2
    else:
        a, b = s["lokr_w1_a"], s["lokr_w1_b"]
        ok1 = len(a) == len(b) == 2 and a[1] == b[0]
    if "lokr_w2" in s:
        ok2 = len(s["lokr_w2"]) in FACTOR_NDIMS
    elif "lokr_t2" in s:
        a, b, t = s["lokr_w2_a"], s["lokr_w2_b"], s["lokr_t2"]
        ok2 = len(a) == len(b) == 2 and len(t) == 4 and t[0] == a[0] and t[1] == b[0]
    else:
        a, b = s["lokr_w2_a"], s["lokr_w2_b"]
        ok2 = len(a) == 2 and len(b) in FACTOR_NDIMS and a[1] == b[0]
    if not (ok1 and ok2):
        raise _shape_error(name, "LoKr", s, "factors do not chain (w1: a x b or a x r, r x b; w2: c x d[ x kh x kw] "
                           "or c x r, r x d, or Tucker r x c, r x d, r x r x kh x kw)")


def _missing(name: str, kind: str, have: set[str], need: str) -> LoraStructureError:
    return LoraStructureError(f"{kind} module {name} is incomplete: it has {', '.join(sorted(have))} but needs "
                              f"{need}; the file is damaged or from an unknown LyCORIS version - re-export it")


def _complete(name: str, kind: str, have: set[str]) -> None:
    """Raise LoraStructureError for a half-recognised module."""
    if kind == "locon":
        if not {"lora_down.weight", "lora_up.weight"} <= have:
            raise _missing(name, "LoCon", have, "both lora_down.weight and lora_up.weight")
    elif kind == "loha":
        if not set(LOHA[:4]) <= have:
            raise _missing(name, "LoHa", have, "hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b")
        if ("hada_t1" in have) != ("hada_t2" in have):
            raise _missing(name, "LoHa", have, "both Tucker cores hada_t1 and hada_t2, or neither")
    elif kind == "lokr":
        if "lokr_t1" in have:
            raise LoraStructureError(f"LoKr module {name} has lokr_t1, a variant LyCORIS does not write; "
                                     "lora-resize cannot read it - please report the trainer that wrote it")
        for side in ("w1", "w2"):
            full, pair = f"lokr_{side}" in have, {f"lokr_{side}_a", f"lokr_{side}_b"} & have
            if full == bool(pair) or (pair and len(pair) != 2):
                raise _missing(name, "LoKr", have, f"either lokr_{side} or both lokr_{side}_a and lokr_{side}_b")
        if "lokr_t2" in have and "lokr_w2" in have:
            raise _missing(name, "LoKr", have, "lokr_w2_a and lokr_w2_b beside its Tucker core lokr_t2")


def _module(name: str, parts: dict[str, str], infos: Mapping[str, TensorInfo]) -> tuple[str, Module | None]:
    """(label, module) for a module to resize, or (kind, None) for one that passes through; raises
    LoraStructureError for a half-recognised or malformed one."""
    kinds = {KIND_OF[p] for p in parts if p in KIND_OF}
    if len(kinds) > 1:
        raise LoraStructureError(f"module {name} mixes parts of different kinds ({', '.join(sorted(parts))}); "
                                 "the file is damaged - re-export it")
    if not kinds:
        raise LoraStructureError(f"{', '.join(sorted(parts.values()))} has no LoRA/LyCORIS factors beside it; "
                                 "the file is incomplete - re-export it")
    kind = kinds.pop()
    if kind not in ("locon", "loha", "lokr"):
        return kind, None
    factors = {p: k for p, k in parts.items() if p not in SHARED}
    _complete(name, kind, set(factors))
    for k in factors.values():
        info = infos[k]
        if not info.dtype.is_floating_point:
            raise LoraStructureError(f"{k} must be floating point, got {info.dtype}")
        if min(info.shape, default=0) == 0:
            raise LoraStructureError(f"{k} is empty (shape {list(info.shape)}); the file is damaged")
    shapes = {p: tuple(infos[k].shape) for p, k in factors.items()}
    if kind != "locon" and any(len(s) in OTHER_CONV_NDIMS for s in shapes.values()):
        return "conv1d/conv3d", None
    if kind != "locon" and name.startswith("base_model.model."):
        raise LoraStructureError(f"module {name} is a PEFT {kind.upper()} adapter (its scale lives in "
                                 "adapter_config.json); PEFT LoHa/LoKr adapters are not supported yet")
    check_scalar(name, infos[parts["alpha"]] if "alpha" in parts else None)
    if kind == "locon":
        _check_locon(name, shapes, infos, parts)
        label = "Tucker LoCon" if "lora_mid.weight" in parts else "LoCon"
    elif kind == "loha":
        _check_loha(name, shapes)
        label = "Tucker LoHa" if "hada_t1" in parts else "LoHa"
    else:
        _check_lokr(name, shapes)
        label = "Tucker LoKr" if "lokr_t2" in parts else "LoKr"
    keys = list(factors.values()) + ([parts["alpha"]] if "alpha" in parts else [])
    return label, LycorisModule(name, keys, kind, {p: k for p, k in parts.items() if p != DORA}, label)


def _summary(names: list[str]) -> str:
    more = f", ... ({len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


class Lycoris(Format):
    name = "lycoris"
    title = "LyCORIS"
    example = "lora_unet_..._conv1.hada_w1_a"
    covers = ("kohya",)
    priority = 9
    markers = MARKERS

    def claims(self, infos: Mapping[str, TensorInfo]) -> int:
        # lora_down/lora_up count as for kohya, so a plain kohya file ties; any LyCORIS part makes it win
        return sum(1 for k in infos if split_key(k) is not None)

    def parse(self, infos: Mapping[str, TensorInfo], metadata: Mapping[str, str], path: Path | None = None
              ) -> Layout:
        names = sorted({sk[0] for sk in (split_key(k) for k in infos) if sk is not None})
        groups: dict[str, dict[str, str]] = {}
        owned: set[str] = set()
        for n in names:
            parts = {p: f"{n}.{p}" for p in (*DETECTORS, *SHARED) if f"{n}.{p}" in infos}
            for _, det, rest in PASS_KINDS:  # a kind's other parts belong to it only beside a detecting part
                if any(p in parts for p in det):
                    parts.update({p: f"{n}.{p}" for p in rest if f"{n}.{p}" in infos})
            groups[n] = {p: k for p, k in parts.items() if k not in owned}
            owned.update(groups[n].values())

        modules: list[Module] = []
        passthrough_modules: dict[str, list[str]] = {}
        dora: list[str] = []
        known: dict[str, str] = {}
        for n in names:
            label, module = _module(n, groups[n], infos)
            if module is None:
                passthrough_modules.setdefault(label, []).append(n)
                known.update({k: f"{label} module" for k in groups[n].values()})
                continue
            modules.append(module)
            if DORA in groups[n]:
                dora.append(n)
                known[groups[n][DORA]] = DORA_KIND

        notes = form_notes(modules, {})
        for kind, mods in passthrough_modules.items():
            why = ("lora-resize reads LoHa/LoKr only on linear and conv2d layers" if kind == "conv1d/conv3d" else
                   "it cannot be written as low-rank factors without the base model")
            notes.append(f"{len(mods)} {kind} module(s) copied, not resized ({why}): {_summary(mods)}")
        if dora:
            notes.append(f"{len(dora)} DoRA magnitude vector(s) (dora_scale) kept as trained; the loader "
                         f"renormalises with the resized update, so their effect is close to, not exactly, the "
                         f"original's: {_summary(dora)}")
        module_keys = {k for m in modules for k in m.keys}
        passthrough = [k for k in infos if k not in module_keys]
        return LycorisLayout(self.name, modules, passthrough, notes, known, copies_modules=bool(passthrough_modules))


# ----------------------------------------------------------------------------------------------------------------
# LoKr kept as LoKr: W1 as stored, W2 truncated exactly
#
# dW = scale * kron(W1, W2). For every X, ||kron(W1, W2 - X)||_F = ||W1||_F ||W2 - X||_F (the Frobenius norm of a
# Kronecker product is the product of the norms), so the best update of the form kron(W1, X) with rank(X) <= k is
# kron(W1, W2_k), W2_k the truncated SVD of W2 (Eckart-Young), and its squared error is
# scale^2 ||W1||_F^2 sum_{j>k} s_j(W2)^2. The layer the engine decomposes is therefore ||W1||_F * W2 (c x d*kh*kw):
# its singular values ||W1||_F s_j(W2) are what every rank policy and budget reads for the module (a rank is W2's
# rank; the energy of a step k -> k+1 is scale^2 ||W1||_F^2 s_{k+1}(W2)^2, its bytes c + d*kh*kw), and their squares
# sum to ||dW||_F^2 / scale^2, so retention and budgets measure the update as applied. (The singular values of dW
# itself are the products s_i(W1) s_j(W2); the plain route reads those.)


@dataclass(frozen=True)
class KronLayer(LowRankLayer):
    """A LoKr kept as LoKr, as the engine decomposes it: up @ down = ||W1||_F * W2 (c x d*kh*kw, `kernel` and
    `in_channels` W2's), with the module's scale and rank (`rank`: W2's). `w1`: lokr_w1 as stored, written again
    as it is (cast to the save precision); `w1_norm`: ||W1||_F in float64, what a loader's kron(W1, .) multiplies
    the written W2 factors' product by (ops.job.output_scale folds it out of the new factors)."""
    w1: torch.Tensor | None = None
    w1_norm: float = 1.0

    @property
    def kept(self) -> dict[str, torch.Tensor]:
        """The tensors written as read (NewFactors.kept): W1."""
        return {"lokr_w1": self.w1}


@dataclass
class KeptLokr(LycorisModule):
    """A LoKr module (lokr_w1 whole) written as LoKr: `lokr_w1` as stored, W2 truncated to rank k, written as
    LyCORIS builds a module of lora_dim k (lycoris-lora modules/lokr.py `LokrModule.__init__`): factored,
    `lokr_w2_a` (c x k) and `lokr_w2_b` (k x d*kh*kw, a conv's kernel folded in as LyCORIS stores it), while
    k < max(c, d) / 2, loaded with scale alpha / k (ComfyUI comfy/weight_adapter/lokr.py: dim = lokr_w2_b's rows);
    else whole, `lokr_w2` (c x d[ x kh x kw]) = W2_k, loaded with scale 1 (both halves whole: LyCORIS and ComfyUI
    ignore alpha) - the product of the rounded factors, rounded once more. A Tucker module (lokr_t2) is written
    without its core (lokr_w2_b holds the core contracted with it), which both loaders read as a non-Tucker conv.
    `w1_shape`: lokr_w1's shape; `w2_rows`, `w2_channels`, `w2_cols`: c, d and d*kh*kw."""
    w1_shape: tuple[int, ...] = ()
    w2_rows: int = 0
    w2_channels: int = 0
    w2_cols: int = 0

    def whole_at(self, k: int) -> bool:
        """Whether W2 is written whole at rank k (LyCORIS's rule: lora_dim >= max(c, d) / 2)."""
        return 2 * k >= max(self.w2_rows, self.w2_channels)

    def output_scale_at(self, k: int) -> float | None:
        return 1.0 if self.whole_at(k) else None

    def scale_and_rank(self, src: TensorSource) -> tuple[float, int]:
        """alpha / lokr_w2_b's rows (1 without alpha); W2 stored whole: scale 1 (both halves whole) and the rank
        W2 can have, min(c, d*kh*kw)."""
        if "lokr_w2" in self.parts:
            return 1.0, min(self.w2_rows, self.w2_cols)
        return super().scale_and_rank(src)

    def load(self, src: TensorSource) -> KronLayer:
        w1 = src.get(self.parts["lokr_w1"])
        u2, v2, kernel, d, _ = self._w2(src)
        scale, rank = self.scale_and_rank(src)
        g = float(torch.linalg.matrix_norm(w1.to(torch.float64)))
        if kernel is None:
            kernel, d = unfolded(self.name, v2.shape[1])
        return KronLayer(u2 * g, v2, rank, self._alpha(src), scale if g > 0 else 0.0, kernel, d, w1=w1, w1_norm=g)

    def stored_factors(self, src: TensorSource, dtype: torch.dtype) -> tuple[NewFactors | None, str]:
        """W2's factors as stored (lokr_w2_a, lokr_w2_b as a matrix) with the stored alpha, in `dtype`, for a copy
        bit for bit at the module's own rank (ops.job.start_layer, as formats.convert.exact_copy gives plain
        pairs; the caller checks that `dtype` holds every stored value); (None, why not) for a W2 stored whole or
        with a Tucker core, or a scale alpha / rank the save precision does not hold. W1 reaches `emit` from the
        loaded layer (KronLayer.kept)."""
        if "lokr_w2_a" not in self.parts or "lokr_t2" in self.parts:
            return None, "its W2 is not stored as a lokr_w2_a/_b pair"
        up, down = src.get(self.parts["lokr_w2_a"]), src.get(self.parts["lokr_w2_b"])
        alpha, rank = self._alpha(src), down.shape[0]
        alpha_t = torch.tensor(alpha if alpha is not None else float(rank), dtype=torch.float32).to(dtype)
        if float(alpha_t) / rank != self.scale_and_rank(src)[0]:
            return None, "its scale alpha / rank is not one the save precision holds"
        kernel, d = self.kernel_of(down)
        return NewFactors(up.to(dtype), down.reshape(rank, -1).to(dtype), alpha_t, kernel, d), ""

    def kernel_of(self, w2b: torch.Tensor) -> tuple[tuple[int, ...] | None, int]:
        """(kernel, in channels) of W2 from a stored lokr_w2_b (r x d[ x kh x kw], or with the kernel folded)."""
        if w2b.ndim == 4:
            return tuple(w2b.shape[2:]), w2b.shape[1]
        return unfolded(self.name, w2b.shape[1])

    def emit(self, new: NewFactors) -> dict[str, torch.Tensor]:
        n, k = self.name, new.down.shape[0]
        w1 = new.kept.get("lokr_w1")
        out = {f"{n}.lokr_w1": (torch.empty(self.w1_shape, dtype=new.up.dtype, device=new.up.device) if w1 is None
                                else w1.to(new.up.dtype))}
        if self.whole_at(k):
            w2 = (new.up.to(torch.float64) @ new.down.to(torch.float64)).to(new.up.dtype)
            out[f"{n}.lokr_w2"] = w2.reshape(w2.shape[0], new.in_channels, *new.kernel) if new.kernel else w2
        else:
            out[f"{n}.lokr_w2_a"], out[f"{n}.lokr_w2_b"] = new.up, new.down
        out[n + ALPHA] = new.alpha
        return out


def lokr_smaller(w1_shape: tuple[int, ...], c: int, d: int, cols: int) -> bool:
    """Whether a LoKr with W1 (a x b) and W2 (c x d, d*kh*kw = `cols` columns) is smaller kept as LoKr than as
    plain factors at the same fidelity, for every rank k of W2: kept, it writes kron(W1, W2_k) in a*b + k*(c + cols)
    elements (c*cols once W2 is written whole, KeptLokr.whole_at); plain factors that hold the same update need
    its rank, rank(W1) * k (rank(W1) taken as min(a, b), what W1's shape allows), at most min(a*c, b*cols), at
    a*c + b*cols elements per rank. (Plain factors of a lower rank hold less of the update: whatever rank a
    criterion picks on the plain route, its update is no closer to kron(W1, W2_k) than that one.)"""
    a, b = w1_shape
    full, per = min(a * c, b * cols), a * c + b * cols
    for k in range(1, min(c, cols) + 1):
        kept = a * b + (c * cols if 2 * k >= max(c, d) else k * (c + cols))
        if kept > min(min(a, b) * k, full) * per:
            return False
    return True


def _kept(m: Module, infos: Mapping[str, TensorInfo]) -> tuple[KeptLokr | None, str]:
    """`m` as a KeptLokr, or (None, why it is written as plain factors) for a LoKr that stays plain ("" for any
    other module)."""
    if not isinstance(m, LycorisModule) or m.kind != "lokr":
        return None, ""
    if "lokr_w1" not in m.parts:  # LyCORIS builds w1_a/_b and w2_a/_b with one lora_dim: W2 alone cannot shrink
        return None, "lokr_w1 factored (LyCORIS loads lokr_w1_a/_b only beside a lokr_w2_a/_b of the same rank)"
    s = {p: tuple(infos[k].shape) for p, k in m.parts.items()}
    if "lokr_w2" in s:
        c, d, kernel = s["lokr_w2"][0], s["lokr_w2"][1], s["lokr_w2"][2:]
    elif "lokr_t2" in s:
        c, d, kernel = s["lokr_w2_a"][1], s["lokr_w2_b"][1], s["lokr_t2"][2:]
    else:
        c, d, kernel = s["lokr_w2_a"][0], s["lokr_w2_b"][1], s["lokr_w2_b"][2:]
    cols = d * math.prod(kernel)
    if not kernel:
        d = unfolded(m.name, d)[1]
    if not lokr_smaller(s["lokr_w1"], c, d, cols):
        return None, "not smaller as LoKr than as plain factors holding the same update"
    return KeptLokr(m.name, m.keys, m.kind, m.parts, m.label, s["lokr_w1"], c, d, cols), ""


PLAIN_NOTE = "LyCORIS modules written as plain LoRA factors (lora_down/lora_up/alpha)"
LOHA_WHY = ("a LoHa's update (A1 B1) * (A2 B2) has no truncation that keeps its form exactly - its best rank-k "
            "approximation is not a Hadamard product of two low-rank halves - so it is written as that best "
            "approximation, plain factors")


def form_notes(modules: list[Module], plain_why: Mapping[str, str]) -> list[str]:
    """What the LyCORIS modules are written as: the plain ones counted by kind (why, for LoHa and for a LoKr that
    stays plain: `plain_why`, module name -> reason), and the LoKr modules kept as LoKr."""
    lyco = [m for m in modules if isinstance(m, LycorisModule)]
    plain = [m for m in lyco if not isinstance(m, KeptLokr) and m.label != "LoCon"]
    kept = [m.name for m in lyco if isinstance(m, KeptLokr)]
    notes = []
    if plain:
        counts: dict[str, int] = {}
        for m in plain:
            counts[m.label] = counts.get(m.label, 0) + 1
        listed = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        whys = ([f"LoHa: {LOHA_WHY}"] if any(m.kind == "loha" for m in plain) else [])
        reasons = sorted({plain_why[m.name] for m in plain if m.name in plain_why})
        whys += [f"LoKr with {r}" for r in reasons]
        lokr = [m for m in plain if m.kind == "lokr" and m.name not in plain_why]
        if lokr:
            whys.append("LoKr: plain factors asked for - --as-lora, a conversion or a merge")
        notes.append(f"{PLAIN_NOTE}: {listed}" + (f" ({'; '.join(whys)})" if whys else ""))
    if kept:
        notes.append(f"{len(kept)} LoKr module(s) kept as LoKr, smaller than plain factors holding the same update: "
                     "lokr_w1 as stored, W2 truncated exactly (the best kron(W1, X) of rank(X) <= k is kron(W1, W2_k); "
                     "their rank is W2's, chosen on ||W1||_F times W2's singular values); --as-lora writes plain "
                     f"factors: {_summary(kept)}")
    return notes


@dataclass
class LycorisLayout(Layout):
    """A LyCORIS file's layout: with a LoKr kept as LoKr, the output is still a LyCORIS network (its input's
    network fields hold), else as Layout.written_network."""

    def written_network(self) -> str | None:
        if any(isinstance(m, KeptLokr) for m in self.modules):
            return None
        return super().written_network()


def kept_lokr(layout: Layout, infos: Mapping[str, TensorInfo]) -> Layout:
    """`layout` with each LoKr module that is smaller kept as LoKr (lokr_smaller, with lokr_w1 whole) written as
    LoKr (KeptLokr), the notes saying which and why the others are plain factors; any other layout unchanged."""
    if not isinstance(layout, LycorisLayout):
        return layout
    modules, why = [], {}
    for m in layout.modules:
        kept, reason = _kept(m, infos)
        modules.append(kept or m)
        if reason:
            why[m.name] = reason
    if not any(isinstance(m, KeptLokr) for m in modules) and not why:
        return layout
    notes = form_notes(modules, why) + [n for n in layout.notes if not n.startswith(PLAIN_NOTE)]
    return replace(layout, modules=modules, notes=notes)
