"""Base models for `--base`: a single-file checkpoint (`.safetensors`: SD/SDXL's original layout, DiT checkpoints
with `model.diffusion_model.`, `diffusion_model.` or bare keys) or a diffusers model folder (`unet/`,
`text_encoder/`, `transformer/`, ... each with its `.safetensors` files, sharded or not), read one weight at a
time: the headers up front, a weight's data only when it is asked for, so a 12B base is never loaded whole.

Which files of a diffusers folder are read follows diffusers' own rule (`variant_compatible_siblings` in
diffusers/pipelines/pipeline_loading_utils.py, `_add_variant` in diffusers/utils/hub_utils.py): in each component,
the weight files without a variant (`diffusion_pytorch_model.safetensors`, `model-00001-of-00002.safetensors`), or
with `variant` those of that variant (`diffusion_pytorch_model.fp16.safetensors`, `model.fp16-00001-of-00002...`,
the legacy `model-00001-of-00002.fp16.safetensors`) where the component has them; a sharded set is the files its
index (`*.safetensors.index.json`, `*.safetensors.index.fp16.json`, legacy `*.safetensors.fp16.index.json`) lists.

Weights come back as float64 matrices. A quantized weight is read with its scale or refused, never read unscaled:
fp8 weights with `<module>.weight_scale` (ComfyUI's comfy/quant_ops.py TensorCoreFP8Layout, NVIDIA ModelOpt FP8,
compressed-tensors), `<module>.scale_weight` (ComfyUI's older scaled fp8, comfy/ops.py) or
`<module>.weight_scale_inv` (DeepSeek-V3's and transformers' fine-grained FP8: 128 x 128 blocks, multiplied in
despite the name); each scale per tensor, per output channel or per 2-D block. Any other scale-like key beside a
weight (`weight_scale_2`: ModelOpt NVFP4's second level; `weight_global_scale`, `weight_zero_point`: compressed-
tensors; `scale_inv`, ...), a scale of another shape, or an integer-stored weight is refused in one line.
Activation scales (`input_scale`, `scale_input`, ...) do not change the weight and are ignored."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from ..core.truncate import FP8
from ..errors import InputFileError
from .reader import SafetensorsReader, TensorInfo

# per-tensor, per-channel or per-block scales a weight is multiplied by, keyed by the module (without .weight)
WEIGHT_SCALES = ("weight_scale", "scale_weight", "weight_scale_inv")
ACTIVATION_SCALES = frozenset({"input_scale", "scale_input", "output_scale", "scale_output", "input_global_scale",
                               "k_scale", "v_scale", "q_scale", "input_scale_2"})
COMFY_QUANT = "comfy_quant"  # ComfyUI's per-layer quantization record: JSON bytes, {"format": "float8_e4m3fn"}
BLOCK = 128  # the block side of DeepSeek-V3's and transformers' fine-grained FP8 (weight_block_size [128, 128])
WEIGHT_PREFIXES = ("diffusion_pytorch_model", "model")  # diffusers' and transformers' weight file names
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")
_INDEX = re.compile(r"^(diffusion_pytorch_model|model)\.safetensors\.(?:index\.(?:([^.]+)\.)?json|([^.]+)\.index\.json)$")


def weight_file_variant(name: str) -> tuple[str | None, str | None]:
    """(prefix, variant) of a diffusers/transformers weight file name: ('diffusion_pytorch_model', None),
    ('model', 'fp16') for `model.fp16-00001-of-00002.safetensors` or `model-00001-of-00002.fp16.safetensors`;
    (None, None) for another name (a single-file checkpoint)."""
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
    head, _, rest = stem.partition(".")
    head = _SHARD.sub("", head)
    if head not in WEIGHT_PREFIXES:
        return None, None
    return head, _SHARD.sub("", rest) or None


def index_variant(name: str) -> tuple[str, str | None] | None:
    """(prefix, variant) of a sharded set's index file name, None for another name."""
    m = _INDEX.match(name)
    return (m.group(1), m.group(2) or m.group(3)) if m else None


