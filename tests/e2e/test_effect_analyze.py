"""analyze --base MODEL --effect on the tiny pipelines (lora_resize.testing.pipelines, random weights), as a
diffusers folder and as a single file with --base-config: the effect error of each setting, measured on the
denoiser's output; the recommendation it drives; the CLI's column and JSON; bad input as one line."""
from __future__ import annotations

import json

import pytest

from helpers import refused_in_one_line, write_lora
from lora_resize.cli import main
from lora_resize.ops.analyze import analyze
from lora_resize.ops.effect import Probing
from lora_resize.testing.archs import flux1
from lora_resize.testing.loras import lora_state_dict

pytest.importorskip("diffusers")

PROBE = dict(prompts=("a photo of a cat",), timesteps=2)


@pytest.mark.parametrize("form", ["folder", "single"])
def test_effect_error_grows_as_ranks_shrink_and_is_zero_for_the_original_tensors(tiny_base, tiny_sd1_lora, form):
    base, config = tiny_base("sd1", form)
    # a setting at the full rank writes the factors as stored (exact copies), so its file holds the original's
    # tensors and its effect error must be exactly 0
    a = analyze(tiny_sd1_lora, sweep={"fixed": (1, 2, 4, 8)},
                effect=Probing(base=str(base), config=str(config) if form == "single" else None, **PROBE))
    by_rank = {int(r.ranks.max()): r.effect_error for r in a.rows}
    assert sorted(by_rank) == [1, 2, 4, 8]
    assert by_rank[8] == 0.0
    assert by_rank[1] > by_rank[2] > by_rank[4] > 0.0
    assert by_rank[1] < 1.5  # a share of the LoRA's change: rank 1 keeps some of it


def test_full_rank_conversion_is_exact_too(tiny_base, tiny_sd1_lora):
    """A conversion to the input's own layout copies the factors as well: effect error 0 at the full rank."""
    base, _ = tiny_base("sd1")
    a = analyze(tiny_sd1_lora, output_format="kohya", sweep={"fixed": (8,)}, effect=Probing(base=str(base), **PROBE))
    assert a.rows[0].effect_error == 0.0


def test_a_folder_base_saved_by_transformers_5_has_every_text_encoder_weight(tiny_base, tiny_sd1_lora):
    """The tiny folder's CLIP is saved without the `text_model.` wrapper (transformers >= 5): --base still finds
    the weight of every text-encoder module (it found none: --effect's sweep refused them)."""
    base, _ = tiny_base("sd1")
    a = analyze(tiny_sd1_lora, base=str(base), sweep={"fixed": (2,)})
    missing = [sp.name for sp in a.layers if sp.base is None]
    assert not missing and any(sp.name.startswith("lora_te_") for sp in a.layers)


def test_recommended_is_the_smallest_file_under_the_threshold(tiny_base, tiny_sd1_lora):
    base, _ = tiny_base("sd1")
    a = analyze(tiny_sd1_lora, sweep={"fixed": (1, 2, 4, 8), "sv_ratio": (2, 4, 8)}, max_effect_error=0.3,
                effect=Probing(base=str(base), **PROBE))
    under = [r for r in a.rows if r.effect_error <= 0.3]
    assert under and len(under) < len(a.rows)  # the threshold separates the rows
    assert a.recommended.output_bytes == min(r.output_bytes for r in under)
    assert a.recommended.effect_error <= 0.3
    # settings that write the same ranks share one measurement
    same = {}
    for r in a.rows:
        same.setdefault(tuple(int(k) for k in r.ranks), set()).add(r.effect_error)
    assert all(len(v) == 1 for v in same.values())


@pytest.mark.slow
def test_cli_effect_column_and_json(tiny_base, tiny_sd1_lora, tmp_path, capsys):
    base, config = tiny_base("sd1", "single")
    common = [str(tiny_sd1_lora), "--base", str(base), "--base-config", str(config), "--effect", "--rank", "2",
              "--prompt", "a cat", "--probe-steps", "1", "-q"]
    report, plot = tmp_path / "r.html", tmp_path / "r.png"
    assert main(["analyze", *common, "--report", str(report), "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert " effect " in text and "effect = " in text and "> recommended:" in text
    html = report.read_text()
    assert "Output size against effect error" in html and "<th>effect error</th>" in html
    assert plot.stat().st_size > 0
    assert main(["analyze", *common, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    errors = [s["effect_error"] for s in data["settings"]]
    assert errors and all(isinstance(e, float) and e >= 0 for e in errors)
    under = [s for s in data["settings"] if s["effect_error"] <= 0.05]  # the default --max-effect-error
    least = min(errors)  # none under: the least effect error, in the smallest file that has it
    want = min(s["output_bytes"] for s in (under or [s for s in data["settings"] if s["effect_error"] == least]))
    assert data["recommended"]["output_bytes"] == want
    assert "effect error" in data["recommended"]["reason"]


def test_effect_without_base_is_one_line(tiny_sd1_lora, capsys):
    assert "add --base MODEL" in refused_in_one_line(capsys, ["analyze", str(tiny_sd1_lora), "--effect"])
    assert "add --effect" in refused_in_one_line(capsys, ["analyze", str(tiny_sd1_lora), "--prompt", "a cat"])


def test_a_base_that_is_not_a_model_is_one_line(tiny_sd1_lora, tmp_path, capsys):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    err = refused_in_one_line(capsys, ["analyze", str(tiny_sd1_lora), "--effect", "--base", str(folder), "--rank", "1", "-q"])
    assert "not_a_model" in err


def test_a_lora_for_another_model_is_one_line(tiny_base, tmp_path, capsys):

    flux = write_lora(tmp_path / "flux.safetensors",
                      lora_state_dict(flux1(width=64, double=1, single=1, mlp_ratio=2), style="kohya", rank=4))
    base, _ = tiny_base("sd1")
    refused_in_one_line(capsys, ["preview", str(flux), "--base", str(base), "--steps", "1", "--probe-steps", "1", "-q",
                     "-o", str(tmp_path / "g.png")])
    assert not (tmp_path / "g.png").exists()


def test_baked_strengths_are_in_the_reference_not_in_the_error(tiny_base, tiny_sd1_lora):
    """With scale rules the effect error measures the resize against the LoRA with the strengths asked for (at full
    rank), not the strengths themselves: at the full rank it is 0 to rounding (before, every setting carried the
    whole change the strengths make); a smaller rank still costs effect."""
    base, _ = tiny_base("sd1")
    a = analyze(tiny_sd1_lora, sweep={"fixed": (1, 8)}, block_rules=["*=scale:0.5"],
                effect=Probing(base=str(base), **PROBE))
    by_rank = {int(r.ranks.max()): r.effect_error for r in a.rows}
    plain = analyze(tiny_sd1_lora, sweep={"fixed": (1,)}, effect=Probing(base=str(base), **PROBE)).rows[0]
    assert by_rank[8] < 1e-3 * by_rank[1] and by_rank[1] > 0.1 * plain.effect_error
