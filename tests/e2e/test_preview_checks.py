"""Every probing and rendering option is checked in one place (ops.effect: Probing, check_steps; the pipeline's
size multiple: diffusion BaseModel.check_size) and refused in one line by the CLI, the API and the page alike."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import lora_resize

from helpers import refused_in_one_line
from lora_resize.cli import main
from lora_resize.errors import OptionsError
from lora_resize.ops.effect import Probing, check_steps
from lora_resize.ops.preview import preview
from lora_resize.results import MAX_SEED, MAX_SIDE, MAX_STEPS

pytest.importorskip("diffusers")
pytest.importorskip("skimage")


@pytest.mark.parametrize("kwargs, said", [
    (dict(seed=-1), "--seed"), (dict(seed=MAX_SEED + 1), "--seed"), (dict(seed=10 ** 30), "--seed"),
    (dict(seed=1.5), "--seed"), (dict(timesteps=0), "--probe-steps"), (dict(timesteps=MAX_STEPS + 1), "--probe-steps"),
    (dict(timesteps=1000), "--probe-steps"), (dict(size=(MAX_SIDE + 8, 64)), "--size"),
    (dict(size=(100000, 100000)), "--size"), (dict(size=(4, 64)), "--size")])
def test_probing_refuses_what_torch_or_diffusers_cannot_take(kwargs, said):
    with pytest.raises(OptionsError, match=said):
        Probing(base="b", **kwargs)
    Probing(base="b", seed=MAX_SEED, timesteps=MAX_STEPS, size=(MAX_SIDE, 8))  # the bounds themselves are fine


@pytest.mark.parametrize("steps", [0, -1, MAX_STEPS + 1, 2.5, True, None])
def test_render_steps_one_rule(steps):
    with pytest.raises(OptionsError, match=f"--steps must be a whole number from 1 to {MAX_STEPS}"):
        check_steps(steps)


@pytest.mark.parametrize("argv, said", [
    (["--size", "33"], "a multiple of"), (["--size", "100000"], f"8 to {MAX_SIDE} pixels"),
    (["--steps", "0"], "--steps"), (["--steps", "-1"], "--steps"), (["--seed", "99999999999999999999999"], "--seed"),
    (["--probe-steps", "1000"], "--probe-steps")])
def test_preview_cli_refuses_in_one_line(tiny_base, tiny_sd1_lora, tmp_path, capsys, argv, said):
    base, config = tiny_base("sd1", "single")
    capsys.readouterr()  # what building the tiny base printed
    out = tmp_path / "g.png"
    err = refused_in_one_line(capsys, ["preview", str(tiny_sd1_lora), "--base", str(base), "--base-config", str(config),
                                       "--steps", "1", "--probe-steps", "1", "-q", "-o", str(out), *argv])
    assert said in err and not out.exists()


@pytest.mark.parametrize("argv, said", [(["--size", "33"], "a multiple of"), (["--size", "100000"], "--size"),
                                        (["--seed", "99999999999999999999999"], "--seed"),
                                        (["--probe-steps", "1000"], "--probe-steps")])
def test_analyze_effect_cli_refuses_in_one_line(tiny_base, tiny_sd1_lora, capsys, argv, said):
    base, _ = tiny_base("sd1")
    capsys.readouterr()
    err = refused_in_one_line(capsys, ["analyze", str(tiny_sd1_lora), "--effect", "--base", str(base), "--rank", "1",
                                       "-q", *argv])
    assert said in err


@pytest.mark.parametrize("family, packed", [("sd1", 1), ("flux", 2)])
def test_the_size_multiple_is_the_pipelines(tiny_base, family, packed):
    """The VAE's scale factor; Flux packs 2 x 2 latents (8 and 16 on the real models; the tiny VAEs scale by 2)."""
    from lora_resize.diffusion import BaseModel
    base, _ = tiny_base(family)
    with BaseModel(base) as bm:
        step = bm.size_step()
        assert step == packed * bm.pipe.vae_scale_factor
        with pytest.raises(OptionsError, match=f"multiple of {step} pixels; give e.g. --size {2 * step}x{3 * step}"):
            bm.check_size((3 * step - 1, 3 * step))
        assert bm.check_size((2 * step, 3 * step)) == (2 * step, 3 * step)


def test_preview_api_refuses_bad_steps(tiny_base, tiny_sd1_lora):
    base, _ = tiny_base("sd1")
    for steps in (0, -1):
        with pytest.raises(OptionsError, match="--steps"):
            preview(tiny_sd1_lora, Probing(base=str(base), timesteps=1), steps=steps)


def test_the_page_refuses_bad_seeds_and_steps_in_its_status(tiny_base, tiny_sd1_lora, tmp_path):
    pytest.importorskip("gradio", reason="the [ui] extra")
    from lora_resize.ui.app import App
    base, _ = tiny_base("sd1")
    app = App(tmp_path / "work", base=base)
    for seed, steps, said in ((1e30, 1, "--seed"), (-1, 1, "--seed"), (0, 0, "--steps"), (0, -3, "--steps"),
                              (0, 1.5, "--steps")):
        status = app.preview(str(tiny_sd1_lora), None, "a cat", seed, steps, "--rank 1")[-1]
        assert status.startswith("error: ") and said in status, (seed, steps, status)


