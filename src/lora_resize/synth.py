"""Synthetic LoRA files with trained-like spectra, for the demo, tests and benchmarks (no download needed).

Shapes follow the SD1.5 architecture as kohya's LoCon adapts it (FORMATS.md §2): UNet Transformer2DModel linears and
1x1 proj_in/proj_out, ResnetBlock2D conv1/conv2 (3x3), time_emb_proj, conv_shortcut (1x1), Downsample2D/Upsample2D
convs, and the CLIP-L text encoder's attention and MLP: 350 modules. Each layer's singular values decay as
s_i ~ ((i + 3) / 3) ** -p with p = 1.3 jittered by +-20%, on random orthonormal singular vectors."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .writer import write_safetensors


@dataclass(frozen=True)
class ModuleShape:
    """A layer to adapt: kohya name, output features, input channels, square kernel size (1 for linear)."""
    name: str
    out: int
    inp: int
    kernel: int = 1
    conv: bool = False


def _transformer(prefix: str, d: int, ctx: int = 768) -> list[ModuleShape]:
    p = f"lora_unet_{prefix}_"
    tb = p + "transformer_blocks_0_"
    return [ModuleShape(p + "proj_in", d, d, 1, True),
            *[ModuleShape(tb + f"attn1_{n}", d, d) for n in ("to_q", "to_k", "to_v", "to_out_0")],
            ModuleShape(tb + "attn2_to_q", d, d), ModuleShape(tb + "attn2_to_k", d, ctx),
            ModuleShape(tb + "attn2_to_v", d, ctx), ModuleShape(tb + "attn2_to_out_0", d, d),
            ModuleShape(tb + "ff_net_0_proj", 8 * d, d), ModuleShape(tb + "ff_net_2", d, 4 * d),
            ModuleShape(p + "proj_out", d, d, 1, True)]


def _resnet(prefix: str, cin: int, cout: int, temb: int = 1280) -> list[ModuleShape]:
    p = f"lora_unet_{prefix}_"
    mods = [ModuleShape(p + "conv1", cout, cin, 3, True), ModuleShape(p + "time_emb_proj", cout, temb),
            ModuleShape(p + "conv2", cout, cout, 3, True)]
    if cin != cout:
        mods.append(ModuleShape(p + "conv_shortcut", cout, cin, 1, True))
    return mods


def sd15_locon_shapes() -> list[ModuleShape]:
    """The 350 layers an SD1.5 LoCon adapts (254 linear, 46 conv 1x1, 50 conv 3x3)."""
    ch = [320, 640, 1280, 1280]
    mods: list[ModuleShape] = []
    cin = ch[0]
    for b, c in enumerate(ch):
        for j in range(2):
            mods += _resnet(f"down_blocks_{b}_resnets_{j}", cin if j == 0 else c, c)
            if b < 3:
                mods += _transformer(f"down_blocks_{b}_attentions_{j}", c)
        if b < 3:
            mods.append(ModuleShape(f"lora_unet_down_blocks_{b}_downsamplers_0_conv", c, c, 3, True))
        cin = c
    mods += _resnet("mid_block_resnets_0", 1280, 1280) + _transformer("mid_block_attentions_0", 1280)
    mods += _resnet("mid_block_resnets_1", 1280, 1280)
    rev = ch[::-1]
    prev = rev[0]
    for b, c in enumerate(rev):
        skip_in = rev[min(b + 1, 3)]
        for j in range(3):
            res_in = prev if j == 0 else c
            skip = skip_in if j == 2 else c
            mods += _resnet(f"up_blocks_{b}_resnets_{j}", res_in + skip, c)
            if b > 0:
                mods += _transformer(f"up_blocks_{b}_attentions_{j}", c)
        if b < 3:
            mods.append(ModuleShape(f"lora_unet_up_blocks_{b}_upsamplers_0_conv", c, c, 3, True))
        prev = c
    for i in range(12):
        p = f"lora_te_text_model_encoder_layers_{i}_"
        mods += [ModuleShape(p + f"self_attn_{n}_proj", 768, 768) for n in ("q", "k", "v", "out")]
        mods += [ModuleShape(p + "mlp_fc1", 3072, 768), ModuleShape(p + "mlp_fc2", 768, 3072)]
    return mods


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g))
    return q


def synth_factors(out: int, n: int, rank: int, g: torch.Generator, decay: float = 1.3, jitter: float = 0.2,
                  top: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(up out x rank, down rank x n, S) in float32 whose product has the trained-like spectrum S."""
    p = min(out, n, rank)
    expo = decay * (1 + jitter * (2 * torch.rand((), generator=g).item() - 1))
    s0 = top if top is not None else 0.5 + 1.5 * torch.rand((), generator=g).item()
    S = s0 * ((torch.arange(p, dtype=torch.float32) + 3) / 3) ** -expo
    U, V = _orthonormal(out, p, g), _orthonormal(n, p, g)
    mix = _orthonormal(rank, rank, g)[:p]  # spread the p directions over all `rank` factor columns
    up = (U * S.sqrt()) @ mix
    down = mix.T @ (S.sqrt()[:, None] * V.T)
    return up, down, S


def synth_locon(shapes: list[ModuleShape], rank: int, alpha: float, conv_rank: int, conv_alpha: float,
                dtype: torch.dtype = torch.float16, seed: int = 0, progress=None) -> dict[str, torch.Tensor]:
    """A kohya LoCon state dict: 3x3 convs get conv_rank/conv_alpha (skipped when conv_rank is 0), the rest rank/alpha.
    `progress(iterable, total)` may wrap the loop over layers."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for m in (progress(shapes, len(shapes)) if progress else shapes):
        r, a = (conv_rank, conv_alpha) if m.kernel > 1 else (rank, alpha)
        if r <= 0:
            continue
        up, down, _ = synth_factors(m.out, m.inp * m.kernel * m.kernel, r, g)
        if m.conv:
            up, down = up.reshape(m.out, r, 1, 1), down.reshape(r, m.inp, m.kernel, m.kernel)
        sd[m.name + ".lora_up.weight"] = up.to(dtype)
        sd[m.name + ".lora_down.weight"] = down.to(dtype)
        sd[m.name + ".alpha"] = torch.tensor(float(a)).to(dtype)
    return sd


def write_sd15_locon(path: str | Path, rank: int = 32, alpha: float = 16, conv_rank: int = 16,
                     conv_alpha: float = 8, dtype: torch.dtype = torch.float16, seed: int = 0, progress=None) -> Path:
    """Write an SD1.5-shaped LoCon with sd-scripts-style metadata; returns the path."""
    path = Path(path)
    sd = synth_locon(sd15_locon_shapes(), rank, alpha, conv_rank, conv_alpha, dtype, seed, progress)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(float(alpha)),
            "ss_network_args": f'{{"conv_dim": "{conv_rank}", "conv_alpha": "{conv_alpha}"}}',
            "ss_base_model_version": "sd_v1", "ss_training_comment": "synthetic SD1.5 LoCon made by lora-resize"}
    write_safetensors(path, sd, meta)
    return path
