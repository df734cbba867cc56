"""diffusers as the judge of a LoKr kept as LoKr: ai-toolkit's Z-Image LoKr layout (`diffusion_model.<diffusers path>
.lokr_w1 / .lokr_w2_a / .lokr_w2_b / .alpha`), resized by us, goes through ZImagePipeline's own `lora_state_dict`
(diffusers' `_convert_non_diffusers_lokr_to_diffusers`, which bakes alpha / rank into lokr_w1) and PEFT's LoKr
layers into a tiny ZImageTransformer2DModel; the fused weight change of every module is scale * kron(W1, W2_k),
W2_k the float64 truncated SVD of the input's W2."""
from __future__ import annotations

import pytest
import torch

import diffusers
import lora_resize

from helpers import best_rank_k, load_st, rel_err, write_lora

pytestmark = pytest.mark.thirdparty

MODULES = ["layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.attention.to_out.0"]


def tiny_z_image():
    torch.manual_seed(0)
    return diffusers.ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=12, axes_dims=[8, 8, 16], axes_lens=[64, 32, 32])


@pytest.mark.parametrize("rank", [2, 3], ids=["cut", "whole"])
def test_diffusers_loads_our_z_image_lokr_with_the_exact_w2_truncation(tmp_path, rank):
    g = torch.Generator().manual_seed(5)
    sd, ref = {}, {}
    for m in MODULES:  # 64 x 64 layers as LoKr: W1 8 x 8 whole, W2 8 x 8 at rank 3 (LyCORIS's factor 8)
        w1, w2a, w2b = torch.randn(8, 8, generator=g), torch.randn(8, 3, generator=g), torch.randn(3, 8, generator=g)
        p = "diffusion_model." + m
        sd.update({f"{p}.lokr_w1": w1, f"{p}.lokr_w2_a": w2a, f"{p}.lokr_w2_b": w2b, f"{p}.alpha": torch.tensor(2.0)})
        ref[m] = (w1.double(), w2a.double() @ w2b.double(), 2.0 / 3)
    src = write_lora(tmp_path / "in.safetensors", sd, {})
    res = lora_resize.resize(src, tmp_path / "out.safetensors", rank=rank, precision="float")
    out, _ = load_st(tmp_path / "out.safetensors")
    assert all(f"diffusion_model.{m}.lokr_w2_b" in out for m in MODULES) and not any("lora_" in k for k in out)
    assert {r.new_rank for r in res.layers} == {rank}
    state = diffusers.ZImagePipeline.lora_state_dict(str(tmp_path / "out.safetensors"))
    model = tiny_z_image()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.load_lora_adapter(state, prefix="transformer")
    model.fuse_lora()
    after = {n.replace("base_layer.", ""): p.detach() for n, p in model.named_parameters() if "lokr_" not in n}
    for m in MODULES:
        w1, w2, scale = ref[m]
        change = after[m + ".weight"].double() - before[m + ".weight"].double()
        assert rel_err(change, scale * torch.kron(w1, best_rank_k(w2, rank))) < 1e-5, m