def test_a_bad_setting_is_named(tiny_base, tiny_sd1_lora, capsys):
    base, _ = tiny_base("sd1")
    capsys.readouterr()
    err = refused_in_one_line(capsys, ["preview", str(tiny_sd1_lora), "--base", str(base), "--setting", "--rank 4",
                                       "--setting", "--rank 0", "-q"])
    assert '--setting "--rank 0": rank must be a whole number >= 1, got 0' in err


def test_the_page_names_its_bad_settings_line(tiny_base, tiny_sd1_lora, tmp_path):
    pytest.importorskip("gradio", reason="the [ui] extra")
    from lora_resize.ui.app import App
    base, _ = tiny_base("sd1")
    status = App(tmp_path / "work", base=base).preview(str(tiny_sd1_lora), None, "a cat", 0, 1,
                                                       "--rank 4\n\n--rank 0")[-1]
    assert status.startswith("error: settings line 3 ('--rank 0'): rank must be"), status


@pytest.mark.parametrize("flag", [["--max-effect-error", "0.1"], ["--seed", "0"], ["--probe-steps", "4"],
                                  ["--size", "64"], ["--prompt", "a cat"], ["--base-config", "x"]])
def test_every_effect_only_flag_is_refused_without_effect(tiny_sd1_lora, capsys, flag):
    """One rule: given without --effect (even at its default value) it would be ignored."""
    err = refused_in_one_line(capsys, ["analyze", str(tiny_sd1_lora), *flag])
    assert f"{flag[0]} is read only with --effect" in err and "add --effect" in err


def _cli(argv: list[str], **env) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (a library's once-only notices are printed again there), this checkout's source
    first on the path."""
    src = str(Path(lora_resize.__file__).parents[1])
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.run([sys.executable, "-m", "lora_resize.cli", *argv], capture_output=True, text=True,
                          env=environ, timeout=600)


@pytest.mark.parametrize("form", ["folder", "single"])
def test_nothing_but_our_lines_on_stderr(tiny_base, tiny_sd1_lora, tmp_path, form):
    """diffusers' and transformers' notices (float32 modules, torchvision, Hub downloads) are silenced while the
    diffusion room loads and runs pipelines (diffusion.pipeline.quiet)."""
    base, config = tiny_base("sd1", form)
    argv = ["preview", str(tiny_sd1_lora), "--base", str(base), "--steps", "1", "--probe-steps", "1", "-q",
            "-o", str(tmp_path / "g.png"), "--setting", "--rank 1"]
    run = _cli(argv + (["--base-config", str(config)] if form == "single" else []))
    assert run.returncode == 0 and run.stderr == "", run.stderr


def test_quiet_restores_the_libraries_levels():
    import diffusers
    import transformers

    from lora_resize.diffusion.pipeline import quiet
    levels = diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity()
    with quiet():
        assert diffusers.utils.logging.get_verbosity() == transformers.utils.logging.get_verbosity() == 40
    assert (diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity()) == levels


def test_a_single_file_base_without_its_configs_is_one_line(tiny_base, tiny_sd1_lora):
    """Offline (no Hub to fetch the configs from): one line, ours, naming --base-config."""
    base, _ = tiny_base("sd1", "single")
    run = _cli(["preview", str(tiny_sd1_lora), "--base", str(base), "--steps", "1", "--probe-steps", "1", "-q"],
               HF_HUB_OFFLINE="1")
    err = run.stderr.strip()
    assert run.returncode == 2 and err.count("\n") == 0 and err.startswith("lora-resize: error:") \
        and "--base-config" in err, err


def test_ui_checks_its_base_at_start_up_without_loading_it(tiny_base, tiny_sd1_lora, monkeypatch, capsys):
    """What can be checked cheaply (a folder's model_index.json, a file's header) is refused at start-up, not when
    Preview is pressed; a single file without --base-config is said in one line (the Hub will be asked)."""
    pytest.importorskip("gradio", reason="the [ui] extra")
    from lora_resize.ui import app
    served = []
    monkeypatch.setattr(app, "serve", lambda *a, **k: served.append(k))
    single, config = tiny_base("sd1", "single")
    flux, _ = tiny_base("flux", "single")
    capsys.readouterr()
    assert "is not a single-file SD1.5, SDXL or Flux.1 checkpoint" in refused_in_one_line(
        capsys, ["ui", "--base", str(tiny_sd1_lora)])  # a LoRA, not a model
    assert "give --base-config DIR" in refused_in_one_line(capsys, ["ui", "--base", str(flux)])
    assert "not a diffusers pipeline folder" in refused_in_one_line(
        capsys, ["ui", "--base", str(single), "--base-config", str(single.parent)])
    assert not served
    assert main(["ui", "--base", str(single)]) == 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "note: --base" in err and "--base-config DIR" in err, err
    assert main(["ui", "--base", str(single), "--base-config", str(config)]) == 0
    assert capsys.readouterr().err == "" and len(served) == 2
