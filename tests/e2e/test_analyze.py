"""analyze: the sizes and fidelities it predicts are the ones resize then produces (bytes exactly, ranks and
Frobenius retention per layer), for fixed, dynamic, kohya-rule, budget and rule settings; the CLI's text and JSON."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import lora_resize
from lora_resize.formats.blocks import block_of
from lora_resize.ops.analyze import analyze
from lora_resize.cli import main

from helpers import BLOCKY, dense_dw, load_st, write_lora



def output_numel(path) -> int:
    return sum(t.numel() for t in load_st(path)[0].values())


SETTINGS = [
    dict(method="fixed", rank=4),
    dict(method="fixed", rank=6, conv_rank=2, precision="float"),
    dict(method="sv_fro", param=0.9, rank=8),
    dict(method="sv_ratio", param=3, rank_rule="kohya"),
    dict(method="sv_cumulative", param=0.8, precision="bf16",
         block_rules=("lora_te_*=2", "*conv2=drop", "*proj_in=cap:3", "*nothing*=5")),
    dict(target_fro=0.9),
    dict(target_fro=0.8, rank_rule="kohya", rank=6, block_rules=("*mid_block*=cap:4",)),
    dict(target_size=12_000, block_rules=("lora_te_*=drop",)),
]


@pytest.mark.parametrize("fields", SETTINGS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_analyze_predicts_what_resize_writes(tmp_path, blocky_lora, fields):
    a = analyze(blocky_lora, sweep={}, **fields)
    dst = tmp_path / "out.safetensors"
    res = lora_resize.resize(blocky_lora, dst, **fields)
    p = a.chosen
    assert p is not None and p.chosen
    assert p.output_bytes == dst.stat().st_size  # the whole file: header, metadata, hashes, copied tensors
    assert p.params == output_numel(dst)
    assert [L.name for L in a.layers] == [r.name for r in res.layers]
    assert [int(k) for k in p.ranks] == [r.new_rank for r in res.layers]
    assert p.fro_mean == pytest.approx(res.mean_fro, abs=1e-12)
    assert p.fro_min == pytest.approx(res.min_fro.fro_retained, abs=1e-12)
    assert p.worst_layer == res.min_fro.name
    live = [r for r in res.layers if r.fro_retained == r.fro_retained]
    w = [r.out_features * r.in_features for r in live]
    assert p.fro_weighted == pytest.approx(sum(wi * r.fro_retained for wi, r in zip(w, live)) / sum(w), abs=1e-12)


def test_predicted_global_fro_is_the_written_files(tmp_path, blocky_lora):
    """fro_global from the spectra equals ||dW_out|| / ||dW_in|| over all layers, measured on the two files."""
    a = analyze(blocky_lora, sweep={}, method="sv_fro", param=0.8, precision="float")
    dst = tmp_path / "out.safetensors"
    lora_resize.resize(blocky_lora, dst, method="sv_fro", param=0.8, precision="float")
    sd_in, sd_out = load_st(blocky_lora)[0], load_st(dst)[0]
    kept = total = 0.0
    for L in a.layers:
        din, dout = dense_dw(sd_in, L.name), dense_dw(sd_out, L.name).reshape(-1)
        total += float(din.norm()) ** 2
        kept += float(dout.norm()) ** 2  # the truncation is orthogonal: ||dW_k||^2 = sum of the kept S^2
    assert a.chosen.fro_global == pytest.approx(math.sqrt(kept / total), rel=2e-3)  # fp16 input factors


def test_every_sweep_row_predicts_the_file_resize_writes(tmp_path, blocky_lora):
    a = analyze(blocky_lora, rank=8)
    methods = {r.method for r in a.rows}
    assert methods == {"sv_ratio", "sv_fro", "sv_cumulative", "fixed", "target_fro", "target_size"}
    assert all(r.options.rank == 8 for r in a.rows if r.method != "fixed")  # the cap reaches every setting
    assert sorted(r.options.rank for r in a.rows if r.method == "fixed") == [1, 2, 4, 8]
    assert all(int(r.ranks.max()) <= 8 for r in a.rows)
    for n, row in enumerate(a.rows[::4]):
        dst = tmp_path / f"row{n}.safetensors"
        res = lora_resize.resize(blocky_lora, dst, row.options)
        assert row.output_bytes == dst.stat().st_size, row.label
        assert [int(k) for k in row.ranks] == [r.new_rank for r in res.layers], row.label


def test_sizes_follow_precision_and_ranks(blocky_lora):
    half = analyze(blocky_lora, sweep={"fixed": (1, 2, 4)})
    full = analyze(blocky_lora, sweep={"fixed": (1, 2, 4)}, precision="float")
    assert half.precision == "fp16" and full.precision == "float"
    sizes = [r.output_bytes for r in half.rows]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    for h, f in zip(half.rows, full.rows):
        assert h.params == f.params
        data_h = h.output_bytes - h.header_bytes
        data_f = f.output_bytes - f.header_bytes
        assert data_f - data_h == 2 * (h.params - 7)  # every float element doubles; the int64 index (7) stays


def test_block_groups():
    assert block_of("lora_te_text_model_encoder_layers_0_mlp_fc1") == "text encoder"
    assert block_of("lora_te2_text_model_encoder_layers_0_mlp_fc1") == "text encoder 2"
    assert block_of("lora_unet_down_blocks_2_resnets_0_conv1") == "down 2"
    assert block_of("lora_unet_mid_block_attentions_0_proj_in") == "mid"
    assert block_of("lora_unet_up_blocks_3_attentions_0_proj_in") == "up 3"
    assert block_of("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") == "down 4"
    assert block_of("lora_unet_double_blocks_0_img_attn_qkv") == "double"
    assert block_of("transformer.single_transformer_blocks.0.attn.to_q") == "other"


def test_dropped_modules_are_not_decomposed_and_leave_every_setting(blocky_lora):
    a = analyze(blocky_lora, sweep={"fixed": (2,)}, block_rules=("lora_te_*=drop",))
    assert len(a.dropped) == 2 and all(n.startswith("lora_te_") for n in a.dropped)
    assert all(not L.name.startswith("lora_te_") for L in a.layers)
    assert a.rule_hits == {"lora_te_*=drop": 2}


def test_cli_analyze_text_and_json(tmp_path, blocky_lora, capsys):
    assert main(["analyze", str(blocky_lora), "--method", "sv_fro", "--param", "0.9", "-q"]) == 0
    text = capsys.readouterr().out
    assert "sv_ratio 2" in text and "target_size" in text and "rank 256" in text
    chosen = [line for line in text.splitlines() if line.startswith("* ")]
    assert chosen and "sv_fro 0.9" in chosen[0]
    assert "lora-resize resize" in text and "--method sv_fro --param 0.9" in text
    assert main(["analyze", str(blocky_lora), "--json", "-q", "--method", "fixed", "--rank", "4"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["chosen"]["args"].startswith("--rank 4")
    rows = d["settings"]
    assert len(rows) > 30 and all({"output_bytes", "params", "fro_weighted", "fro_min", "worst_layer", "args"}
                                  <= set(r) for r in rows)
    assert len(d["layers"]) == len(BLOCKY)
    assert d["chosen_ranks"] and max(d["chosen_ranks"].values()) <= 4


def test_cli_analyze_rows_show_whole_labels(blocky_lora, capsys):
    """Labels that differ only at their end (rank constraints, --uniform-rank) are shown whole: every row's label
    is on its line, and the rows stay a table (the columns after the label line up)."""
    assert main(["analyze", str(blocky_lora), "--allowed-ranks", "2,4", "--uniform-rank", "-q", "--json"]) == 0
    labels = [r["label"] for r in json.loads(capsys.readouterr().out)["settings"]]
    assert max(map(len, labels)) > 30
    assert main(["analyze", str(blocky_lora), "--allowed-ranks", "2,4", "--uniform-rank", "-q"]) == 0
    text = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(text) if line.lstrip().startswith("setting"))
    rows = text[head + 1: head + 1 + len(labels)]
    width = max(map(len, labels))  # one column for the label: each whole, padded to the longest
    assert [row[2:2 + width].rstrip() for row in rows] == labels and all(row[2 + width] == " " for row in rows)
    assert len(set(labels)) == len(labels)


def test_cli_analyze_refuses_an_output(blocky_lora, capsys):
    assert main(["analyze", str(blocky_lora), "-o", "x.safetensors"]) == 2
    assert "analyze writes no LoRA" in capsys.readouterr().err


def test_analyze_time_is_mostly_the_decomposition(blocky_lora):
    a = analyze(blocky_lora)
    assert a.seconds < 20 and len(a.rows) > 40
    assert np.isfinite([r.output_bytes for r in a.rows]).all()


@pytest.mark.parametrize("fields", [dict(method="fixed", rank=3), dict(method="sv_ratio", param=4, rank_rule="kohya", rank=8),
                                    dict(target_fro=0.95, precision="fp16"), dict(target_size=14_000, rank_rule="kohya"),
                                    dict(target_size=17_000)],
                         ids=["fixed", "kohya", "fro", "size-kohya", "size"])
def test_zero_oversize_and_alpha_free_layers_agree_too(tmp_path, standard_lora, fields):
    a = analyze(standard_lora, sweep={}, **fields)
    dst = tmp_path / "out.safetensors"
    res = lora_resize.resize(standard_lora, dst, **fields)
    assert a.chosen.output_bytes == dst.stat().st_size
    assert [int(k) for k in a.chosen.ranks] == [r.new_rank for r in res.layers]
    if "target_size" in fields:
        assert dst.stat().st_size <= fields["target_size"]


def test_other_key_families_agree_too(tmp_path):
    """A PEFT adapter (lora_A/lora_B, no alpha tensors, scale from adapter_config.json): sizes come from the
    family's own emit, so they are exact for every key family."""
    g = torch.Generator().manual_seed(5)
    sd = {}
    for i in range(2):
        for proj, (o, n) in {"q_proj": (24, 24), "v_proj": (8, 24), "o_proj": (24, 24)}.items():
            p = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            sd[p + ".lora_A.weight"] = torch.randn(8, n, generator=g)
            sd[p + ".lora_B.weight"] = torch.randn(o, 8, generator=g) / (1 + i)
    folder = tmp_path / "adapter"
    folder.mkdir()
    write_lora(folder / "adapter_model.safetensors", sd)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "o_proj"]}))
    for n, fields in enumerate([dict(method="fixed", rank=3), dict(method="sv_fro", param=0.8), dict(target_size=6000)]):
        a = analyze(folder, sweep={}, **fields)
        dst = tmp_path / f"out{n}" / "adapter_model.safetensors"
        dst.parent.mkdir()
        res = lora_resize.resize(folder, dst, **fields)
        assert res.format == a.format != "kohya"
        assert a.chosen.output_bytes == dst.stat().st_size, fields
        assert [int(k) for k in a.chosen.ranks] == [r.new_rank for r in res.layers]
        assert dst.stat().st_size <= fields.get("target_size", float("inf"))


def test_evaluate_any_other_setting_from_the_same_spectra(tmp_path, blocky_lora):
    a = analyze(blocky_lora, sweep={})
    row = a.evaluate(lora_resize.ResizeOptions(method="sv_ratio", param=3, precision=a.precision))
    dst = tmp_path / "o.safetensors"
    lora_resize.resize(blocky_lora, dst, row.options)
    assert row.output_bytes == dst.stat().st_size and row.label == f"sv_ratio 3, {a.precision}"
