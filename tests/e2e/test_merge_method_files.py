"""merge --merge-method through the CLI and the API on small SD1.5-like (kohya LoCon: linear, conv 1x1 and 3x3, a
zero layer) and Flux-like files: each written layer is the best rank-k approximation of the method's merged update,
computed densely in float64 by lora_resize.testing.dense_merge (the papers' definitions; the elementwise methods on
the canonical cores); the record and the summary name the method; the refusals are one line and write nothing."""
from __future__ import annotations

import json

import pytest
import torch

import lora_resize
from lora_resize.cli import main
from lora_resize.testing import archs, loras
from lora_resize.testing.dense_merge import dense_core_bases, dense_merge

from helpers import (BASE_METADATA, best_rank_k, dense_dw, file_sha, layer_names, load_st, make_state_dict,
                     refused_in_one_line, rel_err, standard_specs, write_lora)


def sd15_pair(tmp_path):
    a = write_lora(tmp_path / "a.safetensors", make_state_dict(standard_specs(), seed=1), dict(BASE_METADATA))
    b = write_lora(tmp_path / "b.safetensors", make_state_dict(standard_specs(), seed=2), dict(BASE_METADATA))
    return a, b


def reference(method: str, taus: list[torch.Tensor], name: str, **params) -> torch.Tensor:
    """The method's merged update: the dense definition (tsv, iso, sum), or the dense method on the canonical
    cores for the elementwise ones (README: Merge methods)."""
    if method in ("tsv", "iso", "sum") or not any(bool(t.any()) for t in taus):
        return dense_merge(method, taus, name=name, **params)
    u, v = dense_core_bases(taus)
    return u @ dense_merge(method, [u.T @ t @ v for t in taus], name=name, **params) @ v.T


def check_layers(files: list, weights: list[float], out, rows, method: str, k: int, **params) -> None:
    sds = [load_st(f)[0] for f in files]
    written = load_st(out)[0]
    assert sorted(r.name for r in rows) == layer_names(sds[0])
    for row in rows:
        taus = [w * dense_dw(sd, row.name) for w, sd in zip(weights, sds)]
        merged = reference(method, taus, row.name, **params)
        want, got = best_rank_k(merged, k), dense_dw(written, row.name)
        if method == "iso":  # a flat spectrum: every rank-k piece of it is a best rank-k approximation
            scale = float(torch.linalg.norm(merged)) or 1.0
            assert int(torch.linalg.matrix_rank(got)) <= k
            assert abs(float(torch.linalg.norm(merged - got)) - float(torch.linalg.norm(merged - want))) < 2e-5 * scale
            assert rel_err(torch.linalg.svdvals(got)[:k], torch.linalg.svdvals(want)[:k]) < 2e-5, row.name
        else:
            assert rel_err(got, want) < 2e-5, (method, row.name, rel_err(got, want))


