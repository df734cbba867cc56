"""average: each weighting's written layers against the dense weighted mean of the updates (float64, weights
built here from each weighting's definition: the EMA recurrence run literally, the EDM2 power profile from its
sigma_rel relation checked numerically); order from metadata, names and --steps; refusals; the factor-wise
average measured against ours."""
from __future__ import annotations

import json
import math

import pytest
import torch

import lora_resize
from lora_resize.cli import main

from helpers import (DOWN, UP, Spec, best_rank_k, dense_dw, layer_names, load_st, make_state_dict, refused_in_one_line,
                     rel_err, write_lora)

SPECS = [Spec("lora_te_text_model_encoder_layers_0_mlp_fc1", 40, 24, 6, alpha=3.0),
         Spec("lora_unet_down_blocks_0_resnets_0_conv1", 12, 6, 4, kernel=3, alpha=2.0)]
STEPS = [300, 100, 500, 200]  # the files' steps, given out of order


def checkpoints(folder, steps=STEPS, meta=lambda s: {"ss_steps": str(s)}, name=lambda i, s: f"run-{i}"):
    """One run's checkpoints in `folder`: a shared start plus a drift that grows with the step (correlated, like
    training)."""
    folder.mkdir(parents=True, exist_ok=True)
    start = make_state_dict(SPECS, seed=0)
    paths = []
    for i, s in enumerate(steps):
        drift = make_state_dict(SPECS, seed=10 + i)
        sd = {k: v + 0.1 * (s / 100) * drift[k] if k.endswith((UP, DOWN)) else v for k, v in start.items()}
        paths.append(write_lora(folder / f"{name(i, s)}.safetensors", sd, meta(s)))
    return paths


def dense_mean(paths, weights):
    """sum_i w_i dW_i per layer in float64, from the files (weights in the order of `paths`)."""
    sds = [load_st(p)[0] for p in paths]
    return {n: sum(w * dense_dw(sd, n) for w, sd in zip(weights, sds)) for n in layer_names(sds[0])}


def ema_by_recurrence(xs, beta):
    """ema = x_1; ema = beta * ema + (1 - beta) * x_i: run literally on the per-checkpoint values."""
    ema = xs[0]
    for x in xs[1:]:
        ema = beta * ema + (1 - beta) * x
    return ema


def sigma_rel_of(gamma):  # EDM2 (arXiv 2312.02696) eq. 3, written out here
    return math.sqrt(gamma + 1) / ((gamma + 2) * math.sqrt(gamma + 3))


def power_weights(steps, sigma_rel):
    """Karras et al.'s profile t^gamma integrated over each checkpoint's steps (t_{i-1}, t_i], t_0 = 0, with gamma
    the largest real root of their cubic (Algorithm 2), then checked against the sigma_rel relation."""
    t = sigma_rel ** -2
    roots = torch.linalg.eigvals(torch.tensor([[-7.0, -(16 - t), -(12 - t)], [1, 0, 0], [0, 1, 0]],
                                              dtype=torch.float64))
    gamma = max(float(r.real) for r in roots if abs(float(r.imag)) < 1e-9)
    assert sigma_rel_of(gamma) == pytest.approx(sigma_rel, rel=1e-10)
    cum = [0.0] + [s ** (gamma + 1) for s in steps]
    raw = [b - a for a, b in zip(cum, cum[1:])]
    return [r / sum(raw) for r in raw]


def reference_weights(weighting, n, steps, beta=None, sigma_rel=None):
    if weighting == "uniform":
        return [1 / n] * n
    if weighting == "linear":
        return [i / (n * (n + 1) / 2) for i in range(1, n + 1)]
    if weighting == "ema":  # the recurrence on unit vectors gives each checkpoint's weight
        return ema_by_recurrence(list(torch.eye(n, dtype=torch.float64)), beta).tolist()
    return power_weights(steps, sigma_rel)


CASES = [("uniform", {}), ("linear", {}), ("ema", {"beta": 0.7}), ("power", {"sigma_rel": 0.1}),
         ("power", {"sigma_rel": 0.27})]