def folder_files(root: Path, variant: str | None) -> list[Path]:
    """The .safetensors files of diffusers folder `root` to read (diffusers' rule, module docstring). Raises
    InputFileError when a component holds only other variants' weights, `variant` is nowhere, or an index lists a
    missing shard."""
    by_dir: dict[Path, list[Path]] = {}
    for f in sorted(root.rglob("*.safetensors")):
        by_dir.setdefault(f.parent, []).append(f)
    chosen: list[Path] = []
    found_variant = False
    for folder, files in by_dir.items():
        weights = {f: weight_file_variant(f.name) for f in files}
        present = {v for _, v in weights.values()}
        want = variant if variant in present else None
        found_variant |= variant is not None and variant in present
        picked = [f for f, (prefix, v) in weights.items() if prefix is None or v == want]
        if not any(weights[f][0] for f in picked) and any(v is not None for _, v in weights.values()):
            others = sorted(v for v in present if v is not None)
            raise InputFileError(f"--base: {folder} holds only variant weight files ({', '.join(others)}); choose "
                                 f"one with --base-variant {others[0]}")
        for index in folder.iterdir():
            iv = index_variant(index.name)
            if iv is None or iv[1] != want:
                continue
            listed = _index_files(index)
            missing = sorted(n for n in listed if not (folder / n).is_file())
            if missing:
                raise InputFileError(f"--base: {index} lists {missing[0]}, which is missing; download the whole "
                                     "sharded set")
            picked = [f for f in picked if weights[f][0] != iv[0] or f.name in listed]
        chosen += picked
    if variant is not None and not found_variant:
        raise InputFileError(f"--base-variant {variant}: no weight file of that variant under {root} (e.g. "
                             f"diffusion_pytorch_model.{variant}.safetensors); drop --base-variant to read the "
                             "files without one")
    return chosen


