"""The file whose effect is measured is the row's file: `ops.effect.as_planned` pins the ranks the analysis
planned, so a setting that ranked by --base (--target-size with --base, base_fro, --target-error) is measured at
its own ranks without reading the base again - bit for bit the tensors `resize` writes with the row's options."""
from __future__ import annotations

import pytest
import torch

import lora_resize
from lora_resize.ops.analyze import analyze
from lora_resize.ops.effect import as_planned

pytest.importorskip("diffusers")
pytestmark = pytest.mark.thirdparty


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("with_base", [False, True])
def test_the_measured_file_is_the_rows_file(tiny_base, tiny_sd1_lora, with_base):
    base, _ = tiny_base("sd1")
    a = analyze(tiny_sd1_lora, base=str(base) if with_base else None)
    names = [sp.name for sp in a.layers]
    assert len(a.rows) > 5
    for row in a.rows:
        written = lora_resize.resized(tiny_sd1_lora, row.options)
        measured = lora_resize.resized(tiny_sd1_lora, as_planned(row, names))
        assert [x.new_rank for x in written.result.layers] == [int(k) for k in row.ranks], row.label
        assert same(measured.tensors, written.tensors), row.label
