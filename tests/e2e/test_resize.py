"""End to end through the Python API: every resized layer, read back from the written file, equals the best
rank-k approximation of the input layer (dense float64 SVD), with sd-scripts' shapes and alpha."""
from __future__ import annotations

import pytest
import torch

import lora_resize
from lora_resize import LayerResult, ResizeOptions, ResizeResult
from lora_resize.cli import main

from helpers import (ALPHA, CONV1_A, CONV1_NOALPHA, CONV3_A, CONV3_NOALPHA, DOWN, LIN_A,
                      LIN_NOALPHA, OVERSIZE, UP, ZERO, Spec, best_rank_k, decaying_spectrum, dense_dw, layer_names,
                      load_st, make_state_dict, one_alpha, rel_err, standard_specs, write_lora)

REGULAR = [LIN_A, LIN_NOALPHA, CONV1_A, CONV1_NOALPHA, CONV3_A, CONV3_NOALPHA]
SPECS = {s.name: s for s in standard_specs()}


def expected_rank(spec: Spec, rank: int) -> int:
    return min(rank, spec.out, spec.flat_in, spec.rank)


def out_dense(sd_out, name: str) -> torch.Tensor:
    """The output's dW: up @ down * alpha / k, with k read from the output's shapes."""
    return dense_dw(sd_out, name)


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_float_output_is_best_rank_k(tmp_path, standard_lora, standard_sd, rank):
    dst = tmp_path / "out.safetensors"
    res = lora_resize.resize(standard_lora, dst, rank=rank, precision="float")
    assert isinstance(res, ResizeResult)
    out, _ = load_st(dst)
    for name in REGULAR + [OVERSIZE]:
        spec = SPECS[name]
        k = expected_rank(spec, rank)
        assert out[name + DOWN].shape[0] == k, name
        assert out[name + DOWN].dtype == out[name + UP].dtype == torch.float32
        want = best_rank_k(dense_dw(standard_sd, name), k)
        err = rel_err(out_dense(out, name), want)
        assert err < 1e-5, (name, k, err)


@pytest.mark.parametrize("name", REGULAR)
@pytest.mark.parametrize("precision,tol,dtype", [("float", 1e-5, torch.float32), ("fp16", 2e-3, torch.float16),
                                                  ("bf16", 1.6e-2, torch.bfloat16)])
def test_each_kind_shapes_alpha_and_values(tmp_path, standard_lora, standard_sd, name, precision, tol, dtype):
    rank = 5
    dst = tmp_path / f"out_{precision}.safetensors"
    lora_resize.resize(standard_lora, dst, rank=rank, precision=precision)
    out, _ = load_st(dst)
    spec = SPECS[name]
    k = expected_rank(spec, rank)
    down, up, alpha = out[name + DOWN], out[name + UP], out[name + ALPHA]
    if spec.kernel is None:
        assert tuple(down.shape) == (k, spec.inp)
        assert tuple(up.shape) == (spec.out, k)
    else:
        assert tuple(down.shape) == (k, spec.inp, spec.kernel, spec.kernel)
        assert tuple(up.shape) == (spec.out, k, 1, 1)
    assert down.dtype == up.dtype == alpha.dtype == dtype
    assert alpha.ndim == 0, "alpha must be a 0-d tensor"
    # one alpha for every layer (each layer's ratio is in its factors), so every consumer applies the strength
    assert float(alpha) == float(torch.tensor(one_alpha(standard_sd, rank), dtype=torch.float32).to(dtype))
    want = best_rank_k(dense_dw(standard_sd, name), k)
    err = rel_err(out_dense(out, name), want)
    assert err < tol, (name, precision, err)


@pytest.mark.parametrize("options", [dict(rank=6), dict(method="sv_fro", param=0.9, rank=8)])
def test_one_alpha_for_every_layer_and_the_strength_in_the_factors(tmp_path, standard_lora, standard_sd, options):
    dst = tmp_path / "out.safetensors"
    lora_resize.resize(standard_lora, dst, precision="float", **options)
    out, _ = load_st(dst)
    assert {float(out[n + ALPHA]) for n in layer_names(out)} == {one_alpha(standard_sd, options["rank"])}
    for name in REGULAR:
        k = out[name + DOWN].shape[0]
        assert rel_err(out_dense(out, name), best_rank_k(dense_dw(standard_sd, name), k)) < 1e-5, name


