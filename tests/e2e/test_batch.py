"""batch: a folder of mixed good and bad files, in parallel, resumable, with a manifest; killed runs leave no
partial outputs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lora_resize.ops.batch import discover, run_batch
from lora_resize.units import parse_size
from lora_resize.cli import main
from lora_resize.errors import OptionsError
from lora_resize.options import ResizeOptions

from helpers import BASE_METADATA, Spec, dense_dw, best_rank_k, file_sha, load_st, make_state_dict, rel_err, write_lora

SPECS = [Spec("lora_te_a", 40, 30, 8, alpha=4.0), Spec("lora_unet_b", 24, 8, 6, kernel=3, alpha=2.0)]


def make_tree(root: Path) -> dict[str, Path]:
    (root / "sub" / "deeper").mkdir(parents=True)
    files = {
        "a.safetensors": write_lora(root / "a.safetensors", make_state_dict(SPECS, seed=1), dict(BASE_METADATA)),
        "sub/b.safetensors": write_lora(root / "sub" / "b.safetensors", make_state_dict(SPECS, seed=2)),
        "sub/deeper/c.safetensors": write_lora(root / "sub" / "deeper" / "c.safetensors",
                                               make_state_dict(SPECS, seed=3)),
    }
    torch.save(make_state_dict(SPECS, seed=4), root / "sub" / "d.pt")
    files["sub/d.pt"] = root / "sub" / "d.pt"
    (root / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    cut = files["a.safetensors"].read_bytes()
    (root / "sub" / "truncated.safetensors").write_bytes(cut[: len(cut) // 2])
    (root / "notes.txt").write_text("not a LoRA")
    return files


@pytest.mark.slow
def test_mixed_folder_two_workers_then_resume_then_force(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    good = make_tree(src)
    before = {p: file_sha(p) for p in src.rglob("*") if p.is_file()}
    opts = ResizeOptions(rank=3, precision="float")
    res = run_batch(src, out, opts, workers=2, max_memory=parse_size("4GB"))
    status = {f.file: f.status for f in res.files}
    assert status == {"a.safetensors": "ok", "sub/b.safetensors": "ok", "sub/deeper/c.safetensors": "ok",
                      "sub/d.pt": "ok", "broken.safetensors": "error", "sub/truncated.safetensors": "error"}
    for rel, path in good.items():
        o = out / Path(rel).with_suffix(".safetensors")
        sd_in = load_st(path)[0] if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
        sd_out = load_st(o)[0]
        for name in ("lora_te_a", "lora_unet_b"):
            assert rel_err(dense_dw(sd_out, name).reshape(-1), best_rank_k(
                dense_dw(sd_in, name).reshape(dense_dw(sd_in, name).shape[0], -1), 3).reshape(-1)) < 1e-5
    errors = {f.file: f.error for f in res.files if f.status == "error"}
    assert "not a valid safetensors" in errors["broken.safetensors"]
    assert not list(out.rglob(".lora-resize-*")) and not (out / "broken.safetensors").exists()
    manifest = json.loads((out / "lora-resize-manifest.json").read_text())
    assert {e["file"] for e in manifest["files"]} == set(status)
    csv_text = (out / "lora-resize-manifest.csv").read_text()
    assert csv_text.splitlines()[0].startswith("file,status,format,in_bytes,out_bytes,mean_fro,min_fro,seconds")
    assert before == {p: file_sha(p) for p in src.rglob("*") if p.is_file()}

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    again = run_batch(src, out, opts, workers=2)
    assert {f.file: f.status for f in again.files if f.status != "error"} == {k: "skipped" for k in good}
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    changed = run_batch(src, out, ResizeOptions(rank=2, precision="float"), workers=1)  # other options: redo
    assert {f.status for f in changed.files if f.file in good} == {"ok"}
    forced = run_batch(src, out, ResizeOptions(rank=2, precision="float"), force=True)
    assert {f.status for f in forced.files if f.file in good} == {"ok"}
    os.utime(good["a.safetensors"])
    write_lora(good["a.safetensors"], make_state_dict(SPECS, seed=9))  # new content: redone
    redo = run_batch(src, out, ResizeOptions(rank=2, precision="float"))
    assert {f.file: f.status for f in redo.files}["a.safetensors"] == "ok"


@pytest.mark.slow
def test_cli_batch(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    make_tree(src)
    rc = main(["batch", str(src), str(out), "--method", "sv_fro", "--param", "0.9", "--workers", "2", "-q"])
    text = capsys.readouterr().out
    assert rc == 2  # some files failed
    assert "6 files: 4 resized" in text and "2 failed" in text and "broken.safetensors" in text
    assert main(["batch", str(src), str(out), "--method", "sv_fro", "--param", "0.9", "--json"]) == 2
    data = json.loads(capsys.readouterr().out)
    assert sorted(f["status"] for f in data["files"]) == ["error", "error"] + ["skipped"] * 4


def test_discover_by_extension_and_content(tmp_path):
    make_tree(tmp_path)
    write_lora(tmp_path / "no_extension_lora", make_state_dict(SPECS, seed=5))
    names = set(discover(tmp_path))
    assert "no_extension_lora" in names and "notes.txt" not in names and "broken.safetensors" in names


def test_bad_batch_options(tmp_path):
    with pytest.raises(OptionsError):
        run_batch(tmp_path / "missing", tmp_path / "out", ResizeOptions(rank=2))
    (tmp_path / "in").mkdir()
    with pytest.raises(OptionsError):
        run_batch(tmp_path / "in", tmp_path / "in" / "out", ResizeOptions(rank=2))
    with pytest.raises(OptionsError):
        parse_size("lots")
    assert parse_size("8GB") == 8 * 10**9 and parse_size("500 MB") == 500 * 10**6  # one MB everywhere (units.py)
    assert parse_size("8GiB") == 8 * 2**30 and parse_size("500 MiB") == 500 * 2**20


@pytest.mark.slow
def test_killed_batch_leaves_no_partial_outputs_and_resumes(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    big = [Spec(f"lora_te_l{i}", 512, 512, 64, alpha=8.0) for i in range(12)]
    for i in range(6):
        write_lora(src / f"f{i}.safetensors", make_state_dict(big, seed=i))
    cmd = [sys.executable, "-m", "lora_resize.cli", "batch", str(src), str(out), "--rank", "8", "-q"]
    for delay in (0.8, 1.6, 2.4):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        for o in out.rglob("*.safetensors"):
            load_st(o)  # every output present is complete and readable
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == [f"f{i}.safetensors" for i in range(6)]
    assert not list(out.rglob(".lora-resize-*"))


@pytest.mark.parametrize("budget, most", [(250, 2), (100, 1), (None, 4)])
def test_memory_budget_bounds_the_files_in_flight(tmp_path, monkeypatch, budget, most):
    # each file is estimated at 100 (units of the budget); 4 workers, 8 files: the budget, not the worker count,
    # decides how many run at once (a lone file always runs)
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import asdict

    from lora_resize.ops import batch

    src = tmp_path / "in"
    src.mkdir()
    for i in range(8):
        write_lora(src / f"f{i}.safetensors", make_state_dict(SPECS, seed=i))
    lock = threading.Lock()
    state = {"now": 0, "peak": 0}

    def fake_resize(s, d, options, threads):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.1)
        with lock:
            state["now"] -= 1
        return asdict(batch.FileResult(file=s, status="ok", in_bytes=1, out_bytes=1))

    monkeypatch.setattr(batch, "resize_file", fake_resize)
    monkeypatch.setattr(batch, "estimate_memory", lambda size: 100)
    monkeypatch.setattr(batch, "ProcessPoolExecutor",
                        lambda max_workers, mp_context, initializer, initargs: ThreadPoolExecutor(max_workers))
    res = run_batch(src, tmp_path / "out", ResizeOptions(rank=2), workers=4, max_memory=budget)
    assert [f.status for f in res.files] == ["ok"] * 8
    assert state["peak"] == most, state


@pytest.mark.parametrize("names", [("a.pt", "a.safetensors"), ("x", "x.safetensors"), ("sub/M.ckpt", "sub/m.pth"),
                                   ("Caf\u00e9.safetensors", "Cafe\u0301.pt")],
                         ids=["suffix", "no-suffix", "case", "unicode-normalisation"])
def test_two_inputs_for_one_output_are_refused_before_any_work(tmp_path, capsys, names):
    src, out = tmp_path / "in", tmp_path / "out"
    for i, name in enumerate(names):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        sd = make_state_dict(SPECS, seed=i)
        if name.endswith((".pt", ".pth", ".ckpt")):
            torch.save(sd, src / name)
        else:
            write_lora(src / name, sd)
    write_lora(src / "other.safetensors", make_state_dict(SPECS, seed=7))
    with pytest.raises(OptionsError) as e:
        run_batch(src, out, ResizeOptions(rank=3))
    assert all(n in str(e.value) for n in names) and "rename one" in str(e.value)
    assert not out.exists()  # nothing done, not even the output folder or the file without a clash
    assert main(["batch", str(src), str(out), "--rank", "3", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "would both be written as" in err


def test_a_file_where_an_output_folder_goes_is_a_one_line_error_naming_it(tmp_path):
    """batch --output-format peft writes a folder per input: a plain file standing at that path is reported in
    the file's row as a path problem naming it, not as a Python exception's repr, and the other files are done."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    for name, seed in (("a.safetensors", 1), ("b.safetensors", 2)):
        write_lora(src / name, make_state_dict(SD_SPECS, seed=seed))
    (out / "a").write_bytes(b"not a folder")
    res = run_batch(src, out, ResizeOptions(rank=3, output_format="peft"))
    rows = {f.file: f for f in res.files}
    assert rows["b.safetensors"].status == "ok"
    err = rows["a.safetensors"].error
    assert rows["a.safetensors"].status == "error" and str(out / "a") in err and "Error:" not in err, err
    assert "\n" not in err and "Errno" not in err


