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


@pytest.mark.parametrize("rank_rule", ["exact", "kohya"])
def test_a_resize_at_a_layers_own_rank_copies_it_bit_for_bit(tmp_path, rank_rule):
    """A layer whose planned rank keeps it whole is written as stored, not re-rounded from its SVD: the full-rank
    setting of a preview gives the original LoRA's image. Layers the rank truncates are computed as before."""
    from helpers import CONV1_A, LIN_A, LIN_NOALPHA, Spec, make_state_dict, write_lora
    specs = [Spec(LIN_A, out=96, inp=64, rank=16, alpha=8.0), Spec(LIN_NOALPHA, out=48, inp=72, rank=16, alpha=8.0),
             Spec(CONV1_A, out=40, inp=40, rank=16, kernel=1, alpha=8.0)]  # one scale: one alpha fits all layers
    src = write_lora(tmp_path / "in.safetensors", make_state_dict(specs, seed=3))
    original, _ = load_st(src)
    r = lora_resize.resized(src, rank=16, rank_rule=rank_rule)
    kept = [x.name for x in r.result.layers]
    assert len(kept) == 3
    for name in kept:
        for k in [k for k in original if k.startswith(name + ".") and "lora_" in k]:
            assert torch.equal(r.tensors[k], original[k]), k
    assert not any("converted" in n for n in r.result.notes)
    cast = lora_resize.resized(src, rank=16, rank_rule=rank_rule, precision="bf16")  # not copied: another dtype
    assert not any("converted" in n for n in cast.result.notes)  # ... and not called a conversion
    assert all(x.conversion is None for x in cast.result.layers)
