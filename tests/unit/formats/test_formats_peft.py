"""The PEFT key family through the CLI: keys kept, scales from adapter_config.json (r, lora_alpha, use_rslora,
rank_pattern / alpha_pattern as PEFT matches them), the rewritten config, DoRA magnitudes kept, and the errors for
files and configs that do not fit. Exactness against dense float64 SVDs of the trained updates."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lora_resize.testing import archs, loras
from lora_resize.cli import main
from lora_resize.errors import InputFileError, LoraStructureError
from lora_resize import resize

from helpers import best_rank_k, load_st, rel_err, write_lora

P = "base_model.model."
A, B = ".lora_A.weight", ".lora_B.weight"


def llama_adapter(folder: Path, config: dict | None, rank: int = 8, seed: int = 0, dtype=torch.float32,
                  layers: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shapes = archs.llama(hidden=24, kv=8, inter=40, layers=layers)
    sd = loras.lora_state_dict(shapes, "peft", rank=rank, seed=seed, dtype=dtype)
    write_lora(folder / "adapter_model.safetensors", sd)
    if config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder / "adapter_model.safetensors"


def paths_of(sd) -> list[str]:
    return sorted(k[len(P):-len(A)] for k in sd if k.endswith(A))


def cfg_scale(cfg: dict, path: str) -> tuple[int, float]:
    """(rank, scale) of a module from a config whose patterns are full module names (what we write)."""
    r = cfg.get("rank_pattern", {}).get(path, cfg["r"])
    a = cfg.get("alpha_pattern", {}).get(path, cfg["lora_alpha"])
    return r, (a / math.sqrt(r) if cfg.get("use_rslora") else a / r)


def dw(sd, path: str, scale: float) -> torch.Tensor:
    return sd[P + path + B].double() @ sd[P + path + A].double() * scale


def run(*args: str) -> int:
    return main(["resize", *map(str, args), "-q"])


BASE_CFG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
            "gate_proj", "up_proj", "down_proj"], "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}


def test_config_scales_and_patterns_are_kept_per_module(tmp_path, capsys):
    cfg = dict(BASE_CFG, rank_pattern={"k_proj": 4, "^model.layers.1.mlp.down_proj": 6},
               alpha_pattern={r"layers\.0\.self_attn\.q_proj": 3, "mlp.gate_proj": 40})
    src = tmp_path / "in"
    src.mkdir()
    shapes = archs.llama(hidden=24, kv=8, inter=40, layers=2)
    g_sd: dict[str, torch.Tensor] = {}
    for s in shapes:  # ranks as the patterns say
        r = 4 if s.name.endswith("k_proj") else 6 if s.name == "model.layers.1.mlp.down_proj" else 8
        g_sd.update(loras.lora_state_dict([s], "peft", rank=r, seed=len(g_sd)))
    write_lora(src / "adapter_model.safetensors", g_sd)
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    out.mkdir()
    assert run(src, "-o", out / "adapter_model.safetensors", "--method", "sv_fro", "--param", "0.85") == 0
    assert "(peft)" in capsys.readouterr().out
    sd_out, _ = load_st(out / "adapter_model.safetensors")
    assert set(sd_out) == set(g_sd)
    new = json.loads((out / "adapter_config.json").read_text())
    assert {k: v for k, v in new.items() if k not in ("r", "lora_alpha", "rank_pattern", "alpha_pattern")} == \
        {k: v for k, v in cfg.items() if k not in ("r", "lora_alpha", "rank_pattern", "alpha_pattern")}

    def old_scale(path):
        r = 4 if path.endswith("k_proj") else 6 if path == "model.layers.1.mlp.down_proj" else 8
        a = 3 if path == "model.layers.0.self_attn.q_proj" else 40 if path.endswith("gate_proj") else 16
        return a / r
    ranks = set()
    for path in paths_of(g_sd):
        k, scale = cfg_scale(new, path)
        assert sd_out[P + path + A].shape[0] == k
        ranks.add(k)
        assert math.isclose(scale, old_scale(path), rel_tol=1e-12), path  # strength unchanged
        assert rel_err(dw(sd_out, path, scale), best_rank_k(dw(g_sd, path, old_scale(path)), k)) < 1e-6, path
    assert len(ranks) > 1


def test_rslora_scale_is_kept(tmp_path):
    src = llama_adapter(tmp_path / "in", dict(BASE_CFG, use_rslora=True, lora_alpha=4), layers=1)
    out = tmp_path / "out" / "adapter_model.safetensors"
    out.parent.mkdir()
    assert run(src, "-o", out, "--rank", "3") == 0
    new = json.loads((out.parent / "adapter_config.json").read_text())
    assert new["r"] == 3 and new["use_rslora"] is True
    assert math.isclose(new["lora_alpha"] / math.sqrt(3), 4 / math.sqrt(8), rel_tol=1e-12)
    sd_in, _ = load_st(src)
    sd_out, _ = load_st(out)
    for path in paths_of(sd_in):
        assert rel_err(dw(sd_out, path, new["lora_alpha"] / math.sqrt(3)),
                       best_rank_k(dw(sd_in, path, 4 / math.sqrt(8)), 3)) < 1e-6


def test_fp16_adapter_keeps_precision_and_exact_alpha(tmp_path):
    src = llama_adapter(tmp_path / "in", dict(BASE_CFG, lora_alpha=5), dtype=torch.float16, layers=1)
    out = tmp_path / "out" / "adapter_model.safetensors"
    out.parent.mkdir()
    assert run(src, "-o", out, "--method", "sv_ratio", "--param", "4") == 0
    sd_in, _ = load_st(src)
    sd_out, _ = load_st(out)
    new = json.loads((out.parent / "adapter_config.json").read_text())
    for path in paths_of(sd_in):
        assert sd_out[P + path + A].dtype == torch.float16
        k, scale = cfg_scale(new, path)
        assert rel_err(dw(sd_out, path, scale), best_rank_k(dw(sd_in, path, 5 / 8), k)) < 2e-3


def test_dora_magnitudes_are_kept_as_trained(tmp_path, capsys):
    src = llama_adapter(tmp_path / "in", dict(BASE_CFG, use_dora=True), layers=1)
    sd, _ = load_st(src)
    g = torch.Generator().manual_seed(3)
    for path in paths_of(sd):
        sd[P + path + ".lora_magnitude_vector"] = torch.rand(sd[P + path + B].shape[0], generator=g) + 0.5
    write_lora(src, sd)
    out = tmp_path / "out" / "adapter_model.safetensors"
    out.parent.mkdir()
    assert run(src, "-o", out, "--rank", "4") == 0
    text = capsys.readouterr().out
    assert "7 DoRA magnitude vector(s) kept as trained" in text
    sd_out, _ = load_st(out)
    for path in paths_of(sd):
        assert torch.equal(sd_out[P + path + ".lora_magnitude_vector"], sd[P + path + ".lora_magnitude_vector"])
    assert json.loads((out.parent / "adapter_config.json").read_text())["use_dora"] is True


def test_output_beside_the_input_leaves_the_input_config_alone(tmp_path, capsys):
    src = llama_adapter(tmp_path / "ad", BASE_CFG, layers=1)
    before = (tmp_path / "ad" / "adapter_config.json").read_bytes()
    assert run(src, "-o", tmp_path / "ad" / "small.safetensors", "--rank", "2") == 0
    assert (tmp_path / "ad" / "adapter_config.json").read_bytes() == before
    new = json.loads((tmp_path / "ad" / "small_adapter_config.json").read_text())
    assert new["r"] == 2
    assert "left alone" in capsys.readouterr().out
    assert not list((tmp_path / "ad").glob("*.partial"))


def test_without_config_scale_is_one_and_nothing_else_is_written(tmp_path, capsys):
    src = llama_adapter(tmp_path / "in", None, layers=1)
    out = tmp_path / "out" / "x.safetensors"
    out.parent.mkdir()
    assert run(src, "-o", out, "--rank", "3") == 0
    assert "no adapter_config.json" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.safetensors"]
    sd_in, _ = load_st(src)
    sd_out, _ = load_st(out)
    assert set(sd_out) == set(sd_in)
    for path in paths_of(sd_in):
        assert rel_err(dw(sd_out, path, 1.0), best_rank_k(dw(sd_in, path, 1.0), 3)) < 1e-6


def test_api_summary_names_the_family(tmp_path):
    src = llama_adapter(tmp_path / "in", BASE_CFG, layers=1)
    res = resize(src.parent, tmp_path / "in" / "o.safetensors", rank=2)
    assert res.format == "peft"
    assert any("small" not in n and "adapter_config.json" in n for n in res.notes)


# ----------------------------------------------------------------------------------------------------------------
# files and configs that do not fit


def expect_error(capsys, *args) -> str:
    assert run(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-resize: error:")
    return err


def test_lora_a_without_b_is_named(tmp_path, capsys):
    src = llama_adapter(tmp_path / "in", BASE_CFG, layers=1)
    sd, _ = load_st(src)
    del sd[P + "model.layers.0.mlp.up_proj" + B]
    write_lora(src, sd)
    err = expect_error(capsys, src, "-o", tmp_path / "o.safetensors", "--rank", "2")
    assert "model.layers.0.mlp.up_proj.lora_A.weight has no partner" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_keys_with_the_adapter_name_are_read_and_written_back(tmp_path, capsys):
    """Raw PeftModel.state_dict() dumps and DiffSynth-Studio files keep the adapter name in the keys
    (<module>.lora_A.default.weight): read with the config's scales, resized, written under the same names."""
    src = llama_adapter(tmp_path / "in", dict(BASE_CFG, alpha_pattern={"up_proj": 4}), layers=1)
    sd, _ = load_st(src)
    named = {k.replace(A, ".lora_A.default.weight").replace(B, ".lora_B.default.weight"): v for k, v in sd.items()}
    write_lora(src, named)
    out = tmp_path / "out" / "adapter_model.safetensors"
    out.parent.mkdir()
    assert run(src, "-o", out, "--rank", "3") == 0
    sd_out, _ = load_st(out)
    assert set(sd_out) == set(named)
    new = json.loads((out.parent / "adapter_config.json").read_text())
    for path in paths_of(sd):
        k, scale = cfg_scale(new, path)
        assert k == 3 and sd_out[P + path + ".lora_A.default.weight"].shape[0] == 3
        got = sd_out[P + path + ".lora_B.default.weight"].double() @ sd_out[P + path + ".lora_A.default.weight"].double()
        want = best_rank_k(dw(sd, path, (4 if path.endswith("up_proj") else 16) / 8), 3)
        assert rel_err(got * scale, want) < 1e-6, path
    # two adapters in one file cannot be told apart: refused, naming both
    key = P + "model.layers.0.mlp.up_proj"
    named[key + ".lora_A.other.weight"] = named[key + ".lora_A.default.weight"].clone()
    named[key + ".lora_B.other.weight"] = named[key + ".lora_B.default.weight"].clone()
    write_lora(src, named)
    err = expect_error(capsys, src, "-o", tmp_path / "o.safetensors", "--rank", "2")
    assert "the adapters default, other" in err


