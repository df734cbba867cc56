"""Numerical edge cases: all-zero layers, rank-1 layers, equal singular values, extreme magnitudes (fp16 overflow on
save is refused with a one-line NumericalError, or avoided by the sqrt(S) factor split) and denormals. Each gives a
valid output and a sane report, or a clean exit-2 error."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lora_resize.cli import main

from helpers import (ALPHA, DOWN, UP, Spec, best_rank_k, dense_dw, load_st, make_state_dict, rel_err,
                      write_lora)

NAME = "lora_unet_mid_block_attentions_0_proj_in"
OTHER = "lora_te_text_model_encoder_layers_0_mlp_fc1"


def _cli(capsys, src, dst, *opts) -> tuple[int, str, str]:
    rc = main(["resize", str(src), "-o", str(dst), "--device", "cpu", *opts])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _report(capsys, src, dst, *opts) -> dict:
    """Resize with --json; the report as a dict (exit 0 asserted)."""
    rc, out, err = _cli(capsys, src, dst, *opts, "--json")
    assert rc == 0, err
    assert err == ""
    return json.loads(out)


def _check_output(dst) -> dict[str, torch.Tensor]:
    tensors, meta = load_st(dst)
    for k, t in tensors.items():
        if t.is_floating_point():
            assert bool(torch.isfinite(t.float()).all()), k
    for k in tensors:
        if k.endswith(DOWN):
            base = k[:-len(DOWN)]
            assert tensors[base + UP].shape[1] == tensors[k].shape[0] >= 1
            assert tensors[base + ALPHA].numel() == 1
    assert "sshs_model_hash" in meta
    return tensors


def _check_report(rep: dict) -> None:
    """Sane numbers: ranks in range, finite alphas, retained fractions in [0, 1] (null, i.e. NaN, only for a zero
    layer: --json writes strict JSON)."""
    for row in rep["layers"]:
        assert 1 <= row["new_rank"] <= min(row["out_features"], row["in_features"]), row
        assert math.isfinite(row["new_alpha"]), row
        for f in ("fro_retained", "sum_retained"):
            v = row[f]
            if row["zero"]:
                assert v is None or 0 <= v <= 1 + 1e-9, row
            else:
                assert 0 <= v <= 1 + 1e-9, row
    nonzero = [r for r in rep["layers"] if not r["zero"]]
    if nonzero:
        assert 0 <= rep["mean_fro_retained"] <= 1 + 1e-9


def _lora(tmp_path, specs, *, dtype=torch.float32, edit=None, name="in.safetensors"):
    sd = make_state_dict(specs, seed=17)
    if edit:
        edit(sd)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return write_lora(tmp_path / name, sd), sd


# ----------------------------------------------------------------------------------------------------------------
# Zero layers


@pytest.mark.parametrize("which", ["up", "down", "both"])
@pytest.mark.parametrize("opts", [["--rank", "4"], ["--method", "sv_fro", "--param", "0.9"],
                                  ["--method", "sv_ratio", "--param", "2", "--rank-rule", "kohya"],
                                  ["--method", "sv_cumulative", "--param", "0.5", "--precision", "fp16"]])
def test_all_zero_layer(tmp_path, capsys, which, opts):
    def zero(sd):
        for suf in {"up": (UP,), "down": (DOWN,), "both": (UP, DOWN)}[which]:
            sd[NAME + suf] = torch.zeros_like(sd[NAME + suf])

    src, sd = _lora(tmp_path, [Spec(NAME, 24, 20, 8, alpha=4.0), Spec(OTHER, 16, 12, 6)], edit=zero)
    dst = tmp_path / "out.safetensors"
    rep = _report(capsys, src, dst, *opts)
    _check_report(rep)
    row = next(r for r in rep["layers"] if r["name"] == NAME)
    assert row["zero"] and row["new_rank"] == 1
    out = _check_output(dst)
    assert float(dense_dw(out, NAME).abs().max()) == 0.0
    # the plain summary copes with a zero layer too
    rc, text, err = _cli(capsys, src, dst, *opts)
    assert rc == 0 and err == "" and "Frobenius retained" in text


def test_every_layer_zero(tmp_path, capsys):
    def zero(sd):
        for k in sd:
            if k.endswith(UP):
                sd[k] = torch.zeros_like(sd[k])

    src, _ = _lora(tmp_path, [Spec(NAME, 24, 20, 8, alpha=4.0), Spec(OTHER, 16, 12, 6, kernel=3)], edit=zero)
    dst = tmp_path / "out.safetensors"
    rc, text, err = _cli(capsys, src, dst, "--rank", "4", "-v")
    assert rc == 0, err
    assert "n/a" in text  # "Frobenius retained: n/a (all layers are zero)"
    _check_output(dst)


# ----------------------------------------------------------------------------------------------------------------
# Rank-1 layers and equal singular values


@pytest.mark.parametrize("rule", ["exact", "kohya"])
@pytest.mark.parametrize("kernel", [None, 1, 3])
def test_rank_one_layer(tmp_path, capsys, rule, kernel):
    src, sd = _lora(tmp_path, [Spec(NAME, 24, 10, 1, kernel=kernel, alpha=1.0)])
    dst = tmp_path / "out.safetensors"
    rep = _report(capsys, src, dst, "--rank", "4", "--rank-rule", rule, "--precision", "float")
    _check_report(rep)
    row = rep["layers"][0]
    assert row["new_rank"] == (1 if rule == "exact" else 4)  # kohya keeps the rank asked for (zero-padded)
    assert row["fro_retained"] == pytest.approx(1.0)
    out = _check_output(dst)
    assert rel_err(dense_dw(out, NAME), dense_dw(sd, NAME)) < 1e-6


def test_rank_one_product_in_a_wider_layer(tmp_path, capsys):
    def rank1(sd):
        g = torch.Generator().manual_seed(3)
        a, b = torch.randn(24, 1, generator=g), torch.randn(1, 20, generator=g)
        sd[NAME + UP] = a @ torch.randn(1, 8, generator=g)
        sd[NAME + DOWN] = torch.randn(8, 1, generator=g) @ b

    src, sd = _lora(tmp_path, [Spec(NAME, 24, 20, 8, alpha=8.0)], edit=rank1)
    dst = tmp_path / "out.safetensors"
    rep = _report(capsys, src, dst, "--method", "sv_fro", "--param", "0.999", "--precision", "float")
    _check_report(rep)
    assert rep["layers"][0]["new_rank"] == 1
    out = _check_output(dst)
    assert rel_err(dense_dw(out, NAME), dense_dw(sd, NAME)) < 1e-5


def _equal_sv(sd, s=0.5, r=8, m=32, n=40):
    g = torch.Generator().manual_seed(9)
    qu = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    qv = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    sd[NAME + UP] = (qu * math.sqrt(s)).float()
    sd[NAME + DOWN] = (qv.T * math.sqrt(s)).float()


@pytest.mark.parametrize("opts,k", [(["--rank", "3"], 3), (["--method", "sv_fro", "--param", "0.9"], 7),
                                    (["--method", "sv_cumulative", "--param", "0.55"], 5),
                                    (["--method", "sv_ratio", "--param", "2"], 8)])
def test_all_singular_values_equal(tmp_path, capsys, opts, k):
    src, sd = _lora(tmp_path, [Spec(NAME, 32, 40, 8)], edit=_equal_sv)  # no alpha: scale 1, S = 0.5 (x8)
    dst = tmp_path / "out.safetensors"
    rep = _report(capsys, src, dst, *opts, "--precision", "float")
    _check_report(rep)
    row = rep["layers"][0]
    assert row["new_rank"] == k
    assert row["fro_retained"] == pytest.approx(math.sqrt(k / 8), rel=1e-6)
    assert row["max_ratio"] == pytest.approx(1.0, rel=1e-5)
    out = _check_output(dst)
    # any k of the equal directions is a best rank-k approximation: the error is the optimal one, and the kept
    # singular values are all 0.5
    dw_in, dw_out = dense_dw(sd, NAME), dense_dw(out, NAME)
    assert float(torch.linalg.norm(dw_in - dw_out)) == pytest.approx(0.5 * math.sqrt(8 - k), abs=1e-5)
    assert torch.allclose(torch.linalg.svdvals(dw_out)[:k], torch.full((k,), 0.5, dtype=torch.float64), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Extreme magnitudes


def _scale(factor_up: float, factor_down: float):
    def edit(sd):
        sd[NAME + UP] = (sd[NAME + UP].double() * factor_up).float()
        sd[NAME + DOWN] = (sd[NAME + DOWN].double() * factor_down).float()
    return edit


def _rank4_error(capsys, src, dst, sd, precision: str) -> float:
    """Resize src to rank 4 at `precision` (report and output checked): the relative error of the output's layer
    to the best rank-4 approximation of sd's."""
    _check_report(_report(capsys, src, dst, "--rank", "4", "--precision", precision))
    o = _check_output(dst)
    return rel_err(dense_dw(o, NAME), best_rank_k(dense_dw(sd, NAME), 4))


