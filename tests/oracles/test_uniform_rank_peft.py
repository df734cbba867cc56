"""PEFT as the judge of --uniform-rank: a PEFT adapter with a rank_pattern, resized with a dynamic method and one
rank for every module, is written with one `r` and no rank_pattern (its alpha_pattern keeps the scale of the
modules trained at another one); `PeftModel.from_pretrained`
loads it without a warning, builds every module at that rank, and `merge_and_unload` changes each adapted weight
by exactly the best rank-r approximation of its trained update (dense float64 SVD)."""
from __future__ import annotations

import json

import pytest
from peft import LoraConfig

from lora_resize.cli import main

from helpers import load_st, rel_err
from test_loaders_peft import PREFIX, TARGETS, TOL, load_merged, resized_dw, save_adapter

pytestmark = pytest.mark.thirdparty


@pytest.mark.parametrize("setting,r", [(["--rank", "32"], 32),  # v_proj (rank 16) padded to 32
                                       (["--method", "sv_fro", "--param", "0.9", "--rank-multiple", "16"], 16)],
                         ids=["rank32", "sv_fro-multiple16"])
def test_uniform_rank_peft_adapter_has_one_r_and_merges_exactly(tmp_path, setting, r):
    cfg = LoraConfig(r=64, lora_alpha=32, target_modules=TARGETS, rank_pattern={"v_proj": 16},
                     init_lora_weights=True)
    src, before = save_adapter(tmp_path, cfg, seed=3)
    out_dir = tmp_path / "uniform"
    assert main(["resize", f"{src}/", "-o", f"{out_dir}/", "-q", *setting, "--uniform-rank"]) == 0
    new_cfg = json.loads((out_dir / "adapter_config.json").read_text())
    assert new_cfg["r"] == r and not new_cfg.get("rank_pattern")
    assert {p.split(".")[-1] for p in new_cfg.get("alpha_pattern", {})} <= {"v_proj"}
    sd_in, _ = load_st(src / "adapter_model.safetensors")
    sd_out, _ = load_st(out_dir / "adapter_model.safetensors")
    assert {v.shape[0] for k, v in sd_out.items() if k.endswith(".lora_A.weight")} == {r}

    msgs, ranks, merged = load_merged(out_dir)
    assert msgs == [] and set(ranks.values()) == {r}
    for key in sd_out:
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[len(PREFIX):-len(".lora_A.weight")]
        scale = 32 / 16 if path.endswith("v_proj") else 32 / 64
        want = resized_dw(sd_in, PREFIX + path, scale, r)
        got = merged[path + ".weight"].double() - before[path + ".weight"].double()
        assert rel_err(got, want) < TOL, path
        if path.endswith("v_proj"):  # rank 16 in, r out: the padded directions are exact zeros
            assert int((sd_out[key].abs().sum(1) > 0).sum()) <= 16