def test_magnitude_without_pair_is_named(tmp_path, capsys):
    src = llama_adapter(tmp_path / "in", BASE_CFG, layers=1)
    sd, _ = load_st(src)
    sd[P + "model.layers.0.mlp.nothing.lora_magnitude_vector"] = torch.ones(4)
    write_lora(src, sd)
    err = expect_error(capsys, src, "-o", tmp_path / "o.safetensors", "--rank", "2")
    assert "nothing.lora_magnitude_vector (a DoRA magnitude) has no lora_A/lora_B pair" in err


@pytest.mark.parametrize("cfg, fault", [
    (dict(BASE_CFG, r=16), "gives it rank 16 but its tensors have rank 8"),
    (dict(BASE_CFG, rank_pattern={"q_proj": 4}), "gives it rank 4 but its tensors have rank 8"),
    (dict(BASE_CFG, peft_type="LOHA"), "is a LOHA config"),
    (dict(BASE_CFG, rank_pattern={"q_proj(": 4}), "not a valid regular expression"),
    ({"lora_alpha": 8}, "has no 'r'"),
    (dict(BASE_CFG, lora_alpha="sixteen"), "lora_alpha must be a finite number"),
])
def test_config_that_does_not_fit_is_named(tmp_path, capsys, cfg, fault):
    src = llama_adapter(tmp_path / "in", cfg, layers=1)
    err = expect_error(capsys, src, "-o", tmp_path / "o.safetensors", "--rank", "2")
    assert fault in err
    assert not (tmp_path / "o.safetensors").exists()