def test_a_file_that_fails_on_a_rerun_leaves_no_earlier_output_looking_current(tmp_path):
    """An input replaced by a damaged file: the output made of its earlier version is removed (it no longer
    belongs to the input); one someone edited since is left alone."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name, seed in (("a.safetensors", 1), ("b.safetensors", 2)):
        write_lora(src / name, make_state_dict(SPECS, seed=seed))
    opts = ResizeOptions(rank=3)
    assert {f.status for f in run_batch(src, out, opts).files} == {"ok"}
    (out / "b.safetensors").write_bytes((out / "b.safetensors").read_bytes() + b" ")  # edited by someone
    for name in ("a.safetensors", "b.safetensors"):
        (src / name).write_bytes(b"\x00" * 64)  # now damaged
    rows = {f.file: f for f in run_batch(src, out, opts).files}
    assert rows["a.safetensors"].status == "error" and "earlier version was removed" in rows["a.safetensors"].error
    assert not (out / "a.safetensors").exists()
    assert rows["b.safetensors"].status == "error" and "removed" not in rows["b.safetensors"].error
    assert (out / "b.safetensors").exists()


def test_a_rerun_skips_only_outputs_that_are_still_the_ones_written(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name, seed in (("a.safetensors", 1), ("b.safetensors", 2), ("c.safetensors", 3)):
        write_lora(src / name, make_state_dict(SPECS, seed=seed))
    opts = ResizeOptions(rank=3, precision="float")
    assert {f.status for f in run_batch(src, out, opts).files} == {"ok"}
    want = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    (out / "a.safetensors").write_bytes(want["b.safetensors"])  # another input's output put in its place
    (out / "b.safetensors").write_bytes(want["b.safetensors"][:-4] + b"\0\0\0\0")  # changed
    again = run_batch(src, out, opts)
    assert {f.file: f.status for f in again.files} == {"a.safetensors": "ok", "b.safetensors": "ok",
                                                        "c.safetensors": "skipped"}
    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == want
    assert {f.status for f in run_batch(src, out, opts).files} == {"skipped"}


SD_BLOCK = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_"
SD_SPECS = [Spec(SD_BLOCK + "attn1_to_q", 32, 32, 8, alpha=4.0), Spec(SD_BLOCK + "ff_net_2", 32, 64, 8, alpha=8.0)]


def test_peft_output_is_a_folder_per_input_as_resize_writes_it_and_reruns_replace_it(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    (src / "own").mkdir()
    ins = {"one.safetensors": write_lora(src / "one.safetensors", make_state_dict(SD_SPECS, seed=1)),
           "sub/two.safetensors": write_lora(src / "sub" / "two.safetensors", make_state_dict(SD_SPECS, seed=2)),
           "own/adapter_model.safetensors": write_lora(src / "own" / "adapter_model.safetensors",
                                                       make_state_dict(SD_SPECS, seed=3))}
    folders = {"one.safetensors": "one", "sub/two.safetensors": "sub/two", "own/adapter_model.safetensors": "own"}
    argv = ["batch", str(src), str(out), "--rank", "4", "--output-format", "peft", "-q"]
    assert main(argv) == 0
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    files = {f"{d}/{n}" for d in folders.values() for n in ("adapter_model.safetensors", "adapter_config.json")}
    assert written == files | {"lora-resize-manifest.json", "lora-resize-manifest.csv"}
    for rel, folder in folders.items():  # each folder is what `resize -o DIR/ --output-format peft` writes
        alone = tmp_path / "alone" / folder
        alone.parent.mkdir(parents=True, exist_ok=True)
        assert main(["resize", str(ins[rel]), "-o", f"{alone}/", "--rank", "4", "--output-format", "peft", "-q"]) == 0
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert (out / folder / name).read_bytes() == (alone / name).read_bytes(), (rel, name)
    before = {f: (out / f).read_bytes() for f in files}
    assert main(argv) == 0 and "3 skipped" in capsys.readouterr().out
    (out / "one" / "adapter_config.json").unlink()  # a folder missing its config is done again
    assert main(argv) == 0
    assert "1 resized" in capsys.readouterr().out
    assert main([*argv, "--force"]) == 0  # a rerun replaces each folder's files, adding none
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == written
    assert {f: (out / f).read_bytes() for f in files} == before


def test_two_inputs_for_one_peft_folder_are_refused_before_any_work(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "x").mkdir(parents=True)
    write_lora(src / "x.safetensors", make_state_dict(SD_SPECS, seed=1))
    write_lora(src / "x" / "adapter_model.safetensors", make_state_dict(SD_SPECS, seed=2))
    with pytest.raises(OptionsError, match="x/adapter_model.safetensors.*a folder of its own"):
        run_batch(src, out, ResizeOptions(rank=3, output_format="peft"))
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_a_peft_input_without_config_is_written_and_skipped_on_rerun(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    key = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    write_lora(src / "bare.safetensors", {key + ".lora_A.weight": torch.randn(8, 32, generator=g),
                                          key + ".lora_B.weight": torch.randn(32, 8, generator=g)})
    argv = ["batch", str(src), str(out), "--rank", "4", "--output-format", "peft", "-q"]
    assert main(argv) == 0  # no config to write (the input has none): a folder with the file alone
    assert sorted(p.name for p in (out / "bare").iterdir()) == ["adapter_model.safetensors"]
    capsys.readouterr()
    assert main(argv) == 0 and "1 skipped" in capsys.readouterr().out
