"""Ranks a server or loader accepts (--rank-multiple, --allowed-ranks, --uniform-rank) with every method and budget:
judged on the written files - every rank satisfies the constraint, every layer's update is the best rank-k
approximation of its input's (dense float64 SVD) with padded directions exactly zero, the size analyze predicts
is the size written, a budget's plan is the best the constraint allows - and bad values refused in one line."""
from __future__ import annotations

import pytest
import torch

import lora_resize
from lora_resize.cli import main
from lora_resize.cli.flags import options_from_flags
from lora_resize.ops.analyze import analysis_from_result, analyze, decomposed
from lora_resize.ops.merge import Source
from lora_resize.options import ResizeOptions

from helpers import (DOWN, UP, best_rank_k, dense_dw, layer_names, load_st, refused_in_one_line, rel_err,
                     standard_specs)
from test_rank_settings import TO, budget_check, ranks_of, updates, wan  # noqa: F401 (wan: the fixture)

EXACT = 2e-6  # float32 factors of a float64 truncation
SIZES = {s.name: min(s.out, s.flat_in) for s in standard_specs()}
INPUT_RANK = {s.name: 0 if s.zero else min(s.out, s.flat_in, s.rank) for s in standard_specs()}

CONSTRAINTS = {
    "multiple4": dict(rank_multiple=4),
    "allowed": dict(allowed_ranks="12,2,4,8,4"),  # unsorted, a duplicate: normalised
    "uniform": dict(uniform_rank=True),
    "uniform+multiple": dict(uniform_rank=True, rank_multiple=4),
    "uniform+allowed": dict(uniform_rank=True, allowed_ranks=(3, 5, 8, 11)),
}
SETTINGS = {
    "fixed": dict(method="fixed", rank=8),
    "sv_ratio": dict(method="sv_ratio", param=4.0),
    "sv_fro": dict(method="sv_fro", param=0.9),
    "sv_cumulative": dict(method="sv_cumulative", param=0.8),
    "target_size": dict(target_size=20_000),
    "target_fro": dict(target_fro=0.95),
}


def satisfied(constraint: dict, ranks: dict[str, int]) -> None:
    """Every written rank is one the constraint accepts (a layer smaller than every accepted rank above its
    choice keeps its size); with --uniform-rank, one rank for all."""
    if constraint.get("uniform_rank"):
        assert len(set(ranks.values())) == 1, ranks
    n = constraint.get("rank_multiple")
    allowed = constraint.get("allowed_ranks")
    if isinstance(allowed, str):
        allowed = [int(x) for x in allowed.split(",")]
    for name, k in ranks.items():
        size = SIZES[name]
        if n is not None:
            assert k % n == 0 or (k == size and size % n and not constraint.get("uniform_rank")), (name, k)
        if allowed is not None:
            assert k in allowed or (k == size and size < max(allowed) and not constraint.get("uniform_rank")), \
                (name, k)


def written_ranks(sd) -> dict[str, int]:
    return {name: sd[name + DOWN].shape[0] for name in layer_names(sd)}


def exact_and_padded(sd_in, sd_out, copied=()) -> None:
    """Each layer's written update is the best rank-k approximation of the input's (k: its written rank), and
    the directions past the input's numerical rank are exact zeros in both factors (`copied`: layers written as
    stored, bit for bit, at their own rank - nothing padded)."""
    for name in layer_names(sd_in):
        k = sd_out[name + DOWN].shape[0]
        want = best_rank_k(dense_dw(sd_in, name), k)
        assert rel_err(dense_dw(sd_out, name), want) < EXACT, name
        p = INPUT_RANK[name]
        if name in copied:
            assert torch.equal(sd_out[name + DOWN], sd_in[name + DOWN]), name
        elif k > p:
            up = sd_out[name + UP].reshape(sd_out[name + UP].shape[0], -1)
            down = sd_out[name + DOWN].reshape(k, -1)
            live = torch.nonzero(up.abs().sum(0) + down.abs().sum(1)).flatten()
            assert len(live) <= p, (name, k, p, live)


