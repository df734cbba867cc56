"""Base models for `--base`: a single-file checkpoint (`.safetensors`: SD/SDXL's original layout, DiT checkpoints
with `model.diffusion_model.`, `diffusion_model.` or bare keys) or a diffusers model folder (`unet/`,
`text_encoder/`, `transformer/`, ... each with its `.safetensors` files, sharded or not), read one weight at a
time: the headers up front, a weight's data only when it is asked for, so a 12B base is never loaded whole.

Weights come back as float64 matrices; fp8 weights are dequantized with their per-tensor scale when the file has
one (`<module>.scale_weight`, ComfyUI's scaled fp8; `<module>.weight_scale`)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..errors import InputFileError
from .reader import SafetensorsReader, TensorInfo

SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # per-tensor fp8 scales, keyed by the module (without .weight)


class Checkpoint:
    """A base model's weights by key: a single file's keys as they are, a diffusers folder's as
    `<component>.<key>` (`unet.down_blocks.0...weight`; a folder holding one model's files directly: bare keys).
    `folder` says which. Raises InputFileError for a path that is neither, or a folder without safetensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.folder = self.path.is_dir()
        self._readers: list[SafetensorsReader] = []
        self._where: dict[str, tuple[SafetensorsReader, str]] = {}
        if self.folder:
            files = sorted(self.path.rglob("*.safetensors"))
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
                    self._where.setdefault(prefix + key, (r, key))
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

    def matrix(self, key: str) -> torch.Tensor:
        """Weight `key` as a float64 matrix (out x in * prod(kernel)), fp8 dequantized with its per-tensor scale.
        Raises InputFileError for a scale that is not one number."""
        r, k = self._where[key]
        w = r.get(k)
        if w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            stem = key[: -len(".weight")] if key.endswith(".weight") else key
            scale = next((s for s in (stem + x for x in SCALE_SUFFIXES) if s in self._where), None)
            w = w.to(torch.float64)
            if scale is not None:
                sr, sk = self._where[scale]
                t = sr.get(sk)
                if t.numel() != 1:
                    raise InputFileError(f"--base: {scale} scales {key} in blocks ({list(t.shape)}); only per-tensor "
                                         "fp8 scales are read - use a bf16/fp16 base")
                w = w * float(t.reshape(()))
        w = w.to(torch.float64)
        return w.reshape(w.shape[0], math.prod(w.shape[1:])) if w.ndim > 1 else w.reshape(1, -1)
