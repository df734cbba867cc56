"""A LoRA against a base of another model, and a base lacking a few of its modules, on the tiny pipelines
(lora_resize.testing.pipelines): `analyze --base`, `analyze --effect` and `preview` decide by one rule
(formats.weights.Located.check) - fewer than half the LoRA's modules with a weight of their shape in the base is
another model's base, refused in one line naming the base, the LoRA's model and the count; a LoRA with a module the
base lacks still runs, that module listed in a note and the base-relative settings left out of the default sweep."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_resize.cli import main
from lora_resize.errors import LoraStructureError
from lora_resize.ops.analyze import analyze
from lora_resize.ops.effect import Probing
from lora_resize.ops.preview import preview
from lora_resize.options import ResizeOptions

FAMILIES = ("sd1", "sdxl", "flux")
MODEL = {"sd1": "Stable Diffusion", "sdxl": "SDXL", "flux": "Flux.1"}
EXTRA = "lora_unet_nonexistent_block_proj"


def with_extra(src, path):
    """`src` with one more module, whose weight no base has."""
    sd = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
    g = torch.Generator().manual_seed(1)
    sd[f"{EXTRA}.lora_down.weight"] = torch.randn(4, 32, generator=g)
    sd[f"{EXTRA}.lora_up.weight"] = torch.randn(32, 4, generator=g)
    sd[f"{EXTRA}.alpha"] = torch.tensor(2.0)
    save_file(sd, str(path), metadata)
    return path


def refusal(err: str, base, lora_family: str) -> None:
    assert len(err.strip().splitlines()) == 1, err
    assert str(base) in err and f"this {MODEL[lora_family]}" in err and " modules have a weight of their shape" in err


@pytest.mark.parametrize("lora_family,base_family", [(a, b) for a in FAMILIES for b in FAMILIES if a != b])
def test_analyze_base_refuses_another_models_base(tiny_base, tiny_loras, capsys, lora_family, base_family):
    base, _ = tiny_base(base_family)
    lora = tiny_loras(lora_family)
    capsys.readouterr()
    assert main(["analyze", str(lora), "--base", str(base)]) == 2
    refusal(capsys.readouterr().err, base, lora_family)


@pytest.mark.thirdparty
@pytest.mark.slow
@pytest.mark.parametrize("lora_family,base_family", [(a, b) for a in FAMILIES for b in FAMILIES if a != b])
def test_effect_and_preview_refuse_another_models_base(tiny_base, tiny_loras, lora_family, base_family):
    pytest.importorskip("diffusers")
    pytest.importorskip("skimage")
    base, _ = tiny_base(base_family)
    probing = Probing(base=str(base), prompts=("a cat",), timesteps=1)
    with pytest.raises(LoraStructureError) as e:  # the effect alone (no weight-space --base)
        analyze(tiny_loras(lora_family), sweep={"fixed": (1,)}, effect=probing)
    refusal(str(e.value), base, lora_family)
    with pytest.raises(LoraStructureError) as e:
        preview(tiny_loras(lora_family), probing, [ResizeOptions(method="fixed", rank=1)], steps=1)
    refusal(str(e.value), base, lora_family)


def test_a_module_the_base_lacks_is_noted_and_base_settings_left_out(tiny_base, tiny_loras, tmp_path, capsys):
    base, _ = tiny_base("sd1")
    src = with_extra(tiny_loras("sd1"), tmp_path / "extra.safetensors")
    capsys.readouterr()
    assert main(["analyze", str(src), "--base", str(base), "--json"]) == 0
    out = capsys.readouterr().out
    assert EXTRA in out and "left out of the sweep" in out and "--target-error" not in out
    for argv, flag in ((["--target-error", "0.01"], "--target-error"), (["--method", "base_fro", "--param", "0.9"],
                                                                         "--method base_fro")):
        assert main(["analyze", str(src), "--base", str(base), *argv]) == 2
        err = capsys.readouterr().err
        assert f"{EXTRA} has no weight in --base, so {flag} cannot" in err and "--target-size" not in err, err
    # --target-size ranks by the updates' own energy there, and says so
    assert main(["analyze", str(src), "--base", str(base), "--target-size", "120k"]) == 0
    assert "--target-size ranks by each update's own energy" in capsys.readouterr().out


@pytest.mark.thirdparty
@pytest.mark.slow
def test_effect_with_a_module_the_base_lacks_runs(tiny_base, tiny_loras, tmp_path):
    pytest.importorskip("diffusers")
    base, _ = tiny_base("sd1")
    src = with_extra(tiny_loras("sd1"), tmp_path / "extra.safetensors")
    a = analyze(src, sweep={"fixed": (1, 4)}, effect=Probing(base=str(base), prompts=("a cat",), timesteps=1))
    assert any("1 not applied" in n and EXTRA in n for n in a.notes), a.notes
    assert {int(r.ranks.max()): r.effect_error for r in a.rows}[4] == 0.0


@pytest.mark.parametrize("form", ["folder", "single"])
def test_a_flux_loras_clip_modules_are_measured_in_the_base(tiny_base, tiny_loras, capsys, form):
    base, _ = tiny_base("flux", form)
    lora = tiny_loras("flux")
    capsys.readouterr()
    assert main(["analyze", str(lora), "--base", str(base), "--json"]) == 0
    out = capsys.readouterr().out
    if form == "folder":  # the folder's CLIP-L (saved without the text_model wrapper) holds every te1 module
        assert "32 base weight(s) measured" in out and "no weight of their shape" not in out
    else:  # the single file holds the transformer only: CLIP-L's modules are noted, not fatal
        assert "20 base weight(s) measured" in out and "lora_te1_" in out


@pytest.mark.thirdparty
@pytest.mark.slow
def test_a_single_file_bases_text_encoders_come_from_its_config_folder(tiny_base, tiny_loras):
    """The Flux.1 file holds the transformer only; with --effect's --base-config, the norms of the LoRA's CLIP-L
    modules are read from that folder, as its pipeline loads them, and a base-relative setting is measured."""
    pytest.importorskip("diffusers")
    base, config = tiny_base("flux", "single")
    a = analyze(tiny_loras("flux"), base=str(base), sweep={"target_error": (0.01,), "fixed": (4,)},
                effect=Probing(base=str(base), config=str(config), prompts=("a cat",), timesteps=1))
    assert all(sp.base is not None for sp in a.layers) and len(a.layers) == 32
    assert "32 base weight(s) measured" in " ".join(a.notes)
    assert all(r.effect_error is not None for r in a.rows)
    assert {int(r.ranks.max()): r.effect_error for r in a.rows if r.method == "fixed"}[4] == 0.0