def _index_files(index: Path) -> set[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {str(v) for v in weight_map.values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise InputFileError(f"--base: {index} is not a valid sharded-weights index (no weight_map); re-download "
                             "it") from None


class Checkpoint:
    """A base model's weights by key: a single file's keys as they are, a diffusers folder's as
    `<component>.<key>` (`unet.down_blocks.0...weight`; a folder holding one model's files directly: bare keys),
    from the files of `variant` (None: those without one; module docstring). `folder` says which. Raises
    InputFileError for a path that does not exist, one that is neither, a folder without safetensors, or a variant
    it does not hold."""

    def __init__(self, path: str | os.PathLike, variant: str | None = None):
        self.path = Path(path)
        self.folder = self.path.is_dir()
        self._readers: list[SafetensorsReader] = []
        self._where: dict[str, tuple[SafetensorsReader, str]] = {}
        self._siblings: dict[str, list[str]] = {}  # module -> the suffixes of its keys (weight, weight_scale...)
        if not self.path.exists():
            raise InputFileError(f"--base {self.path} not found; give an existing .safetensors checkpoint or "
                                 "diffusers model folder")
        if self.folder:
            files = folder_files(self.path, variant)
            if not files:
                raise InputFileError(f"--base {self.path} holds no .safetensors files; give a checkpoint file or a "
                                     "diffusers model folder")
        elif self.path.suffix.lower() == ".safetensors" and self.path.is_file():
            files = [self.path]
        else:
            raise InputFileError(f"--base {self.path} is not a .safetensors checkpoint or a diffusers model folder")
        try:
            for f in files:
                r = SafetensorsReader(f)
                self._readers.append(r)
                rel = f.parent.relative_to(self.path).parts if self.folder else ()
                prefix = ".".join(rel) + "." if rel else ""
                for key in r.infos():
                    if prefix + key in self._where:  # two files of one model never hold one weight
                        raise InputFileError(f"--base {self.path}: {prefix + key} is in both "
                                             f"{self._where[prefix + key][0].path.name} and {f.name}; give the "
                                             "checkpoint file itself (or a folder holding one model)")
                    self._where[prefix + key] = (r, key)
            for key in self._where:
                stem, _, suffix = key.rpartition(".")
                self._siblings.setdefault(stem, []).append(suffix)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for r in self._readers:
            r.close()
        self._readers = []

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def info(self, key: str) -> TensorInfo:
        r, k = self._where[key]
        return r.infos()[k]

    def tensor(self, key: str) -> torch.Tensor:
        """Tensor `key` as stored (its shape and dtype, no scale applied)."""
        return self._get(key)

    def _get(self, key: str) -> torch.Tensor:
        r, k = self._where[key]
        return r.get(k)

    def matrix(self, key: str) -> torch.Tensor:
        """Weight `key` as a float64 matrix (out x in * prod(kernel)), a quantized one multiplied by its scale
        (module docstring). Raises InputFileError for a weight that cannot be read exactly: stored as integers, a
        scale-like key whose meaning is not known, a scale of a shape that is not per tensor, channel or block."""
        w = self._get(key)
        if not w.is_floating_point():
            raise InputFileError(f"--base: {key} is stored as {w.dtype} (a quantized or packed format), which is "
                                 "not read; use a bf16/fp16/fp8 base")
        stem = key[: -len(".weight")] if key.endswith(".weight") else None
        scales = self._scale_keys(key, stem, w.dtype)
        w = w.to(torch.float64)
        if scales:
            w = w * self._expanded_scale(key, scales[0], w.shape)
        return w.reshape(w.shape[0], math.prod(w.shape[1:])) if w.ndim > 1 else w.reshape(1, -1)

    def _scale_keys(self, key: str, stem: str | None, dtype: torch.dtype) -> list[str]:
        """The scale key weight `key` is multiplied by ([] for none); InputFileError for scale-like keys beside it
        that are not known, more than one scale, or a scale beside a float weight that is not all ones."""
        if stem is None:
            return []
        suffixes = [s for s in self._siblings.get(stem, []) if s != "weight" and s not in ACTIVATION_SCALES]
        known = [s for s in suffixes if s in WEIGHT_SCALES]
        unknown = [s for s in suffixes if s not in WEIGHT_SCALES and ("scale" in s.lower() or s == COMFY_QUANT
                                                                      or "zero_point" in s)]
        if COMFY_QUANT in unknown:
            fmt = self._comfy_format(f"{stem}.{COMFY_QUANT}")
            if fmt.startswith("float8"):
                unknown.remove(COMFY_QUANT)
            else:
                raise InputFileError(f"--base: {key} is quantized as {fmt!r} (its {stem}.{COMFY_QUANT}), which is "
                                     "not read; use a bf16/fp16/fp8 base")
        if unknown or len(known) > 1:
            names = ", ".join(f"{stem}.{s}" for s in unknown + known[1:])
            raise InputFileError(f"--base: {key} has {names} beside it, a scale whose meaning is not known here; "
                                 "reading the weight without it would be wrong - use a bf16/fp16 base (or one in "
                                 "ComfyUI's or ModelOpt's fp8 format)")
        scales = [f"{stem}.{s}" for s in known]
        if scales and dtype not in FP8:
            t = self._get(scales[0])
            if not bool((t.to(torch.float64) == 1).all()):
                raise InputFileError(f"--base: {key} is {dtype} but has the scale {scales[0]} (not 1); whether it "
                                     "applies is not known - use a base without it")
            return []
        return scales

    def _comfy_format(self, key: str) -> str:
        try:
            record = json.loads(bytes(self._get(key).reshape(-1).to(torch.uint8).tolist()).decode("utf-8"))
            return str(record.get("format", "?"))
        except (ValueError, UnicodeDecodeError, AttributeError):
            return "?"

    def _expanded_scale(self, key: str, scale_key: str, shape: torch.Size) -> torch.Tensor:
        """Scale `scale_key` broadcast to a weight of `shape`: one number; one per output channel ([out] or
        [out, 1]); or 2-D blocks ([ceil(out/b0), ceil(in/b1)]: BLOCK when it fits, else out/rows x in/cols)."""
        s = self._get(scale_key).to(torch.float64)
        out = shape[0]
        inp = math.prod(shape[1:]) if len(shape) > 1 else 1
        if s.numel() == 1:
            return s.reshape(())
        if s.numel() == out and s.squeeze().ndim == 1:
            return s.reshape(out, *([1] * (len(shape) - 1)))
        if s.ndim == 2 and len(shape) == 2:
            rows, cols = s.shape
            b0 = BLOCK if -(-out // BLOCK) == rows else (out // rows if out % rows == 0 else 0)
            b1 = BLOCK if -(-inp // BLOCK) == cols else (inp // cols if inp % cols == 0 else 0)
            if b0 and b1:
                return s.repeat_interleave(b0, 0)[:out].repeat_interleave(b1, 1)[:, :inp]
        raise InputFileError(f"--base: {scale_key} has shape {list(s.shape)}, which is neither one scale, one per "
                             f"output channel, nor 2-D blocks of {key} ({list(shape)}); use a bf16/fp16 base")
