"""LoKr modules kept as LoKr (the default): lokr_w1 written as stored, W2 truncated exactly - judged by the float64
reference scale * kron(W1, W2_k) (W2_k the truncated SVD of W2, the best update of the form kron(W1, X) with rank
X <= k) and by ComfyUI's LoKr math (comfy/weight_adapter/lokr.py `LoKrAdapter.calculate_weight`, written out
below); sizes predicted == written, budgets, the 9x growth of the plain route, --as-lora, DoKr.
(lycoris-lora's own loader judges the same outputs in tests/oracles/test_loaders_lycoris.py.)"""
from __future__ import annotations

import json
import math

import pytest
import torch

import lora_resize
from lora_resize.cli import main
from lora_resize.options import ResizeOptions
from lora_resize.cli.flags import options_from_flags

from helpers import ALPHA, BASE_METADATA, DOWN, UP, best_rank_k, load_st, rel_err, write_lora
from test_lycoris import CONV, LIN, lokr, ref_lokr, _rebuild_tucker


def input_w1_w2(sd, name) -> tuple[torch.Tensor, torch.Tensor, float]:
    """W1, W2 (c x d*kh*kw) and the scale LyCORIS applies, float64, from an input LoKr with lokr_w1 whole."""
    g = {p: sd[f"{name}.{p}"].double() for p in ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
         if f"{name}.{p}" in sd}
    if "lokr_w2" in g:
        w2, scale = g["lokr_w2"], 1.0  # both halves whole: alpha ignored
    else:
        if "lokr_t2" in g:
            w2 = _rebuild_tucker(g["lokr_t2"], g["lokr_w2_a"], g["lokr_w2_b"])
        else:
            w2 = g["lokr_w2_a"] @ g["lokr_w2_b"].reshape(g["lokr_w2_b"].shape[0], -1)
        a = sd.get(name + ALPHA)
        scale = float(a) / g["lokr_w2_b"].shape[0] if a is not None else 1.0
    return g["lokr_w1"], w2.reshape(w2.shape[0], -1), scale