def test_kohya_rank_rule_keeps_sd_scripts_alphas(tmp_path, standard_lora, standard_sd):
    dst = tmp_path / "out.safetensors"
    lora_resize.resize(standard_lora, dst, rank=6, precision="float", rank_rule="kohya")
    out, _ = load_st(dst)
    for name in REGULAR:
        k = out[name + DOWN].shape[0]
        r = standard_sd[name + DOWN].shape[0]
        a_in = standard_sd.get(name + ALPHA)
        scale_in = float(a_in) / r if a_in is not None else 1.0
        assert float(out[name + ALPHA]) / k == pytest.approx(scale_in, rel=1e-6), name


def test_rank_above_layer_size_is_clamped(tmp_path, standard_lora, standard_sd):
    dst = tmp_path / "out.safetensors"
    res = lora_resize.resize(standard_lora, dst, rank=12, precision="float")
    row = next(r for r in res.layers if r.name == OVERSIZE)
    assert isinstance(row, LayerResult)
    assert row.old_rank == 16 and row.new_rank == 6
    assert row.clamped is True
    out, _ = load_st(dst)
    assert tuple(out[OVERSIZE + UP].shape) == (6, 6)
    assert tuple(out[OVERSIZE + DOWN].shape) == (6, 40)
    full = dense_dw(standard_sd, OVERSIZE)
    assert rel_err(out_dense(out, OVERSIZE), full) < 1e-5
    assert float(out[OVERSIZE + ALPHA]) == one_alpha(standard_sd, 12)
    # layers that fit are not flagged
    assert not next(r for r in res.layers if r.name == LIN_A).clamped
    assert any("full rank" in n or OVERSIZE in n for n in res.notes)


def test_rank_above_every_layer_reproduces_input(tmp_path, standard_lora, standard_sd):
    dst = tmp_path / "out.safetensors"
    lora_resize.resize(standard_lora, dst, rank=32, precision="float")
    out, _ = load_st(dst)
    for name in REGULAR + [OVERSIZE]:
        assert rel_err(out_dense(out, name), dense_dw(standard_sd, name)) < 1e-5, name


@pytest.mark.parametrize("options", [dict(rank=4), dict(rank=8, method="sv_fro", param=0.9),
                                     dict(rank=4, method="sv_ratio", param=4.0, rank_rule="kohya")])
def test_zero_layer(tmp_path, standard_lora, options):
    dst = tmp_path / "out.safetensors"
    res = lora_resize.resize(standard_lora, dst, precision="float", **options)
    row = next(r for r in res.layers if r.name == ZERO)
    assert row.new_rank == 1 and row.zero
    out, _ = load_st(dst)
    assert out[ZERO + DOWN].shape[0] == 1 and out[ZERO + UP].shape[1] == 1
    for key in (ZERO + DOWN, ZERO + UP, ZERO + ALPHA):
        assert bool(torch.isfinite(out[key]).all()), key
    assert float(out_dense(out, ZERO).abs().max()) == 0.0
    assert bool(torch.isfinite(out[ZERO + ALPHA]))


def test_passthrough_keys(tmp_path, standard_lora, standard_sd):
    dst = tmp_path / "out.safetensors"
    res = lora_resize.resize(standard_lora, dst, rank=4, precision="fp16")
    out, _ = load_st(dst)
    assert sorted(res.passthrough) == ["some.other.index", "some.other.weight"]
    assert out["some.other.weight"].dtype == torch.float16  # floats are cast to the save dtype
    assert torch.equal(out["some.other.weight"], standard_sd["some.other.weight"].to(torch.float16))
    assert out["some.other.index"].dtype == torch.int64  # integers are copied as they are
    assert torch.equal(out["some.other.index"], standard_sd["some.other.index"])
    # nothing is lost or invented: every layer keeps its three keys
    want = set(standard_sd) | {n + ALPHA for n in layer_names(standard_sd)}
    assert set(out) == want


def test_dynamic_ranks_and_values(tmp_path, standard_lora, standard_sd):
    dst = tmp_path / "out.safetensors"
    param = 0.8
    res = lora_resize.resize(standard_lora, dst, rank=32, method="sv_fro", param=param, precision="float")
    out, _ = load_st(dst)
    for name in REGULAR + [OVERSIZE]:
        S = torch.linalg.svdvals(dense_dw(standard_sd, name))
        fro = torch.sqrt(torch.cumsum(S ** 2, 0) / (S ** 2).sum())
        k = int((fro < param).sum()) + 1  # the smallest k with sqrt(sum_k S^2 / sum S^2) >= param
        assert out[name + DOWN].shape[0] == k, name
        assert rel_err(out_dense(out, name), best_rank_k(dense_dw(standard_sd, name), k)) < 1e-5
        row = next(r for r in res.layers if r.name == name)
        assert row.new_rank == k
        assert row.fro_retained == pytest.approx(float(fro[k - 1]), rel=1e-9)
        assert row.sum_retained == pytest.approx(float(S[:k].sum() / S.sum()), rel=1e-6)