@pytest.mark.parametrize("weighting,params", CASES)
@pytest.mark.parametrize("k", [2, None])
def test_each_weighting_writes_the_best_rank_k_of_the_dense_weighted_mean(tmp_path, weighting, params, k):
    paths = checkpoints(tmp_path)
    order = sorted(range(len(paths)), key=lambda i: STEPS[i])
    ref_w = reference_weights(weighting, len(paths), sorted(STEPS), **params)
    ref = dense_mean([paths[i] for i in order], ref_w)
    out = tmp_path / "avg.safetensors"
    rank = {"rank": k, "conv_rank": k} if k else {"rank": 64}  # 64: above every layer's rank, all of it kept
    res = lora_resize.average(paths, out, weighting=weighting, precision="float", **params, **rank)
    O = load_st(out)[0]
    for name, dw in ref.items():
        target = best_rank_k(dw.reshape(dw.shape[0], -1), k) if k else dw
        # at full rank the average is exact to the save dtype (float32)
        assert rel_err(dense_dw(O, name).reshape(target.shape), target) < 1e-6, name
    assert [r["step"] for r in res.options["order"]] == sorted(STEPS)
    assert [r["weight"] for r in res.options["order"]] == pytest.approx(ref_w, rel=1e-12)
    assert sum(r["weight"] for r in res.options["order"]) == pytest.approx(1, rel=1e-14)


def test_full_rank_average_is_exact_to_the_save_dtype(tmp_path):
    """fp16 output: every written update within fp16 rounding of the dense mean."""
    paths = checkpoints(tmp_path)
    out = tmp_path / "avg.safetensors"
    lora_resize.average(paths, out, weighting="ema", beta=0.5, precision="fp16", rank=64)
    ref = dense_mean(sorted(paths, key=lambda p: STEPS[paths.index(p)]),
                     reference_weights("ema", 4, None, beta=0.5))
    O = load_st(out)[0]
    for name, dw in ref.items():
        assert rel_err(dense_dw(O, name).reshape(dw.shape), dw) < 2e-3, name


def test_musubi_sigma_rel_weights_are_ours_at_file_index_steps(tmp_path):
    """musubi-tuner's lora_post_hoc_ema.py with --sigma_rel updates beta_t = (1 - 1/t)^(gamma+1) at t = 1.. for
    the 2nd.. files: the same as our power weights at steps 0, 1, ..., N-1 (the first file weightless)."""
    from lora_resize.ops.average import average_weights, sigma_rel_gamma
    gamma = sigma_rel_gamma(0.15)
    xs = list(torch.eye(5, dtype=torch.float64))
    ema = xs[0]
    for t, x in enumerate(xs[1:], start=1):
        b = (1 - 1 / t) ** (gamma + 1)
        ema = b * ema + (1 - b) * x
    assert average_weights("power", 5, [0, 1, 2, 3, 4], sigma_rel=0.15) == pytest.approx(ema.tolist(), abs=1e-15)


def test_order_from_metadata_names_and_steps(tmp_path):
    # ss_steps (sd-scripts, musubi)
    paths = checkpoints(tmp_path / "a")
    res = lora_resize.average(paths, tmp_path / "a.safetensors", weighting="linear", rank=2)
    assert res.options["steps_from"] == "ss_steps"
    assert [r["file"] for r in res.options["order"]] == ["run-1.safetensors", "run-3.safetensors",
                                                         "run-0.safetensors", "run-2.safetensors"]
    # ai-toolkit's training_info, its names x_000000300
    paths = checkpoints(tmp_path / "b", meta=lambda s: {"training_info": json.dumps({"step": s, "epoch": 0})})
    res = lora_resize.average(paths, tmp_path / "b.safetensors", weighting="linear", rank=2)
    assert res.options["steps_from"] == "training_info"
    assert [r["step"] for r in res.options["order"]] == sorted(STEPS)
    # no metadata: the last number of the name (sd-scripts' x-000004, ai-toolkit's x_000001000)
    paths = checkpoints(tmp_path / "c", meta=lambda s: None, name=lambda i, s: f"flux2-v3_{s:09d}")
    res = lora_resize.average(paths, tmp_path / "c.safetensors", weighting="ema", beta=0.5, rank=2)
    assert res.options["steps_from"] == "file names"
    assert [r["step"] for r in res.options["order"]] == sorted(STEPS)
    # --steps overrides both, in the order of the files
    res = lora_resize.average(paths, tmp_path / "d.safetensors", weighting="ema", beta=0.5, rank=2,
                              steps="4,3,2,1")
    assert res.options["steps_from"] == "--steps"
    assert [r["file"] for r in res.options["order"]] == [p.name for p in reversed(paths)]
    # uniform without any steps keeps the order given
    paths = checkpoints(tmp_path / "e", meta=lambda s: None, name=lambda i, s: "abcd"[i])
    res = lora_resize.average(paths, tmp_path / "e.safetensors", rank=2)
    assert res.options["steps_from"] is None and [r["file"] for r in res.options["order"]] == [p.name for p in paths]


