"""The written file: loadable by the safetensors library, laid out byte for byte as safetensors.torch.save lays
it out, and carrying sd-scripts' sshs_model_hash / sshs_legacy_hash, recomputed here from the written file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

import lora_resize
from lora_resize.io.files import TMP_PREFIX

from helpers import (BASE_METADATA, Spec, best_rank_k, dense_dw, load_st, make_state_dict, raw_header, rel_err,
                      sha256, write_lora)

LEGACY_LO, LEGACY_HI = 0x100000, 0x110000


@pytest.fixture(scope="module")
def big_sd() -> dict[str, torch.Tensor]:
    """Six 512x512 layers of rank 64: the float output is ~1.5 MB, past the legacy hash's 1.0-1.06 MB window."""
    specs = [Spec(f"lora_unet_block_{i}_attn1_to_{c}", out=512, inp=512, rank=64, alpha=32.0)
             for i, c in enumerate("qkvoab")]
    return make_state_dict(specs, seed=99, passthrough=True)


@pytest.fixture
def big_lora(tmp_path, big_sd) -> Path:
    return write_lora(tmp_path / "big.safetensors", big_sd, dict(BASE_METADATA))


def _check_hashes(path: Path, expect_legacy_window: bool):
    buf = path.read_bytes()
    n = int.from_bytes(buf[:8], "little")
    tensors, meta = load_st(path)
    # 1) the model hash covers the tensor data section of the written file itself
    assert meta["sshs_model_hash"] == sha256(buf[8 + n:])
    # 2) independently: the safetensors library's own serialisation with only the ss_* metadata
    ss_meta = {k: v for k, v in meta.items() if k.startswith("ss_")}
    ref = st_save(tensors, ss_meta)
    rn = int.from_bytes(ref[:8], "little")
    assert meta["sshs_model_hash"] == sha256(ref[8 + rn:])
    if expect_legacy_window:
        assert len(ref) >= LEGACY_HI, "test input too small for a meaningful legacy hash"
    assert meta["sshs_legacy_hash"] == sha256(ref[LEGACY_LO:LEGACY_HI])[:8]
    assert len(meta["sshs_legacy_hash"]) == 8 and len(meta["sshs_model_hash"]) == 64


@pytest.mark.parametrize("precision", ["float", "fp16"])
def test_hashes_of_large_output(tmp_path, big_lora, precision):
    dst = tmp_path / "out.safetensors"
    lora_resize.resize(big_lora, dst, rank=64 if precision == "float" else 60, precision=precision)
    if precision == "float":
        assert dst.stat().st_size > LEGACY_HI
    _check_hashes(dst, expect_legacy_window=precision == "float")


def test_hashes_of_small_output(tmp_path, standard_lora):
    dst = tmp_path / "out.safetensors"
    lora_resize.resize(standard_lora, dst, rank=4)
    assert dst.stat().st_size < LEGACY_LO
    _check_hashes(dst, expect_legacy_window=False)


@pytest.mark.parametrize("comment", ["théière \u2014 \"quoted\"\n\ttab \\ slash / \x01 \U0001F600", ""])
def test_hashes_dynamic_and_unusual_comment(tmp_path, big_sd, comment):
    # the legacy window's position depends on the ss_* header's exact length: escapes and UTF-8 must match the library
    src = write_lora(tmp_path / "in.safetensors", big_sd, dict(BASE_METADATA, ss_training_comment=comment))
    dst = tmp_path / "out.safetensors"
    lora_resize.resize(src, dst, rank=64, method="sv_fro", param=1.0, precision="float")
    _check_hashes(dst, expect_legacy_window=True)


def test_stale_input_hashes_are_replaced(tmp_path, standard_sd):
    meta = dict(BASE_METADATA, sshs_model_hash="0" * 64, sshs_legacy_hash="deadbeef")
    src = write_lora(tmp_path / "in.safetensors", standard_sd, meta)
    dst = tmp_path / "out.safetensors"
    lora_resize.resize(src, dst, rank=3)
    _, out_meta = load_st(dst)
    assert out_meta["sshs_model_hash"] != "0" * 64
    _check_hashes(dst, expect_legacy_window=False)


def _ordered_header(buf: bytes):
    n = int.from_bytes(buf[:8], "little")
    pairs = json.loads(buf[8:8 + n].decode("utf-8"), object_pairs_hook=list)
    return n, pairs


