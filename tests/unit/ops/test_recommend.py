"""The recommendation (ops.analyze.recommend): one setting and the reason, a pure function of the sweep's rows -
with effect errors, the smallest file under the threshold (or the least effect error, said so); without them the
weight-space rule, labelled as such. And the chosen mark: a setting the caller named, never the cap alone."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lora_resize.cli import main
from lora_resize.errors import OptionsError
from lora_resize.options import ResizeOptions
from lora_resize.ops.analyze import DEFAULT_MAX_EFFECT_ERROR, WEIGHT_SPACE_MIN_FRO, analyze, recommend
from lora_resize.results import SettingRow


def row(label, size, fro_min, effect=None, fro=None):
    fro = fro_min if fro is None else fro
    return SettingRow(label, "x", None, f"--{label}", size, size // 2, fro, fro, fro, fro_min, None,
                      ranks=np.array([1]), effect_error=effect)


def test_effect_errors_the_smallest_file_under_the_threshold():
    rows = [row("a", 900, 0.99, 0.01), row("b", 300, 0.95, 0.04), row("c", 200, 0.5, 0.2), row("d", 500, 0.97, 0.02),
            row("e", 100, 0.99)]  # e: not measured, does not compete with measured rows
    best, why = recommend(rows, 0.05)
    assert best.label == "b" and "at most 5.0%" in why and "4.00%" in why and "weight-space" not in why
    assert recommend(rows, 0.3)[0].label == "c"
    assert recommend(rows, 0.015)[0].label == "a"
    # none under: the least effect error, saying so
    best, why = recommend(rows, 0.001)
    assert best.label == "a" and why.startswith("no setting keeps the effect error at most 0.1%")
    assert recommend(list(reversed(rows)), 0.05)[0].label == "b"  # the order of rows does not matter


def test_a_recommendation_no_smaller_than_the_input_says_so():
    rows = [row("full", 1000, 1.0, 0.0), row("half", 500, 0.9, 0.3)]
    best, why = recommend(rows, 0.05, input_bytes=900)
    assert best.label == "full" and "no smaller than the input" in why and "keeping the input" in why
    assert "no smaller" not in recommend(rows, 0.05, input_bytes=2000)[1]
    assert "no smaller" not in recommend(rows, 0.05)[1]


def test_without_effect_errors_the_weight_space_rule_labelled():
    rows = [row("big", 1000, 0.999), row("mid", 400, 0.93), row("small", 100, 0.6), row("edge", 350, 0.899)]
    best, why = recommend(rows)
    assert best.label == "mid" and why.startswith("weight-space rule:") and "90%" in why and "--effect" in why
    # every row under the rule: the one that keeps most of its worst layer, saying so
    best, why = recommend([row("a", 10, 0.5), row("b", 20, 0.7), row("c", 5, 0.7)])
    assert best.label == "c" and "no setting keeps" in why
    # a layer pinned low (--rule '*attn*=2') sets every row's minimum: the size-weighted mean decides, not a tie
    pinned = [row("tiny", 5, 0.72, fro=0.80), row("mid", 9, 0.72, fro=0.91), row("big", 20, 0.72, fro=0.99)]
    best, why = recommend(pinned)
    assert best.label == "mid" and "size-weighted mean" in why and "caps and rules" in why
    best, why = recommend([row("tiny", 5, 0.72, fro=0.80), row("big", 20, 0.72, fro=0.85)])
    assert best.label == "big" and "keeps the most" in why
    # a zero layer's NaN fidelity never wins; all zero: the smallest file
    assert recommend([row("z", 1, float("nan")), row("ok", 9, 0.95)])[0].label == "ok"
    assert recommend([row("z1", 5, float("nan")), row("z2", 3, float("nan"))])[0].label == "z2"
    assert recommend([]) == (None, "nothing to recommend: the sweep has no settings")
    assert WEIGHT_SPACE_MIN_FRO == 0.9 and DEFAULT_MAX_EFFECT_ERROR == 0.05


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.05", True])
def test_a_bad_threshold_is_an_options_error(bad):
    with pytest.raises(OptionsError, match="--max-effect-error must be a number >= 0"):
        recommend([row("a", 1, 0.9)], bad)


def test_the_cap_alone_is_not_a_chosen_setting(blocky_lora):
    """`analyze x --rank 12` caps every setting; nothing is chosen, and the recommendation is the smallest file
    meeting the rule, which is not the rank-12 row (the largest file under the cap) here."""
    a = analyze(blocky_lora, rank=12)
    assert a.chosen is None and not any(r.chosen for r in a.rows)
    best, why = recommend(a.rows)
    assert a.recommended is best and a.recommended_reason == why
    under = [r for r in a.rows if r.fro_min >= WEIGHT_SPACE_MIN_FRO]
    assert a.recommended.output_bytes == min(r.output_bytes for r in under)
    cap = a.evaluate(ResizeOptions(rank=12))  # what the old analyze marked as chosen: the largest file
    assert cap.output_bytes >= max(r.output_bytes for r in a.rows) > a.recommended.output_bytes
    # naming a setting marks it: a method, a budget, or a fixed rank with method="fixed"
    for fields in (dict(method="sv_fro", param=0.9, rank=4), dict(target_fro=0.9), dict(method="fixed", rank=4)):
        assert analyze(blocky_lora, sweep={}, **fields).chosen is not None, fields


def test_cli_prints_the_recommendation_and_its_command(blocky_lora, capsys):
    assert main(["analyze", str(blocky_lora), "--rank", "12", "-q"]) == 0
    text = capsys.readouterr().out
    assert not any(line.startswith("* ") for line in text.splitlines())  # no chosen row
    a = analyze(blocky_lora, rank=12)
    line = next(x for x in text.splitlines() if x.startswith("> recommended: "))
    assert line == f"> recommended: {a.recommended.args}  ({a.recommended_reason})"
    assert f"lora-resize resize {blocky_lora} -o OUT.safetensors {a.recommended.args}" in text
    marked = [x for x in text.splitlines() if x.startswith("> ") and not x.startswith("> recommended")]
    assert len(marked) == 1 and a.recommended.label in marked[0]
    assert main(["analyze", str(blocky_lora), "--rank", "12", "-q", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["chosen"] is None
    assert d["recommended"]["args"] == a.recommended.args and d["recommended"]["reason"] == a.recommended_reason


def test_effect_errors_filled_after_the_sweep_decide_the_recommendation(blocky_lora):
    """analyze --effect fills row.effect_error after the sweep and recommends again: the same pure function."""
    a = analyze(blocky_lora, rank=12)
    for r in a.rows:
        r.effect_error = 1 - r.fro_global  # a stand-in for a measurement that falls as the file grows
    best, why = recommend(a.rows, 0.05)
    under = [r for r in a.rows if r.effect_error <= 0.05]
    assert best.output_bytes == min(r.output_bytes for r in under) and best.effect_error <= 0.05
    assert "effect error" in why and "weight-space" not in why


def test_cli_refuses_a_bad_max_effect_error(blocky_lora, capsys):
    assert main(["analyze", str(blocky_lora), "--max-effect-error", "-0.5", "--effect", "--base", "nowhere", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--max-effect-error must be a number >= 0" in err
    # without --effect nothing reads it (the weight-space rule has no threshold): refused, as every --effect flag
    assert main(["analyze", str(blocky_lora), "--max-effect-error", "0.2", "-q"]) == 2
    assert "read only with --effect" in capsys.readouterr().err