def test_fp16_overflow_on_save_is_refused(tmp_path, capsys):
    src, sd = _lora(tmp_path, [Spec(NAME, 24, 20, 8, alpha=8.0), Spec(OTHER, 16, 12, 6)], edit=_scale(1e6, 1e6))
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"previous")
    rc, out, err = _cli(capsys, src, dst, "--rank", "4", "--precision", "fp16")
    assert rc == 2, err
    assert err.startswith("lora-resize: error:") and err.count("\n") == 1 and NAME in err, err
    assert "--precision" in err
    assert dst.read_bytes() == b"previous"
    # the advice works: float (and bf16's wider range) hold it
    for prec, tol in (("float", 1e-5), ("bf16", 2e-2)):
        assert _rank4_error(capsys, src, dst, sd, prec) < tol


@pytest.mark.parametrize("up,down", [(1e6, 1e-6), (1e-6, 1e6), (3e4, 3e4 ** -1)])
def test_unbalanced_factors_fit_fp16_after_the_split(tmp_path, capsys, up, down):
    # the input's up (or down) alone overflows fp16, but dW is moderate: sqrt(S) on each side fits
    src, sd = _lora(tmp_path, [Spec(NAME, 24, 20, 8, alpha=8.0)], edit=_scale(up, down))
    dst = tmp_path / "out.safetensors"
    assert _rank4_error(capsys, src, dst, sd, "fp16") < 5e-3


