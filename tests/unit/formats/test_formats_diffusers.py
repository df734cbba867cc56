"""The diffusers key family (and ai-toolkit's files, which use it) and ControlLoRA through the CLI: every key
form kept, scale 1 without alpha, `.alpha` keys honoured, `lora_adapter_metadata` read and rewritten for the new
ranks (prefixed per component, or unprefixed), and the errors for modules that half-match."""
from __future__ import annotations

import json

import pytest
import torch

from lora_resize.testing import archs, loras
from lora_resize.testing.archs import ModuleShape
from lora_resize.cli import main
from lora_resize.errors import LoraStructureError
from lora_resize import resize

from helpers import best_rank_k, load_st, rel_err, write_lora


def pair(sd, name, down_suffix, up_suffix):
    up, down = sd[name + up_suffix], sd[name + down_suffix]
    return up.reshape(up.shape[0], -1).double(), down.reshape(down.shape[0], -1).double()


def product(sd, name, down_suffix, up_suffix, scale=1.0):
    up, down = pair(sd, name, down_suffix, up_suffix)
    return up @ down * scale


def resize_ok(src, dst, *args, capsys=None) -> str:
    assert main(["resize", str(src), "-o", str(dst), "-q", *args]) == 0
    return capsys.readouterr().out if capsys else ""


AI_TOOLKIT = [ModuleShape(f"transformer.single_transformer_blocks.{i}.{n}", o, k)
              for i in range(2) for n, o, k in (("attn.to_q", 16, 16), ("attn.to_k", 16, 16), ("proj_mlp", 64, 16),
                                                 ("proj_out", 16, 80), ("norm.linear", 48, 16))]


def test_ai_toolkit_flux_file_keeps_keys_and_scale_one(tmp_path, capsys):
    sd = loras.lora_state_dict(AI_TOOLKIT, "diffusers", rank=8, seed=1, dtype=torch.bfloat16)
    src = write_lora(tmp_path / "flux_aitk.safetensors", sd, {"format": "pt", "software": "ai-toolkit"})
    text = resize_ok(src, tmp_path / "o.safetensors", "--method", "sv_fro", "--param", "0.9", capsys=capsys)
    assert "(diffusers)" in text
    out, meta = load_st(tmp_path / "o.safetensors")
    assert set(out) == set(sd)  # no alpha keys added, none lost
    assert meta["software"] == "ai-toolkit"
    for m in AI_TOOLKIT:
        k = out[m.name + ".lora_A.weight"].shape[0]
        assert out[m.name + ".lora_A.weight"].dtype == torch.bfloat16
        got = product(out, m.name, ".lora_A.weight", ".lora_B.weight")
        want = best_rank_k(product(sd, m.name, ".lora_A.weight", ".lora_B.weight"), k)
        assert rel_err(got, want) < 1.5e-2, m.name  # bf16 factors


def test_alpha_keys_give_the_scale_and_are_rewritten(tmp_path):
    sd = loras.lora_state_dict(AI_TOOLKIT[:4], "diffusers", rank=8, alpha=4.0, seed=2)
    src = write_lora(tmp_path / "a.safetensors", sd)
    resize_ok(src, tmp_path / "o.safetensors", "--rank", "3")
    out, _ = load_st(tmp_path / "o.safetensors")
    assert set(out) == set(sd)
    for m in AI_TOOLKIT[:4]:
        assert float(out[m.name + ".alpha"]) == pytest.approx(4.0 / 8 * 3)
        got = product(out, m.name, ".lora_A.weight", ".lora_B.weight", float(out[m.name + ".alpha"]) / 3)
        want = best_rank_k(product(sd, m.name, ".lora_A.weight", ".lora_B.weight", 0.5), 3)
        assert rel_err(got, want) < 1e-6


OLD_FORMS = {  # diffusers' older key forms, each with a conv and a linear layer
    "unet.down_blocks.0.resnets.0.conv1": (".lora.down.weight", ".lora.up.weight", (8, 4, 3)),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q": (
        "_lora.down.weight", "_lora.up.weight", (8, 8, None)),
    "text_encoder.text_model.encoder.layers.0.mlp.fc1": (
        ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight", (32, 16, None)),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (".lora.down.weight", ".lora.up.weight",
                                                                  (16, 16, None)),
}