@pytest.mark.parametrize("setting", SETTINGS.values(), ids=SETTINGS)
@pytest.mark.parametrize("constraint", CONSTRAINTS.values(), ids=CONSTRAINTS)
def test_written_ranks_meet_the_constraint_exactly_and_as_predicted(tmp_path, standard_lora, standard_sd,
                                                                     constraint, setting):
    a = analyze(standard_lora, sweep={}, precision="float", **setting, **constraint)
    res = lora_resize.resize(standard_lora, tmp_path / "o.safetensors", precision="float", **setting, **constraint)
    sd_out, _ = load_st(res.dst)
    ranks = written_ranks(sd_out)
    satisfied(constraint, ranks)
    exact_and_padded(standard_sd, sd_out)
    assert a.chosen.output_bytes == res.dst.stat().st_size == res.output_bytes
    assert dict(zip([sp.name for sp in a.layers], map(int, a.chosen.ranks))) == ranks
    if constraint.get("uniform_rank"):
        assert any(n.startswith("--uniform-rank: every layer is written at rank") for n in res.notes)


@pytest.mark.parametrize("setting", [dict(method="sv_fro", param=0.9), dict(target_size=20_000)],
                         ids=["sv_fro", "target_size"])
@pytest.mark.parametrize("constraint", [dict(rank_multiple=4), dict(uniform_rank=True)], ids=["multiple4", "uniform"])
def test_kohya_rank_rule_is_constrained_too(tmp_path, standard_lora, standard_sd, constraint, setting):
    """sd-scripts' rank rule (it keeps at least 2, and a fixed rank up to the layer's size) under a constraint."""
    fields = dict(rank_rule="kohya", precision="float", **setting, **constraint)
    a = analyze(standard_lora, sweep={}, **fields)
    res = lora_resize.resize(standard_lora, tmp_path / "o.safetensors", **fields)
    sd_out, _ = load_st(res.dst)
    ranks = written_ranks(sd_out)
    satisfied(constraint, ranks)
    exact_and_padded(standard_sd, sd_out)
    assert a.chosen.output_bytes == res.dst.stat().st_size
    assert dict(zip([sp.name for sp in a.layers], map(int, a.chosen.ranks))) == ranks


@pytest.mark.parametrize("constraint", [dict(rank_multiple=4), dict(allowed_ranks=(2, 4, 8, 12))],
                         ids=["multiple4", "allowed"])
@pytest.mark.parametrize("target", [17_000, 20_000, 24_000, 30_000])
def test_target_size_plans_between_accepted_ranks_and_fills_the_budget(standard_lora, constraint, target):
    """The plan fits, every rank is accepted, and no layer can take its next accepted rank and still fit (the
    exact file size, from the analysis' sizer)."""
    opts = ResizeOptions(target_size=target, precision="float", **constraint)
    ev, _ = decomposed(standard_lora, opts)
    row = ev.evaluate(opts)
    ranks = [int(k) for k in row.ranks]
    assert row.output_bytes <= target
    satisfied(constraint, {sp.name: k for sp, k in zip(ev.sps, ranks)})
    sizer = ev.sizer(opts)
    for i, sp in enumerate(ev.sps):
        up = [k for k in range(ranks[i] + 1, sp.full_size + 1) if _accepted(constraint, k, sp.full_size)]
        if not up or ranks[i] >= int((sp.S > 0).sum()):
            continue  # at its highest accepted rank, or past its numerical rank (more adds only zero directions)
        grown = list(ranks)
        grown[i] = up[0]
        assert sizer.file_size(grown)[0] > target, (sp.name, ranks, up[0])


def _accepted(constraint: dict, k: int, size: int) -> bool:
    n, allowed = constraint.get("rank_multiple"), constraint.get("allowed_ranks")
    if n is not None:
        return k % n == 0 or k == size
    return k in allowed or (k == size and size < max(allowed))


