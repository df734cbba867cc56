"""The metadata describes the file written: sd-scripts' ss_network_dim / ss_network_alpha / the comment and
ss_network_args' conv_dim / conv_alpha follow the ranks and alphas of the layers as written (one rank per group:
that rank; several: 'Dynamic'), whatever the rank asked for; an alpha the save dtype cannot hold is never written
(a rank far above every layer's size gives a finite alpha and the same update) or is refused with the right
reason; the size warning comes only for an output strictly larger than its input, in units that show the
difference."""
from __future__ import annotations

import json
import re

import pytest
import torch

import lora_resize
from lora_resize.errors import NumericalError
from lora_resize.ops.job import growth_notes
from lora_resize.testing import archs, loras

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


@pytest.mark.parametrize("constraint", [dict(rank_multiple=16), dict(allowed_ranks="2,5,16"),
                                        dict(rank_multiple=16, uniform_rank=True), {}],
                         ids=["multiple", "allowed", "uniform", "none"])
def test_the_size_warning_advises_settings_the_constraint_accepts(tmp_path, constraint):
    """Every setting the growth warning advises runs under the same rank constraint, and a --target-size it
    advises is met: the input's size when a file that small is possible, else the smallest file possible."""
    sd = loras.lora_state_dict(archs.sd15(ch=(32, 64, 64, 64), ctx=32, te=(32, 2, 64)), "kohya", rank=8, alpha=4.0,
                               seed=1)
    src = write_lora(tmp_path / "in.safetensors", sd, dict(BASE_METADATA))
    setting = dict(method="sv_fro", param=0.99) if constraint else dict(rank=12)  # (kohya: 12 > the input's 8)
    grown = lora_resize.resize(src, tmp_path / "o.safetensors", **setting, rank_rule="kohya", **constraint)
    (note,) = [n for n in grown.notes if "larger than the input" in n]
    advised = re.findall(r"--(rank|target-size) (\d+)", note)
    assert advised, note
    for flag, value in advised:
        field = flag.replace("-", "_")
        res = lora_resize.resize(src, tmp_path / f"{field}.safetensors", **{field: int(value)},
                                 rank_rule="kohya", **constraint)
        if field == "target_size":
            assert res.output_bytes <= int(value)
            assert (int(value) == res.input_bytes) == (res.output_bytes <= res.input_bytes), note


# ----------------------------------------------------------------------------------------------------------------
# Each field equals what is read back from the tensors written


def read_back(path) -> dict[str, str]:
    """What the written tensors say, in sd-scripts' fields: per group (linear, conv) its rank and its alpha as
    stored, or 'Dynamic' where the group's layers differ; zero layers (no update, which no alpha changes) aside."""
    sd, _ = load_st(path)
    groups: dict[bool, list[tuple[int, float]]] = {False: [], True: []}
    for name in layer_names(sd):
        down, up = sd[name + DOWN], sd[name + ".lora_up.weight"]
        if not (bool(down.any()) and bool(up.any())):
            continue
        groups[down.dim() == 4].append((down.shape[0], float(sd[name + ".alpha"])))
    out = {}
    for conv, (dim, alpha) in ((False, ("ss_network_dim", "ss_network_alpha")), (True, ("conv_dim", "conv_alpha"))):
        if groups[conv]:
            ranks, alphas = {k for k, _ in groups[conv]}, {a for _, a in groups[conv]}
            out[dim] = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
            out[alpha] = str(alphas.pop()) if len(alphas) == 1 and out[dim] != "Dynamic" else "Dynamic"
    return out


def stated(meta) -> dict[str, str]:
    out = {k: meta[k] for k in ("ss_network_dim", "ss_network_alpha")}
    args = json.loads(meta.get("ss_network_args") or "{}")
    return {**out, **{k: args[k] for k in ("conv_dim", "conv_alpha") if k in args}}


MIXED = [Spec("lora_te_text_model_encoder_layers_0_mlp_fc1", 40, 32, 8, alpha=4.0),
         Spec("lora_te_text_model_encoder_layers_0_mlp_fc2", 32, 40, 8, alpha=8.0),
         Spec("lora_te_text_model_encoder_layers_1_mlp_fc1", 40, 32, 8, alpha=-2.0),
         Spec("lora_te_text_model_encoder_layers_1_mlp_fc2", 32, 40, 8, alpha=4992.0),
         Spec("lora_te_text_model_encoder_layers_2_mlp_fc1", 40, 32, 8, alpha=0.0),  # switched off
         Spec("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k", 24, 20, 12, alpha=7.0),
         Spec("lora_unet_down_blocks_0_resnets_0_conv1", 16, 8, 4, kernel=3, alpha=2.0),
         Spec("lora_unet_down_blocks_0_resnets_0_conv2", 16, 16, 4, kernel=3, alpha=1.0)]


