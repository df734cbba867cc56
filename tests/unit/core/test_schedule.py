"""The schedule: layers go through the engine in windows, decomposed in same-shape batches. Whatever the window size
(one layer, the CPU's, a GPU's), the results are the same; a damaged layer is named whatever window it is in."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from lora_resize import analyze, resize
from lora_resize.core import schedule
from lora_resize.testing import loras
from lora_resize.cli import main
from lora_resize.core.schedule import GPU_WINDOW_BYTES, WINDOW_LAYERS, windows

from helpers import Spec, load_st, make_state_dict, write_lora


@dataclass
class _U:
    name: str
    nbytes: int


def test_windows_bound_layers_and_bytes():
    units = [_U(f"u{i}", 10) for i in range(25)]
    ws = list(windows(units, 45))
    assert [len(w) for w in ws] == [4, 4, 4, 4, 4, 4, 1]
    assert [u for w in ws for u in w] == units  # consecutive, in order, each once
    big = [_U("a", 5), _U("huge", 1000), _U("b", 5), _U("c", 5)]
    assert [[u.name for u in w] for w in windows(big, 45)] == [["a"], ["huge"], ["b", "c"]]
    many = [_U(f"s{i}", 0) for i in range(WINDOW_LAYERS * 2 + 3)]
    assert [len(w) for w in windows(many, 1 << 30)] == [WINDOW_LAYERS, WINDOW_LAYERS, 3]


@pytest.fixture()
def per_layer(monkeypatch):
    """Every layer alone: the engine one layer at a time, as before batching."""
    def use(kind: str):
        size = {"one": (1, 1), "gpu": (GPU_WINDOW_BYTES, GPU_WINDOW_BYTES)}[kind]
        monkeypatch.setattr(schedule, "window_bytes", lambda device: size)
    return use


@pytest.fixture(scope="module")
def small_rank_sd15(tmp_path_factory):
    """The SD1.5 LoCon layout at rank 8 (350 layers, ~36 distinct shapes): batches of many sizes."""
    path = tmp_path_factory.mktemp("sched") / "sd15_r8.safetensors"
    loras.write_sd15_locon(path, rank=8, alpha=4, conv_rank=4, conv_alpha=2)
    return path


def test_gpu_sized_windows_give_the_one_layer_results(tmp_path, per_layer, small_rank_sd15):
    results = {}
    for kind in ("one", "gpu"):
        per_layer(kind)
        out = tmp_path / f"{kind}.safetensors"
        r = resize(small_rank_sd15, out, method="sv_fro", param=0.8, rank=8, device="cpu")
        results[kind] = (r, load_st(out)[0])
    (r1, t1), (rg, tg) = results["one"], results["gpu"]
    assert [x.name for x in r1.layers] == [x.name for x in rg.layers]
    assert [x.new_rank for x in r1.layers] == [x.new_rank for x in rg.layers]
    assert len({x.new_rank for x in rg.layers}) > 1  # the dynamic method did choose per layer
    assert t1.keys() == tg.keys()
    for k in t1:
        assert torch.allclose(t1[k].float(), tg[k].float(), rtol=1e-3, atol=1e-5), k  # the file is fp16


@pytest.mark.slow
def test_gpu_sized_windows_give_the_one_layer_analysis(per_layer, small_rank_sd15):
    got = {}
    for kind in ("one", "gpu"):
        per_layer(kind)
        a = analyze(small_rank_sd15, device="cpu")
        got[kind] = {x.name: x.S for x in a.layers}
    assert got["one"].keys() == got["gpu"].keys()
    for name, s in got["one"].items():
        assert torch.allclose(torch.as_tensor(s), torch.as_tensor(got["gpu"][name]), rtol=1e-10, atol=0), name


@pytest.mark.parametrize("kind", ["one", "gpu"])
def test_damaged_layer_in_a_batch_is_named(tmp_path, capsys, per_layer, kind):
    per_layer(kind)
    specs = [Spec(f"lora_unet_block_{i:02d}_to_q", out=48, inp=32, rank=4, alpha=2.0) for i in range(10)]
    sd = make_state_dict(specs, seed=3)
    sd["lora_unet_block_05_to_q.lora_up.weight"][3, 1] = float("nan")
    sd["lora_unet_block_08_to_q.lora_down.weight"][0, 2] = float("inf")
    src = write_lora(tmp_path / "in.safetensors", sd)
    dst = tmp_path / "out.safetensors"
    assert main(["resize", str(src), "-o", str(dst), "--rank", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora_unet_block_05_to_q" in err[0] and "NaN" in err[0], err
    assert not dst.exists()


def test_large_layers_go_alone_on_the_cpu():
    units = [_U("s1", 10), _U("s2", 10), _U("big", 100), _U("s3", 10), _U("big2", 100), _U("big3", 100)]
    got = [[u.name for u in w] for w in windows(units, 1000, alone_above=50)]
    assert got == [["s1", "s2"], ["big"], ["s3"], ["big2"], ["big3"]]


def test_out_of_device_memory_retries_in_halves_then_names_the_layer(tmp_path, capsys, monkeypatch, per_layer,
                                                                     small_rank_sd15):
    per_layer("gpu")  # one large window, as on a GPU
    real = schedule.decompose_layers
    sizes = []

    def tight(named, device, vectors=True):  # a device that holds at most 40 layers at once
        sizes.append(len(named))
        if len(named) > 40:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(named, device, vectors)

    monkeypatch.setattr(schedule, "decompose_layers", tight)
    tight_out, ref_out = tmp_path / "tight.safetensors", tmp_path / "ref.safetensors"
    r = resize(small_rank_sd15, tight_out, method="sv_fro", param=0.8, rank=8, device="cpu")
    assert max(sizes) > 40  # windows were too large at first
    assert sum(n for n in sizes if n <= 40) == len(r.layers)  # every layer computed once, after the splits
    monkeypatch.setattr(schedule, "decompose_layers", real)
    resize(small_rank_sd15, ref_out, method="sv_fro", param=0.8, rank=8, device="cpu")
    assert tight_out.read_bytes() == ref_out.read_bytes()

    def none_fits(named, device, vectors=True):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(schedule, "decompose_layers", none_fits)
    dst = tmp_path / "none.safetensors"
    assert main(["resize", str(small_rank_sd15), "-o", str(dst), "--rank", "4", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit in the memory of cpu" in err[0] and "lora_" in err[0], err
    assert not dst.exists()
