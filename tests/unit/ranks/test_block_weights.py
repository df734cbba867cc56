"""Scale rules (`PATTERN=scale:X`) and --block-weights presets as text: parsing, the separate first-match lists of
scale and rank/cap/drop rules, the preset ahead of every scale rule, strength 0 as a drop, and one-line errors."""
from __future__ import annotations

import pytest

from lora_resize.errors import OptionsError
from lora_resize.options import ResizeOptions
from lora_resize.ranks.block_weights import PRESETS, parse_block_weights
from lora_resize.ranks.rules import apply_rules, first_match, parse_rule, parse_rules, strength_of

# LBW's DEF_WEIGHT_PRESET (hako-mikan/sd-webui-lora-block-weight, scripts/lora_block_weight.py), as it is written
LBW_NAMED = """NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
INS:1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0
IND:1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0
INALL:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0
MIDD:1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0
OUTD:1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0
OUTS:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1
OUTALL:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1
ALL0.5:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"""
# ComfyUI-Inspire-Pack resources/lbw-preset.txt, its SDXL lines
INSPIRE_SDXL = """SDXL-NONE:0,0,0,0,0,0,0,0,0,0,0,0
SDXL-ALL:1,1,1,1,1,1,1,1,1,1,1,1
SDXL-INALL:1,1,1,1,1,0,0,0,0,0,0,0
SDXL-MIDALL:1,0,0,0,0,1,0,0,0,0,0,0
SDXL-OUTALL:1,0,0,0,0,0,1,1,1,1,1,1"""


@pytest.mark.parametrize("preset, line", [("SD15", line) for line in LBW_NAMED.splitlines()] +
                         [("SDXL", line.removeprefix("SDXL-")) for line in INSPIRE_SDXL.splitlines()])
def test_named_presets_are_the_extensions_values(preset, line):
    name, values = line.split(":")
    bw = parse_block_weights(f"{preset.lower()}:{name.lower()}")
    assert bw.values == tuple(float(v) for v in values.split(","))
    assert bw.text == f"{preset}:{name}"  # reads back as it was named


@pytest.mark.parametrize("preset, counts", [("SD15", (17, 26)), ("SDXL", (12, 20)), ("FLUX", (58, 61))])
def test_each_preset_takes_its_forms_counts(preset, counts):
    for n in counts:
        bw = parse_block_weights(f"{preset}:" + ",".join(["-0.25"] * n))
        assert bw.values == (-0.25,) * n and bw.text == f"{preset}:" + ",".join(["-0.25"] * n)
    with pytest.raises(OptionsError, match=rf"--block-weights {preset} takes {counts[0]} or {counts[1]} values"):
        parse_block_weights(f"{preset}:" + ",".join(["1"] * (counts[0] - 1)))


def test_the_lbw_block_lists():
    sd15 = PRESETS["SD15"].form(17).blocks
    assert sd15 == ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05",
                    "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
    assert PRESETS["SDXL"].form(12).blocks == ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", "OUT00", "OUT01",
                                               "OUT02", "OUT03", "OUT04", "OUT05")
    flux = PRESETS["FLUX"].form(61).blocks
    assert flux[:4] == ("CLIP", "T5", "IN", "D00") and flux[21:23] == ("D18", "S00") and flux[-2:] == ("S37", "OUT")
    assert PRESETS["FLUX"].form(58).blocks[:2] == ("BASE", "D00")


@pytest.mark.parametrize("text, fix", [
    ("SD15", "give PRESET:W1,W2"), ("XL:1,1", "PRESET one of SD15, SDXL, FLUX"),
    ("SD15:OUTSIDE", "not a named preset; give one of NONE"), ("SD15:1,1,x" + ",1" * 14, "'x' is not a strength"),
    ("SD15:" + ",".join(["inf"] * 17), "'inf' is not a strength"), (17, "must be text")])
def test_bad_block_weights_are_one_line_errors(text, fix):
    with pytest.raises(OptionsError, match=fix) as e:
        ResizeOptions(rank=4, block_weights=text)
    assert "\n" not in str(e.value)


def test_scale_rules_parse_and_read_back():
    assert parse_rule("*attn2*=scale:0.5") == parse_rule("*attn2*=SCALE: 0.5")
    for text in ("*attn2*=scale:0.5", "a=scale:-1", "b=scale:0", "c=scale:2", "d=scale:0.1234567891"):
        r = parse_rule(text)
        assert r.action == "scale" and str(r) == text and parse_rule(str(r)) == r
    for bad in ("a=scale:", "a=scale:nan", "a=scale:-inf", "a=scale:half"):
        with pytest.raises(OptionsError, match="is not a strength"):
            parse_rule(bad)


