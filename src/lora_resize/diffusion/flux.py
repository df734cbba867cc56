"""A Flux.1 transformer checkpoint in BFL's layout (flux1-dev.safetensors: `double_blocks.0.img_attn.qkv.weight`,
bare or under `model.diffusion_model.` / `diffusion_model.`) read into diffusers' FluxTransformer2DModel through
the project's own tables (models.dit FLUX1: renames, fused weights split into their diffusers parts by rows,
swapped halves; FLUX1_NORMS for the q/k norm scales), at any width: diffusers' own converter
(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers) splits linear1 at Flux.1's width 3072
whatever the config says."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputFileError
from ..formats.weights import DIT_FILE_PREFIXES
from ..io.checkpoint import Checkpoint
from ..models.dit import FLUX1, FLUX1_NORMS


def diffusers_state(ck: Checkpoint, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under diffusers' FluxTransformer2DModel names, cast to `dtype`. Raises
    InputFileError for a key that is not Flux.1's, or a weight stored as integers (a quantized format)."""
    out: dict[str, torch.Tensor] = {}
    for key in ck.keys():
        bare = next(key[len(p):] for p in DIT_FILE_PREFIXES if key.startswith(p))
        t = ck.tensor(key)
        if not t.is_floating_point():
            raise InputFileError(f"--base: {key} is stored as {t.dtype} (a quantized format), which is not read; "
                                 "use a bf16/fp16/fp32 Flux.1 checkpoint")
        t = t.to(dtype)
        module, _, leaf = bare.rpartition(".")
        weight = key[: len(key) - len(leaf)] + "weight"
        shape = ck.info(weight).shape if weight in ck else t.shape
        try:
            if FLUX1_NORMS.native_of(module) is not None and leaf == "scale":  # `weight` in diffusers
                out[f"{FLUX1_NORMS.to_diffusers(module, t.shape[0], 0)[0][0]}.weight"] = t
                continue
            parts = FLUX1.to_diffusers(module, shape[0], shape[1] if len(shape) > 1 else 0)
        except (KeyError, ValueError):
            raise InputFileError(f"--base: {key} is not a Flux.1 transformer weight (BFL's layout); give a Flux.1 "
                                 "checkpoint, or a diffusers folder") from None
        for path, (a, b), swap in parts:
            part = t[a:b]
            if swap:
                part = torch.cat([part[(b - a) // 2:], part[:(b - a) // 2]])
            out[f"{path}.{leaf}"] = part.contiguous()
    return out


def load_transformer(diffusers, path: Path, config: str, dtype: torch.dtype):
    """FluxTransformer2DModel with `config`'s transformer config (a diffusers folder of Flux.1) and the weights of
    BFL checkpoint `path`, built on the meta device and assigned the checkpoint's tensors (no random init).
    Raises InputFileError when the checkpoint's weights are not exactly the model's."""
    cls = diffusers.FluxTransformer2DModel
    cfg = cls.load_config(config, subfolder="transformer", local_files_only=True)
    with Checkpoint(path) as ck:
        state = diffusers_state(ck, dtype)
    with torch.device("meta"):
        model = cls.from_config(cfg)
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    bad = [k for k in want if k in state and want[k].shape != state[k].shape]
    if missing or unexpected or bad:
        what = (f"{len(missing)} weight(s) of the model missing (e.g. {missing[0]})" if missing else
                f"{len(unexpected)} weight(s) the model does not have (e.g. {unexpected[0]})" if unexpected else
                f"{len(bad)} weight(s) of another shape (e.g. {bad[0]}: {list(state[bad[0]].shape)}, the model's "
                f"{list(want[bad[0]].shape)})")
        raise InputFileError(f"--base {path} does not fit the Flux.1 transformer of --base-config {config}: {what}; "
                             "give the config folder of this checkpoint's model")
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise InputFileError(f"--base {path}: the Flux.1 transformer has state the checkpoint does not set "
                             f"({left[0]}); give a diffusers folder instead")
    return model.eval()
