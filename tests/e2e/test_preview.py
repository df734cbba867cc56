"""`preview` on the tiny pipelines (lora_resize.testing.pipelines, random weights) as a diffusers folder and as a
single file with --base-config: the pictures, their labels and metrics, the grid, the report, the CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import refused_in_one_line
from lora_resize.cli import main
from lora_resize.ops.effect import Probing
from lora_resize.ops.preview import preview
from lora_resize.options import ResizeOptions
from lora_resize.report.grid import GAP

pytest.importorskip("diffusers")
pytest.importorskip("skimage")

RENDER = dict(prompt="a photo of a cat", steps=2)


@pytest.mark.parametrize("form", ["folder", "single"])
def test_pictures_labels_and_grid(tiny_base, tiny_sd1_lora, form):
    base, config = tiny_base("sd1", form)
    exact = ResizeOptions(method="fixed", rank=8)  # the full rank: the factors copied as stored
    settings = [exact, ResizeOptions(method="fixed", rank=4), ResizeOptions(method="fixed", rank=1)]
    p = preview(tiny_sd1_lora, Probing(base=str(base), config=str(config) if form == "single" else None, timesteps=1),
                settings, **RENDER)
    assert [x.kind for x in p.pictures] == ["base", "original", "setting", "setting", "setting"]
    original, full, mid, low = (np.asarray(x.image) for x in p.pictures[1:])
    assert np.array_equal(full, original)  # the file of the full-rank setting holds the original's tensors
    assert p.pictures[2].row.effect_error == 0.0 and p.pictures[2].ssim == 1.0
    errors = [x.row.effect_error for x in p.pictures[2:]]
    assert errors[0] < errors[1] < errors[2]
    assert not np.array_equal(low, original)
    assert 0 < p.pictures[4].ssim < 1
    for x in p.pictures[2:]:
        label = x.label()
        assert x.row.label in label and "effect error" in label and "SSIM to original" in label
    # the grid: one cell per picture, in one row, each picture scaled to >= 192 px, a label strip drawn under it
    grid = p.grid()
    w, h = p.pictures[0].image.size
    scale = -(-192 // w)
    cols = len(p.pictures)
    assert grid.width == cols * (w * scale + GAP) - GAP
    strip = grid.height - h * scale
    assert strip > 20
    pixels = np.asarray(grid)
    for i in range(cols):
        x0 = i * (w * scale + GAP)
        cell_label = pixels[h * scale:, x0:x0 + w * scale]
        assert (cell_label < 128).any(), f"cell {i} has no label drawn"  # black text on the white strip


@pytest.mark.slow
def test_cli_writes_grid_beside_the_lora_under_a_free_name_and_the_report(tiny_base, tiny_sd1_lora, tmp_path, capsys):
    base, config = tiny_base("sd1", "single")
    lora = shutil.copy(tiny_sd1_lora, tmp_path / "mine.safetensors")
    taken = tmp_path / "mine_preview.png"
    taken.write_bytes(b"not mine to overwrite")
    report = tmp_path / "r.html"
    argv = ["preview", str(lora), "--base", str(base), "--base-config", str(config), "--prompt", "a cat",
            "--steps", "1", "--probe-steps", "1", "--setting", "--method fixed --rank 2",
            "--setting", "--method sv_ratio --param 4", "--report", str(report), "-q"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert taken.read_bytes() == b"not mine to overwrite"
    grid = tmp_path / "mine_preview_2.png"
    assert grid.is_file() and f"grid written to {grid}" in out
    assert "SSIM" in out and "effect error" in out
    html = report.read_text()
    assert html.count('<figure class="pic"') == 4 and "data:image/png;base64," in html
    assert "Output size against effect error" in html and "curve-svg-effect_error" in html
    assert main([*argv, "--json", "-o", str(tmp_path / "g.png")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [x["kind"] for x in data["pictures"]] == ["base", "original", "setting", "setting"]
    assert data["image_metric"].startswith("SSIM to the original-LoRA image")


def test_bad_input_is_one_line(tiny_sd1_lora, tiny_base, tmp_path, capsys):
    assert "add --base MODEL" in refused_in_one_line(capsys, ["preview", str(tiny_sd1_lora)])
    base, _ = tiny_base("sd1")
    capsys.readouterr()  # what building the tiny base printed (when this test builds it first)
    assert "--param" in refused_in_one_line(capsys, ["preview", str(tiny_sd1_lora), "--base", str(base), "--setting",
                                         "--method sv_ratio"])
    assert "one prompt" in refused_in_one_line(capsys, ["preview", str(tiny_sd1_lora), "--base", str(base), "--prompt", "a",
                                            "--prompt", "b"])
    not_a_model = tmp_path / "model.safetensors"
    shutil.copy(tiny_sd1_lora, not_a_model)  # a safetensors file, but a LoRA, not a checkpoint
    refused_in_one_line(capsys, ["preview", str(tiny_sd1_lora), "--base", str(not_a_model), "-o", str(tmp_path / "g.png"), "-q"])
    assert not (tmp_path / "g.png").exists()


def test_the_page_previews_and_a_click_picks_the_setting(tiny_base, tiny_sd1_lora, tmp_path):
    pytest.importorskip("gradio", reason="the [ui] extra")
    from types import SimpleNamespace

    from lora_resize.ui.app import App, build
    base, _ = tiny_base("sd1")
    app = App(tmp_path / "work", base=base)
    section, grid, flags, start, status = app.preview(str(tiny_sd1_lora), None, "a cat", 0, 1,
                                                      "--method fixed --rank 2\n\n--method fixed --rank 1")
    assert not status.startswith("error"), status
    assert section.count('<figure class="pic"') == 4 and "curve-svg-effect_error" in section
    assert flags == {"row0": "--rank 2", "row1": "--rank 1"}  # resize's flags for those settings
    assert 'data-row="row1"' in section  # the pictures and points of the settings carry their row
    assert App.pick_point(flags, SimpleNamespace(row="row1")) == "--rank 1"
    assert Path(grid).is_file() and tmp_path / "work" in Path(grid).parents
    assert start in flags.values()  # the Resize tab's flags start at the recommended setting
    assert app.preview(str(tiny_sd1_lora), None, "a cat", 0, 1, "--method sv_ratio")[-1].startswith("error: ")
    assert build(app=app) is not None  # the page with its Preview tab builds (not launched)


def test_each_cell_names_what_makes_its_setting_distinct(tiny_base, tiny_sd1_lora):
    """One rank at three precisions: three labels, each naming its precision (as the recommendation's flags do)."""
    base, _ = tiny_base("sd1")
    settings = [ResizeOptions(rank=4), ResizeOptions(rank=4, precision="bf16"), ResizeOptions(rank=4, precision="fp16")]
    p = preview(tiny_sd1_lora, Probing(base=str(base), timesteps=1), settings, prompt="a cat", steps=1)
    firsts = [x.label().splitlines()[0] for x in p.pictures[2:]]
    assert firsts == ["rank 4", "rank 4, bf16", "rank 4, fp16"]
