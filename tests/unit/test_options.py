"""The options object is the single source of truth: frozen, validated again on every change, and the CLI's flags,
help and choices are generated from its fields (so a flag cannot drift from the option it sets)."""
from __future__ import annotations

import dataclasses
import json

import pytest

import lora_resize
from helpers import Spec, load_st, make_state_dict, write_lora
from lora_resize import OptionsError, ResizeOptions
from lora_resize.cli import build_parser
from lora_resize.formats import output_formats
from lora_resize.options import option_fields
from lora_resize.ranks.policies import dynamic_methods


def subparser(name: str):
    p = build_parser()
    return next(a for a in p._actions if isinstance(a, type(p._subparsers._group_actions[0]))).choices[name]


def test_frozen_and_validated_again_on_change():
    opts = ResizeOptions(method="sv_fro", param=0.9, rank=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.param = 0.5
    with pytest.raises(OptionsError, match="must be in"):
        dataclasses.replace(opts, param=1.5)
    assert dataclasses.replace(opts, param=0.5).param == 0.5 and opts.param == 0.9
    assert opts.with_setting(target_size="2MB").target_size == 2_000_000


def test_rule_is_refused_as_ambiguous_between_rank_rule_and_block_rules():
    """`rule` means the block rules on the command line (--rule); in Python it once meant the rank rule. One name,
    one meaning: rule= is refused, naming both fields, never read as either."""
    assert ResizeOptions(rank=4, rank_rule="kohya").rank_rule == "kohya"
    for value in ("kohya", "*=2"):
        with pytest.raises(OptionsError, match="ambiguous: give rank_rule=.*block_rules="):
            ResizeOptions(rank=4, rule=value)
    with pytest.raises(OptionsError, match="ambiguous"):
        lora_resize.analyze("never-read.safetensors", rule="kohya")


def test_the_record_names_the_rank_rule_and_the_block_rules_apart(tmp_path):
    src = write_lora(tmp_path / "in.safetensors", make_state_dict([Spec("lora_unet_a", 8, 6, 4)], seed=1))
    lora_resize.resize(src, tmp_path / "out.safetensors", rank=2, rank_rule="kohya", block_rules=("*=cap:3",))
    rec = json.loads(load_st(tmp_path / "out.safetensors")[1]["lora_resize"])
    assert rec["rank_rule"] == "kohya" and rec["block_rules"] == ["*=cap:3"] and "rule" not in rec


@pytest.mark.parametrize("command", ["resize", "merge", "analyze", "batch"])
def test_every_option_is_a_flag_with_its_fields_help_and_choices(command):
    p = subparser(command)
    by_dest = {a.dest: a for a in p._actions}
    for f in option_fields():
        action = by_dest[f.name]
        assert list(action.option_strings) == list(f.metadata["flags"]), f.name
        assert action.help == f.metadata["help"]
    assert by_dest["method"].choices == ["fixed", *dynamic_methods()]
    assert by_dest["output_format"].choices == output_formats()
    assert by_dest["rank_rule"].default == "exact" and by_dest["device"].default == "auto"


def test_subcommands_have_only_the_flags_they_honour():
    def flags(name):
        return {s for a in subparser(name)._actions for s in a.option_strings if a.help != "==SUPPRESS=="}
    assert {"--report", "--plot", "-v"} <= flags("resize") & flags("analyze")
    assert not {"--report", "--plot", "-v", "-o"} & flags("batch")
    assert not {"--report", "--plot"} & flags("merge") and "-o" not in flags("analyze")
    assert not {"--rank", "--method", "--precision"} & flags("demo")


def test_label_names_everything_that_changes_the_file():
    """Settings that write different files have different labels (preview's cells, analyze rows, the ComfyUI
    nodes all use ResizeOptions.label): the precision, the output layout, a dynamic method's rank rule."""
    same_rank = [ResizeOptions(rank=4), ResizeOptions(rank=4, precision="bf16"),
                 ResizeOptions(rank=4, precision="fp16"), ResizeOptions(rank=4, output_format="comfy")]
    labels = [o.label() for o in same_rank]
    assert labels == ["rank 4", "rank 4, bf16", "rank 4, fp16", "rank 4, comfy layout"]
    assert ResizeOptions(method="sv_fro", param=0.9, rank=8, rank_rule="kohya", precision="float").label() == \
        "sv_fro 0.9, cap 8, float, kohya rank rule"
    assert ResizeOptions(method="sv_fro", param=0.9).label() == "sv_fro 0.9"
    assert ResizeOptions(rank=4, device="cpu", threads=1).label() == "rank 4"  # computation changes no file