def test_cli_ties_writes_the_best_rank_k_of_the_ties_merge_and_records_it(tmp_path, capsys):
    a, b = sd15_pair(tmp_path)
    out = tmp_path / "ab.safetensors"
    before = file_sha(a), file_sha(b)
    assert main(["merge", f"{a}:0.8", str(b), "--merge-method", "ties", "--density", "0.3", "--rank", "16",
                 "--precision", "float", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "(merge method ties, density 0.3)" in text.splitlines()[0]
    assert (file_sha(a), file_sha(b)) == before
    meta = load_st(out)[1]
    rec = json.loads(meta["lora_resize"])
    assert rec["operation"] == "merge" and rec["merge_method"] == "ties" and rec["density"] == 0.3
    res = lora_resize.merge([f"{a}:0.8", b], tmp_path / "api.safetensors", rank=16, precision="float",
                            merge_method="ties", density=0.3)
    assert res.options["merge_method"] == "ties" and res.options["density"] == 0.3
    assert load_st(tmp_path / "api.safetensors")[0].keys() == load_st(out)[0].keys()
    check_layers([a, b], [0.8, 1.0], out, res.layers, "ties", 16, density=0.3)


@pytest.mark.parametrize("method, params", [("dare", {"density": 0.4, "seed": 5}), ("magnitude_prune", {}),
                                            ("tsv", {}), ("iso", {}), ("ties", {})])
def test_api_merge_methods_write_the_best_rank_k_of_their_merged_update(tmp_path, method, params):
    a, b = sd15_pair(tmp_path)
    out = tmp_path / "ab.safetensors"
    res = lora_resize.merge([f"{a}:0.6", f"{b}:-0.9"], out, rank=8, precision="float", merge_method=method,
                            **params)
    rec = json.loads(load_st(out)[1]["lora_resize"])
    defaults = lora_resize.core.merging.MergeSettings(method, **params).as_dict()
    assert {k: rec[k] for k in defaults} == defaults
    check_layers([a, b], [0.6, -0.9], out, res.layers, method, 8, **params)


@pytest.mark.parametrize("method", ["ties", "tsv", "iso", "dare"])
def test_flux_like_merge_of_three(tmp_path, method):
    shapes = archs.flux1(width=16, double=1, single=1, in_channels=4, context=12)
    files = [write_lora(tmp_path / f"{i}.safetensors", loras.lora_state_dict(shapes, "musubi", rank=4, alpha=2.0,
                                                                             seed=10 + i)) for i in range(3)]
    out = tmp_path / "o.safetensors"
    assert main(["merge", *map(str, files), "--merge-method", method, "--rank", "6", "--precision", "float",
                 "-o", str(out), "-q"]) == 0
    res = lora_resize.merge(files, tmp_path / "api.safetensors", rank=6, precision="float", merge_method=method)
    assert load_st(tmp_path / "api.safetensors")[0].keys() == load_st(out)[0].keys()
    check_layers(files, [1.0, 1.0, 1.0], out, res.layers, method, 6)


def test_dare_files_are_the_same_for_a_seed_and_thread_count_and_differ_for_another_seed(tmp_path):
    a, b = sd15_pair(tmp_path)
    outs = []
    for seed, threads in ((3, 1), (3, 2), (4, 1)):
        out = tmp_path / f"{seed}_{threads}.safetensors"
        assert main(["merge", str(a), str(b), "--merge-method", "dare", "--seed", str(seed), "--rank", "8",
                     "--threads", str(threads), "-o", str(out), "-q"]) == 0
        outs.append(load_st(out)[0])
    assert outs[0].keys() == outs[1].keys() == outs[2].keys()
    assert all(outs[0][k].numpy().tobytes() == outs[1][k].numpy().tobytes() for k in outs[0])
    assert any(not torch.equal(outs[0][k], outs[2][k]) for k in outs[0] if k.endswith("lora_up.weight"))


@pytest.mark.parametrize("flags, why", [
    (["--density", "0.3"], "--density is not read by --merge-method sum"),
    (["--merge-method", "iso", "--density", "0.3"], "--density is not read by --merge-method iso"),
    (["--merge-method", "ties", "--density", "0"], "--density must be a number in (0, 1]"),
    (["--merge-method", "dare", "--density", "1.5"], "--density must be a number in (0, 1]"),
    (["--merge-method", "ties", "--seed", "1"], "--seed is not read by --merge-method ties"),
])
def test_options_a_method_does_not_read_or_bad_values_are_refused_in_one_line(tmp_path, capsys, flags, why):
    a, b = sd15_pair(tmp_path)
    out = tmp_path / "o.safetensors"
    err = refused_in_one_line(capsys, ["merge", str(a), str(b), "--rank", "4", "-o", str(out), *flags])
    assert why in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_merge_help_shows_every_method_and_its_help_line(capsys):
    from lora_resize.core.merging import MERGE_METHODS

    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for m in MERGE_METHODS.values():
        assert f"{m.name}: {' '.join(m.help.split())}" in text, m.name


def test_an_inputs_dare_masks_do_not_move_when_another_input_lacks_the_layer_or_has_weight_0(tmp_path):
    """DARE seeds each input's masks by its place among the inputs given: in a layer that input 2 lacks (and with
    input 2 at weight 0), input 3 keeps the masks it has where every input holds the layer."""
    a, b = sd15_pair(tmp_path)
    c = write_lora(tmp_path / "c.safetensors", make_state_dict(standard_specs(), seed=3), dict(BASE_METADATA))
    sd_b, meta_b = load_st(b)
    gone = layer_names(sd_b)[0]
    lacking = write_lora(tmp_path / "b_lacking.safetensors", {k: v for k, v in sd_b.items()
                                                               if not k.startswith(gone + ".")}, meta_b)
    sds = [load_st(f)[0] for f in (a, c)]
    for second, weight in ((lacking, 1.0), (b, 0.0)):
        out = tmp_path / f"o{weight}.safetensors"
        res = lora_resize.merge([a, f"{second}:{weight}", c], out, rank=64, precision="float",
                                merge_method="dare", density=0.5, seed=9)
        row = next(r for r in res.layers if r.name == gone)
        taus = [dense_dw(sd, gone) for sd in sds]
        u, v = dense_core_bases(taus)
        want = u @ dense_merge("dare", [u.T @ t @ v for t in taus], density=0.5, seed=9, name=gone,
                               positions=[0, 2]) @ v.T
        assert rel_err(dense_dw(load_st(out)[0], row.name), want) < 2e-5


def test_a_method_whose_merge_is_zero_says_so_without_calling_it_a_sum(tmp_path):
    a, _ = sd15_pair(tmp_path)
    res = lora_resize.merge([f"{a}:0.5", f"{a}:0.5", f"{a}:-1"], tmp_path / "o.safetensors", rank=4,
                            merge_method="iso")
    zero = [n for n in res.notes if "zero" in n]
    assert len(zero) == 1 and "iso" in zero[0] and "sum to zero" not in zero[0], res.notes


@pytest.mark.parametrize("method", ["sum", "ties", "dare", "magnitude_prune", "tsv", "iso"])
@pytest.mark.parametrize("single", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_an_input_with_nan_or_inf_is_refused_in_one_line_by_every_method(tmp_path, capsys, method, single, bad):
    a, _ = sd15_pair(tmp_path)
    sd = make_state_dict(standard_specs(), seed=2)
    name = layer_names(sd)[1]
    key = next(k for k in sd if k.startswith(name) and "lora_up" in k)
    sd[key][0, 0] = bad
    nan = write_lora(tmp_path / "nan.safetensors", sd, dict(BASE_METADATA))
    before = file_sha(a), file_sha(nan)
    out = tmp_path / "o.safetensors"
    inputs = [f"{nan}:0.5"] if single else [str(a), str(nan)]
    err = refused_in_one_line(capsys, ["merge", *inputs, "--merge-method", method, "--rank", "8", "-o", str(out)])
    assert f"layer {name} in nan.safetensors holds NaN or Inf values" in err, err
    assert not out.exists() and (file_sha(a), file_sha(nan)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "nan.safetensors"]


def test_a_single_input_merge_names_its_weight_and_method_and_a_long_seed_prints_exactly(tmp_path, capsys):
    a, _ = sd15_pair(tmp_path)
    out = tmp_path / "one.safetensors"
    assert main(["merge", f"{a}:0.5", "-o", str(out), "--merge-method", "ties", "--rank", "8"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "a.safetensors:0.5 -> one.safetensors (merge method ties, density 0.2)" in first, first
    seed = 99999999999999999999
    assert main(["merge", str(a), f"{a}:0.5", "-o", str(tmp_path / "two.safetensors"), "--merge-method", "dare",
                 "--seed", str(seed), "--rank", "8"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert f"(merge method dare, density 0.5, seed {seed})" in first, first
    from lora_resize.core.merging import MergeSettings
    settings = MergeSettings("dare", density=0.25, seed=seed)
    assert settings.label() == f"dare, density 0.25, seed {seed}"
    assert settings.flags() == ["--merge-method", "dare", "--density", "0.25", "--seed", str(seed)]


@pytest.mark.parametrize("dtypes, want", [((torch.float16, torch.bfloat16), torch.float32),
                                          ((torch.bfloat16, torch.float32), torch.float32),
                                          ((torch.float16, torch.float32), torch.float32),
                                          ((torch.bfloat16, torch.bfloat16), torch.bfloat16),
                                          ((torch.float16, torch.float16), torch.float16)])
def test_inputs_in_different_dtypes_merge_into_the_one_that_holds_both_in_either_order(tmp_path, dtypes, want):
    files = [write_lora(tmp_path / f"{i}.safetensors", make_state_dict(standard_specs(), seed=i, dtype=d),
                        dict(BASE_METADATA)) for i, d in enumerate(dtypes)]
    for order in (files, files[::-1]):
        out = tmp_path / f"o_{order[0].stem}.safetensors"
        res = lora_resize.merge(order, out, rank=8)
        written = load_st(out)[0]
        assert {t.dtype for k, t in written.items() if "lora_up" in k or "lora_down" in k} == {want}
        differ = [n for n in res.notes if "different precisions" in n]
        assert len(differ) == (dtypes[0] != dtypes[1]), res.notes
        assert not differ or f"saved as {res.precision}" in differ[0]


def test_a_method_notes_that_it_works_on_the_output_layouts_modules_when_an_input_was_fused_or_split(tmp_path):
    shapes = archs.flux1(width=16, double=1, single=1, in_channels=4, context=12)
    k = write_lora(tmp_path / "k.safetensors", loras.lora_state_dict(shapes, "musubi", rank=4, alpha=2.0, seed=1))
    k2 = write_lora(tmp_path / "k2.safetensors", loras.lora_state_dict(shapes, "musubi", rank=4, alpha=2.0, seed=2))
    d = tmp_path / "d.safetensors"
    assert main(["convert", str(k2), "-o", str(d), "--to", "diffusers", "--precision", "float", "-q"]) == 0

    def notes(files, method, **kw):
        res = lora_resize.merge(files, tmp_path / f"o{len(list(tmp_path.iterdir()))}.safetensors", rank=4,
                                merge_method=method, **kw)
        return [n for n in res.notes if "--output-format chooses it" in n]
    fused = notes([k, d], "tsv")
    assert len(fused) == 1 and "d.safetensors" in fused[0] and "fused" in fused[0] and "as one matrix" in fused[0]
    split = notes([d, k], "ties")
    assert len(split) == 1 and "k.safetensors" in split[0] and "split" in split[0] and "apart" in split[0]
    assert len(notes([k, k2], "iso", output_format="diffusers")) == 1  # both split by --output-format
    assert notes([k, d], "sum") == [] and notes([d, k], "sum") == []
    assert notes([k, k2], "tsv") == []  # one layout: nothing converted


def test_tsv_of_a_lora_and_itself_writes_the_mean_of_the_weighted_updates(tmp_path):
    a, _ = sd15_pair(tmp_path)
    out = tmp_path / "aa.safetensors"
    assert main(["merge", str(a), f"{a}:0.5", "--merge-method", "tsv", "--rank", "64", "--precision", "float",
                 "-o", str(out), "-q"]) == 0
    sd, written = load_st(a)[0], load_st(out)[0]
    for name in layer_names(sd):
        dw = dense_dw(sd, name)
        # each input's leading min(out, in) // 2 directions (tsv's default density, 1/2), then (1 + 0.5) / 2 of
        # them: README, tsv where inputs share directions (a truncated layer included: the 6 x 40 one)
        want = 0.75 * best_rank_k(dw, min(dw.shape) // 2)
        got = dense_dw(written, name)
        assert rel_err(got, want) < 2e-5 if bool(want.any()) else not bool(got.any()), name