@pytest.mark.parametrize("mag", [1e18, 1e30])
def test_huge_float32_values_resize_exactly_in_float(tmp_path, capsys, mag):
    src, sd = _lora(tmp_path, [Spec(NAME, 24, 20, 8, alpha=8.0)], edit=_scale(mag, mag))
    dst = tmp_path / "out.safetensors"
    assert _rank4_error(capsys, src, dst, sd, "float") < 1e-5


@pytest.mark.parametrize("mag", [1e160, 1e300])
def test_float64_values_beyond_float32(tmp_path, capsys, mag):
    # a float64 file whose products overflow even float64: a clean error naming the layer, never a crash
    src, _ = _lora(tmp_path, [Spec(NAME, 24, 20, 8, alpha=8.0)], dtype=torch.float64,
                   edit=lambda sd: sd.update({NAME + DOWN: sd[NAME + DOWN].double() * mag}))
    dst = tmp_path / "out.safetensors"
    rc, out, err = _cli(capsys, src, dst, "--rank", "4")
    assert rc == 2, err
    assert err.startswith("lora-resize: error:") and err.count("\n") == 1 and NAME in err, err
    assert not dst.exists()


@pytest.mark.parametrize("prec", ["fp16", "float"])
def test_alpha_that_overflows_the_save_precision(tmp_path, capsys, prec):
    # alpha 2e5 at rank 8 -> rank 4 gives alpha 1e5: above fp16's 65504, fine in float; in fp16 the alpha written
    # is the largest fp16 holds and the factors carry the rest, so the update is the same
    src, sd = _lora(tmp_path, [Spec(NAME, 24, 20, 8, alpha=2e5)])
    dst = tmp_path / "out.safetensors"
    rc, out, err = _cli(capsys, src, dst, "--rank", "4", "--precision", prec)
    if prec == "fp16":
        assert rc == 0, err
        o = _check_output(dst)
        assert float(o[NAME + ALPHA]) == 65504.0
        assert rel_err(dense_dw(o, NAME), best_rank_k(dense_dw(sd, NAME), 4)) < 2e-3
    else:
        assert rc == 0, err
        o = _check_output(dst)
        assert float(o[NAME + ALPHA]) == pytest.approx(1e5)
        assert rel_err(dense_dw(o, NAME), best_rank_k(dense_dw(sd, NAME), 4)) < 1e-5


def test_alpha_too_large_for_float32(tmp_path, capsys):
    src, _ = _lora(tmp_path, [Spec(NAME, 24, 20, 8, alpha=3e38)], dtype=torch.float64)
    rc, out, err = _cli(capsys, src, tmp_path / "out.safetensors", "--rank", "4", "--rank-rule", "kohya",
                        "--precision", "float")
    assert rc == 2, err
    assert err.startswith("lora-resize: error:") and err.count("\n") == 1 and "alpha" in err, err


