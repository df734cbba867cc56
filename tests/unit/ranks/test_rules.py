"""Per-block rules: PATTERN=RANK / PATTERN=cap:RANK / PATTERN=drop, first match wins, applied before the method, in
resize, merge and the CLI; hits in the summary, unmatched patterns warned about, bad rules refused with the fix."""
from __future__ import annotations

import json

import pytest

import lora_resize
from lora_resize import OptionsError, ResizeOptions
from lora_resize.cli import main
from lora_resize.ranks.rules import BlockRule, parse_rule

from helpers import DOWN, load_st
from helpers import BLOCKY

TE = [s.name for s in BLOCKY if s.name.startswith("lora_te_")]
ATTN2 = [s.name for s in BLOCKY if "attn2" in s.name]


@pytest.mark.parametrize("text,want", [
    ("lora_te_*=8", BlockRule("lora_te_*", "rank", 8)),
    ("*attn2*=cap:64", BlockRule("*attn2*", "cap", 64)),
    (" *attn2* = CAP: 4 ", BlockRule("*attn2*", "cap", 4)),
    ("lora_unet_mid_*=drop", BlockRule("lora_unet_mid_*", "drop")),
])
def test_rule_forms(text, want):
    r = parse_rule(text)
    assert r == want
    assert parse_rule(str(r)) == r


@pytest.mark.parametrize("text,msg", [
    ("lora_te_*", "needs the form PATTERN=RANK"),
    ("=8", "needs the form"),
    ("lora_te_*=0", "not a rank"),
    ("lora_te_*=cap:x", "not a rank"),
    ("lora_te_*=remove", "not a rank"),
])
def test_bad_rules_are_refused_with_the_fix(text, msg):
    with pytest.raises(OptionsError, match=msg):
        ResizeOptions(rank=4, block_rules=(text,))


def test_rules_apply_before_the_method_first_match_wins(tmp_path, blocky_lora):
    dst = tmp_path / "out.safetensors"
    rules = ("lora_te_*=3", "*attn2*=cap:1", "*conv1=drop", "*attn2_to_v=drop", "*mid_block*=cap:9",
             "lora_xyz_*=2")
    res = lora_resize.resize(blocky_lora, dst, method="sv_fro", param=0.99, rank=5, block_rules=rules)
    sd, meta = load_st(dst)
    names = {r.name: r for r in res.layers}
    assert not any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1") for k in sd)  # dropped entirely
    assert "lora_unet_down_blocks_0_resnets_0_conv1" not in names
    assert all(names[n].new_rank == 3 for n in TE)  # a fixed rank overrides the method
    assert all(names[n].new_rank == 1 for n in ATTN2)  # first match (cap:1) beats the later drop of attn2_to_v
    mid = [n for n in names if "mid_block" in n]
    assert any(names[n].new_rank > 5 for n in mid)  # cap:9 replaces the --rank 5 cap
    assert all(names[n].new_rank <= 5 for n in names if not any(p in n for p in ("mid_block", "lora_te_")))
    assert res.options["rule_hits"] == {"lora_te_*=3": 2, "*attn2*=cap:1": 2, "*conv1=drop": 1,
                                        "*attn2_to_v=drop": 0, "*mid_block*=cap:9": 2, "lora_xyz_*=2": 0}
    notes = "\n".join(res.notes)
    assert "rule *attn2_to_v=drop is shadowed" in notes
    assert "rule lora_xyz_*=2 matches no module" in notes
    assert meta["ss_network_dim"] == "Dynamic"
    record = json.loads(meta["lora_resize"])
    assert record["block_rules"] == list(rules)
    assert "lora_unet_down_blocks_0_resnets_0_conv1" not in record["layers"]


def test_dropping_every_module_is_an_error(tmp_path, blocky_lora):
    with pytest.raises(OptionsError, match="every module is dropped"):
        lora_resize.resize(blocky_lora, tmp_path / "o.safetensors", rank=2, block_rules=("lora_*=drop",))
    assert not (tmp_path / "o.safetensors").exists()


def test_merge_honours_rules(tmp_path, blocky_lora):
    dst = tmp_path / "m.safetensors"
    res = lora_resize.merge([f"{blocky_lora}:0.5", f"{blocky_lora}:0.5"], dst, rank=4,
                            block_rules=("lora_te_*=drop", "*attn2*=2"))
    sd, _ = load_st(dst)
    assert not any(k.startswith("lora_te_") for k in sd)
    assert all(sd[n + DOWN].shape[0] == 2 for n in ATTN2)
    assert res.options["rule_hits"] == {"lora_te_*=drop": 2, "*attn2*=2": 2}
    # the planning step is shared: a budget plans a merge as it plans a resize, the rules applied first
    m2 = tmp_path / "m2.safetensors"
    res = lora_resize.merge([f"{blocky_lora}:0.5", f"{blocky_lora}:0.5"], m2, target_size="12kB",
                            block_rules=("lora_te_*=drop",))
    assert m2.stat().st_size <= 12_000 and not any(k.startswith("lora_te_") for k in load_st(m2)[0])
    assert json.loads(res.metadata["lora_resize"])["target_size"] == 12_000


def test_cli_rules_and_their_hits_in_the_summary(tmp_path, blocky_lora, capsys):
    out = tmp_path / "o.safetensors"
    assert main(["resize", str(blocky_lora), "-o", str(out), "--rank", "4", "--rule", "lora_te_*=8",
                 "--rule", "*attn2*=cap:2", "--rule", "nothing*=drop", "-q"]) == 0
    text = capsys.readouterr().out
    assert "rules: lora_te_*=8: 2 modules; *attn2*=cap:2: 2 modules; nothing*=drop: 0 modules" in text
    assert "warning: rule nothing*=drop matches no module" in text
    sd, _ = load_st(out)
    assert all(sd[n + DOWN].shape[0] == 8 for n in TE)
    assert main(["resize", str(blocky_lora), "-o", str(out), "--rank", "4", "--rule", "lora_te_*"]) == 2
    assert "PATTERN=RANK" in capsys.readouterr().err