@pytest.mark.parametrize("precision", ["bf16", "fp16", "float"])
@pytest.mark.parametrize("case", [
    dict(rank=6, rank_rule="kohya"), dict(rank=8, rank_rule="kohya", conv_rank=4),  # per-layer alphas: 7/12*8
    dict(rank=6), dict(rank=3, conv_rank=2), dict(rank=6, rank_rule="kohya", block_rules=("*layers_1_*=drop",)),
    dict(rank=10, conv_rank=2)],  # linear ranks 8 and 10, one conv rank: conv_dim is the convs' own
    ids=["kohya6", "kohya8", "exact6", "exact3", "kohya-dropped", "exact-linear-differ"])
def test_dims_and_alphas_stated_are_those_read_back_from_the_tensors(tmp_path, case, precision):
    """sd-scripts' network dim/alpha and the network args' conv dim/alpha say what the written layers hold: one
    rank (alpha) per group where they share it - the alpha as stored, after the save dtype's rounding (7/12*8 is
    4.65625 in bf16, not 4.666666507720947) - else 'Dynamic'."""
    sd = make_state_dict(MIXED, seed=5)
    src = write_lora(tmp_path / "in.safetensors", sd, {**BASE_METADATA, "ss_network_args": json.dumps(ARGS)})
    res = lora_resize.resize(src, tmp_path / "out.safetensors", precision=precision, **case)
    assert stated(res.metadata) == read_back(res.dst)
    assert stated(load_st(res.dst)[1]) == read_back(res.dst)


@pytest.mark.parametrize("case", [dict(rank=4), dict(rank=4, block_rules=("*fc1=2",)), dict(method="sv_fro", param=0.9),
                                  dict(target_size=20_000)])
def test_the_comment_names_every_rule_applied_drops_included(tmp_path, case):
    sd = make_state_dict(LINEAR, seed=6)
    src = write_lora(tmp_path / "in.safetensors", sd, dict(BASE_METADATA))
    rules = (*case.pop("block_rules", ()), "*attn2*=drop")
    res = lora_resize.resize(src, tmp_path / "out.safetensors", block_rules=rules, **case)
    comment = load_st(res.dst)[1]["ss_training_comment"]
    assert all(r in comment for r in rules), comment
    assert not any("attn2" in k for k in load_st(res.dst)[0])


@pytest.mark.parametrize("convs", [False, True], ids=["linear-only", "with-convs"])
def test_a_loha_written_as_lora_states_conv_args_only_for_the_conv_layers_written(tmp_path, convs):
    from helpers import _loha_lokr
    sd = _loha_lokr(torch.Generator().manual_seed(7))
    if not convs:
        sd = {k: v for k, v in sd.items() if "resnets" not in k}
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_dim": "4", "ss_network_alpha": "2",
            "ss_network_args": json.dumps({"algo": "loha", "conv_dim": "4", "conv_alpha": "2", "dropout": "0.1"})}
    src = write_lora(tmp_path / "in.safetensors", sd, meta)
    res = lora_resize.resize(src, tmp_path / "out.safetensors", rank=3, as_lora=True)  # the LoKr too
    out, written_meta, groups = written(res.dst)
    assert bool(groups[True]) == convs
    assert written_meta["ss_network_module"] == "networks.lora"
    args = json.loads(written_meta["ss_network_args"])
    assert args["dropout"] == "0.1" and "algo" not in args
    assert stated(written_meta) == read_back(res.dst)
    assert ("conv_dim" in args) == ("conv_alpha" in args) == convs


@pytest.mark.parametrize("arch", ["sd", "flux1"])
@pytest.mark.parametrize("version", ["sd_v1", "flux1"])
def test_the_network_module_follows_the_architecture_the_keys_read_as(tmp_path, arch, version):
    """A LyCORIS file written as plain pairs gets sd-scripts' LoRA module of the model its keys belong to (the
    model convert reads them as), whatever base model version its metadata names."""
    from lora_resize.formats import read_layout
    from lora_resize.formats.convert import detect_arch, scheme_of
    from lora_resize.io.reader import open_tensor_file
    from lora_resize.testing import archs, loras
    if arch == "sd":
        sd = make_state_dict(LINEAR, seed=8)
    else:
        fn, tiny, _ = archs.NATIVE["flux1"]
        sd = loras.lora_state_dict(fn(**tiny), "musubi", rank=4, alpha=2.0)
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "lora"}),
            "ss_base_model_version": version}
    src = write_lora(tmp_path / "in.safetensors", sd, meta)
    with open_tensor_file(src) as r:  # the architecture convert reads the keys as
        layout = read_layout(r.infos(), r.metadata, src)
        read_as = detect_arch(layout, scheme_of(layout), None, r.infos(), r.metadata)
    assert (read_as.name if read_as else "sd") == arch
    res = lora_resize.resize(src, tmp_path / "out.safetensors", rank=2)
    assert load_st(res.dst)[1]["ss_network_module"] == ("networks.lora_flux" if arch == "flux1" else "networks.lora")
