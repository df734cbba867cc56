"""XLabs Flux LoRAs (double_blocks.N.processor.qkv_lora1.down.weight, ..., no alpha): every pair of both block
kinds is read and resized exactly under its own keys (before: a double-blocks-only file was 'no LoRA layers
found', and a file with both kinds had its double-block pairs copied unresized)."""
from __future__ import annotations

import pytest
import torch

import lora_resize

from helpers import best_rank_k, load_st, rel_err, write_lora

D = 16  # hidden width


def xlabs_sd(double: int, single: int, rank: int = 6, prefix: str = "", seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {}
    for i in range(double):
        for s in ("1", "2"):
            shapes[f"{prefix}double_blocks.{i}.processor.qkv_lora{s}"] = (3 * D, D)
            shapes[f"{prefix}double_blocks.{i}.processor.proj_lora{s}"] = (D, D)
    for i in range(single):
        shapes[f"{prefix}single_blocks.{i}.processor.qkv_lora"] = (3 * D, D)
        shapes[f"{prefix}single_blocks.{i}.processor.proj_lora"] = (D, D)
    sd = {}
    for name, (o, i) in shapes.items():
        sd[name + ".down.weight"] = torch.randn(rank, i, generator=g) / i ** 0.5
        sd[name + ".up.weight"] = torch.randn(o, rank, generator=g) * 0.1
    return sd


def names(sd):
    return sorted(k[: -len(".down.weight")] for k in sd if k.endswith(".down.weight"))


@pytest.mark.parametrize("double, single, prefix", [(2, 2, ""), (2, 0, ""), (0, 2, ""), (1, 1, "diffusion_model.")])
def test_every_pair_is_resized_exactly_under_its_own_keys(tmp_path, double, single, prefix):
    sd = xlabs_sd(double, single, prefix=prefix)
    src = write_lora(tmp_path / "xlabs.safetensors", sd)
    res = lora_resize.resize(src, tmp_path / "o.safetensors", rank=3)
    assert res.format == "xlabs" and len(res.layers) == len(names(sd)) and not res.passthrough
    out, _ = load_st(tmp_path / "o.safetensors")
    assert set(out) == set(sd)  # no alpha added: XLabs loaders apply scale 1
    for n in names(sd):
        assert out[n + ".down.weight"].shape[0] == 3
        got = out[n + ".up.weight"].double() @ out[n + ".down.weight"].double()
        want = best_rank_k(sd[n + ".up.weight"].double() @ sd[n + ".down.weight"].double(), 3)
        assert rel_err(got, want) < 1e-6, n
