"""analyze's precision rows (the blog's third table): the shown setting at fp16, bf16 and float from the same
decomposition - each size the size of the file resize writes at that precision, and each rounding error the one
that file really has, against a dense float64 truncation, over the layers it was measured on."""
from __future__ import annotations

import json
import math

import pytest
import torch

import lora_resize
from lora_resize.cli import main
from lora_resize.ops.analyze import PRECISION_ROWS, ROUNDING_SAMPLE, analyze

from helpers import best_rank_k, dense_dw, load_st


@pytest.mark.parametrize("fields", [dict(rank=12), dict(target_size="20KB", rank=12),
                                    dict(method="sv_ratio", param=4, rank_rule="kohya")],
                         ids=["recommended", "budget", "kohya"])
def test_each_precision_row_is_the_file_resize_writes(tmp_path, blocky_lora, fields):
    a = analyze(blocky_lora, **fields)
    rows, note = a.at_precisions()
    assert [r.precision for r in rows] == list(PRECISION_ROWS)
    assert f"on the {ROUNDING_SAMPLE} layers with the largest updates" in note
    src = load_st(blocky_lora)[0]
    names = [sp.name for sp in a.layers]
    heavy = sorted(range(len(names)), key=lambda i: -a.layers[i].energy)[:ROUNDING_SAMPLE]
    for r in rows:
        dst = tmp_path / f"{r.precision}.safetensors"
        res = lora_resize.resize(blocky_lora, dst, r.options)
        assert dst.stat().st_size == r.output_bytes, r.precision
        assert [x.new_rank for x in res.layers] == [int(k) for k in r.ranks]
        out = load_st(dst)[0]
        assert out[names[heavy[0]] + ".lora_up.weight"].dtype == {"fp16": torch.float16, "bf16": torch.bfloat16,
                                                                  "float": torch.float32}[r.precision]
        lost = total = 0.0
        for i in heavy:
            dw = dense_dw(src, names[i])
            exact = best_rank_k(dw, int(r.ranks[i]))
            lost += float(torch.linalg.norm(dense_dw(out, names[i]) - exact)) ** 2
            total += float(torch.linalg.norm(dw)) ** 2
        assert r.rounding_error == pytest.approx(math.sqrt(lost / total), rel=1e-3, abs=1e-7), r.precision
    fp16, bf16, fl = (r.rounding_error for r in rows)
    assert fl < 1e-6 < fp16 < bf16  # float: the truncation alone; bf16 rounds 8x coarser than fp16
    assert rows[0].output_bytes < rows[2].output_bytes or "target_size" in fields


def test_cli_text_and_json_show_the_precisions(blocky_lora, capsys):
    assert main(["analyze", str(blocky_lora), "--rank", "12", "-q"]) == 0
    text = capsys.readouterr().out
    a = analyze(blocky_lora, rank=12)
    rows, note = a.at_precisions()
    assert f"{a.recommended.label} at each precision" in text and note in text
    for r in rows:
        line = next(x for x in text.splitlines() if x.startswith(f"  {r.precision} "))
        assert f"{r.output_bytes:,}" in line and f"{r.rounding_error:.2e}" in line
    assert main(["analyze", str(blocky_lora), "--rank", "12", "-q", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["precisions"]
    assert d["setting"] == a.recommended.label and d["note"] == note
    assert [(x["precision"], x["output_bytes"], x["args"]) for x in d["rows"]] == [
        (r.precision, r.output_bytes, r.args) for r in rows]