@pytest.mark.parametrize("stem,step", [
    ("flux-000004", 4), ("flux_000001000", 1000), ("flux-step00001000", 1000), ("lora_e10", 10),
    ("2025-01-02_03-04-05-save-1200-3-100", 1200),  # OneTrainer: global step, epoch, epoch step
    ("no-number", None)])
def test_step_from_a_file_name(stem, step):
    from pathlib import Path

    from lora_resize.ops.average import name_step
    assert name_step(Path(stem + ".safetensors"))[0] == step


def test_names_numbering_epochs_and_steps_are_not_mixed(tmp_path, capsys):
    """sd-scripts names epoch saves x-000004 and step saves x-step00001000: two counts, refused for an order."""
    paths = checkpoints(tmp_path, steps=[1, 2, 3], meta=lambda s: None,
                        name=lambda i, s: ["x-000002", "x-step00000500", "x-000004"][i])
    err = refused_in_one_line(capsys, ["average", *map(str, paths), "-o", str(tmp_path / "o.safetensors"),
                                       "--rank", "2", "--weighting", "linear"])
    assert "number them in different ways" in err and "--steps" in err


def test_one_step_source_for_all_never_a_mix(tmp_path):
    """One file without ss_steps: the names' numbers (epochs) order them all, not steps for some, epochs for
    others."""
    paths = checkpoints(tmp_path, steps=[400, 800, 1200], meta=lambda s: {"ss_steps": str(s)} if s != 800 else {},
                        name=lambda i, s: f"x-{3 - i:06d}")
    res = lora_resize.average(paths, tmp_path / "o.safetensors", weighting="linear", rank=2)
    assert res.options["steps_from"] == "file names"
    assert [r["step"] for r in res.options["order"]] == [1, 2, 3]