def test_config_that_is_not_json_is_named(tmp_path):
    src = llama_adapter(tmp_path / "in", None, layers=1)
    (src.parent / "adapter_config.json").write_text("{r: 8")
    with pytest.raises(InputFileError, match="adapter_config.json is not valid JSON"):
        resize(src, tmp_path / "o.safetensors", rank=2)


def test_peft_and_diffusers_keys_mixed_are_refused(tmp_path):
    src = llama_adapter(tmp_path / "in", BASE_CFG, layers=1)
    sd, _ = load_st(src)
    sd.update(loras.lora_state_dict([archs.ModuleShape("transformer.x.to_q", 8, 8)], "diffusers", rank=2))
    write_lora(src, sd)
    with pytest.raises(LoraStructureError, match="transformer.x.to_q.lora_A.weight looks like part of a LoRA"):
        resize(src, tmp_path / "o.safetensors", rank=2)


def test_rewritten_config_anchors_names_that_end_another_name():
    from lora_resize.formats.peft import pattern_key, rewritten_config
    entries = [("a.q", 4, 8.0), ("x.a.q", 2, 8.0), ("x.b", 4, 8.0), ("x.c+", 4, 2.0)]
    cfg = rewritten_config({"r": 8, "lora_alpha": 16, "rank_pattern": {"q": 3}, "other": 1}, entries, False)
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["other"] == 1
    assert cfg["rank_pattern"] == {"x.a.q": 2}
    assert cfg["alpha_pattern"] == {r"x\.c\+": 2}
    # PEFT's matching picks each module's own entry, and no other
    names = [p for p, _, _ in entries]
    got = {n: pattern_key(cfg["rank_pattern"], n) for n in names}
    assert got == {"a.q": None, "x.a.q": "x.a.q", "x.b": None, "x.c+": None}
    cfg = rewritten_config({"r": 8, "lora_alpha": 16}, [("a.q", 2, 8.0), ("x.a.q", 4, 8.0), ("y.a.q", 4, 8.0)],
                           False)
    assert cfg["rank_pattern"] == {"^a.q": 2}
    assert {n: pattern_key(cfg["rank_pattern"], n) for n in ("a.q", "x.a.q", "y.a.q")} == \
        {"a.q": "^a.q", "x.a.q": None, "y.a.q": None}