@pytest.mark.parametrize("precision", ["float", "fp16", "bf16"])
def test_layout_equals_safetensors_library(tmp_path, standard_lora, precision):
    dst = tmp_path / "out.safetensors"
    lora_resize.resize(standard_lora, dst, rank=5, precision=precision)
    ours = dst.read_bytes()
    tensors, meta = load_st(dst)  # loadable by the library
    ref = st_save(tensors, meta)
    n, pairs = _ordered_header(ours)
    rn, rpairs = _ordered_header(ref)
    assert n == rn, "header length (including padding) differs from the safetensors library's"
    assert n % 8 == 0
    # data section: identical bytes
    assert ours[8 + n:] == ref[8 + rn:]
    # header: same entries in the same order; __metadata__ compared as a mapping (its key order is free)
    assert [k for k, _ in pairs] == [k for k, _ in rpairs]
    assert pairs[0][0] == "__metadata__"
    for (k, v), (_, rv) in zip(pairs, rpairs):
        if k == "__metadata__":
            assert dict(v) == dict(rv)
        else:
            assert dict(v) == dict(rv), k
    # the same header with the metadata keys sorted: byte-identical apart from metadata order
    assert ours[:8] == ref[:8]
    assert sorted(ours[8:8 + n]) == sorted(ref[8:8 + rn])


def test_large_layout_equals_safetensors_library(tmp_path, big_lora):
    dst = tmp_path / "out.safetensors"
    lora_resize.resize(big_lora, dst, rank=32)
    ours = dst.read_bytes()
    tensors, meta = load_st(dst)
    ref = st_save(tensors, meta)
    n, _ = raw_header(ours)
    rn, _ = raw_header(ref)
    assert n == rn and ours[8 + n:] == ref[8 + rn:]


def test_output_values_survive_the_roundtrip(tmp_path, big_lora):
    # the 512x512 layers are exact too (a check that the writer's byte layout matches the header offsets)
    dst = tmp_path / "out.safetensors"
    lora_resize.resize(big_lora, dst, rank=16, precision="float")
    src_t, _ = load_st(big_lora)
    out, _ = load_st(dst)
    for name in ("lora_unet_block_0_attn1_to_q", "lora_unet_block_5_attn1_to_b"):
        assert rel_err(dense_dw(out, name), best_rank_k(dense_dw(src_t, name), 16)) < 1e-5


def test_existing_output_is_replaced_and_no_temp_left(tmp_path, standard_lora):
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"old junk that is not a tensor file")
    lora_resize.resize(standard_lora, dst, rank=2)
    tensors, meta = load_st(dst)
    assert "sshs_model_hash" in meta and tensors
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lora-resize-")]


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt"])
def test_pickle_output_is_a_weights_only_state_dict(tmp_path, standard_lora, standard_sd, suffix):
    dst = tmp_path / f"out{suffix}"
    res = lora_resize.resize(standard_lora, dst, rank=4, precision="float")
    sd = torch.load(dst, map_location="cpu", weights_only=True)
    assert isinstance(sd, dict)
    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    assert rel_err(dense_dw(sd, name), best_rank_k(dense_dw(standard_sd, name), 4)) < 1e-5
    assert any("metadata" in n for n in res.notes)


def test_finite_check_runs_on_one_thread(monkeypatch):
    """The writer's NaN/Inf check is one small parallel region per tensor: on the process's torch threads each
    waits for every thread to be scheduled (seconds for a file's hundreds of tensors on a busy machine, issue 24);
    it runs on one, and the process's setting is as it was afterwards."""
    from lora_resize.io import writer
    seen = []
    real = torch.isfinite

    def isfinite(t):
        seen.append(torch.get_num_threads())
        return real(t)
    monkeypatch.setattr(torch, "isfinite", isfinite)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        writer.check_finite({"a": torch.ones(3, dtype=torch.float16), "b": torch.zeros(2, 2)})
        assert seen == [1, 1]
        assert torch.get_num_threads() == 2
        with pytest.raises(lora_resize.NumericalError, match="'c' would hold NaN"):
            writer.check_finite({"c": torch.tensor([1.0, float("nan")])})
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_resize_holds_no_finished_layer_in_memory(tmp_path, standard_lora, monkeypatch):
    """The layers' tensors wait for the write in a scratch file, not in memory (issue 24: the SD1.5 LoCon 512
    resize held its 268 MB of output through the whole run): when the write starts, no tensor a layer emitted is
    alive any more; the file written is byte for byte the in-memory job's (`resized`)."""
    import weakref

    from lora_resize.ops import job
    emitted: list = []
    finish, write = job.finish_layer, job.write_output

    def recorded(q):
        row, tensors = finish(q)
        emitted.extend(weakref.ref(t) for t in tensors.values())
        return row, tensors

    def counted(*args, **kwargs):
        alive.append(sum(r() is not None for r in emitted))
        return write(*args, **kwargs)
    alive: list[int] = []
    monkeypatch.setattr(job, "finish_layer", recorded)
    monkeypatch.setattr(job, "write_output", counted)
    lora_resize.resize(standard_lora, tmp_path / "out.safetensors", rank=4)
    assert len(emitted) > 10 and alive == [0]
    mem = lora_resize.resized(standard_lora, rank=4)
    assert (tmp_path / "out.safetensors").read_bytes() == _file_bytes(mem)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "out.safetensors"]