def comfy_update(out, name) -> torch.Tensor:
    """The update ComfyUI applies for a LoKr module (comfy/weight_adapter/lokr.py, LoKrAdapter.calculate_weight):
    w1 = lokr_w1, or lokr_w1_a @ lokr_w1_b (dim = lokr_w1_b's rows); w2 = lokr_w2, or lokr_w2_a @ lokr_w2_b, or the
    Tucker einsum with lokr_t2 (dim = lokr_w2_b's rows); a 4-D w2 gets w1 unsqueezed; scale alpha / dim, 1 without
    alpha or dim; kron(w1, w2) * scale, reshaped to the weight (here: out x in*kh*kw), in float64."""
    t = {k.split(".", 1)[1]: v.double() for k, v in out.items() if k.startswith(name + ".")}
    dim = None
    w1 = t.get("lokr_w1")
    if w1 is None:
        dim, w1 = t["lokr_w1_b"].shape[0], t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t.get("lokr_w2")
    if w2 is None:
        dim = t["lokr_w2_b"].shape[0]
        w2 = (torch.einsum("ijkl,jr,ip->prkl", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"]) if "lokr_t2" in t
              else t["lokr_w2_a"] @ t["lokr_w2_b"])
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    alpha = t.get("alpha")
    scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
    dw = torch.kron(w1.contiguous(), w2.contiguous()) * scale
    return dw.reshape(dw.shape[0], -1)


# name -> (builder(module name), module name, ranks to ask, {asked rank: "factored" / "whole"})
CASES = {
    "w2_factored": (lambda n: lokr(n, 4, 4, 24, 20, r=8, alpha=4.0, seed=1), LIN, {3: "factored", 99: "factored"}),
    "both_whole": (lambda n: lokr(n, 4, 4, 10, 6, w2="full", alpha=7.0, seed=2), LIN, {2: "factored", 99: "whole"}),
    "conv_flat": (lambda n: lokr(n, 4, 4, 8, 8, r=3, w2="flat", kernel=3, alpha=1.5, seed=3), CONV,
                  {2: "factored", 99: "factored"}),
    "conv_whole": (lambda n: lokr(n, 2, 2, 8, 6, w2="full", kernel=3, alpha=2.0, seed=4), CONV,
                   {2: "factored", 99: "whole"}),
    "conv_tucker": (lambda n: lokr(n, 4, 4, 8, 8, r=3, w2="tucker", kernel=3, alpha=1.5, seed=5), CONV,
                    {2: "factored", 99: "factored"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("cut", [True, False], ids=["cut", "whole_rank"])
def test_kept_lokr_is_the_exact_w2_truncation(tmp_path, case, cut):
    build, name, asked = CASES[case]
    k_asked = min(asked) if cut else max(asked)
    sd = build(name)
    src = write_lora(tmp_path / "in.safetensors", sd, dict(BASE_METADATA))
    res = lora_resize.resize(src, tmp_path / "out.safetensors", rank=k_asked, conv_rank=k_asked, precision="float")
    out, _ = load_st(tmp_path / "out.safetensors")
    parts = {k.split(".", 1)[1] for k in out if k.startswith(name + ".")}
    form = asked[k_asked]
    assert parts == ({"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"} if form == "factored" else
                     {"lokr_w1", "lokr_w2", "alpha"}), parts
    assert torch.equal(out[name + ".lokr_w1"], sd[name + ".lokr_w1"])  # W1 as stored, bit for bit
    if form == "whole" and sd[name + ".lokr_w1"].ndim and CONV == name:
        assert out[name + ".lokr_w2"].ndim == 4  # a whole conv W2 in its conv shape, as LyCORIS stores it
    if form == "factored":
        assert out[name + ".lokr_w2_b"].ndim == 2  # LyCORIS's non-Tucker form: the kernel folded into the columns
    w1, w2, scale = input_w1_w2(sd, name)
    S = torch.linalg.svdvals(w2)
    k = min(k_asked, int((S > 1e-9 * S[0]).sum()))
    (row,) = res.layers
    assert row.new_rank == k
    want = scale * torch.kron(w1, best_rank_k(w2, k))
    got = comfy_update(out, name)
    assert rel_err(got, want) < 1e-6, rel_err(got, want)
    # the error is exactly scale * ||W1||_F * the dropped tail of W2's singular values
    err = float(torch.linalg.norm(got - scale * torch.kron(w1, w2)))
    tail = abs(scale) * float(torch.linalg.norm(w1)) * float(S[k:].norm())
    assert abs(err - tail) <= 1e-6 * abs(scale) * float(torch.linalg.norm(w1)) * float(S[0])
    # the spectrum the rank policies read: ||W1||_F times W2's singular values, so retention is the update's
    assert row.fro_retained == pytest.approx(float(S[:k].norm() / S.norm()), rel=1e-9)
    if cut:
        assert any("kept as LoKr" in n for n in res.notes), res.notes


def test_ranks_chosen_by_a_method_read_the_kron_spectrum(tmp_path):
    """sv_fro on a LoKr reads ||W1||_F s_j(W2): the rank that keeps the asked share of the update's energy."""
    sd = lokr(LIN, 4, 4, 24, 20, r=12, alpha=4.0, seed=6)
    src = write_lora(tmp_path / "in.safetensors", sd, dict(BASE_METADATA))
    res = lora_resize.resize(src, tmp_path / "out.safetensors", method="sv_fro", param=0.9, precision="float")
    w1, w2, scale = input_w1_w2(sd, LIN)
    S = torch.linalg.svdvals(w2)
    fro = torch.sqrt(torch.cumsum(S ** 2, 0) / (S ** 2).sum())
    k = int((fro < 0.9 - 1e-12).sum()) + 1
    assert res.layers[0].new_rank == k
    out, _ = load_st(tmp_path / "out.safetensors")
    got, full = comfy_update(out, LIN), scale * torch.kron(w1, w2)
    assert float(torch.linalg.norm(got) / torch.linalg.norm(full)) == pytest.approx(float(fro[k - 1]), rel=1e-6)


def big_lokr_file(tmp_path, dtype=torch.float16):
    """Two LoKr modules of a 320 x 320 layer (W1 8 x 8, W2 40 x 40 at rank 16), as ai-toolkit/LyCORIS write them."""
    sd = {**lokr(LIN, 8, 8, 40, 40, r=16, alpha=16.0, seed=7),
          **lokr(LIN.replace("fc1", "fc2"), 8, 8, 40, 40, r=16, alpha=16.0, seed=8)}
    return write_lora(tmp_path / "big.safetensors", {k: v.to(dtype) for k, v in sd.items()},
                      {**BASE_METADATA, "ss_network_module": "lycoris.kohya",
                       "ss_network_args": json.dumps({"algo": "lokr", "factor": "8"})})


def test_resized_lokr_is_smaller_than_its_input(tmp_path):
    """The issue's 9x bug: a LoKr resized to a rank below its own was written as plain factors several times its
    size. Kept as LoKr it is smaller than the input; --as-lora shows the plain route's growth, and says so."""
    src = big_lokr_file(tmp_path)
    kept = lora_resize.resize(src, tmp_path / "kept.safetensors", rank=8)
    plain = lora_resize.resize(src, tmp_path / "plain.safetensors", rank=8, as_lora=True)
    assert kept.output_bytes < kept.input_bytes
    assert plain.output_bytes > 3 * plain.input_bytes
    (grown,) = [n for n in plain.notes if "larger than the input" in n]
    assert "2 LoKr module(s) are written as plain factors" in grown and "key names and metadata" not in grown
    converted = lora_resize.resize(src, tmp_path / "conv.safetensors", rank=8, output_format="kohya")
    (grown,) = [n for n in converted.notes if "larger than the input" in n]  # a conversion's plain factors too
    assert "LoKr module(s) are written as plain factors" in grown and "--output-format" in grown
    assert not any("larger than the input" in n for n in kept.notes)
    _, meta = load_st(tmp_path / "kept.safetensors")
    assert meta["ss_network_module"] == "lycoris.kohya"  # still a LyCORIS LoKr network
    assert json.loads(meta["ss_network_args"])["algo"] == "lokr"


@pytest.mark.parametrize("fields", [dict(method="fixed", rank=5), dict(method="sv_fro", param=0.8),
                                    dict(target_size=2_500), dict(target_fro=0.9)],
                         ids=["fixed", "sv_fro", "size", "fro"])
def test_analyze_predicts_the_written_size(tmp_path, fields):
    """Sizes of kept LoKr modules are exact (a rank step costs c + d*kh*kw elements, W1 is written beside): what
    analyze predicts is what resize writes, to the byte, and a size budget is met."""
    src = big_lokr_file(tmp_path)
    a = lora_resize.analyze(src, sweep={}, **fields)
    dst = tmp_path / "out.safetensors"
    res = lora_resize.resize(src, dst, **fields)
    assert a.chosen.output_bytes == dst.stat().st_size
    assert [int(k) for k in a.chosen.ranks] == [r.new_rank for r in res.layers]
    if "target_size" in fields:
        assert dst.stat().st_size <= fields["target_size"]
    if "target_fro" in fields:  # the budget's energy per step is the update's own: the written file keeps it
        out, _ = load_st(dst)
        sd, _ = load_st(src)
        kept = total = 0.0
        for n in (LIN, LIN.replace("fc1", "fc2")):
            w1, w2, scale = input_w1_w2(sd, n)
            kept += float(torch.linalg.norm(comfy_update(out, n))) ** 2
            total += float(torch.linalg.norm(scale * torch.kron(w1, w2))) ** 2
        assert math.sqrt(kept / total) >= 0.9 - 1e-3


def test_as_lora_writes_what_the_plain_route_writes(tmp_path, monkeypatch):
    """--as-lora turns the LoKr route off entirely: the file is, byte for byte, the one written when no module is
    kept as LoKr (the output before LoKr was kept)."""
    import lora_resize.formats as formats
    src = big_lokr_file(tmp_path)
    main(["resize", str(src), "-o", str(tmp_path / "a.safetensors"), "--rank", "4", "--as-lora", "--quiet"])
    monkeypatch.setattr(formats, "kept_lokr", lambda layout, infos: layout)
    main(["resize", str(src), "-o", str(tmp_path / "b.safetensors"), "--rank", "4", "--quiet"])
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    out, _ = load_st(tmp_path / "a.safetensors")
    assert not any("lokr_" in k for k in out)


def test_as_lora_flag_round_trips():
    opts = ResizeOptions(rank=4, as_lora=True)
    assert opts.flag_words() == ["--rank", "4", "--as-lora"]
    assert options_from_flags(opts.flags()) == opts
    assert "LyCORIS as LoRA" in opts.label()
    with pytest.raises(lora_resize.errors.OptionsError):
        ResizeOptions(rank=4, as_lora="yes")


def test_lokr_with_factored_w1_stays_plain_and_says_why(tmp_path):
    """LyCORIS builds lokr_w1_a/_b and lokr_w2_a/_b with one lora_dim, so W2 alone cannot shrink there: the module
    is written as plain factors (exact, as before) and the summary says why; a LoHa says why too."""
    from test_lycoris import loha
    sd = {**lokr(LIN, 8, 6, 10, 12, r=2, w1_factored=True, alpha=1.0, seed=9),
          **loha(CONV.replace("conv1", "conv2"), 20, 8, 3, alpha=1.5, kernel=3, flat=True, seed=4)}
    src = write_lora(tmp_path / "in.safetensors", sd, dict(BASE_METADATA))
    res = lora_resize.resize(src, tmp_path / "out.safetensors", rank=2, precision="float")
    out, _ = load_st(tmp_path / "out.safetensors")
    assert LIN + DOWN in out and not any("lokr_" in k for k in out)
    assert rel_err((out[LIN + UP].double() @ out[LIN + DOWN].double()) * float(out[LIN + ALPHA]) / 2,
                   best_rank_k(ref_lokr(sd, LIN), 2)) < 1e-6
    note = next(n for n in res.notes if "plain LoRA factors" in n)
    assert "lokr_w1 factored" in note and "Hadamard" in note, note


def test_dokr_keeps_its_magnitudes_and_stays_lycoris(tmp_path):
    """LoKr + DoRA (dora_scale): the magnitude vector is copied as trained beside the LoKr parts, and the
    metadata still describes the input's LyCORIS network (algo lokr, dora_wd) - ComfyUI's LoKr adapter applies
    it with its weight decomposition, lycoris-lora as a LokrModule with wd (tests/oracles)."""
    sd = {**lokr(LIN, 4, 4, 24, 20, r=8, alpha=4.0, seed=10), LIN + ".dora_scale": torch.rand(96, 1) + 0.5}
    meta = {**BASE_METADATA, "ss_network_module": "lycoris.kohya",
            "ss_network_args": json.dumps({"algo": "lokr", "dora_wd": "True", "factor": "4"})}
    src = write_lora(tmp_path / "in.safetensors", sd, meta)
    res = lora_resize.resize(src, tmp_path / "out.safetensors", rank=3, precision="float")
    out, written = load_st(tmp_path / "out.safetensors")
    assert torch.equal(out[LIN + ".dora_scale"], sd[LIN + ".dora_scale"])
    assert {LIN + ".lokr_w1", LIN + ".lokr_w2_a", LIN + ".lokr_w2_b"} <= set(out)
    assert json.loads(written["ss_network_args"]) == {"algo": "lokr", "dora_wd": "True", "factor": "4"}
    w1, w2, scale = input_w1_w2(sd, LIN)
    assert rel_err(comfy_update(out, LIN), scale * torch.kron(w1, best_rank_k(w2, 3))) < 1e-6
    assert res.copied[LIN + ".dora_scale"] == "DoRA magnitude"


def test_a_zero_w1_is_a_zero_layer(tmp_path):
    sd = lokr(LIN, 4, 4, 12, 10, r=4, alpha=2.0, seed=11)
    sd[LIN + ".lokr_w1"] = torch.zeros(4, 4)
    src = write_lora(tmp_path / "in.safetensors", sd, dict(BASE_METADATA))
    res = lora_resize.resize(src, tmp_path / "out.safetensors", rank=2, precision="float")
    out, _ = load_st(tmp_path / "out.safetensors")
    assert res.layers[0].zero
    assert float(comfy_update(out, LIN).abs().max()) == 0.0 and all(torch.isfinite(v).all() for v in out.values())


def test_merge_of_a_lokr_and_a_lora_sums_plain_factors(tmp_path):
    """A merge sums the inputs' updates as plain factors, so a LoKr input is read as its exact plain pair (never
    kept as LoKr there) and the merged file is the best rank-k approximation of the weighted sum."""
    from helpers import Spec, dense_dw, make_state_dict
    sd1 = lokr(LIN, 4, 4, 6, 5, r=2, alpha=3.0, seed=12)
    sd2 = make_state_dict([Spec(LIN, 24, 20, 4, alpha=2.0)], seed=13)
    a = write_lora(tmp_path / "a.safetensors", sd1, dict(BASE_METADATA))
    b = write_lora(tmp_path / "b.safetensors", sd2, dict(BASE_METADATA))
    lora_resize.merge([str(a), str(b) + ":0.5"], tmp_path / "m.safetensors", rank=6, precision="float")
    out, _ = load_st(tmp_path / "m.safetensors")
    assert not any("lokr_" in k for k in out)
    want = best_rank_k(ref_lokr(sd1, LIN) + 0.5 * dense_dw(sd2, LIN), 6)
    got = (out[LIN + UP].double() @ out[LIN + DOWN].double()) * float(out[LIN + ALPHA]) / 6
    assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_kept_lokr_at_its_own_rank_is_copied_bit_for_bit(tmp_path, dtype):
    """As a plain pair at its own rank is copied, not re-rounded (ops.job.start_layer): a LoKr kept at the rank of
    its stored lokr_w2_a/_b, with the alpha the output states, writes every tensor of the module as stored."""
    sd = {k: v.to(dtype) for k, v in lokr(LIN, 4, 4, 24, 20, r=8, alpha=4.0, seed=14).items()}
    src = write_lora(tmp_path / "in.safetensors", sd, dict(BASE_METADATA))
    res = lora_resize.resize(src, tmp_path / "out.safetensors", rank=8)
    out, _ = load_st(tmp_path / "out.safetensors")
    assert sorted(out) == sorted(sd) and all(torch.equal(out[k], sd[k]) for k in sd)
    assert res.layers[0].conversion == "exact"


@pytest.mark.parametrize("part", ["lokr_w1", "lokr_w2_a"])
def test_a_non_finite_lokr_is_refused_and_nothing_written(tmp_path, capsys, part):
    """NaN in W1 (which the kept route copies) or W2 is a one-line error naming the layer; nothing is written."""
    sd = lokr(LIN, 4, 4, 24, 20, r=8, alpha=4.0, seed=15)
    sd[f"{LIN}.{part}"][1, 1] = float("nan")
    src = write_lora(tmp_path / "in.safetensors", sd, dict(BASE_METADATA))
    rc = main(["resize", str(src), "-o", str(tmp_path / "out.safetensors"), "--rank", "3"])
    err = capsys.readouterr().err
    assert rc != 0 and LIN in err and "NaN" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("case", ["w2_factored", "both_whole"])
def test_a_kept_lokr_reads_back_as_its_update(tmp_path, case):
    """What reads our output again (preview and --effect patch a base through formats.detect; a second resize)
    sees the kept LoKr's own update, scale * kron(W1, W2_k): whole W2 at scale 1, factored at alpha / k."""
    from lora_resize.formats import detect
    from lora_resize.io.reader import open_tensor_file
    build, name, asked = CASES[case]
    sd = build(name)
    src = write_lora(tmp_path / "in.safetensors", sd, dict(BASE_METADATA))
    w1, w2, scale = input_w1_w2(sd, name)
    for k in asked:
        dst = tmp_path / f"out{k}.safetensors"
        res = lora_resize.resize(src, dst, rank=k, precision="float")
        k = res.layers[0].new_rank
        with open_tensor_file(dst) as r:
            (m,) = detect(r.infos(), r.metadata).modules
            layer = m.load(r)
        assert rel_err(layer.scale * (layer.up @ layer.down), scale * torch.kron(w1, best_rank_k(w2, k))) < 1e-6


def test_a_whole_w2_beyond_the_save_precision_is_refused(tmp_path, capsys):
    """W2 written whole is the product of the new factors: where it leaves fp16's range though the factors fit,
    the writer's check refuses it in one line naming the tensor and --precision float; nothing is written."""
    sd = lokr(LIN, 4, 4, 10, 6, w2="full", seed=16)
    sd[LIN + ".lokr_w2"] = sd[LIN + ".lokr_w2"] * 1e5
    src = write_lora(tmp_path / "in.safetensors", sd, dict(BASE_METADATA))
    rc = main(["resize", str(src), "-o", str(tmp_path / "out.safetensors"), "--rank", "99", "--precision", "fp16"])
    err = capsys.readouterr().err
    assert rc != 0 and LIN in err and "--precision float" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("strength", [-1.0, 0.5])
def test_a_kept_lokr_takes_its_strength_and_a_rank_constraint(tmp_path, strength):
    """Issue 22's parts together: a scale rule on a kept LoKr multiplies its update (folded into W2's factors, W1
    as stored), and --rank-multiple rounds W2's rank up; the result is strength * scale * kron(W1, W2_k), k the
    rounded rank, and analyze predicts the written bytes."""
    sd = lokr(LIN, 4, 4, 24, 20, r=8, alpha=4.0, seed=11)
    src = write_lora(tmp_path / "in.safetensors", sd, dict(BASE_METADATA))
    fields = dict(method="sv_fro", param=0.6, rank_multiple=4, block_rules=(f"{LIN}=scale:{strength}",),
                  precision="float")
    res = lora_resize.resize(src, tmp_path / "out.safetensors", **fields)
    out, _ = load_st(tmp_path / "out.safetensors")
    assert torch.equal(out[LIN + ".lokr_w1"], sd[LIN + ".lokr_w1"])
    w1, w2, scale = input_w1_w2(sd, LIN)
    (row,) = res.layers
    k = row.new_rank
    assert k % 4 == 0 and out[LIN + ".lokr_w2_b"].shape[0] == k
    S = torch.linalg.svdvals(w2)
    fro = torch.sqrt(torch.cumsum(S ** 2, 0) / (S ** 2).sum())
    assert k == -(-(int((fro < 0.6 - 1e-12).sum()) + 1) // 4) * 4  # sv_fro's rank, rounded up to a multiple of 4
    want = strength * scale * torch.kron(w1, best_rank_k(w2, k))
    assert rel_err(comfy_update(out, LIN), want) < 1e-6
    a = lora_resize.analyze(src, **{k_: v for k_, v in fields.items() if k_ != "precision"}, precision="float")
    assert a.chosen.output_bytes == (tmp_path / "out.safetensors").stat().st_size
