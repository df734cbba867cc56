"""`lora_resize.resized`: a resize in memory hands over exactly what `resize` writes (the preview and the ComfyUI
nodes apply it without a file), for every key family, with and without a rank setting, and writes nothing."""
from __future__ import annotations

import pytest
import torch

import lora_resize
from helpers import family_files, load_st

SETTINGS = [dict(rank=4), dict(method="sv_fro", param=0.8, rank=6), dict(rank=64), dict(rank=4, precision="bf16"),
            dict(target_fro=0.9)]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    return family_files(tmp_path_factory.mktemp("families"))


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_resized_is_what_resize_writes(families, tmp_path, setting):
    for family, src in families.items():
        before = sorted(p.name for p in src.parent.iterdir())
        r = lora_resize.resized(src, **setting)
        assert sorted(p.name for p in src.parent.iterdir()) == before, family  # nothing written beside the input
        dst = tmp_path / family / "out.safetensors"
        dst.parent.mkdir()
        written = lora_resize.resize(src, dst, **setting)
        tensors, meta = load_st(dst)
        assert r.metadata == meta, family
        assert set(r.tensors) == set(tensors), family
        for k, t in tensors.items():
            got = r.tensors[k]
            assert got.dtype == t.dtype and got.shape == t.shape, (family, k)
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), (family, k)
        assert r.result.output_bytes == dst.stat().st_size == written.output_bytes, family
        assert r.result.dst is None
        assert [x.new_rank for x in r.result.layers] == [x.new_rank for x in written.layers], family


def test_resized_refuses_what_resize_refuses(tmp_path):
    with pytest.raises(lora_resize.InputFileError):
        lora_resize.resized(tmp_path / "missing.safetensors", rank=4)
    with pytest.raises(lora_resize.OptionsError):
        lora_resize.resized(tmp_path / "missing.safetensors", rank=-1)