def test_conv_rank_applies_to_every_conv_layer(tmp_path, standard_lora):
    dst = tmp_path / "out.safetensors"
    lora_resize.resize(standard_lora, dst, rank=7, conv_rank=3, precision="float")
    out, _ = load_st(dst)
    for name, spec in SPECS.items():
        if spec.zero:
            continue
        cap = 3 if spec.kernel is not None else 7
        assert out[name + DOWN].shape[0] == min(cap, spec.out, spec.flat_in, spec.rank), name


@pytest.mark.parametrize("in_dtype,name", [(torch.float16, "fp16"), (torch.bfloat16, "bf16"),
                                           (torch.float32, "float")])
def test_default_precision_is_input_dtype(tmp_path, in_dtype, name):
    specs = [Spec(LIN_A, 40, 30, 8, alpha=4.0), Spec(CONV3_A, 16, 4, 8, kernel=3, alpha=2.0)]
    sd = make_state_dict(specs, seed=5, dtype=in_dtype)
    src = write_lora(tmp_path / "in.safetensors", sd, {"ss_training_comment": "x"})
    res = lora_resize.resize(src, tmp_path / "out.safetensors", rank=4)
    assert res.precision == name
    out, _ = load_st(tmp_path / "out.safetensors")
    assert {t.dtype for t in out.values()} == {in_dtype}
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[in_dtype]
    for n in (LIN_A, CONV3_A):
        assert rel_err(out_dense(out, n), best_rank_k(dense_dw(sd, n), 4)) < tol


def test_options_object_and_fields_are_equivalent(tmp_path, standard_lora):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    lora_resize.resize(standard_lora, a, ResizeOptions(rank=5, method="sv_cumulative", param=0.7, precision="float"))
    lora_resize.resize(standard_lora, b, rank=5, method="sv_cumulative", param=0.7, precision="float")
    ta, _ = load_st(a)
    tb, _ = load_st(b)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    with pytest.raises(lora_resize.OptionsError):
        lora_resize.resize(standard_lora, tmp_path / "c.safetensors", ResizeOptions(rank=4), rank=5)


def test_input_is_never_modified(tmp_path, standard_lora):
    before = standard_lora.read_bytes()
    lora_resize.resize(standard_lora, tmp_path / "out.safetensors", rank=2)
    assert standard_lora.read_bytes() == before


def test_result_rows_match_output(tmp_path, standard_lora, standard_sd):
    dst = tmp_path / "out.safetensors"
    res = lora_resize.resize(standard_lora, dst, rank=4, precision="float")
    out, _ = load_st(dst)
    assert [r.name for r in res.layers] == layer_names(standard_sd)
    for r in res.layers:
        assert r.old_rank == standard_sd[r.name + DOWN].shape[0]
        assert r.new_rank == out[r.name + DOWN].shape[0]
        assert float(out[r.name + ALPHA]) == pytest.approx(r.new_alpha, rel=1e-6)
    assert res.output_bytes == dst.stat().st_size
    assert res.input_bytes == standard_lora.stat().st_size


def test_layer_with_larger_spectrum_range(tmp_path):
    # a wide dynamic range of singular values (1 .. 1e-4) still truncates exactly
    S = torch.logspace(0, -4, 16, dtype=torch.float64)
    spec = Spec(LIN_A, out=120, inp=100, rank=16, alpha=16.0, spectrum=S)
    sd = make_state_dict([spec], seed=9)
    src = write_lora(tmp_path / "in.safetensors", sd)
    for k in (1, 4, 10):
        dst = tmp_path / f"out{k}.safetensors"
        lora_resize.resize(src, dst, rank=k, precision="float")
        out, _ = load_st(dst)
        assert rel_err(out_dense(out, LIN_A), best_rank_k(dense_dw(sd, LIN_A), k)) < 1e-5, k


def test_spectrum_helper_is_distinct():
    # the test data's own premise: well separated singular values, so best rank-k is unique
    S = decaying_spectrum(16)
    assert bool((S[1:] <= 0.93 * S[:-1] + 1e-15).all())


