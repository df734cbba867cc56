"""Metadata strings exactly as sd-scripts' resize_lora.py writes them, input metadata kept, and our own record."""
from __future__ import annotations

import json

import pytest
import torch

import lora_resize

from helpers import (ALPHA, BASE_COMMENT, BASE_METADATA, DOWN, Spec, layer_names, load_st,
                      make_state_dict, standard_specs, write_lora, one_alpha)

SD_SCRIPTS_KEYS = ("ss_training_comment", "ss_network_dim", "ss_network_alpha", "sshs_model_hash", "sshs_legacy_hash")


def old_dim(sd) -> int:
    return max(sd[n + DOWN].shape[0] for n in layer_names(sd))


def sd_scripts_alpha_str(sd_in, name: str, k: int) -> str:
    """str(float(scale * new_rank)) with scale = alpha / old_rank computed in float32 (1.0 without alpha)."""
    r = sd_in[name + DOWN].shape[0]
    a = sd_in.get(name + ALPHA)
    scale = a.float() / r if a is not None else torch.tensor(1.0)
    return str(float(scale * k))


@pytest.mark.parametrize("rank,conv_rank", [(4, None), (4, 4), (6, 2), (3, 5)])
def test_fixed_mode_strings(tmp_path, standard_lora, standard_sd, rank, conv_rank):
    dst = tmp_path / "out.safetensors"
    lora_resize.resize(standard_lora, dst, rank=rank, conv_rank=conv_rank, precision="float")
    tensors, meta = load_st(dst)
    conv = conv_rank if conv_rank is not None else rank
    conv_desc = "" if conv == rank else f" (conv: {conv})"
    assert meta["ss_training_comment"] == (
        f"dimension is resized from {old_dim(standard_sd)} to {rank}{conv_desc}; {BASE_COMMENT}")
    assert meta["ss_network_dim"] == str(rank)
    assert meta["ss_network_alpha"] == str(one_alpha(standard_sd, rank))  # the one alpha every layer carries
    # with sd-scripts' rank rule, its per-layer alphas: the one the written linear layers share, else 'Dynamic'
    lora_resize.resize(standard_lora, dst, rank=rank, conv_rank=conv_rank, precision="float", rank_rule="kohya")
    tensors, meta = load_st(dst)
    alphas = {float(tensors[n + ALPHA]) for n in layer_names(tensors)
              if tensors[n + DOWN].dim() == 2 and bool(tensors[n + DOWN].any()) and bool(tensors[n + ".lora_up.weight"].any())}
    assert meta["ss_network_alpha"] == (str(alphas.pop()) if len(alphas) == 1 else "Dynamic")


@pytest.mark.parametrize("method,param", [("sv_fro", 0.9), ("sv_ratio", 8), ("sv_cumulative", 0.5)])
@pytest.mark.parametrize("rule", ["exact", "kohya"])
def test_dynamic_mode_strings(tmp_path, standard_lora, standard_sd, method, param, rule):
    dst = tmp_path / "out.safetensors"
    lora_resize.resize(standard_lora, dst, rank=16, method=method, param=param, rank_rule=rule)
    _, meta = load_st(dst)
    assert meta["ss_training_comment"] == (
        f"Dynamic resize with {method}: {float(param)} from {old_dim(standard_sd)}; {BASE_COMMENT}")
    assert meta["ss_network_dim"] == "Dynamic"
    assert meta["ss_network_alpha"] == "Dynamic"


def test_other_input_metadata_is_kept(tmp_path, standard_lora):
    dst = tmp_path / "out.safetensors"
    lora_resize.resize(standard_lora, dst, rank=4)
    _, meta = load_st(dst)
    for k, v in BASE_METADATA.items():
        if k not in SD_SCRIPTS_KEYS:
            assert meta[k] == v, k


def test_no_input_metadata(tmp_path, standard_sd):
    src = write_lora(tmp_path / "in.safetensors", standard_sd, None)
    dst = tmp_path / "out.safetensors"
    lora_resize.resize(src, dst, rank=4, conv_rank=2)
    _, meta = load_st(dst)
    assert meta["ss_training_comment"] == f"dimension is resized from {old_dim(standard_sd)} to 4 (conv: 2); "
    assert meta["ss_network_dim"] == "4"
    assert set(k for k in meta if k.startswith("ss_")) == {"ss_training_comment", "ss_network_dim",
                                                           "ss_network_alpha"}


