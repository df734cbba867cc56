"""The web page's jobs (ui/app.py's App) without a browser: LoRAs picked from a folder (`lora-resize ui --loras DIR`)
are listed recursively, their results are saved beside them under a free name - the CLI's file byte for byte, no
file written over, the input unchanged - and a name outside the folder, or no input at all, is a one-line error
that writes nothing. (The browser test drives the same jobs through the page.)"""
from __future__ import annotations

from pathlib import Path

import pytest

from lora_resize.cli import main
from lora_resize.testing.loras import write_sd15_locon

pytest.importorskip("gradio", reason="the [ui] extra")  # a test dependency: make test installs it
from lora_resize.ui.app import App  # noqa: E402


@pytest.fixture
def folder(tmp_path):
    loras = tmp_path / "loras"
    (loras / "sub").mkdir(parents=True)
    write_sd15_locon(loras / "sub" / "a.safetensors", rank=8, alpha=4, conv_rank=4, conv_alpha=2, seed=1)
    write_sd15_locon(loras / "b.safetensors", rank=8, alpha=4, conv_rank=4, conv_alpha=2, seed=2)
    (loras / ".trash").mkdir()
    (loras / ".trash" / "old.safetensors").write_bytes(b"x")
    (loras / "readme.txt").write_text("not a LoRA")
    return loras


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_folder_is_listed_and_results_are_saved_beside_the_picked_file(folder, tmp_path):
    app = App(tmp_path / "work", folder)
    assert app.choices() == ["b.safetensors", "sub/a.safetensors"]
    before = files(folder)
    status, path = app.resize(None, "sub/a.safetensors", "--method sv_fro --param 0.9 --rank 6")
    assert path == str(folder / "sub" / "a_resized.safetensors") and status.endswith(f"saved as {path}")
    want = tmp_path / "cli.safetensors"
    assert main(["resize", str(folder / "sub" / "a.safetensors"), "-o", str(want), "--method", "sv_fro", "--param",
                 "0.9", "--rank", "6", "-q"]) == 0
    assert Path(path).read_bytes() == want.read_bytes()
    # again: a new name, the first result kept
    _, again = app.resize(None, "sub/a.safetensors", "--rank 4")
    assert again == str(folder / "sub" / "a_resized_2.safetensors")
    assert Path(path).read_bytes() == want.read_bytes()
    _, converted = app.convert(None, "b.safetensors", "diffusers")
    assert main(["convert", str(folder / "b.safetensors"), "-o", str(want), "--to", "diffusers", "-q"]) == 0
    assert converted == str(folder / "b_diffusers.safetensors") and Path(converted).read_bytes() == want.read_bytes()
    _, merged = app.merge(None, ["b.safetensors", "sub/a.safetensors"], "1 -0.5", "--rank 8")
    assert main(["merge", f"{folder / 'b.safetensors'}:1", f"{folder / 'sub' / 'a.safetensors'}:-0.5", "-o",
                 str(want), "--rank", "8", "-q"]) == 0
    assert merged == str(folder / "merged.safetensors") and Path(merged).read_bytes() == want.read_bytes()
    after = files(folder)
    assert {k: after[k] for k in before} == before  # inputs untouched
    assert app.analyze(None, "b.safetensors", 0)[4].startswith("b.safetensors: 350 layers")


def test_an_upload_goes_to_the_work_folder_and_bad_picks_are_one_line_errors(folder, tmp_path):
    app = App(tmp_path / "work", folder)
    before = files(folder)
    _, path = app.convert(str(folder / "b.safetensors"), None, "comfy")  # an upload (Gradio hands a path)
    assert Path(path).parent.parent == tmp_path / "work"
    for picked in ("../loras/b.safetensors/..", "../../etc/passwd", ".trash/../../x.safetensors", "readme.txt",
                   ".trash/old.safetensors", "missing.safetensors"):
        status, out = app.resize(None, picked, "--rank 4")
        assert status.startswith("error: ") and "not a LoRA file in the folder" in status and out is None, picked
    assert app.resize(None, None, "--rank 4") == ("error: upload a LoRA file or pick one from the folder first",
                                                  None)
    status, _ = app.merge(None, ["b.safetensors"], "", "")
    assert status.startswith("error: pick or upload two or more")
    status, _ = app.resize(None, "b.safetensors", "--method nope")
    assert status.startswith("error: ") and "\n" not in status
    assert files(folder) == before
    assert App(tmp_path / "work2").resize(None, None, "")[0] == "error: upload a LoRA file first"


def test_flags_the_page_sets_itself_help_and_peft_are_refused_in_one_line(folder, tmp_path):
    """-h would make argparse exit inside the web server; -o, --model, --report, --plot or another input would be
    dropped without a word; a PEFT folder cannot be downloaded. Each is one line, and nothing is written."""
    app = App(tmp_path / "work", folder)
    before = files(folder)
    for flags, why in (("--rank 4 -h", "the page shows no help"), ("--help", "the page shows no help"),
                       ("--rank 4 -o x.safetensors", "-o/--output/--save_to"), ("--rank 4 --save_to x", "-o/--output"),
                       ("--rank 4 --model b.safetensors", "--model"), ("--rank 4 --rep r.html", "--report"),
                       ("--rank 4 --plot p.png", "--plot"), ("--rank 4 other.safetensors", "unrecognized"),
                       ("--rank 4 --output-format peft", "--output-format peft writes a folder")):
        status, out = app.resize(None, "b.safetensors", flags)
        assert status.startswith("error: ") and why in status and "\n" not in status and out is None, (flags, status)
    for flags, why in (("--rank 4 -h", "the page shows no help"), ("--rank 4 --report r.html", "--report"),
                       ("--rank 4 -o m.safetensors", "-o/--output")):
        status, out = app.merge(None, ["b.safetensors", "sub/a.safetensors"], "1 1", flags)
        assert status.startswith("error: ") and why in status and out is None, (flags, status)
    status, _ = app.merge(None, ["b.safetensors", "sub/a.safetensors"], "1 nan", "--rank 4")
    assert status == "error: a.safetensors: weight nan is not a finite number"
    assert files(folder) == before and not list((tmp_path / "work").rglob("*.safetensors"))


def test_a_dangling_link_is_skipped_and_a_read_only_folder_falls_back_to_the_work_folder(folder, tmp_path,
                                                                                          monkeypatch):
    app = App(tmp_path / "work", folder)
    (folder / "b_resized.safetensors").symlink_to(tmp_path / "nowhere.safetensors")
    _, path = app.resize(None, "b.safetensors", "--rank 4")
    assert path == str(folder / "b_resized_2.safetensors") and not (tmp_path / "nowhere.safetensors").exists()
    import lora_resize.ui.app as ui_app
    monkeypatch.setattr(ui_app.os, "access", lambda p, mode: Path(p) != folder / "sub")  # sub/ is read-only
    status, path = app.resize(None, "sub/a.safetensors", "--rank 4")
    assert Path(path).parent.parent == tmp_path / "work" and status.endswith(f"saved as {path}")
    assert sorted(p.name for p in (folder / "sub").iterdir()) == ["a.safetensors"]
