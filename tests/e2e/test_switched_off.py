"""A layer whose alpha is 0 (switched off in training or by hand) applies no update, and every job keeps it so: a
resize under either rank rule, into any output layout (those that store an alpha, and those loaded with a fixed
scale), a merge with such an input, a LyCORIS layer with alpha 0. Judged by the update a loader applies,
alpha / rank * up @ down (scale 1 without alpha), in float64: zero for that layer, and every other layer the
same as in the same job on the file without the switched-off layer."""
from __future__ import annotations

import pytest
import torch

import lora_resize
from lora_resize.testing import archs, loras

from helpers import (ALPHA, BASE_METADATA, CONV1_A, LIN_A, LIN_NOALPHA, Spec, best_rank_k, dense_dw, layer_names,
                     load_st, make_state_dict, rel_err, write_lora)

OFF = CONV1_A


def specs(alpha_off: float) -> list[Spec]:
    return [Spec(LIN_A, out=24, inp=20, rank=8, alpha=4.0), Spec(LIN_NOALPHA, out=16, inp=12, rank=6),
            Spec(OFF, out=16, inp=12, rank=8, kernel=1, alpha=alpha_off)]


def files(tmp_path, alpha_off: float = 0.0):
    """(the file with layer OFF switched off, the same file without that layer)."""
    sd = make_state_dict(specs(alpha_off), seed=3)
    off = write_lora(tmp_path / "off.safetensors", sd, dict(BASE_METADATA))
    rest = write_lora(tmp_path / "rest.safetensors", {k: v for k, v in sd.items() if not k.startswith(OFF)},
                      dict(BASE_METADATA))
    return sd, off, rest


@pytest.mark.parametrize("alpha_off", [0.0, -0.0])
@pytest.mark.parametrize("setting", [dict(rank=4), dict(rank=4, rank_rule="kohya"),
                                     dict(method="sv_fro", param=0.9), dict(method="sv_ratio", param=4,
                                                                          rank_rule="kohya"),
                                     dict(target_fro=0.9), dict(rank=16)])
def test_a_switched_off_layer_stays_off_and_the_others_are_unchanged(tmp_path, setting, alpha_off):
    sd, off, rest = files(tmp_path, alpha_off)
    got = lora_resize.resize(off, tmp_path / "a.safetensors", precision="float", **setting)
    ref = lora_resize.resize(rest, tmp_path / "b.safetensors", precision="float", **setting)
    out, _ = load_st(got.dst)
    other, _ = load_st(ref.dst)
    assert float(dense_dw(out, OFF).abs().max()) == 0.0
    row = next(r for r in got.layers if r.name == OFF)
    assert row.zero and row.new_rank == 1  # nothing to keep: written as a zero layer, as untrained ones are
    for name in layer_names(other):
        assert rel_err(dense_dw(out, name), dense_dw(other, name)) < 1e-6, name
        assert out[name + ".lora_down.weight"].shape == other[name + ".lora_down.weight"].shape


def test_a_switched_off_layer_stays_off_when_written_without_alphas(tmp_path):
    """Into a layout loaded at a fixed scale (diffusers: 1) and back: the factors themselves must be zero."""
    shapes = archs.flux1(width=16, double=1, single=1, in_channels=4, context=12)
    sd = loras.lora_state_dict(shapes, "musubi", rank=4, alpha=2.0)
    off = shapes[0].name
    sd[loras.lora_keys(off, "musubi")[2]] = torch.tensor(0.0)
    src = write_lora(tmp_path / "in.safetensors", sd)
    for target in ("diffusers", "peft"):
        dst = tmp_path / (target if target == "peft" else f"{target}.safetensors")
        mid = lora_resize.convert(src, dst, target, precision="float")
        back = lora_resize.convert(mid.dst, tmp_path / f"back_{target}.safetensors", "kohya", precision="float")
        out, _ = load_st(back.dst)
        for m in shapes:
            dk, uk, ak = loras.lora_keys(m.name, "musubi")
            update = out[uk].reshape(out[uk].shape[0], -1).double() @ out[dk].reshape(out[dk].shape[0], -1).double()
            update *= float(out[ak]) / out[dk].shape[0]
            want = (sd[uk].reshape(sd[uk].shape[0], -1).double() @ sd[dk].reshape(sd[dk].shape[0], -1).double()
                    * float(sd[ak]) / sd[dk].shape[0])
            if m.name == off:
                assert float(update.abs().max()) == 0.0, target
            else:
                assert rel_err(update, want) < 1e-6, (target, m.name)


def test_a_merge_input_switched_off_in_one_layer_adds_nothing_there(tmp_path):
    sd, off, _ = files(tmp_path)
    other = make_state_dict(specs(2.0), seed=5)
    b = write_lora(tmp_path / "b.safetensors", other, dict(BASE_METADATA))
    res = lora_resize.merge([f"{off}:0.7", f"{b}:0.5"], tmp_path / "m.safetensors", rank=8, precision="float")
    out, _ = load_st(res.dst)
    for name in layer_names(sd):
        want = best_rank_k(0.7 * dense_dw(sd, name) + 0.5 * dense_dw(other, name), 8)
        assert rel_err(dense_dw(out, name), want) < 1e-6, name
    alone = lora_resize.merge([f"{off}:1"], tmp_path / "alone.safetensors", rank=8, precision="float")
    out, _ = load_st(alone.dst)
    assert float(dense_dw(out, OFF).abs().max()) == 0.0


@pytest.mark.parametrize("rank_rule", ["exact", "kohya"])
def test_a_lycoris_layer_with_alpha_0_stays_off(tmp_path, rank_rule):
    g = torch.Generator().manual_seed(1)
    n, live = "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1"
    sd = {f"{n}.hada_w1_a": torch.randn(24, 4, generator=g), f"{n}.hada_w1_b": torch.randn(4, 20, generator=g),
          f"{n}.hada_w2_a": torch.randn(24, 4, generator=g), f"{n}.hada_w2_b": torch.randn(4, 20, generator=g),
          f"{n}{ALPHA}": torch.tensor(0.0),
          **make_state_dict([Spec(live, out=24, inp=20, rank=8, alpha=4.0)], seed=2)}
    src = write_lora(tmp_path / "loha.safetensors", sd, dict(BASE_METADATA))
    res = lora_resize.resize(src, tmp_path / "out.safetensors", rank=4, rank_rule=rank_rule, precision="float")
    out, _ = load_st(res.dst)
    assert float(dense_dw(out, n).abs().max()) == 0.0
    assert rel_err(dense_dw(out, live), best_rank_k(dense_dw(sd, live), 4)) < 1e-6