def test_lora_bias_vectors_pass_through(tmp_path):
    src = llama_adapter(tmp_path / "in", dict(BASE_CFG, lora_bias=True), layers=1)
    sd, _ = load_st(src)
    for path in paths_of(sd):
        sd[P + path + ".lora_B.bias"] = torch.arange(sd[P + path + B].shape[0], dtype=torch.float32)
    write_lora(src, sd)
    out = tmp_path / "out" / "adapter_model.safetensors"
    out.parent.mkdir()
    assert run(src, "-o", out, "--rank", "2") == 0
    sd_out, _ = load_st(out)
    assert set(sd_out) == set(sd)
    for path in paths_of(sd):
        assert torch.equal(sd_out[P + path + ".lora_B.bias"], sd[P + path + ".lora_B.bias"])


def test_merged_peft_adapters_get_a_config_with_the_original_scales(tmp_path):
    a = llama_adapter(tmp_path / "a", BASE_CFG, seed=1, layers=1)
    b = llama_adapter(tmp_path / "b", BASE_CFG, seed=2, layers=1)
    out = tmp_path / "out" / "adapter_model.safetensors"
    out.parent.mkdir()
    assert main(["merge", f"{a}:1", f"{b}:0.5", "-o", str(out), "-q", "--rank", "5"]) == 0
    new = json.loads((out.parent / "adapter_config.json").read_text())
    sd_a, _ = load_st(a)
    sd_b, _ = load_st(b)
    sd_out, _ = load_st(out)
    assert new["r"] == 5 and new["lora_alpha"] == 10 and new["rank_pattern"] == {} == new["alpha_pattern"]
    for path in paths_of(sd_a):
        want = best_rank_k(dw(sd_a, path, 2.0) + 0.5 * dw(sd_b, path, 2.0), 5)
        assert rel_err(dw(sd_out, path, 10 / 5), want) < 1e-6, path


def test_a_folder_output_gets_the_adapter_files_and_nothing_when_the_run_fails(tmp_path, capsys):
    src = llama_adapter(tmp_path / "in", BASE_CFG, layers=1)
    # an existing folder without a file suffix, given without the slash: the adapter's files go into it
    (tmp_path / "have").mkdir()
    assert run(src.parent, "-o", tmp_path / "have", "--rank", "3") == 0
    assert sorted(p.name for p in (tmp_path / "have").iterdir()) == ["adapter_config.json",
                                                                     "adapter_model.safetensors"]
    # a failing run makes no folder
    err = expect_error(capsys, src.parent, "-o", f"{tmp_path / 'new'}/", "--target-size", "10")
    assert "below the smallest file" in err and not (tmp_path / "new").exists()
    # a non-PEFT input keeps its own file name in a folder
    kohya = write_lora(tmp_path / "k.safetensors", loras.lora_state_dict(archs.llama(24, 8, 40, 1), "kohya", rank=4,
                                                                          alpha=2.0))
    assert run(kohya, "-o", f"{tmp_path / 'kf'}/", "--rank", "2") == 0
    assert [p.name for p in (tmp_path / "kf").iterdir()] == ["k.safetensors"]