def test_older_diffusers_key_forms_resize_exactly(tmp_path, capsys):
    g = torch.Generator().manual_seed(3)
    sd = {}
    for name, (ds, us, (o, i, kern)) in OLD_FORMS.items():
        if kern:
            sd[name + ds] = torch.randn(6, i, kern, kern, generator=g)
            sd[name + us] = torch.randn(o, 6, 1, 1, generator=g)
        else:
            sd[name + ds] = torch.randn(6, i, generator=g)
            sd[name + us] = torch.randn(o, 6, generator=g)
    src = write_lora(tmp_path / "old.safetensors", sd)
    text = resize_ok(src, tmp_path / "o.safetensors", "--rank", "4", capsys=capsys)
    assert "4 layers (diffusers)" in text
    out, _ = load_st(tmp_path / "o.safetensors")
    assert set(out) == set(sd)
    for name, (ds, us, (o, i, kern)) in OLD_FORMS.items():
        assert out[name + ds].shape[0] == 4 and out[name + ds].ndim == (4 if kern else 2)
        assert rel_err(product(out, name, ds, us), best_rank_k(product(sd, name, ds, us), 4)) < 1e-6


def sd3_like(n: int = 2):
    return archs.sd3(width=16, blocks=n)


def test_prefixed_metadata_is_read_and_rewritten(tmp_path):
    shapes = sd3_like()
    sd = loras.lora_state_dict(shapes, "diffusers", rank=8, seed=4)
    te = [ModuleShape("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 16, 16)]
    sd.update(loras.lora_state_dict(te, "diffusers", rank=8, seed=5))
    cfg = {"transformer.r": 8, "transformer.lora_alpha": 16, "transformer.use_rslora": False,
           "transformer.alpha_pattern": {"^transformer_blocks.0.attn.to_q": 4}, "transformer.rank_pattern": {},
           "transformer.target_modules": ["to_q", "to_k"], "text_encoder.r": 8, "text_encoder.lora_alpha": 8}
    src = write_lora(tmp_path / "in.safetensors", sd, {"lora_adapter_metadata": json.dumps(cfg), "format": "pt"})
    resize_ok(src, tmp_path / "o.safetensors", "--method", "sv_fro", "--param", "0.8")
    out, meta = load_st(tmp_path / "o.safetensors")
    new = json.loads(meta["lora_adapter_metadata"])
    # the config's own entries kept, and every module written that they do not name added by its full path
    paths = [m.name[len("transformer."):] for m in shapes]
    assert new["transformer.target_modules"] == ["to_q", "to_k"] + sorted(
        p for p in paths if not p.endswith((".to_q", ".to_k"))) and meta["format"] == "pt"
    rp, ap = new["transformer.rank_pattern"], new["transformer.alpha_pattern"]
    ranks = set()
    for m in shapes:
        path = m.name[len("transformer."):]
        k = out[m.name + ".lora_A.weight"].shape[0]
        ranks.add(k)
        assert rp.get(path, new["transformer.r"]) == k
        old_scale = (4 if path == "transformer_blocks.0.attn.to_q" else 16) / 8
        scale = ap.get(path, new["transformer.lora_alpha"]) / k
        assert scale == old_scale, path
        got = product(out, m.name, ".lora_A.weight", ".lora_B.weight", scale)
        want = best_rank_k(product(sd, m.name, ".lora_A.weight", ".lora_B.weight", old_scale), k)
        assert rel_err(got, want) < 1e-6
    assert len(ranks) > 1
    k_te = out[te[0].name + ".lora_A.weight"].shape[0]
    assert new["text_encoder.r"] == k_te and new["text_encoder.lora_alpha"] == k_te  # scale 1 kept


def test_unprefixed_metadata_of_a_single_model_is_rewritten(tmp_path):
    shapes = [ModuleShape(m.name[len("transformer."):], m.out, m.inp) for m in sd3_like(1)]
    sd = loras.lora_state_dict(shapes, "diffusers", rank=6, seed=6)
    cfg = {"r": 6, "lora_alpha": 3, "use_rslora": True, "target_modules": ["to_q"]}
    src = write_lora(tmp_path / "in.safetensors", sd, {"lora_adapter_metadata": json.dumps(cfg)})
    resize_ok(src, tmp_path / "o.safetensors", "--rank", "2")
    out, meta = load_st(tmp_path / "o.safetensors")
    new = json.loads(meta["lora_adapter_metadata"])
    assert new["r"] == 2 and new["rank_pattern"] == {} and new["use_rslora"] is True
    assert new["lora_alpha"] / 2 ** 0.5 == pytest.approx(3 / 6 ** 0.5, rel=1e-12)


def test_controllora_down_up_resize_and_the_controlnet_weights_pass_through(tmp_path, capsys):
    g = torch.Generator().manual_seed(7)
    sd = {"lora_controlnet": torch.tensor([]),
          "input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g),
          "input_blocks.1.0.in_layers.2.down": torch.randn(6, 8, 3, 3, generator=g),
          "input_blocks.1.0.in_layers.2.up": torch.randn(8, 6, 1, 1, generator=g),
          "input_blocks.1.0.in_layers.2.bias": torch.randn(8, generator=g),
          "input_blocks.4.1.transformer_blocks.0.attn2.to_k.down": torch.randn(6, 20, generator=g),
          "input_blocks.4.1.transformer_blocks.0.attn2.to_k.up": torch.randn(16, 6, generator=g)}
    src = write_lora(tmp_path / "control.safetensors", sd)
    text = resize_ok(src, tmp_path / "o.safetensors", "--rank", "3", capsys=capsys)
    assert "2 layers (controllora)" in text and "3 other tensor(s) copied unchanged" in text
    out, _ = load_st(tmp_path / "o.safetensors")
    assert set(out) == set(sd)
    for k in ("lora_controlnet", "input_blocks.0.0.weight", "input_blocks.1.0.in_layers.2.bias"):
        assert torch.equal(out[k], sd[k])
    for name in ("input_blocks.1.0.in_layers.2", "input_blocks.4.1.transformer_blocks.0.attn2.to_k"):
        assert out[name + ".down"].shape[0] == 3
        assert rel_err(product(out, name, ".down", ".up"), best_rank_k(product(sd, name, ".down", ".up"), 3)) < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("drop, named", [
    ("transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight",
     "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight has no partner"),
    ("transformer.single_transformer_blocks.1.proj_mlp.lora_A.weight",
     "transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight has no partner"),
])
def test_half_a_module_is_named(tmp_path, capsys, drop, named):
    sd = loras.lora_state_dict(AI_TOOLKIT, "diffusers", rank=4, seed=8)
    del sd[drop]
    src = write_lora(tmp_path / "in.safetensors", sd)
    assert main(["resize", str(src), "-o", str(tmp_path / "o.safetensors"), "--rank", "2"]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_stray_alpha_and_unknown_lora_keys_are_named(tmp_path):
    sd = loras.lora_state_dict(AI_TOOLKIT[:2], "diffusers", rank=4, seed=9)
    sd["transformer.nowhere.alpha"] = torch.tensor(4.0)
    src = write_lora(tmp_path / "in.safetensors", sd)
    with pytest.raises(LoraStructureError, match="transformer.nowhere.alpha looks like part of a LoRA layer"):
        resize(src, tmp_path / "o.safetensors", rank=2)
    sd.pop("transformer.nowhere.alpha")
    sd["transformer.x.lora_A.default.weight"] = torch.zeros(2, 4)
    src = write_lora(tmp_path / "in.safetensors", sd)
    with pytest.raises(LoraStructureError, match="lora_A.default.weight has no partner"):
        resize(src, tmp_path / "o.safetensors", rank=2)


def test_bad_metadata_is_named(tmp_path):
    sd = loras.lora_state_dict(AI_TOOLKIT[:2], "diffusers", rank=4, seed=10)
    src = write_lora(tmp_path / "in.safetensors", sd, {"lora_adapter_metadata": "{not json"})
    with pytest.raises(LoraStructureError, match="lora_adapter_metadata is not valid JSON"):
        resize(src, tmp_path / "o.safetensors", rank=2)
    cfg = {"transformer.r": 8, "transformer.lora_alpha": 8}  # says rank 8, the tensors have 4
    src = write_lora(tmp_path / "in.safetensors", sd, {"lora_adapter_metadata": json.dumps(cfg)})
    with pytest.raises(LoraStructureError, match="gives it rank 8 but its tensors have rank 4"):
        resize(src, tmp_path / "o.safetensors", rank=2)


def test_keys_of_no_known_family_are_refused(tmp_path):
    src = write_lora(tmp_path / "in.safetensors", {"model.layer.weight": torch.zeros(3, 3),
                                                    "model.layer.bias": torch.zeros(3)})
    with pytest.raises(LoraStructureError, match="no LoRA layers found"):
        resize(src, tmp_path / "o.safetensors", rank=2)
    assert not (tmp_path / "o.safetensors").exists()
