"""The metadata describes the file written: sd-scripts' ss_network_dim / ss_network_alpha / the comment and
ss_network_args' conv_dim / conv_alpha follow the ranks and alphas of the layers as written (one rank per group:
that rank; several: 'Dynamic'), whatever the rank asked for; an alpha the save dtype cannot hold is never written
(a rank far above every layer's size gives a finite alpha and the same update) or is refused with the right
reason; the size warning comes only for an output strictly larger than its input, in units that show the
difference."""
from __future__ import annotations

import json

import pytest
import torch

import lora_resize
from lora_resize.errors import NumericalError
from lora_resize.ops.job import growth_notes

from helpers import (BASE_METADATA, DOWN, Spec, dense_dw, layer_names, load_st, make_state_dict, rel_err,
                     standard_specs, write_lora)

LINEAR = [Spec("lora_te_text_model_encoder_layers_0_mlp_fc1", 40, 32, 8, alpha=4.0),
          Spec("lora_te_text_model_encoder_layers_0_mlp_fc2", 32, 40, 8, alpha=4.0),
          Spec("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k", 24, 20, 8, alpha=4.0)]
LOCON = LINEAR + [Spec("lora_unet_down_blocks_0_resnets_0_conv1", 16, 8, 4, kernel=3, alpha=2.0),
                  Spec("lora_unet_down_blocks_0_resnets_0_conv2", 16, 16, 4, kernel=3, alpha=2.0)]
ARGS = {"conv_dim": "4", "conv_alpha": "2.0", "algo": "locon"}


def written(path):
    sd, meta = load_st(path)
    groups: dict[bool, set[int]] = {False: set(), True: set()}
    for name in layer_names(sd):
        groups[sd[name + DOWN].dim() == 4].add(sd[name + DOWN].shape[0])
    return sd, meta, groups


@pytest.mark.parametrize("rank", [100_000, 1_000_000, 8, 5])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_rank_above_every_layer_writes_a_finite_alpha_and_says_the_ranks_written(tmp_path, rank, precision):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    sd = make_state_dict(LOCON, seed=2, dtype=dtype)
    src = write_lora(tmp_path / "in.safetensors", sd, {**BASE_METADATA, "ss_network_args": json.dumps(ARGS)})
    res = lora_resize.resize(src, tmp_path / "out.safetensors", rank=rank, conv_rank=min(rank, 4))
    out, meta, groups = written(res.dst)
    assert all(torch.isfinite(v).all() for v in out.values())
    for name in layer_names(sd):
        k = out[name + DOWN].shape[0]
        if k == sd[name + DOWN].shape[0]:  # kept whole: the same update, to the save dtype's rounding
            assert rel_err(dense_dw(out, name), dense_dw(sd, name)) < 2e-2, name
    (lin,), (conv,) = groups[False], groups[True]
    assert meta["ss_network_dim"] == str(lin)
    assert meta["ss_training_comment"].startswith(f"dimension is resized from 8 to {lin}"
                                                  + (f" (conv: {conv})" if conv != lin else "") + ";")
    assert float(meta["ss_network_alpha"]) == pytest.approx(float(out[layer_names(out)[-1] + ".alpha"]), rel=1e-2)
    args = json.loads(meta["ss_network_args"])
    assert args["conv_dim"] == str(conv) and args["algo"] == "locon"
    assert float(args["conv_alpha"]) == pytest.approx(float(out["lora_unet_down_blocks_0_resnets_0_conv2.alpha"]),
                                                      rel=1e-2)


def test_ranks_that_came_out_different_are_dynamic(tmp_path):
    """--rank 6 on layers of which some are smaller (6 outputs, a zero layer aside): the ranks written differ."""
    sd = make_state_dict(LINEAR + [Spec("lora_te_small", 4, 20, 8, alpha=4.0)], seed=3)
    src = write_lora(tmp_path / "in.safetensors", sd, dict(BASE_METADATA))
    res = lora_resize.resize(src, tmp_path / "out.safetensors", rank=6)
    _, meta, groups = written(res.dst)
    assert groups[False] == {4, 6}
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "Dynamic"
    # a zero layer (written at rank 1) is no rank of the file's
    specs = [s for s in standard_specs() if s.kernel is None and s.out > 6]
    assert any(s.zero for s in specs)
    src = write_lora(tmp_path / "z.safetensors", make_state_dict(specs, seed=4), dict(BASE_METADATA))
    res = lora_resize.resize(src, tmp_path / "z_out.safetensors", rank=6)
    assert res.metadata["ss_network_dim"] == "6"


def test_an_alpha_that_overflows_is_refused_for_what_it_is(tmp_path):
    sd = make_state_dict(LINEAR, seed=2)
    src = write_lora(tmp_path / "in.safetensors", sd, dict(BASE_METADATA))
    with pytest.raises(NumericalError) as e:
        lora_resize.resize(src, tmp_path / "out.safetensors", rank=10 ** 40)
    assert "damaged" not in str(e.value) and "--rank" in str(e.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_the_size_warning_only_for_a_strictly_larger_output_and_in_units_that_differ():
    assert growth_notes(121_100_000, 121_100_000, []) == []
    assert growth_notes(121_100_000, 121_000_000, []) == []
    (note,) = growth_notes(121_100_000, 121_100_345, [])
    assert "121,100,345 bytes" in note and "121,100,000 bytes" in note
    (note,) = growth_notes(100_000_000, 121_100_000, [])
    assert "121.1 MB" in note and "100.0 MB" in note