@pytest.mark.parametrize("precision,dtype,tol", [("fp16", torch.float16, 1e-4), ("bf16", torch.bfloat16, 8e-4)])
def test_alpha_rounding_is_absorbed(tmp_path, precision, dtype, tol):
    # alpha 3 on rank 7 cut to rank 3: the new alpha 9/7 is not representable in fp16/bf16. The stored factors must
    # compensate, so the effective strength (up @ down * alpha / k) stays that of the rank-3 truncation.
    sd = make_state_dict([Spec(LIN_A, out=96, inp=80, rank=7, alpha=3.0)], seed=31)
    src = write_lora(tmp_path / "in.safetensors", sd)
    dst = tmp_path / "out.safetensors"
    lora_resize.resize(src, dst, rank=3, precision=precision)
    out, _ = load_st(dst)
    ideal = float(torch.tensor(3.0) / 7 * 3)
    stored = float(out[LIN_A + ALPHA])
    assert abs(stored - ideal) / ideal > 3 * tol, "premise: the save dtype rounds this alpha noticeably"
    ref = best_rank_k(dense_dw(sd, LIN_A), 3)
    got = out_dense(out, LIN_A)
    scale = float((got * ref).sum() / (ref * ref).sum())  # systematic strength error; rounding noise averages out
    assert abs(scale - 1) < tol, scale


def _rank_deficient_layer(out: int, inp: int, r: int, true_rank: int, seed: int) -> dict[str, torch.Tensor]:
    """up's columns are exact copies of `true_rank` columns, so up @ down has rank true_rank exactly (in float32)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(out, true_rank, generator=g)
    up = base[:, torch.arange(r) % true_rank].contiguous()
    down = torch.randn(r, inp, generator=g)
    return {LIN_A + UP: up, LIN_A + DOWN: down, LIN_A + ALPHA: torch.tensor(8.0)}


@pytest.mark.parametrize("options", [dict(rank=32, method="sv_fro", param=1.0),
                                     dict(rank=32, method="sv_cumulative", param=1.0),
                                     dict(rank=32, method="sv_ratio", param=1e5)])
def test_exact_rule_stops_at_numerical_rank(tmp_path, options):
    sd = _rank_deficient_layer(60, 50, 16, 5, 41)
    assert int(torch.linalg.matrix_rank(dense_dw(sd, LIN_A))) == 5
    src = write_lora(tmp_path / "in.safetensors", sd)
    dst = tmp_path / "out.safetensors"
    res = lora_resize.resize(src, dst, precision="float", **options)
    out, _ = load_st(dst)
    assert out[LIN_A + DOWN].shape[0] == 5 == res.layers[0].new_rank
    assert rel_err(out_dense(out, LIN_A), dense_dw(sd, LIN_A)) < 1e-5


def test_fixed_rank_above_numerical_rank(tmp_path):
    sd = _rank_deficient_layer(60, 50, 16, 5, 42)
    src = write_lora(tmp_path / "in.safetensors", sd)
    dst = tmp_path / "out.safetensors"
    res = lora_resize.resize(src, dst, rank=8, precision="float")
    out, _ = load_st(dst)
    k = out[LIN_A + DOWN].shape[0]
    assert 5 <= k <= 8 and res.layers[0].new_rank == k
    for key in (LIN_A + UP, LIN_A + DOWN):
        assert bool(torch.isfinite(out[key]).all())
    assert rel_err(out_dense(out, LIN_A), dense_dw(sd, LIN_A)) < 1e-5
    assert float(out[LIN_A + ALPHA]) == pytest.approx(8.0 / 16 * 8)  # one alpha: the scale times --rank


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_factors_are_saved_as_bf16_and_the_file_shrinks(tmp_path, fp8, capsys):
    """LoRAs trained on fp8 bases store fp8 factors (with a float alpha): the default save precision is bf16 (fp8
    output is not offered), said in a note, so a rank 32 -> 10 resize shrinks the file."""
    sd = make_state_dict([Spec(LIN_A, out=96, inp=64, rank=32, alpha=16.0),
                          Spec(CONV3_A, out=32, inp=16, rank=32, kernel=3, alpha=8.0)], seed=5)
    sd = {k: (v.to(fp8) if v.ndim >= 2 else v) for k, v in sd.items()}
    src = tmp_path / "fp8.safetensors"
    from safetensors.torch import save_file
    save_file(sd, str(src))
    dst = tmp_path / "out.safetensors"
    assert main(["resize", str(src), "-o", str(dst), "--rank", "10", "-q"]) == 0
    assert "saved as bf16" in capsys.readouterr().out
    out, _ = load_st(dst)
    assert {v.dtype for k, v in out.items() if k.endswith(".weight")} == {torch.bfloat16}
    assert dst.stat().st_size < src.stat().st_size
    for name in (LIN_A, CONV3_A):
        want = best_rank_k(dense_dw(sd, name).reshape(sd[name + UP].shape[0], -1), 10)
        got = dense_dw(out, name).reshape(want.shape)
        assert rel_err(got, want) < 2e-2, name  # bf16 factors