def _file_bytes(mem) -> bytes:
    """The file write_safetensors makes of an in-memory job's tensors and metadata."""
    import tempfile

    from lora_resize.io.writer import write_safetensors
    with tempfile.TemporaryDirectory() as d:
        write_safetensors(Path(d) / "m.safetensors", mem.tensors, mem.metadata)
        return (Path(d) / "m.safetensors").read_bytes()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64,
                                   torch.bool, torch.uint8, torch.float8_e4m3fn])
def test_held_tensors_read_back_as_added(tmp_path, dtype):
    """HeldTensors gives back each tensor as added (dtype, shape, bits), whatever the sizes before it (odd byte
    counts included), in the order added, and refuses NaN or Inf as the writer does; its scratch file leaves no
    name in the folder."""
    from lora_resize.io.writer import HeldTensors
    g = torch.Generator().manual_seed(0)
    made = {"a": torch.randn(3, 5, generator=g).to(dtype), "odd": torch.ones(3, dtype=torch.uint8),
            "b": torch.randn(7, 1, 3, 3, generator=g).to(dtype), "scalar": torch.tensor(2.5).to(dtype),
            "empty": torch.empty(0, 4, dtype=dtype)}
    with HeldTensors(tmp_path) as held:
        for k, t in made.items():
            held[k] = t
        assert list(held) == list(made) and len(held) == len(made)
        for k, t in made.items():
            back = held[k]
            assert back.dtype == t.dtype and back.shape == t.shape
            assert torch.equal(back.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
        with pytest.raises(lora_resize.NumericalError, match="'nan' would hold NaN or Inf"):
            held["nan"] = torch.tensor([1.0, float("nan")]).to(dtype if dtype.is_floating_point else torch.float16)
        assert "nan" not in held
        assert list(tmp_path.iterdir()) == []


def test_held_tensors_in_an_unwritable_folder_name_the_fix(tmp_path):
    from lora_resize.io.writer import HeldTensors
    with pytest.raises(lora_resize.OutputFileError, match="cannot create a file in .*missing.*choose a writable"):
        HeldTensors(tmp_path / "missing")


HELD_ALL_AT_ONCE = """
import resource, sys, tempfile
from pathlib import Path
import torch
from lora_resize.io.writer import HeldTensors
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
folder = Path(sys.argv[1])
with HeldTensors(folder) as held:
    for i in range(400):
        held[f"t{i}"] = torch.full((3, i % 7 + 1), float(i), dtype=torch.float16)
    everything = dict(held)  # what the .pt writer hands torch.save: every tensor looked up at once
    torch.save(everything, folder / "out.pt")
back = torch.load(folder / "out.pt")
assert all(torch.equal(back[f"t{i}"], torch.full((3, i % 7 + 1), float(i), dtype=torch.float16)) for i in range(400))
print("ok")
"""


@pytest.mark.skipif(sys.platform == "win32", reason="the POSIX limit on open files (resource.RLIMIT_NOFILE)")
def test_held_tensors_looked_up_all_at_once_hold_no_file_each(tmp_path):
    """A .pt output looks up every held tensor at once (torch.save of the whole dict): 400 tensors under a limit of
    128 open files work, so no lookup keeps a file (or a mapping of one) open - an SD1.5 LoCon's 1050 tensors under
    the common limit of 1024 failed with 'Too many open files'."""
    run = subprocess.run([sys.executable, "-c", HELD_ALL_AT_ONCE, str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
