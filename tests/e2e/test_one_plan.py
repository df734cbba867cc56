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
            dict(method="sv_fro", param=0.9, block_rules=("*mlp_fc2=6",)), dict(method="fixed", rank=7)]


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


def flux_files(folder) -> dict[str, object]:
    """A kohya Flux LoRA with fused modules (qkv, linear1) of mixed alphas, and an ai-toolkit one (diffusers keys,
    split q/k/v, no alpha): a conversion splits the one's modules and fuses the other's."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(5)
    H, bf = 32, torch.bfloat16

    def pair(sd, down, up, o, i, r=4):
        sd[down] = (torch.randn(r, i, generator=g) * .1).to(bf)
        sd[up] = (torch.randn(o, r, generator=g) * .1).to(bf)
    fk: dict[str, torch.Tensor] = {}
    for name, o, i, alpha in [("double_blocks_0_img_attn_qkv", 3 * H, H, 2), ("double_blocks_0_img_attn_proj", H, H, 4),
                              ("double_blocks_0_txt_attn_qkv", 3 * H, H, 8), ("double_blocks_0_img_mlp_0", 4 * H, H, 2),
                              ("single_blocks_0_linear1", 7 * H, H, 1), ("single_blocks_0_linear2", H, 5 * H, 4)]:
        p = "lora_unet_" + name
        pair(fk, p + ".lora_down.weight", p + ".lora_up.weight", o, i)
        fk[p + ".alpha"] = torch.tensor(float(alpha)).to(bf)
    save_file(fk, str(folder / "fk.safetensors"), metadata={"ss_network_module": "networks.lora_flux",
                                                            "modelspec.architecture": "flux-1-dev/lora"})
    fa: dict[str, torch.Tensor] = {}
    for name, o, i in [*((f"transformer_blocks.0.attn.{n}", H, H) for n in ("to_q", "to_k", "to_v", "to_out.0")),
                       *((f"single_transformer_blocks.0.attn.{n}", H, H) for n in ("to_q", "to_k", "to_v")),
                       ("single_transformer_blocks.0.proj_mlp", 4 * H, H)]:
        pair(fa, f"transformer.{name}.lora_A.weight", f"transformer.{name}.lora_B.weight", o, i)
    save_file(fa, str(folder / "fa.safetensors"))
    return {"fused": folder / "fk.safetensors", "split": folder / "fa.safetensors"}


@pytest.mark.parametrize("to, rule", [("diffusers", "kohya"), ("kohya", "kohya"), ("comfy", "exact")])
@pytest.mark.parametrize("which", ["fused", "split"])
def test_every_analyze_row_of_a_conversion_under_the_kohya_rule_writes_what_it_predicts(tmp_path, capsys, which, to,
                                                                                         rule):
    """With --output-format (modules split or fused, copied as they are where their rank is kept) and
    --rank-rule kohya (a fixed rank grows to the layer's size) or exact (one alpha for all, not a copy's own),
    each printed row, run as printed, writes the predicted bytes (metadata included) and ranks."""
    import json
    import shlex

    from lora_resize.cli import main
    src = flux_files(tmp_path)[which]
    flags = ["--output-format", to, "--rank-rule", rule]
    assert main(["analyze", str(src), "--json", "-q", *flags]) == 0
    printed = json.loads(capsys.readouterr().out)
    layers = analyze(src, output_format=to, rank_rule=rule).layers
    assert rule != "kohya" or any(s["rank_max"] > 4 for s in printed["settings"])  # the rule grows some layers
    for i, row in enumerate(printed["settings"]):
        dst = tmp_path / f"row{i}.safetensors"
        assert main(["resize", str(src), "-o", str(dst), "-q", *shlex.split(row["args"]), *flags]) == 0
        capsys.readouterr()
        sd, _ = load_st(dst)
        ranks = sorted(v.shape[0] for k, v in sd.items() if k.endswith(("lora_down.weight", "lora_A.weight")))
        mean = sum(ranks) / len(ranks) if to == "kohya" else row["rank_mean"]  # split parts share a layer's rank
        assert (dst.stat().st_size, ranks[0], ranks[-1], mean) == pytest.approx(
            (row["output_bytes"], row["rank_min"], row["rank_max"], row["rank_mean"]), abs=1e-9), row["args"]
        assert to != "kohya" or len(ranks) == len(layers)