@pytest.mark.parametrize("extra", [{}, dict(rank_multiple=4)], ids=["any", "multiple4"])
@pytest.mark.parametrize("budget", [dict(target_size=18_000), dict(target_size=30_000), dict(target_fro=0.9),
                                    dict(target_fro=0.99)], ids=["size18k", "size30k", "fro0.9", "fro0.99"])
def test_uniform_rank_with_a_budget_is_the_best_single_rank_under_it(standard_lora, budget, extra):
    """target_size: the largest accepted rank whose file fits; target_fro: the smallest whose global retention
    reaches the target - checked against every single rank, evaluated on the same spectra."""
    opts = ResizeOptions(uniform_rank=True, precision="float", **budget, **extra)
    ev, _ = decomposed(standard_lora, opts)
    row = ev.evaluate(opts)
    r = int(row.ranks[0])
    assert set(map(int, row.ranks)) == {r}
    n = extra.get("rank_multiple", 1)
    candidates = [k for k in range(1, 17) if k % n == 0]

    def at(k):
        return ev.evaluate(opts.with_setting(ranks={sp.name: k for sp in ev.sps}))
    if "target_size" in budget:
        sizer = ev.sizer(opts)  # the file this setting writes (its metadata) at every layer's rank k
        fits = [k for k in candidates if sizer.file_size([k] * len(ev.sps))[0] <= budget["target_size"]]
        assert r == max(fits) and row.output_bytes == sizer.file_size([r] * len(ev.sps))[0]
    else:
        reach = [k for k in candidates if at(k).fro_global >= budget["target_fro"] - 1e-12]
        assert r == min(reach)


def test_analyze_rows_honour_the_constraint_and_print_the_command_that_writes_them(tmp_path, standard_lora):
    a = analyze(standard_lora, rank_multiple=4, precision="float")
    assert a.rows and all("--rank-multiple 4" in r.args for r in a.rows)
    fixed = [int(r.param) for r in a.rows if r.method == "fixed"]
    assert fixed and all(k % 4 == 0 for k in fixed)  # the fixed ranks it does not accept are left out of the sweep
    for row in a.rows:
        satisfied(dict(rank_multiple=4), {sp.name: int(k) for sp, k in zip(a.layers, row.ranks)})
    for row in (a.rows[0], next(r for r in a.rows if r.method == "target_size")):
        out = tmp_path / f"{row.method}.safetensors"
        assert main(["resize", str(standard_lora), "-o", str(out), "-q", *row.options.flag_words()]) == 0
        assert out.stat().st_size == row.output_bytes
        assert written_ranks(load_st(out)[0]) == {sp.name: int(k) for sp, k in zip(a.layers, row.ranks)}


def test_convert_with_uniform_rank_pads_every_module_without_a_rank_setting(tmp_path, standard_lora, standard_sd):
    """A conversion that keeps every rank, with --uniform-rank: each layer keeps all of its update, padded to the
    largest rank (a copy bit for bit would leave the ranks as they were)."""
    res = lora_resize.convert(standard_lora, tmp_path / "c.safetensors", "kohya", uniform_rank=True,
                              precision="float")
    sd_out, _ = load_st(res.dst)
    ranks = written_ranks(sd_out)
    assert set(ranks.values()) == {16}  # the largest input rank (the rank-16 layer of 6 outputs keeps its own)
    copied = {r.name for r in res.layers if r.conversion == "exact"}
    assert copied <= {n for n in ranks if standard_sd[n + DOWN].shape[0] == 16}  # (where its alpha is the output's)
    exact_and_padded(standard_sd, sd_out, copied)


def test_the_summary_states_the_constraint_and_what_it_padded(capsys, tmp_path, standard_lora):
    out = tmp_path / "o.safetensors"
    assert main(["resize", str(standard_lora), "-o", str(out), "--rank", "8", "--uniform-rank", "-v"]) == 0
    text = capsys.readouterr().out
    assert "rank 8, uniform rank, rule exact" in text
    assert "zero layer (no update): kept as rank-8 zeros" in text  # the per-layer line, and the summary's
    assert "1 zero layer(s) (no update: untrained modules?) kept as rank-8 zeros" in text
    assert ("--uniform-rank: every layer is written at rank 8; 1 layer(s) whose numerical rank is lower are padded "
            "with zero directions") in text  # the 6-output layer (the zero layer is counted above)