def test_scale_rules_are_matched_apart_from_rank_rules():
    rules = parse_rules(["*attn2*=scale:0.5", "*=cap:32", "*attn2*=8", "*=scale:2"])
    assert first_match(rules, "x_attn2_to_k").action == "cap"  # scale rules never decide a rank
    assert strength_of(rules, "x_attn2_to_k") == 0.5 and strength_of(rules, "x_attn1_to_k") == 2.0
    assert strength_of(parse_rules(["*=cap:4"]), "x") == 1.0
    out = apply_rules(rules, ["x_attn2_to_k", "x_attn1_to_k"])
    assert out.kept == ["x_attn2_to_k", "x_attn1_to_k"] and out.strengths == {"x_attn2_to_k": 0.5, "x_attn1_to_k": 2}
    assert out.hits == {"*attn2*=scale:0.5": 1, "*=cap:32": 2, "*attn2*=8": 0, "*=scale:2": 1}
    assert any("*attn2*=8 is shadowed" in n for n in out.notes)
    assert "strengths baked into the factors: x0.5: 1 module; x2: 1 module" in out.notes


def test_a_strength_of_zero_drops_and_the_preset_multiplies():
    rules = parse_rules(["*te*=scale:0", "*=scale:3"])
    out = apply_rules(rules, ["te_a", "unet_b", "unet_c"], preset={"unet_b": -1.0, "te_a": 0.5})
    assert out.kept == ["unet_b", "unet_c"]  # the preset's 0.5 times the scale rule's 0 drops te_a
    assert out.strengths == {"te_a": 0.0, "unet_b": -3.0, "unet_c": 3.0}
    out = apply_rules(rules, ["te_a", "unet_b", "unet_c"], preset={"unet_b": 0.0})
    assert out.dropped == ["te_a", "unet_b"] and out.kept == ["unet_c"]
    assert out.strengths == {"te_a": 0.0, "unet_b": 0.0, "unet_c": 3.0}  # 0: dropped by its strength
    assert "strengths baked into the factors: x3: 1 module; x0: 2 modules dropped" in out.notes
    with pytest.raises(OptionsError, match="every module is dropped"):
        apply_rules(rules, ["te_a", "unet_b"], preset={"unet_b": 0.0})


def test_scale_rules_set_no_rank():
    with pytest.raises(OptionsError, match="give a rank"):
        ResizeOptions(block_rules=["*=scale:0.5"])
    with pytest.raises(OptionsError, match="give a rank"):
        ResizeOptions(block_weights="SD15:ALL")
    o = ResizeOptions(rank=8, block_rules=["*=scale:0.5"], block_weights="sdxl:outall")
    assert not o.dynamic and o.rank_settings == ("rank", "conv_rank")
    assert o.flag_words() == ["--rank", "8", "--rule", "*=scale:0.5", "--block-weights", "SDXL:OUTALL"]


@pytest.mark.parametrize("text", ["1_0", "1e-400", "-1e-400", "0x10", "inf", " ", "1e400"])
def test_a_strength_that_is_not_a_plain_finite_number_is_refused(text):
    """'1_0' read as 10 and '1e-400' as 0 (dropping the module) through Python's float(); a strength is a decimal
    number within float64's range, and a nonzero one is never read as 0."""
    with pytest.raises(OptionsError):
        parse_rule(f"*=scale:{text}")
    with pytest.raises(OptionsError):
        parse_block_weights("SD15:" + ",".join([text] + ["1"] * 16))


@pytest.mark.parametrize("text,value", [("0", 0.0), ("-0.0", 0.0), ("1e-300", 1e-300), (".5", 0.5), ("+2", 2.0)])
def test_plain_strengths_are_read(text, value):
    assert parse_rule(f"*=scale:{text}").value == value


def test_a_preset_strength_and_a_scale_rule_multiply():
    """A module a --block-weights preset covers still takes a matching scale rule: the two strengths multiply (it
    took the preset's alone, so the README's example '*attn2*=scale:0.5' beside an SD15 preset halved nothing)."""
    rules = parse_rules(["*attn2*=scale:0.5", "*=cap:8"])
    preset = {"a_attn2": 1.0, "b_attn2": 0.5, "c_attn1": 0.25, "d_attn2": 0.0}
    out = apply_rules(rules, ["a_attn2", "b_attn2", "c_attn1", "d_attn2", "e_attn2"], preset)
    assert out.strengths == {"a_attn2": 0.5, "b_attn2": 0.25, "c_attn1": 0.25, "d_attn2": 0.0, "e_attn2": 0.5}
    assert out.dropped == ["d_attn2"]
    assert out.hits["*attn2*=scale:0.5"] == 4