@pytest.mark.parametrize("prefix", [P, "transformer."])  # the PEFT family, and the diffusers family's A/B keys
@pytest.mark.parametrize("extra", ["bias", "magnitude", "alpha", "bias+magnitude"])
def test_adapter_name_with_bias_magnitude_or_alpha_is_read(tmp_path, capsys, prefix, extra):
    """Keys with the adapter name left in, beside PEFT's lora_B bias (`.lora_B.default.bias`), DoRA magnitude
    (`.lora_magnitude_vector.default.weight`) or an `.alpha`: each is supported alone and so is the combination -
    the pairs resized exactly, the bias and magnitude copied bit for bit and listed by kind."""
    src = llama_adapter(tmp_path / "in", None, layers=1)
    sd, _ = load_st(src)
    named, side, alphas = {}, {}, {}
    g = torch.Generator().manual_seed(3)
    for path in paths_of(sd):
        base, a, b = prefix + path, sd[P + path + A], sd[P + path + B]
        named[base + ".lora_A.default.weight"], named[base + ".lora_B.default.weight"] = a, b
        if "bias" in extra:
            side[base + ".lora_B.default.bias"] = torch.randn(b.shape[0], generator=g)
        if "magnitude" in extra:
            side[base + ".lora_magnitude_vector.default.weight"] = torch.rand(b.shape[0], generator=g) + 0.5
        if extra == "alpha":
            alphas[base] = 2.0 + len(alphas)
            named[base + ".alpha"] = torch.tensor(alphas[base])
    src = write_lora(tmp_path / "named.safetensors", {**named, **side})
    out = tmp_path / "out.safetensors"
    assert main(["resize", str(src), "-o", str(out), "--rank", "3", "--json", "-q"]) == 0
    res = json.loads(capsys.readouterr().out)
    kinds = {"bias": "LoRA bias", "magnitude": "DoRA magnitude"}
    assert res["copied"] == {kinds[e]: len(paths_of(sd)) for e in extra.split("+") if e in kinds}
    sd_out, _ = load_st(out)
    assert set(sd_out) == set(named) | set(side)
    for k, v in side.items():
        assert torch.equal(sd_out[k], v), k
    for path in paths_of(sd):
        base = prefix + path
        up, down = sd_out[base + ".lora_B.default.weight"].double(), sd_out[base + ".lora_A.default.weight"].double()
        scale = float(sd_out[base + ".alpha"]) / 3 if extra == "alpha" else 1.0
        want = best_rank_k(dw(sd, path, alphas[base] / 8 if extra == "alpha" else 1.0), 3)
        assert rel_err(up @ down * scale, want) < 1e-6, path


def test_peft_output_counts_only_the_modules_the_rules_keep(tmp_path, capsys):
    """The one-model check of a PEFT output looks at the modules the rules leave (resize, convert, merge, analyze
    alike), and its refusal names a drop rule that leaves one model."""
    shapes = archs.sd15(ch=(8, 16, 32, 32), ctx=12, te=(16, 2, 32))
    src = write_lora(tmp_path / "k.safetensors", loras.lora_state_dict(shapes, "kohya", rank=4, alpha=4.0, seed=1))
    assert main(["resize", str(src), "-o", str(tmp_path / "no"), "--rank", "2", "--output-format", "peft"]) == 2
    err = capsys.readouterr().err
    assert "holds one model" in err and len(err.splitlines()) == 1, err
    rule = err.split("--rule '")[1].split("'")[0]
    runs = {"resize": ["resize", str(src), "--rank", "2", "--output-format", "peft"],
            "convert": ["convert", str(src), "--to", "peft"],
            "merge": ["merge", str(src), str(src), "--rank", "2", "--output-format", "peft"]}
    for cmd, args in runs.items():
        dst = tmp_path / cmd
        assert main([*args, "-o", str(dst), "--rule", rule]) == 0, capsys.readouterr().err
        out, _ = load_st(dst / "adapter_model.safetensors")
        assert out and not any("text_model" in k for k in out) and any("down_blocks" in k for k in out)
    assert main(["analyze", str(src), "--output-format", "peft", "--rule", rule]) == 0, capsys.readouterr().err
