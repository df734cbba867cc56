"""io.checkpoint: a quantized base weight is read with its scale (per tensor, per output channel, per 2-D block) in
the key forms fp8 checkpoints use in the wild, or refused in one line - never read unscaled; and a diffusers folder's
weight files are chosen as diffusers chooses them (no variant by default, a variant on request, a sharded set by
its index). The expected values are computed here from the stored fp8 numbers and scales."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_resize.errors import InputFileError
from lora_resize.io.checkpoint import Checkpoint, folder_files

E4M3 = torch.float8_e4m3fn


def _fp8(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    return (torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 50).to(E4M3)


def _read(tmp_path: Path, tensors: dict[str, torch.Tensor], key: str = "blk.lin.weight") -> torch.Tensor:
    save_file(tensors, tmp_path / "base.safetensors")
    with Checkpoint(tmp_path / "base.safetensors") as ck:
        return ck.matrix(key)


@pytest.mark.parametrize("name", ["weight_scale", "scale_weight"])
def test_per_tensor_scale(tmp_path, name):
    q = _fp8(12, 8)
    got = _read(tmp_path, {"blk.lin.weight": q, f"blk.lin.{name}": torch.tensor(0.25), "blk.lin.input_scale":
                           torch.tensor(3.0)})
    assert torch.equal(got, q.double() * 0.25)


@pytest.mark.parametrize("shape", [(12,), (12, 1)])
def test_per_channel_scale(tmp_path, shape):
    # compressed-tensors' channel strategy, FBGEMM fp8: one scale per output row
    q = _fp8(12, 8)
    s = torch.linspace(0.1, 2.0, 12)
    got = _read(tmp_path, {"blk.lin.weight": q, "blk.lin.weight_scale": s.reshape(shape)})
    assert torch.equal(got, q.double() * s.double()[:, None])


def test_block_scales_of_128_with_ragged_edges(tmp_path):
    # DeepSeek-V3 / transformers' fine-grained FP8: weight_scale_inv of shape [ceil(out/128), ceil(in/128)]
    q = _fp8(300, 200)
    s = torch.tensor([[0.5, 2.0], [1.5, 0.25], [3.0, 0.75]])
    got = _read(tmp_path, {"blk.lin.weight": q, "blk.lin.weight_scale_inv": s})
    want = q.double().clone()
    for i in range(3):
        for j in range(2):
            want[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= float(s[i, j])
    assert torch.equal(got, want)


def test_block_scales_of_other_even_blocks(tmp_path):
    q = _fp8(48, 16)
    s = torch.rand(3, 2, generator=torch.Generator().manual_seed(1)) + 0.5
    got = _read(tmp_path, {"blk.lin.weight": q, "blk.lin.weight_scale": s})
    assert torch.equal(got, q.double() * s.double().repeat_interleave(16, 0).repeat_interleave(8, 1))


def test_comfy_quant_record_with_fp8(tmp_path):
    q = _fp8(12, 8)
    record = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    got = _read(tmp_path, {"blk.lin.weight": q, "blk.lin.weight_scale": torch.tensor(0.5),
                           "blk.lin.comfy_quant": record})
    assert torch.equal(got, q.double() * 0.5)


@pytest.mark.parametrize("extra, why", [
    ({"blk.lin.weight_scale": torch.tensor(0.5), "blk.lin.weight_scale_2": torch.tensor(0.1)}, "weight_scale_2"),
    ({"blk.lin.scale_inv": torch.tensor(0.5)}, "blk.lin.scale_inv"),
    ({"blk.lin.weight_global_scale": torch.tensor(4.0)}, "weight_global_scale"),
    ({"blk.lin.weight_scale": torch.tensor(0.5), "blk.lin.weight_zero_point": torch.tensor(3)}, "weight_zero_point"),
    ({"blk.lin.weight_scale": torch.tensor(0.5), "blk.lin.scale_weight": torch.tensor(0.5)}, "scale"),
    ({"blk.lin.weight_scale": torch.rand(5, 7)}, "shape [5, 7]"),
], ids=["nvfp4-second-level", "scale_inv", "global-scale", "zero-point", "two-scales", "odd-shape"])
def test_unknown_scales_are_refused_in_one_line(tmp_path, extra, why):
    with pytest.raises(InputFileError) as e:
        _read(tmp_path, {"blk.lin.weight": _fp8(12, 8), **extra})
    assert why in str(e.value) and "\n" not in str(e.value)


def test_integer_weights_and_scaled_float_weights_are_refused(tmp_path):
    with pytest.raises(InputFileError, match="stored as torch.int8"):
        _read(tmp_path, {"blk.lin.weight": torch.ones(4, 4, dtype=torch.int8), "blk.lin.weight_scale":
                         torch.tensor(0.5)})
    with pytest.raises(InputFileError, match="stored as torch.uint8"):  # packed fp4 (ModelOpt NVFP4)
        _read(tmp_path, {"blk.lin.weight": torch.ones(4, 2, dtype=torch.uint8)})
    with pytest.raises(InputFileError, match="not 1"):
        _read(tmp_path, {"blk.lin.weight": torch.ones(4, 4, dtype=torch.bfloat16), "blk.lin.weight_scale":
                         torch.tensor(2.0)})
    w = torch.randn(4, 4).bfloat16()  # a dummy scale of 1 beside a bf16 weight (ComfyUI's mixed files): no change
    assert torch.equal(_read(tmp_path, {"blk.lin.weight": w, "blk.lin.scale_weight": torch.tensor(1.0)}), w.double())


# -- diffusers folders -------------------------------------------------------------------------------------------

def _folder(root: Path, files: dict[str, dict[str, torch.Tensor]], index: dict[str, list[str]] | None = None):
    comp = root / "transformer"
    comp.mkdir(parents=True, exist_ok=True)
    for name, tensors in files.items():
        save_file(tensors, comp / name)
    for name, shards in (index or {}).items():
        weight_map = {k: shard for shard in shards for k in files[shard]}
        (comp / name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def _names(root: Path, variant=None) -> list[str]:
    return sorted(p.name for p in folder_files(root, variant))


def test_folder_variants_follow_diffusers(tmp_path):
    t = {"a.weight": torch.zeros(2, 2)}
    root = _folder(tmp_path / "m", {"diffusion_pytorch_model.safetensors": t,
                                    "diffusion_pytorch_model.fp16.safetensors": t,
                                    "diffusion_pytorch_model.non_ema.safetensors": t})
    assert _names(root) == ["diffusion_pytorch_model.safetensors"]
    assert _names(root, "fp16") == ["diffusion_pytorch_model.fp16.safetensors"]
    assert _names(root, "non_ema") == ["diffusion_pytorch_model.non_ema.safetensors"]
    with pytest.raises(InputFileError, match="--base-variant bf16: no weight file of that variant"):
        folder_files(root, "bf16")


def test_sharded_sets_by_their_index(tmp_path):
    a, b = {"a.weight": torch.zeros(2, 2)}, {"b.weight": torch.zeros(2, 2)}
    root = _folder(tmp_path / "m", {"diffusion_pytorch_model-00001-of-00002.safetensors": a,
                                    "diffusion_pytorch_model-00002-of-00002.safetensors": b,
                                    "diffusion_pytorch_model-00001-of-00002.fp16.safetensors": a,  # legacy form
                                    "diffusion_pytorch_model-00002-of-00002.fp16.safetensors": b,
                                    "diffusion_pytorch_model.fp16-00001-of-00001.safetensors": {**a, **b},  # new form
                                    "diffusion_pytorch_model-00001-of-00003.safetensors": a},  # not in the index
                   {"diffusion_pytorch_model.safetensors.index.json":
                    ["diffusion_pytorch_model-00001-of-00002.safetensors",
                     "diffusion_pytorch_model-00002-of-00002.safetensors"],
                    "diffusion_pytorch_model.safetensors.index.fp16.json":
                    ["diffusion_pytorch_model.fp16-00001-of-00001.safetensors"]})
    assert _names(root) == ["diffusion_pytorch_model-00001-of-00002.safetensors",
                            "diffusion_pytorch_model-00002-of-00002.safetensors"]
    assert _names(root, "fp16") == ["diffusion_pytorch_model.fp16-00001-of-00001.safetensors"]
    (root / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InputFileError, match="lists diffusion_pytorch_model-00002-of-00002.safetensors, which is "
                                             "missing"):
        folder_files(root, None)


def test_a_component_with_only_variant_files_is_refused_naming_the_flag(tmp_path):
    t = {"a.weight": torch.zeros(2, 2)}
    root = _folder(tmp_path / "m", {"diffusion_pytorch_model.fp16.safetensors": t,
                                    "diffusion_pytorch_model.non_ema.safetensors": t})
    with pytest.raises(InputFileError, match="only variant weight files \\(fp16, non_ema\\); choose one with "
                                             "--base-variant fp16"):
        folder_files(root, None)
    # a variant another component lacks: that component's files without one (diffusers' fallback)
    (root / "text_encoder").mkdir()
    save_file(t, root / "text_encoder" / "model.safetensors")
    assert sorted(p.relative_to(root).as_posix() for p in folder_files(root, "fp16")) == [
        "text_encoder/model.safetensors", "transformer/diffusion_pytorch_model.fp16.safetensors"]


def test_a_folder_of_two_checkpoints_of_one_model_is_refused(tmp_path):
    # flux1-dev-fp8.safetensors sorts before flux1-dev.safetensors: neither may win silently
    folder = tmp_path / "models"
    folder.mkdir()
    save_file({"blk.lin.weight": torch.ones(2, 2)}, folder / "flux1-dev.safetensors")
    save_file({"blk.lin.weight": _fp8(2, 2)}, folder / "flux1-dev-fp8.safetensors")
    with pytest.raises(InputFileError, match="blk.lin.weight is in both flux1-dev-fp8.safetensors and "
                                             "flux1-dev.safetensors; give the checkpoint file itself"):
        Checkpoint(folder)