def test_passthrough_tensor_that_overflows_fp16(tmp_path, capsys):
    def big(sd):
        sd["some.other.weight"] = torch.tensor([1.0, 1e6, -3e5])

    src, sd = _lora(tmp_path, [Spec(NAME, 24, 20, 8, alpha=8.0)], edit=big)
    dst = tmp_path / "out.safetensors"
    rc, out, err = _cli(capsys, src, dst, "--rank", "4", "--precision", "fp16")
    assert rc == 2, err
    assert "some.other.weight" in err and err.count("\n") == 1, err
    assert not dst.exists()
    rc, out, err = _cli(capsys, src, dst, "--rank", "4", "--precision", "float")
    assert rc == 0, err
    assert torch.equal(_check_output(dst)["some.other.weight"], sd["some.other.weight"])


# ----------------------------------------------------------------------------------------------------------------
# Tiny values and denormals


@pytest.mark.parametrize("mag", [1e-10, 1e-20])
@pytest.mark.parametrize("prec", ["float", "bf16"])  # fp16: test_small_updates_are_written_within_...
def test_tiny_values(tmp_path, capsys, mag, prec):
    src, sd = _lora(tmp_path, [Spec(NAME, 24, 20, 8, alpha=8.0)], edit=_scale(mag, mag))
    dst = tmp_path / "out.safetensors"
    rep = _report(capsys, src, dst, "--rank", "4", "--precision", prec)
    _check_report(rep)
    assert not rep["layers"][0]["zero"]
    o = _check_output(dst)
    err = rel_err(dense_dw(o, NAME), best_rank_k(dense_dw(sd, NAME), 4))
    assert err < (1e-5 if prec == "float" else 2e-2)


def _refused_for_precision(capsys, src, dst, *opts) -> None:
    """The run is refused in one line naming the layer and --precision float, and writes nothing."""
    rc, _, err = _cli(capsys, src, dst, *opts)
    assert rc == 2 and err.startswith("lora-resize: error:") and err.count("\n") == 1, err
    assert NAME in err and "--precision float" in err, err
    assert not dst.exists()


# fp16 from 0.1 down past its smallest normal (6.1e-5) and smallest subnormal (6e-8); bf16 past 1.2e-38 (factors
# sqrt(|update|): the update's entries are about mag^2)
SMALL = {"fp16": [1e-1, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 1e-6, 1e-8],
         "bf16": [1e-20, 1e-30, 1e-36, 1e-37, 1e-38, 3e-39, 1e-39, 1e-40]}


@pytest.mark.parametrize("prec", ["fp16", "bf16"])
def test_small_updates_are_written_within_the_save_dtype_s_rounding_or_refused(tmp_path, capsys, prec):
    """A float64 layer scaled down step by step, resized to rank 4 in fp16 / bf16: the written update is within
    the dtype's rounding bound of the best rank-4 approximation (dense float64 SVD), or the run is refused in one
    line naming --precision float, which then writes it - never a summary claiming 100% of an update
    that the subnormal factors wrote 12% (or 100%) off."""
    u = torch.finfo(getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[prec])).eps / 2
    outcomes = []
    for mag in SMALL[prec]:
        def tiny(sd, mag=mag):
            for key in (NAME + UP, NAME + DOWN):
                sd[key] = sd[key].double() * mag
        src, sd = _lora(tmp_path, [Spec(NAME, 24, 20, 8, alpha=8.0)], dtype=torch.float64, edit=tiny,
                        name=f"in{mag}.safetensors")
        dst = tmp_path / f"out{mag}.safetensors"
        best = best_rank_k(dense_dw(sd, NAME), 4)
        rc, out, err = _cli(capsys, src, dst, "--rank", "4", "--precision", prec)
        if rc == 0:
            # each factor within 2u of its exact value (Frobenius), so the update within about 4u (+ the rounding
            # of the stored alpha, exact here)
            assert rel_err(dense_dw(_check_output(dst), NAME), best) <= 6 * u, mag
            outcomes.append("written")
        else:
            assert rc == 2, err
            _refused_for_precision(capsys, src, dst, "--rank", "4", "--precision", prec)
            # float32 holds these factors (down to its own subnormals: test_float32_denormals' bound)
            assert rel_err(_rank4_float(capsys, src, dst), best) < 1e-3, mag
            outcomes.append("refused")
    assert outcomes[0] == "written" and outcomes[-1] == "refused", outcomes


