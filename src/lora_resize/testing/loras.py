"""LoRA files for the synthetic architectures (archs.py): tensors in the kohya, PEFT or diffusers key family with
trained-like spectra (synth.py), and the demo's SD1.5 LoCon (350 modules: sd-scripts networks/lora.py's
UNet and CLIP-L targets with conv layers, `LoRANetwork.UNET_TARGET_REPLACE_MODULE_CONV2D_3X3`)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..io.writer import write_safetensors
from .archs import ModuleShape, sd15
from .synth import synth_factors

# How trainers and UIs key a module `name` (sd-scripts networks/lora.py, PEFT tuners/lora, diffusers
# loaders/lora_conversion_utils.py): (down/up key of <base>, base from the name).
KOHYA_FORM = (".lora_down.weight", ".lora_up.weight")
AB_FORM = (".lora_A.weight", ".lora_B.weight")
STYLES = {
    "kohya": (KOHYA_FORM, lambda n: n),                                      # names already in kohya's style
    "peft": (AB_FORM, lambda n: "base_model.model." + n),
    "diffusers": (AB_FORM, lambda n: n),
    "musubi": (KOHYA_FORM, lambda n: "lora_unet_" + n.replace(".", "_")),    # kohya / musubi-tuner, native paths
    "musubi__": (KOHYA_FORM, lambda n: "lora_unet__" + n.replace(".", "_")),  # some Wan trainers
    "comfy": (KOHYA_FORM, lambda n: "diffusion_model." + n),                 # ComfyUI-native
    "ai_toolkit": (AB_FORM, lambda n: "diffusion_model." + n),               # ai-toolkit, diffusion-pipe
    "diffsynth": ((".lora_A.default.weight", ".lora_B.default.weight"), lambda n: n),
    "peft_dump": ((".lora_A.default.weight", ".lora_B.default.weight"), lambda n: "base_model.model." + n),
    "onetrainer": (KOHYA_FORM, lambda n: "lora_transformer_" + n.replace(".", "_")),  # diffusers paths
    "simpletuner": (KOHYA_FORM, lambda n: "lycoris_" + n.replace(".", "_")),          # diffusers paths
}


def lora_keys(name: str, style: str) -> tuple[str, str, str]:
    """(down, up, alpha) keys of module `name` in a layout (STYLES)."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    (down, up), base = STYLES[style]
    b = base(name)
    return b + down, b + up, b + ".alpha"


def shaped_factors(m: ModuleShape, rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) for layer `m` with a trained-like spectrum, in its tensor shapes (conv: down (r, in, *kernel),
    up (out, r, 1, ...))."""
    up, down, _ = synth_factors(m.out, m.flat_in, rank, g)
    if m.conv:
        up, down = up.reshape(m.out, rank, *([1] * len(m.kernel_dims))), down.reshape(rank, m.inp, *m.kernel_dims)
    return up, down


def lora_state_dict(shapes: Sequence[ModuleShape], style: str = "kohya", rank: int = 8, alpha: float | None = None,
                    dtype: torch.dtype = torch.float32, seed: int = 0, conv_rank: int | None = None
                    ) -> dict[str, torch.Tensor]:
    """A LoRA's tensors for `shapes` in a key family, each layer with a trained-like spectrum. `alpha` None writes
    no alpha keys (PEFT and diffusers files never have them; scale 1 or the config's)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for m in shapes:
        r = conv_rank if (conv_rank and m.spatial) else rank
        up, down = shaped_factors(m, r, g)
        dk, uk, ak = lora_keys(m.name, style)
        sd[dk], sd[uk] = down.to(dtype).contiguous(), up.to(dtype).contiguous()
        if alpha is not None:
            sd[ak] = torch.tensor(float(alpha)).to(dtype)
    return sd


def synth_locon(shapes: list[ModuleShape], rank: int, alpha: float, conv_rank: int, conv_alpha: float,
                dtype: torch.dtype = torch.float16, seed: int = 0, progress=None) -> dict[str, torch.Tensor]:
    """A kohya LoCon state dict: 3x3 convs get conv_rank/conv_alpha (skipped when conv_rank is 0), the rest rank/alpha.
    `progress(iterable, total)` may wrap the loop over layers."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for m in (progress(shapes, len(shapes)) if progress else shapes):
        r, a = (conv_rank, conv_alpha) if m.spatial else (rank, alpha)
        if r <= 0:
            continue
        up, down = shaped_factors(m, r, g)
        sd[m.name + ".lora_up.weight"] = up.to(dtype)
        sd[m.name + ".lora_down.weight"] = down.to(dtype)
        sd[m.name + ".alpha"] = torch.tensor(float(a)).to(dtype)
    return sd


def write_sd15_locon(path: str | Path, rank: int = 32, alpha: float = 16, conv_rank: int = 16,
                     conv_alpha: float = 8, dtype: torch.dtype = torch.float16, seed: int = 0, progress=None) -> Path:
    """Write an SD1.5-shaped LoCon with sd-scripts-style metadata; returns the path."""
    path = Path(path)
    sd = synth_locon(sd15(), rank, alpha, conv_rank, conv_alpha, dtype, seed, progress)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(float(alpha)),
            "ss_network_args": f'{{"conv_dim": "{conv_rank}", "conv_alpha": "{conv_alpha}"}}',
            "ss_base_model_version": "sd_v1", "ss_training_comment": "synthetic SD1.5 LoCon made by lora-resize"}
    write_safetensors(path, sd, meta)
    return path