def test_metadata_records_order_weights_and_steps(tmp_path, capsys):
    paths = checkpoints(tmp_path)
    out = tmp_path / "avg.safetensors"
    assert main(["average", *map(str, paths), "-o", str(out), "--weighting", "ema", "--beta", "0.6",
                 "--rank", "2"]) == 0
    printed = capsys.readouterr().out
    assert ("average of 4 checkpoints (ema, beta 0.6), in step order from ss_steps: run-1.safetensors (step 100)"
            in printed)
    meta = load_st(out)[1]
    record = json.loads(meta["lora_resize"])
    assert record["operation"] == "average"
    assert [(s["file"], s["step"]) for s in record["sources"]] == [
        ("run-1.safetensors", 100), ("run-3.safetensors", 200), ("run-0.safetensors", 300), ("run-2.safetensors", 500)]
    assert [s["weight"] for s in record["sources"]] == pytest.approx(reference_weights("ema", 4, None, beta=0.6))
    assert meta["ss_steps"] == "500"
    assert meta["ss_training_comment"].startswith("averaged with lora-resize")
    assert main(["average", *map(str, paths), "-o", str(tmp_path / "j.safetensors"), "--rank", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["weight"] for r in data["options"]["order"]] == pytest.approx([0.25] * 4)


@pytest.mark.parametrize("argv,words", [
    (["--weighting", "ema"], "needs --beta"),
    (["--weighting", "ema", "--beta", "1"], "strictly between 0 and 1"),
    (["--weighting", "ema", "--beta", "0"], "strictly between 0 and 1"),
    (["--weighting", "ema", "--beta", "nan"], "strictly between 0 and 1"),
    (["--beta", "0.9"], "read only by --weighting ema"),
    (["--weighting", "power", "--beta", "0.9"], "read only by --weighting ema"),
    (["--weighting", "power", "--sigma-rel", "0.31"], "0 < sigma_rel <= 0.300283;"),
    (["--weighting", "power", "--sigma-rel", "0"], "0 < sigma_rel <= 0.300283;"),
    (["--weighting", "power"], "needs --sigma-rel"),
    (["--weighting", "linear", "--steps", "1,2"], "2 value(s) for 4 checkpoint(s)"),
    (["--weighting", "linear", "--steps", "1,x,3,4"], "'x' is not a whole number"),
    (["--weighting", "linear", "--steps", "1,2,2,4"], "both at step 2"),
    (["--weighting", "linear", "--steps", "1,2,-3,4"], ">= 0"),
    # a value starting with a minus and a digit is the flag's value, judged by our check, not a missing argument
    (["--weighting", "linear", "--steps", "-5,1,2,3"], ">= 0"),
    (["--weighting", "ema", "--beta", "-1e-3"], "strictly between 0 and 1"),
    (["--weighting", "power", "--sigma-rel", "0.1", "--steps", "0,0,0,0"], "both at step 0"),
])
def test_bad_settings_are_refused_in_one_line(tmp_path, capsys, argv, words):
    paths = checkpoints(tmp_path)
    out = tmp_path / "avg.safetensors"
    err = refused_in_one_line(capsys, ["average", *map(str, paths), "-o", str(out), "--rank", "2", *argv])
    assert words in err
    assert not out.exists()


def test_refusals_about_the_order(tmp_path, capsys):
    paths = checkpoints(tmp_path, meta=lambda s: None, name=lambda i, s: "abcd"[i])
    for w in (["--weighting", "linear"], ["--weighting", "ema", "--beta", "0.5"],
              ["--weighting", "power", "--sigma-rel", "0.1"]):
        err = refused_in_one_line(capsys, ["average", *map(str, paths), "-o", str(tmp_path / "o.safetensors"),
                                           "--rank", "2", *w])
        assert "records no step" in err and "--steps 100,200,..." in err
    same = checkpoints(tmp_path / "s", steps=[100, 100, 200, 300])
    err = refused_in_one_line(capsys, ["average", *map(str, same), "-o", str(tmp_path / "o.safetensors"),
                                       "--rank", "2"])
    assert "both at step 100 (from ss_steps)" in err
    err = refused_in_one_line(capsys, ["average", str(paths[0]), "-o", str(tmp_path / "o.safetensors"), "--rank", "2"])
    assert "two or more checkpoints" in err
    with pytest.raises(lora_resize.OptionsError, match="takes no density"):
        lora_resize.average(paths, tmp_path / "o.safetensors", density=0.5)
    assert not (tmp_path / "o.safetensors").exists()


MIXED_SOURCES = {  # (metadata, name) per file: each file has a step, no one source has all of them
    "two metadata keys": [({"ss_steps": "50"}, "eqA"), ({"training_info": json.dumps({"step": 700})}, "ti1")],
    "metadata or name": [({"ss_steps": "50"}, "eqA"), (None, "b-000003")],
    "name form or metadata": [(None, "x-step00000500"), ({"training_info": json.dumps({"step": 9})}, "y")],
}


@pytest.mark.parametrize("kind", MIXED_SOURCES)
@pytest.mark.parametrize("weighting", [["--weighting", "linear"], ["--weighting", "ema", "--beta", "0.5"],
                                       ["--weighting", "power", "--sigma-rel", "0.1"]])
def test_steps_from_different_sources_are_refused(tmp_path, capsys, kind, weighting):
    """ss_steps for one file and ai-toolkit's training_info for another (two trainers, maybe two counts), or a
    step some files have only in metadata and others only in their names: refused in one line asking for --steps
    (it was an internal StopIteration), nothing written; uniform needs no order and keeps the order given."""
    files = MIXED_SOURCES[kind]
    paths = checkpoints(tmp_path, steps=[1, 2], meta=lambda s: files[s - 1][0], name=lambda i, s: files[i][1])
    out = tmp_path / "o.safetensors"
    err = refused_in_one_line(capsys, ["average", *map(str, paths), "-o", str(out), "--rank", "8", *weighting])
    assert "steps come from different sources" in err and "--steps 100,200,..." in err
    assert paths[0].name in err and paths[1].name in err
    assert not out.exists()
    res = lora_resize.average(paths, out, rank=8)
    assert res.options["steps_from"] is None and [r["file"] for r in res.options["order"]] == [p.name for p in paths]


def test_ss_steps_and_ss_epoch_are_the_last_checkpoints_own(tmp_path, capsys):
    """The output's ss_steps / ss_epoch are the last checkpoint's metadata values, never the number that ordered
    it (a name's number is the epoch in sd-scripts' x-000010); our record keeps that number as each source's step."""
    # no metadata: ordered by the names' numbers, no ss_steps or ss_epoch written
    paths = checkpoints(tmp_path / "a", steps=[10, 2, 4], meta=lambda s: None, name=lambda i, s: f"x-{s}")
    out = tmp_path / "a.safetensors"
    assert main(["average", *map(str, paths), "-o", str(out), "--weighting", "ema", "--beta", "0.8",
                 "--rank", "12"]) == 0
    meta = load_st(out)[1]
    assert "ss_steps" not in meta and "ss_epoch" not in meta
    assert [(s["file"], s["step"]) for s in json.loads(meta["lora_resize"])["sources"]] == [
        ("x-2.safetensors", 2), ("x-4.safetensors", 4), ("x-10.safetensors", 10)]
    # ordered by epoch names (the middle file has no ss_steps): the last file's own ss_steps and ss_epoch
    own = {1: {"ss_steps": "400", "ss_epoch": "1"}, 2: {"ss_epoch": "2"}, 3: {"ss_steps": "1200", "ss_epoch": "3"}}
    paths = checkpoints(tmp_path / "b", steps=[3, 1, 2], meta=lambda s: own[s], name=lambda i, s: f"x-{s:06d}")
    res = lora_resize.average(paths, tmp_path / "b.safetensors", weighting="linear", rank=2)
    assert res.options["steps_from"] == "file names"
    meta = load_st(tmp_path / "b.safetensors")[1]
    assert (meta["ss_steps"], meta["ss_epoch"]) == ("1200", "3")
    # ai-toolkit's training_info: no sd-scripts field to keep
    paths = checkpoints(tmp_path / "c", meta=lambda s: {"training_info": json.dumps({"step": s})})
    lora_resize.average(paths, tmp_path / "c.safetensors", weighting="linear", rank=2)
    assert "ss_steps" not in load_st(tmp_path / "c.safetensors")[1]
    # --steps puts the file at ss_steps 100 last: its own ss_steps, not the --steps value
    paths = checkpoints(tmp_path / "d")
    lora_resize.average(paths, tmp_path / "d.safetensors", weighting="linear", rank=2, steps=[4, 7, 2, 9])
    assert load_st(tmp_path / "d.safetensors")[1]["ss_steps"] == str(STEPS[3])


@pytest.mark.parametrize("kwargs,words", [
    ({"weighting": "ema", "beta": "0.8"}, "--beta must be a number, got '0.8' (str)"),
    ({"weighting": "ema", "beta": True}, "--beta must be a number"),
    ({"weighting": "power", "sigma_rel": "0.1"}, "--sigma-rel must be a number, got '0.1' (str)"),
    ({"weighting": "linear", "steps": [100, "200", 300, 400]}, "'200' (str) is not a whole number"),
    ({"weighting": "linear", "steps": [100.0, 200, 300, 400]}, "100.0 (float) is not a whole number"),
    ({"weighting": "linear", "steps": [True, 2, 3, 4]}, "True (bool) is not a whole number"),
    ({"weighting": "linear", "steps": 100}, "one whole number per file"),
    ({"weighting": "linear", "steps": [1, 2, 3, None]}, "None (NoneType) is not a whole number"),
])
def test_python_parameters_of_the_wrong_type_are_refused(tmp_path, kwargs, words):
    """From Python a string or a bool is not a number: said so, not 'out of range' or an internal TypeError."""
    paths = checkpoints(tmp_path)
    out = tmp_path / "o.safetensors"
    with pytest.raises(lora_resize.OptionsError) as e:
        lora_resize.average(paths, out, rank=2, **kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()


def test_steps_as_numpy_integers(tmp_path):
    import numpy as np
    paths = checkpoints(tmp_path)
    res = lora_resize.average(paths, tmp_path / "o.safetensors", weighting="linear", rank=2,
                              steps=np.array([4, 3, 2, 1]))
    assert [r["step"] for r in res.options["order"]] == [1, 2, 3, 4]
    assert json.loads(load_st(tmp_path / "o.safetensors")[1]["lora_resize"])["sources"][0]["step"] == 1


def test_factor_wise_average_differs_from_the_mean_of_the_updates(tmp_path):
    """mean(up) @ mean(down) (musubi-tuner's post-hoc EMA, PEFT's linear combination of factors) adds the cross
    terms up_i @ down_j: measured against the dense mean, next to ours."""
    paths = checkpoints(tmp_path)
    order = sorted(range(len(paths)), key=lambda i: STEPS[i])
    w = reference_weights("ema", len(paths), None, beta=0.7)
    ref = dense_mean([paths[i] for i in order], w)
    out = tmp_path / "avg.safetensors"
    lora_resize.average(paths, out, weighting="ema", beta=0.7, precision="float", rank=64)
    sds = [load_st(paths[i])[0] for i in order]
    O = load_st(out)[0]
    ours, theirs = [], []
    for name, dw in ref.items():
        fw = {k: sum(wi * sd[k].double() for wi, sd in zip(w, sds)) for k in (name + UP, name + DOWN, name + ".alpha")}
        theirs.append(rel_err(dense_dw(fw, name).reshape(dw.shape), dw))
        ours.append(rel_err(dense_dw(O, name).reshape(dw.shape), dw))
    assert max(ours) < 1e-6
    assert min(theirs) > 100 * max(ours)  # measured: the cross terms are far above rounding