def _rank4_float(capsys, src, dst) -> torch.Tensor:
    rc, _, err = _cli(capsys, src, dst, "--rank", "4", "--precision", "float")
    assert rc == 0, err
    return dense_dw(_check_output(dst), NAME)


def test_float32_denormals(tmp_path, capsys):
    # factors around 1e-39 (float32 subnormal): exact work in float64, a float output close to the truth
    src, sd = _lora(tmp_path, [Spec(NAME, 24, 20, 8, alpha=8.0)], edit=_scale(3e-39, 3e-39))
    assert float(load_st(src)[0][NAME + UP].abs().max()) < 1.18e-38  # really subnormal in the file
    dst = tmp_path / "out.safetensors"
    rep = _report(capsys, src, dst, "--rank", "8", "--precision", "float")
    _check_report(rep)
    o = _check_output(dst)
    assert rel_err(dense_dw(o, NAME), dense_dw(sd, NAME)) < 1e-3
    dst.unlink()
    for prec in ("fp16", "bf16"):  # factors of 1e-39 are below either's normal numbers
        _refused_for_precision(capsys, src, dst, "--rank", "4", "--precision", prec)


def test_fp16_subnormal_input(tmp_path, capsys):
    # an fp16 LoRA whose values sit in fp16's subnormal range (below 6.1e-5)
    src, sd = _lora(tmp_path, [Spec(NAME, 24, 20, 8)], dtype=torch.float16, edit=_scale(5e-5, 5e-5))
    up = load_st(src)[0][NAME + UP]
    assert float(up.abs().max()) < 6.1e-5 and float(up.abs().max()) > 0
    dst = tmp_path / "out.safetensors"
    # truncated factors of that size keep only a few bits in fp16 (the input's own precision): refused, not
    # written several percent off
    _refused_for_precision(capsys, src, dst, "--rank", "4")
    # at the layer's own rank nothing is re-rounded: its factors are copied as stored, bit for bit
    rc, _, err = _cli(capsys, src, dst, "--rank", "8")
    assert rc == 0, err
    assert all(torch.equal(load_st(dst)[0][k], v) for k, v in load_st(src)[0].items() if "lora_" in k)
    dst.unlink()
    rep = _report(capsys, src, dst, "--rank", "8", "--precision", "float")
    _check_report(rep)
    o = _check_output(dst)
    assert o[NAME + UP].dtype == torch.float32
    assert rel_err(dense_dw(o, NAME), dense_dw({k: v.double() for k, v in load_st(src)[0].items()}, NAME)) < 1e-5


def test_mixed_magnitudes_across_layers(tmp_path, capsys):
    # one tiny, one huge, one ordinary layer in the same file, saved in float
    def edit(sd):
        for name, m in ((NAME, 1e-19), (OTHER, 1e17)):
            sd[name + UP] = (sd[name + UP].double() * m).float()
            sd[name + DOWN] = (sd[name + DOWN].double() * m).float()

    third = "lora_unet_up_blocks_1_attentions_0_proj_out"
    src, sd = _lora(tmp_path, [Spec(NAME, 24, 20, 8, alpha=8.0), Spec(OTHER, 16, 12, 6, alpha=3.0),
                               Spec(third, 12, 12, 4, kernel=1)], edit=edit)
    dst = tmp_path / "out.safetensors"
    rep = _report(capsys, src, dst, "--method", "sv_fro", "--param", "0.95", "--precision", "float")
    _check_report(rep)
    o = _check_output(dst)
    for name in (NAME, OTHER, third):
        k = o[name + DOWN].shape[0]
        assert rel_err(dense_dw(o, name), best_rank_k(dense_dw(sd, name), k)) < 1e-5, name


def test_update_too_large_for_any_precision_is_one_clean_line(tmp_path, capsys):
    """float64 factors of ~1e100 (a product of ~1e200): no numpy warnings, one error line naming the layer."""
    g = torch.Generator().manual_seed(3)
    sd = {"lora_te_big.lora_down.weight": torch.randn(4, 12, generator=g, dtype=torch.float64) * 1e100,
          "lora_te_big.lora_up.weight": torch.randn(10, 4, generator=g, dtype=torch.float64) * 1e100}
    write_lora(tmp_path / "big.safetensors", sd)
    out = tmp_path / "o.safetensors"
    assert main(["resize", str(tmp_path / "big.safetensors"), "-o", str(out), "--method", "sv_fro", "--param",
                 "0.9", "--precision", "float"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-resize: error: layer lora_te_big has an update too large") and len(
        err.splitlines()) == 1
    assert not out.exists()