def test_a_uniform_resize_s_own_row_prints_a_command_that_writes_it(tmp_path, standard_lora):
    """The options a uniform resize ran with (every layer's planned rank filled in) print as the flags that plan
    them again - not as one pinning rule per layer, which --uniform-rank refuses."""
    res = lora_resize.resize(standard_lora, tmp_path / "o.safetensors", method="sv_fro", param=0.9,
                             uniform_rank=True)
    a = analysis_from_result(res, sweep={})
    assert a.chosen.args == "--method sv_fro --param 0.9 --uniform-rank"
    assert options_from_flags(a.chosen.args).flags() == a.chosen.args
    assert a.chosen.output_bytes == res.output_bytes


def test_flags_normalise_and_round_trip():
    opts = options_from_flags("--rank 16 --allowed-ranks 64,8,16,8 --uniform-rank")
    assert opts.allowed_ranks == (8, 16, 64) and opts.uniform_rank
    assert opts.flags() == "--rank 16 --allowed-ranks 8,16,64 --uniform-rank"
    assert options_from_flags(opts.flags()) == opts
    assert "ranks in {8,16,64}" in opts.label() and "uniform rank" in opts.label()
    assert ResizeOptions(method="sv_fro", param=0.9, rank_multiple=16).label() == "sv_fro 0.9, ranks multiple of 16"


def test_rules_that_the_constraint_accepts_are_honoured_and_rounded_within_the_layer(tmp_path, standard_lora):
    """A rule's rank the constraint accepts pins its modules (clamped to a layer's size, as without one); a cap
    rule caps the method's choice before it is rounded up."""
    res = lora_resize.resize(standard_lora, tmp_path / "o.safetensors", method="sv_fro", param=0.99,
                             rank_multiple=4, block_rules=("lora_te_*=8", "*conv*=cap:4"))
    ranks = {r.name: r.new_rank for r in res.layers}
    assert {n: k for n, k in ranks.items() if n.startswith("lora_te_")} == {
        n: 8 for n in ranks if n.startswith("lora_te_")}
    assert {k for n, k in ranks.items() if "conv" in n} == {4}
    satisfied(dict(rank_multiple=4), ranks)


@pytest.mark.parametrize("argv,says", [
    (["--rank", "8", "--rank-multiple", "0"], "--rank-multiple must be a whole number >= 1"),
    (["--rank", "8", "--rank-multiple", "-4"], "--rank-multiple must be a whole number >= 1"),
    (["--rank", "8", "--rank-multiple", "1.5"], "--rank-multiple"),
    (["--rank", "8", "--allowed-ranks", ""], "--allowed-ranks needs at least one rank"),
    (["--rank", "8", "--allowed-ranks", "8,x"], "'x' is not one"),
    (["--rank", "8", "--allowed-ranks", "0,8"], "0 is not one"),
    (["--rank", "8", "--allowed-ranks", "8,-16"], "-16"),
    (["--rank", "8", "--allowed-ranks", "8,16.5"], "16.5"),
    (["--rank", "8", "--rank-multiple", "8", "--allowed-ranks", "8,16"], "give one of --rank-multiple or"),
    (["--rank", "24", "--rank-multiple", "16"], "give --rank 16 or 32"),
    (["--rank", "128", "--allowed-ranks", "8,16,64"], "give --rank 64"),
    (["--method", "sv_fro", "--param", "0.9", "--rule", "*te*=12", "--rank-multiple", "8"], "use 8 or 16"),
    (["--method", "sv_fro", "--param", "0.9", "--rule", "*te*=cap:8", "--uniform-rank"], "--uniform-rank writes"),
    (["--rank", "8", "--conv-rank", "4", "--uniform-rank"], "not a --conv-rank of its own"),
])
def test_bad_constraints_are_refused_in_one_line(capsys, tmp_path, standard_lora, argv, says):
    out = tmp_path / "o.safetensors"
    err = refused_in_one_line(capsys, ["resize", str(standard_lora), "-o", str(out), *argv])
    assert says in err
    assert not out.exists()


