"""Prediction and write go through one planning path: what analyze (and `Analysis.evaluate`) predicts for a setting
is the file resize writes - bytes and every layer's rank - under either rank rule, with budgets, pins and caps,
for layers whose numerical rank is below their trained rank or their size; and `evaluate` honours every option it
is given (precision, output layout, drop rules) or refuses it in one line."""
from __future__ import annotations

import pytest
import torch

import lora_resize
from lora_resize.errors import OptionsError
from lora_resize.ops.analyze import analyze

from helpers import BASE_METADATA, Spec, decaying_spectrum, load_st, make_state_dict, write_lora


def low_rank_specs() -> list[Spec]:
    """Layers whose numerical rank (1, 2, 3) is below their trained rank (8), beside ordinary ones."""
    return [
        Spec("lora_te_text_model_encoder_layers_0_mlp_fc1", 24, 20, 8, alpha=4.0),
        Spec("lora_te_text_model_encoder_layers_0_mlp_fc2", 20, 24, 8, alpha=4.0, spectrum=decaying_spectrum(1)),
        Spec("lora_unet_down_blocks_0_attentions_0_proj_in", 16, 16, 8, kernel=1, alpha=2.0,
             spectrum=decaying_spectrum(2)),
        Spec("lora_unet_down_blocks_0_resnets_0_conv1", 16, 8, 8, kernel=3, alpha=8.0, spectrum=decaying_spectrum(3)),
        Spec("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k", 6, 20, 8, alpha=8.0),
    ]


@pytest.fixture
def low_rank(tmp_path):
    return write_lora(tmp_path / "low.safetensors", make_state_dict(low_rank_specs(), seed=4), dict(BASE_METADATA))


def written(path) -> tuple[int, dict[str, int]]:
    sd, _ = load_st(path)
    return path.stat().st_size, {k[:-len(".lora_down.weight")]: v.shape[0] for k, v in sd.items()
                                 if k.endswith(".lora_down.weight")}


SETTINGS = [dict(target_size=6_000), dict(target_size=9_000), dict(target_fro=0.99), dict(target_fro=0.5),
            dict(target_size=8_000, block_rules=("*mlp_fc2=6", "*conv1=5")),
            dict(target_fro=0.9, rank=6, block_rules=("*proj_in=cap:7",)),
            dict(method="sv_fro", param=0.9, block_rules=("*mlp_fc2=6",)), dict(rank=7)]


@pytest.mark.parametrize("rank_rule", ["kohya", "exact"])
@pytest.mark.parametrize("fields", SETTINGS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_predicted_and_written_agree_under_either_rank_rule(tmp_path, low_rank, fields, rank_rule):
    a = analyze(low_rank, sweep={}, rank_rule=rank_rule, precision="float", **fields)
    res = lora_resize.resize(low_rank, tmp_path / "o.safetensors", rank_rule=rank_rule, precision="float", **fields)
    size, ranks = written(res.dst)
    assert a.chosen.output_bytes == size
    assert dict(zip([sp.name for sp in a.layers], map(int, a.chosen.ranks))) == ranks
    assert [r.new_rank for r in res.layers] == [ranks[r.name] for r in res.layers]


@pytest.mark.parametrize("other", [dict(precision="bf16"), dict(precision="fp16"),
                                   dict(output_format="diffusers"), dict(block_rules=("*conv1=drop",)),
                                   dict(block_rules=("*conv1=drop", "*mlp_fc1=2")), dict(rank_rule="kohya")])
@pytest.mark.parametrize("setting", [dict(rank=3), dict(target_size=5_000), dict(method="sv_ratio", param=4)])
def test_evaluate_honours_every_option_or_refuses_it(tmp_path, low_rank, other, setting):
    a = analyze(low_rank, sweep={}, precision="float")
    opts = lora_resize.ResizeOptions(**setting, **other)
    try:
        row = a.evaluate(opts)
    except OptionsError as e:
        assert "\n" not in str(e)
        return
    res = lora_resize.resize(low_rank, tmp_path / "o.safetensors", opts)
    size, ranks = written(res.dst) if res.dst.suffix == ".safetensors" and "output_format" not in other else \
        (res.dst.stat().st_size, None)
    assert row.output_bytes == size, other
    assert [int(k) for k in row.ranks] == [r.new_rank for r in res.layers]
    assert len(row.ranks) == len(res.layers)
    if ranks is not None:
        assert [r.new_rank for r in res.layers] == [ranks[r.name] for r in res.layers]