def test_network_alpha_of_fp16_input(tmp_path):
    # alpha 3 on rank 7 (a repeating binary fraction): the string is the alpha as stored, after sd-scripts'
    # float32 arithmetic and the fp16 rounding of the file
    specs = [Spec("lora_te_a", 30, 20, 7, alpha=3.0), Spec("lora_unet_b", 30, 20, 7, alpha=3.0)]
    sd = make_state_dict(specs, seed=3, dtype=torch.float16)
    src = write_lora(tmp_path / "in.safetensors", sd, {"ss_training_comment": "c"})
    dst = tmp_path / "out.safetensors"
    lora_resize.resize(src, dst, rank=2)
    _, meta = load_st(dst)
    assert meta["ss_network_alpha"] == str(float(torch.tensor(float(sd_scripts_alpha_str(sd, "lora_unet_b", 2))).half()))
    assert meta["ss_network_alpha"] == str(float((torch.tensor(3.0) / 7 * 2).half()))
    assert meta["ss_network_alpha"] == str(float(load_st(dst)[0]["lora_unet_b" + ALPHA]))


def test_network_alpha_of_layers_written_with_different_alphas_is_dynamic(tmp_path):
    # sd-scripts records the last layer's alpha ("x-y" sorts after "x" as a layer name but before it as a key);
    # with sd-scripts' rank rule these layers are written with alphas 0.75 and 1.25: no one alpha describes them
    specs = [Spec("lora_te_x", 30, 20, 8, alpha=3.0), Spec("lora_te_x-y", 30, 20, 8, alpha=5.0)]
    sd = make_state_dict(specs, seed=4)
    src = write_lora(tmp_path / "in.safetensors", sd, {"ss_training_comment": "c"})
    dst = tmp_path / "out.safetensors"
    lora_resize.resize(src, dst, rank=2, rank_rule="kohya")
    tensors, meta = load_st(dst)
    assert {float(tensors[n + ALPHA]) for n in ("lora_te_x", "lora_te_x-y")} == {0.75, 1.25}
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("2", "Dynamic")


def test_old_dim_is_largest_old_rank(tmp_path):
    specs = [Spec("lora_te_a", 40, 30, 4, alpha=1.0), Spec("lora_te_b", 40, 30, 24, alpha=1.0),
             Spec("lora_te_c", 40, 30, 12, alpha=1.0)]
    sd = make_state_dict(specs, seed=8)
    src = write_lora(tmp_path / "in.safetensors", sd, {"ss_training_comment": "hi"})
    dst = tmp_path / "out.safetensors"
    lora_resize.resize(src, dst, rank=3)
    _, meta = load_st(dst)
    assert meta["ss_training_comment"] == "dimension is resized from 24 to 3; hi"


@pytest.mark.parametrize("options", [dict(rank=4, conv_rank=2),
                                     dict(rank=8, method="sv_fro", param=0.75, rank_rule="kohya"),
                                     dict(rank=None, method="sv_ratio", param=3.0)])
def test_our_record(tmp_path, standard_lora, standard_sd, options):
    dst = tmp_path / "out.safetensors"
    res = lora_resize.resize(standard_lora, dst, **options)
    tensors, meta = load_st(dst)
    rec = json.loads(meta["lora_resize"])
    assert rec["version"] == lora_resize.__version__
    assert rec["method"] == (options.get("method") or "fixed")
    assert rec["param"] == options.get("param")
    assert rec["rank_rule"] == options.get("rank_rule", "exact")
    want_layers = {n: [standard_sd[n + DOWN].shape[0], tensors[n + DOWN].shape[0]] for n in layer_names(standard_sd)}
    assert rec["layers"] == want_layers
    assert res.metadata["lora_resize"] == meta["lora_resize"]


def test_metadata_values_are_strings(tmp_path, standard_lora):
    dst = tmp_path / "out.safetensors"
    res = lora_resize.resize(standard_lora, dst, rank=4)
    _, meta = load_st(dst)
    assert meta == res.metadata
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())


def test_standard_specs_have_distinct_old_ranks():
    # premise of the old_dim checks above: the largest rank is unique enough to matter
    ranks = sorted({s.rank for s in standard_specs()})
    assert len(ranks) > 2
