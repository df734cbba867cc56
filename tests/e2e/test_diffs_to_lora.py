"""`resize --diffs-to-lora`: a module stored as a full diff (`<module>.diff`, as ComfyUI's load_lora reads it)
becomes a low-rank pair under the rank options - the best rank-k factors of the diff (dense float64 SVD) - instead
of being copied; without the flag it is copied bit for bit."""
from __future__ import annotations

import json

import pytest
import torch

from lora_resize import analyze, resize
from lora_resize.cli import main

from helpers import (ALPHA, CONV3_A, DOWN, LIN_A, UP, best_rank_k, dense_dw, file_sha, load_st, make_state_dict,
                     rel_err, standard_specs, write_lora)

LIN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_down_blocks_0_resnets_1_conv1"
BESIDE = "lora_unet_mid_block_attentions_0_proj_in"  # has factors too: its diff stays copied


def _low_rank(shape, rank: int, g: torch.Generator) -> torch.Tensor:
    m, n = shape[0], int(torch.tensor(shape[1:]).prod())
    d = (torch.randn(m, rank, generator=g) * torch.tensor([1.0, 0.4, 0.1])[:rank]) @ torch.randn(rank, n,
                                                                                                   generator=g)
    return (d + 1e-4 * torch.randn(m, n, generator=g)).reshape(shape)


@pytest.fixture
def lora(tmp_path):
    g = torch.Generator().manual_seed(5)
    sd = make_state_dict(standard_specs())
    sd[LIN + ".diff"] = _low_rank((48, 40), 3, g)
    sd[CONV + ".diff"] = _low_rank((16, 8, 3, 3), 3, g)
    sd[LIN + ".diff_b"] = torch.randn(48, generator=g)
    sd.update({BESIDE + DOWN: torch.randn(2, 24, generator=g), BESIDE + UP: torch.randn(24, 2, generator=g),
               BESIDE + ".diff": torch.randn(24, 24, generator=g)})
    return write_lora(tmp_path / "in.safetensors", sd), sd


def written(t, name):
    up, down = t[name + UP].double(), t[name + DOWN].double()
    k = down.shape[0]
    return (up.reshape(up.shape[0], -1) @ down.reshape(k, -1)) * float(t[name + ALPHA]) / k


def test_without_the_flag_diffs_are_copied(lora, tmp_path):
    src, sd = lora
    resize(src, tmp_path / "out.safetensors", rank=2)
    t, _ = load_st(tmp_path / "out.safetensors")
    for k in (LIN + ".diff", CONV + ".diff", BESIDE + ".diff"):
        assert torch.equal(t[k], sd[k])
    assert LIN + DOWN not in t


@pytest.mark.parametrize("rank", [1, 2])
def test_diffs_become_best_rank_k_pairs(lora, tmp_path, rank):
    src, sd = lora
    before = file_sha(src)
    r = resize(src, tmp_path / "out.safetensors", rank=rank, diffs_to_lora=True)
    t, _ = load_st(tmp_path / "out.safetensors")
    for name, shape in ((LIN, (48, 40)), (CONV, (16, 8, 3, 3))):
        assert name + ".diff" not in t
        assert t[name + DOWN].shape == (rank, *shape[1:])
        D = sd[name + ".diff"].double().reshape(shape[0], -1)
        assert rel_err(written(t, name), best_rank_k(D, rank)) < 1e-6
    for name in (LIN_A, CONV3_A):  # the factored layers beside them (same windows) are their own truncations
        assert rel_err(written(t, name), best_rank_k(dense_dw(sd, name), rank)) < 1e-6
    assert torch.equal(t[BESIDE + ".diff"], sd[BESIDE + ".diff"])  # beside factors: copied, said so
    assert torch.equal(t[LIN + ".diff_b"], sd[LIN + ".diff_b"])  # a bias diff stays with its module
    assert any("2 full diff(s)" in n and "--diffs-to-lora" in n for n in r.notes)
    assert any("beside factors" in n for n in r.notes)
    assert any("2 dense layer(s) decomposed exactly" in n for n in r.notes)
    assert json.loads(r.metadata["lora_resize"])["diffs_to_lora"] is True
    assert {x.name for x in r.layers} >= {LIN, CONV}
    assert file_sha(src) == before


def test_budget_and_analysis_agree(lora, tmp_path):
    src, _ = lora
    a = analyze(src, target_size="20KB", diffs_to_lora=True)
    r = resize(src, tmp_path / "out.safetensors", target_size="20KB", diffs_to_lora=True)
    assert r.output_bytes == (tmp_path / "out.safetensors").stat().st_size == a.chosen.output_bytes <= 20_000
    assert LIN in {sp.name for sp in a.layers}


def test_cli_flag_and_label(lora, tmp_path, capsys):
    src, _ = lora
    assert main(["resize", str(src), "-o", str(tmp_path / "o.safetensors"), "--rank", "2", "--diffs-to-lora",
                 "-q"]) == 0
    assert "--diffs-to-lora" in capsys.readouterr().out
    from lora_resize import ResizeOptions
    o = ResizeOptions(rank=2, diffs_to_lora=True)
    assert "--diffs-to-lora" in o.flag_words() and "diffs to LoRA" in o.label()


def test_a_file_of_full_diffs_only(tmp_path):
    """A file holding only full diffs (LyCORIS's `full` algorithm): no LoRA layers without the flag; with it, a
    LoRA of pairs."""
    g = torch.Generator().manual_seed(2)
    sd = {LIN + ".diff": _low_rank((48, 40), 3, g), CONV + ".diff": _low_rank((16, 8, 3, 3), 3, g)}
    src = write_lora(tmp_path / "full.safetensors", sd)
    with pytest.raises(Exception, match="no LoRA layers"):
        resize(src, tmp_path / "a.safetensors", rank=2)
    resize(src, tmp_path / "b.safetensors", rank=2, diffs_to_lora=True)
    t, _ = load_st(tmp_path / "b.safetensors")
    assert sorted(t) == sorted(n + s for n in (LIN, CONV) for s in (DOWN, UP, ALPHA))
    assert rel_err(written(t, LIN), best_rank_k(sd[LIN + ".diff"].double(), 2)) < 1e-6


def test_merge_sums_a_diff_with_the_other_inputs_factors(lora, tmp_path):
    """merge --diffs-to-lora: a module one input stores as a full diff and another as factors is their weighted
    sum, truncated exactly (the best rank-k of w1 * diff + w2 * up @ down * scale)."""
    from lora_resize import merge
    src, sd = lora
    g = torch.Generator().manual_seed(9)
    other = {LIN + DOWN: torch.randn(4, 40, generator=g), LIN + UP: torch.randn(48, 4, generator=g),
             LIN + ALPHA: torch.tensor(2.0)}
    b = write_lora(tmp_path / "b.safetensors", other)
    r = merge([f"{src}:0.5", f"{b}:2"], tmp_path / "m.safetensors", rank=3, diffs_to_lora=True)
    t, _ = load_st(tmp_path / "m.safetensors")
    want = 0.5 * sd[LIN + ".diff"].double() + 2 * (other[LIN + UP].double() @ other[LIN + DOWN].double()) * 2 / 4
    assert rel_err(written(t, LIN), best_rank_k(want, 3)) < 1e-6
    assert LIN + ".diff" not in t and any("--diffs-to-lora" in n for n in r.notes)