def test_api_values_are_checked_like_the_flags():
    for bad in (0, -1, 2.5, "x", True):
        with pytest.raises(lora_resize.OptionsError, match="--rank-multiple"):
            ResizeOptions(rank=8, rank_multiple=bad)
    for bad in ((), [0], [8, "y"], 8):
        with pytest.raises(lora_resize.OptionsError, match="--allowed-ranks"):
            ResizeOptions(rank=8, allowed_ranks=bad)
    with pytest.raises(lora_resize.OptionsError, match="uniform_rank must be True or False"):
        ResizeOptions(rank=8, uniform_rank="yes")
    with pytest.raises(lora_resize.OptionsError, match="explicit ranks differ"):
        ResizeOptions(ranks={"a": 4, "b": 8}, uniform_rank=True)
    assert ResizeOptions(rank=8, allowed_ranks=[16, 8, 8.0]).allowed_ranks == (8, 16)


@pytest.mark.parametrize("constraint", [dict(rank_multiple=4), dict(allowed_ranks=(2, 3, 6)),
                                        dict(uniform_rank=True)], ids=["multiple4", "allowed", "uniform"])
@pytest.mark.parametrize("setting", [dict(target_error=0.01), dict(method="base_fro", param=0.005)],
                         ids=["target_error", "base_fro"])
def test_settings_against_the_base_plan_within_the_constraint(tmp_path, wan, constraint, setting):
    """Measured against a base checkpoint (a musubi Wan LoRA written in the diffusers layout): the ranks meet the
    constraint, target_error keeps its promise, each module is the best rank-k approximation, and analyze
    predicts the file."""
    src, base, full, full_ranks, _, _ = wan
    fields = dict(base=str(base), precision="float", **setting, **constraint)
    a = analyze(src, sweep={}, output_format=TO, **fields)
    res = lora_resize.convert(src, tmp_path / "o.safetensors", TO, **fields)
    got, ranks = updates(res.dst), ranks_of(res.dst)
    sizes = {n: min(d.shape) for n, d in full.items()}
    if constraint.get("uniform_rank"):
        assert len(set(ranks.values())) == 1
    for n, k in ranks.items():
        if "rank_multiple" in constraint:
            assert k % 4 == 0 or k == sizes[n], (n, k)
        if "allowed_ranks" in constraint:
            assert k in (2, 3, 6) or k == sizes[n] < 6, (n, k)
        best = best_rank_k(full[n], k)
        assert rel_err(got[n], best) < 1e-5 or float((got[n] - best).norm()) < 1e-9, n
    if "target_error" in setting:
        budget_check(setting, got, full, res.output_bytes, base)
    assert a.chosen.output_bytes == res.dst.stat().st_size
    assert list(map(int, a.chosen.ranks)) == [r.new_rank for r in res.layers]


def test_merge_plans_its_layers_within_the_constraint(tmp_path, standard_lora, standard_sd):
    """A merge's layers (the weighted sum, stacked) at one rank, a multiple of 4: each the best rank-k
    approximation of the weighted sum of the inputs' updates."""
    res = lora_resize.merge([Source(standard_lora, 0.25), Source(standard_lora, 0.5)], tmp_path / "m.safetensors",
                            method="sv_fro", param=0.9, uniform_rank=True, rank_multiple=4, precision="float")
    sd_out, _ = load_st(res.dst)
    ranks = written_ranks(sd_out)
    (k,) = set(ranks.values())
    assert k % 4 == 0
    for name in layer_names(standard_sd):
        want = best_rank_k(0.75 * dense_dw(standard_sd, name), k)
        assert rel_err(dense_dw(sd_out, name), want) < EXACT, name
