"""merge: against a dense reference (weighted sum of dense dW, full SVD), self-merge, weights, partial modules,
metadata and errors."""
from __future__ import annotations

import json

import pytest
import torch

import lora_resize
from lora_resize.cli import main
from lora_resize.ops.merge import parse_source

from helpers import (BASE_METADATA, DOWN, Spec, best_rank_k, dense_dw, file_sha, layer_names, load_st,
                      make_state_dict, rel_err, standard_specs, write_lora)


def two_loras(tmp_path):
    specs = [s for s in standard_specs() if not s.zero]
    a = write_lora(tmp_path / "a.safetensors", make_state_dict(specs, seed=1), dict(BASE_METADATA))
    b = write_lora(tmp_path / "b.safetensors", make_state_dict(specs, seed=2), {"sshs_model_hash": "b" * 64})
    return a, b


@pytest.mark.parametrize("k", [1, 3, 8])
def test_merged_layers_are_best_rank_k_of_weighted_sum(tmp_path, k):
    a, b = two_loras(tmp_path)
    out = tmp_path / "ab.safetensors"
    res = lora_resize.merge([f"{a}:0.8", f"{b}:-0.5"], out, rank=k, precision="float")
    A, B = load_st(a)[0], load_st(b)[0]
    O = load_st(out)[0]
    for name in layer_names(A):
        ref = best_rank_k(0.8 * dense_dw(A, name) - 0.5 * dense_dw(B, name), k)
        assert rel_err(dense_dw(O, name).reshape(ref.shape), ref) < 1e-5, name
    assert all(r.old_rank == A[r.name + DOWN].shape[0] + B[r.name + DOWN].shape[0] for r in res.layers)


def test_dynamic_method_matches_dense_spectrum(tmp_path):
    a, b = two_loras(tmp_path)
    out = tmp_path / "ab.safetensors"
    res = lora_resize.merge([a, b], out, method="sv_fro", param=0.9, precision="float")
    A, B, O = load_st(a)[0], load_st(b)[0], load_st(out)[0]
    for row in res.layers:
        dw = dense_dw(A, row.name) + dense_dw(B, row.name)
        S = torch.linalg.svdvals(dw)
        fro = torch.sqrt(torch.cumsum(S * S, 0) / (S * S).sum())
        k = int((fro < 0.9 - 1e-12).sum()) + 1  # smallest k reaching 0.9
        assert row.new_rank == k, row.name
        assert rel_err(dense_dw(O, row.name).reshape(dw.shape), best_rank_k(dw, k)) < 1e-5


def test_self_merge_half_half_gives_the_original_back(tmp_path):
    specs = [Spec("lora_te_a", 40, 30, 8, alpha=4.0), Spec("lora_unet_b", 24, 8, 6, kernel=3, alpha=2.0)]
    src = write_lora(tmp_path / "a.safetensors", make_state_dict(specs, seed=3))
    out = tmp_path / "aa.safetensors"
    res = lora_resize.merge([f"{src}:0.5", f"{src}:0.5"], out, rank=8, conv_rank=6, precision="float")
    A, O = load_st(src)[0], load_st(out)[0]
    for name in layer_names(A):
        assert rel_err(dense_dw(O, name), dense_dw(A, name)) < 1e-6
    assert {r.new_rank for r in res.layers} == {8, 6}


def test_zero_weight_drops_input_and_partial_modules_merge(tmp_path):
    a = write_lora(tmp_path / "a.safetensors", make_state_dict([Spec("lora_te_x", 20, 16, 4, alpha=2.0)], seed=1))
    b = write_lora(tmp_path / "b.safetensors", make_state_dict(
        [Spec("lora_te_x", 20, 16, 4, alpha=2.0), Spec("lora_te_y", 12, 10, 3)], seed=2))
    out = tmp_path / "o.safetensors"
    res = lora_resize.merge([f"{a}:1", f"{b}:0"], out, rank=4, precision="float")
    assert any("weight 0" in n for n in res.notes)
    assert [r.name for r in res.layers] == ["lora_te_x"]
    assert rel_err(dense_dw(load_st(out)[0], "lora_te_x"), dense_dw(load_st(a)[0], "lora_te_x")) < 1e-6
    res = lora_resize.merge([f"{a}:1", f"{b}:2"], out, rank=8, precision="float")
    A, B, O = load_st(a)[0], load_st(b)[0], load_st(out)[0]
    assert rel_err(dense_dw(O, "lora_te_y"), 2 * dense_dw(B, "lora_te_y")) < 1e-6
    assert rel_err(dense_dw(O, "lora_te_x"), dense_dw(A, "lora_te_x") + 2 * dense_dw(B, "lora_te_x")) < 1e-6
    assert any("only some" in n for n in res.notes)


def test_metadata_records_sources_and_fresh_hashes(tmp_path):
    a, b = two_loras(tmp_path)
    out = tmp_path / "ab.safetensors"
    lora_resize.merge([f"{a}:0.8", f"{b}:0.5"], out, method="sv_ratio", param=4)
    _, meta = load_st(out)
    rec = json.loads(meta["lora_resize"])
    assert rec["operation"] == "merge" and rec["method"] == "sv_ratio" and rec["param"] == 4.0
    assert [(s["file"], s["weight"]) for s in rec["sources"]] == [("a.safetensors", 0.8), ("b.safetensors", 0.5)]
    assert rec["sources"][1]["sshs_model_hash"] == "b" * 64
    assert meta["ss_network_dim"] == "Dynamic"
    assert "a.safetensors x 0.8 + b.safetensors x 0.5" in meta["ss_training_comment"]
    data = out.read_bytes()
    n = int.from_bytes(data[:8], "little")
    import hashlib
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()


def test_cli_merge_end_to_end(tmp_path, capsys):
    a, b = two_loras(tmp_path)
    out = tmp_path / "ab.safetensors"
    before = file_sha(a), file_sha(b)
    assert main(["merge", f"{a}:0.7", str(b), "-o", str(out), "--rank", "4", "-v"]) == 0
    text = capsys.readouterr().out
    assert "Average Frobenius norm retention" in text and "ab.safetensors" in text
    assert (file_sha(a), file_sha(b)) == before
    assert {t.shape[0] for k, t in load_st(out)[0].items() if k.endswith(DOWN)} <= {4, 2, 3, 1}


def test_cli_merge_errors(tmp_path, capsys):
    a = write_lora(tmp_path / "a.safetensors", make_state_dict([Spec("lora_te_x", 20, 16, 4)], seed=1))
    b = write_lora(tmp_path / "b.safetensors", make_state_dict([Spec("lora_te_x", 21, 16, 4)], seed=2))
    out = tmp_path / "o.safetensors"
    assert main(["merge", str(a), str(b), "-o", str(out), "--rank", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lora-resize: error:") and "lora_te_x" in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert main(["merge", f"{a}:0", "-o", str(out), "--rank", "2"]) == 2
    assert main(["merge", str(a), "-o", str(a), "--rank", "2"]) == 2
    assert main(["merge", str(a), "-o", str(out)]) == 2  # no rank, no method
    assert not out.exists()


def test_parse_source():
    assert parse_source("x.safetensors:0.25").weight == 0.25
    assert parse_source("x.safetensors:-1").weight == -1
    assert parse_source("x.safetensors").weight == 1.0
    assert str(parse_source("C:/dir/x.safetensors").path) == "C:/dir/x.safetensors"


def test_inputs_that_cancel_out_give_zero_layers_and_say_so(tmp_path):
    """A LoRA minus itself, or two checkpoints whose untrained modules are equal: those layers are exact zeros (not
    float64 rounding noise at some rank), and the notes say so; the other layers are the exact difference."""
    specs = [Spec("lora_te_same", 40, 30, 8, alpha=4.0), Spec("lora_unet_conv", 24, 8, 6, kernel=3, alpha=2.0),
             Spec("lora_te_trained", 32, 20, 4, alpha=4.0)]
    a_sd = make_state_dict(specs, seed=3)
    b_sd = {k: (v if "trained" not in k else make_state_dict(specs, seed=4)[k]) for k, v in a_sd.items()}
    a = write_lora(tmp_path / "a.safetensors", a_sd)
    b = write_lora(tmp_path / "b.safetensors", b_sd)
    out = tmp_path / "diff.safetensors"
    res = lora_resize.merge([f"{a}:1", f"{b}:-1"], out, method="sv_fro", param=0.999, precision="float")
    O = load_st(out)[0]
    for name in ("lora_te_same", "lora_unet_conv"):
        assert not dense_dw(O, name).any(), name
    want = dense_dw(load_st(a)[0], "lora_te_trained") - dense_dw(load_st(b)[0], "lora_te_trained")
    assert rel_err(dense_dw(O, "lora_te_trained"), want) < 1e-3  # sv_fro 0.999 of the true difference
    assert any(n.startswith("2 layer(s) cancel out") and "lora_te_same" in n for n in res.notes), res.notes
    res = lora_resize.merge([f"{a}:0.5", f"{a}:-0.5"], out, rank=8, precision="float")
    assert all(not t.any() for k, t in load_st(out)[0].items() if not k.endswith(".alpha"))
    assert "warning: the inputs cancel out in every layer: the merged LoRA changes nothing" in res.notes


def test_a_weight_that_is_not_a_finite_number_is_refused(tmp_path, capsys):
    a = write_lora(tmp_path / "a.safetensors", make_state_dict([Spec("lora_te_x", 20, 16, 4)], seed=1))
    out = tmp_path / "o.safetensors"
    for w in ("nan", "inf", "-inf", "1e999"):
        assert main(["merge", str(a), f"{a}:{w}", "-o", str(out), "--rank", "2"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lora-resize: error: a.safetensors: weight") and "not a finite number" in err, err
    assert not out.exists()



# Non-factor tensors: what loaders add (diff, diff_b, diff_m, w_norm, lora_B.bias) is merged as the LoRA updates
# are, sum_i w_i * t_i; what they set or apply whole is kept only when it is the same (and the weights allow it).
MOD = "lora_unet_blocks_0_attn_qkv"


def with_companions(path, seed, dtypes, extra=None):
    """A bf16 kohya LoRA on MOD with a full diff, a bias diff and a modulation diff in `dtypes` (one each)."""
    g = torch.Generator().manual_seed(seed)
    sd = make_state_dict([Spec(MOD, 24, 16, 4, alpha=2.0)], seed=seed, dtype=torch.bfloat16)
    for end, shape, dtype in zip((".diff", ".diff_b", ".diff_m"), ((24, 16), (24,), (6, 24)), dtypes):
        sd[MOD + end] = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    sd.update(extra or {})
    return write_lora(path, sd)


@pytest.mark.parametrize("weights", [(1.0,), (-1.0,), (1.0, 1.0), (0.5, -2.0)])
def test_added_tensors_merge_as_the_weighted_sum_like_the_updates(tmp_path, weights):
    srcs = [with_companions(tmp_path / "a.safetensors", 1, (torch.float16, torch.float32, torch.bfloat16)),
            with_companions(tmp_path / "b.safetensors", 2, (torch.float32, torch.bfloat16, torch.bfloat16),
                            {MOD + ".w_norm": torch.randn(24, dtype=torch.float16)})][:len(weights)]
    out = tmp_path / "o.safetensors"
    res = lora_resize.merge([f"{s}:{w}" for s, w in zip(srcs, weights)], out, rank=64)  # saved as bf16
    ins, O = [load_st(s)[0] for s in srcs], load_st(out)[0]
    ref = sum(w * dense_dw(sd, MOD) for w, sd in zip(weights, ins))
    assert rel_err(dense_dw(O, MOD), ref) < 1e-2  # the LoRA update is the weighted sum (to bf16) ...
    summed = set()
    for end in (".diff", ".diff_b", ".diff_m", ".w_norm"):  # ... and so is everything a loader adds beside it
        held = [(w, sd[MOD + end]) for w, sd in zip(weights, ins) if MOD + end in sd]
        if not held:
            assert MOD + end not in O
            continue
        dtype = held[0][1].dtype if len({t.dtype for _, t in held}) == 1 else torch.float32  # the widest
        want = sum(w * t.to(torch.float64) for w, t in held).to(dtype)
        assert O[MOD + end].dtype == dtype and torch.equal(O[MOD + end], want), end
        if [w for w, _ in held] != [1.0]:  # a lone input at weight 1 is copied bit for bit, not summed
            summed.add(MOD + end)
    assert set(res.summed) == summed


def test_cli_negated_merge_negates_the_bias_diff_too(tmp_path, capsys):
    src = with_companions(tmp_path / "k.safetensors", 3, (torch.float32,) * 3)
    out = tmp_path / "kneg.safetensors"
    assert main(["merge", f"{src}:-1", "-o", str(out), "--rank", "64"]) == 0
    text = capsys.readouterr().out
    I, O = load_st(src)[0], load_st(out)[0]
    for end in (".diff", ".diff_b", ".diff_m"):
        assert torch.equal(O[MOD + end], -I[MOD + end]), end
    assert "3 other tensor(s) loaders add to the model, summed with the merge weights: 1 bias diff, 1 full diff, " \
           "1 modulation diff" in text, text


@pytest.mark.parametrize("weights, extra_a, extra_b, why", [
    ((1, 1), {"x.set_weight": torch.ones(4)}, {"x.set_weight": torch.zeros(4)}, "differs"),
    ((1, 1), {"bundle_emb.x": torch.ones(4)}, {"bundle_emb.x": torch.ones(5)}, "different shapes"),
    ((1, 1), {MOD + ".dora_scale": torch.ones(24, 1)}, {MOD + ".dora_scale": torch.ones(24, 1)}, "summing to 2"),
    ((-1,), {MOD + ".dora_scale": torch.ones(24, 1)}, {}, "summing to -1"),
    ((1, 1), {MOD + ".dora_scale": torch.ones(24, 1)}, {}, "updates the same layer as plain LoRA"),
    ((2,), {MOD + ".diff_b": torch.arange(24)}, {}, "torch.int64"),
    ((1, 1), {"training_step": torch.tensor([3])}, {"training_step": torch.tensor([4])}, "differs"),
])
def test_tensors_a_merge_cannot_combine_are_refused_in_one_line(tmp_path, capsys, weights, extra_a, extra_b, why):
    a = write_lora(tmp_path / "a.safetensors", {**make_state_dict([Spec(MOD, 24, 16, 4)], seed=1), **extra_a})
    b = write_lora(tmp_path / "b.safetensors", {**make_state_dict([Spec(MOD, 24, 16, 4)], seed=2), **extra_b})
    out = tmp_path / "o.safetensors"
    args = [f"{s}:{w}" for s, w in zip((a, b), weights)]
    assert main(["merge", *args, "-o", str(out), "--rank", "4"]) == 2
    err = capsys.readouterr().err.strip()
    key = next(iter(extra_a))
    assert err.startswith("lora-resize: error:") and key in err and why in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_set_and_whole_tensors_that_agree_are_kept_once(tmp_path):
    keep = {"x.set_weight": torch.arange(4.0), "img_in.reshape_weight": torch.tensor([24, 32]),
            MOD + ".dora_scale": torch.rand(24, 1, generator=torch.Generator().manual_seed(0))}
    a = write_lora(tmp_path / "a.safetensors", {**make_state_dict([Spec(MOD, 24, 16, 4)], seed=1), **keep})
    b = write_lora(tmp_path / "b.safetensors", {**make_state_dict([Spec(MOD, 24, 16, 4)], seed=2), **keep})
    out = tmp_path / "o.safetensors"
    res = lora_resize.merge([f"{a}:0.25", f"{b}:0.75"], out, rank=8)
    O = load_st(out)[0]
    for k, t in keep.items():
        assert O[k].dtype == t.dtype and torch.equal(O[k], t), k
    assert res.summed == [] and any("copied once" in n for n in res.notes)


def test_summed_tensors_are_rounded_once_to_an_explicit_precision(tmp_path):
    a = with_companions(tmp_path / "a.safetensors", 1, (torch.bfloat16,) * 3)
    b = with_companions(tmp_path / "b.safetensors", 2, (torch.bfloat16,) * 3)
    out = tmp_path / "o.safetensors"
    res = lora_resize.merge([f"{a}:0.3", f"{b}:0.7"], out, rank=8, precision="float")
    A, B, O = load_st(a)[0], load_st(b)[0], load_st(out)[0]
    for end in (".diff", ".diff_b", ".diff_m"):  # float32 of the exact sum, not of its bf16 rounding
        want = (0.3 * A[MOD + end].double() + 0.7 * B[MOD + end].double()).float()
        assert O[MOD + end].dtype == torch.float32 and torch.equal(O[MOD + end], want), end
    assert set(res.cast) == {MOD + e for e in (".diff", ".diff_b", ".diff_m")}


def peft_with_bias(folder, seed, alpha):
    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    write_lora(folder / "adapter_model.safetensors", {key + ".lora_A.weight": torch.randn(4, 16, generator=g),
                                                      key + ".lora_B.weight": torch.randn(24, 4, generator=g),
                                                      key + ".lora_B.bias": torch.randn(24, generator=g)})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": alpha,
                                                            "target_modules": ["q_proj"], "lora_bias": True}))
    return folder, key + ".lora_B.bias"


def test_peft_lora_biases_are_summed_when_their_layers_scale_alike_else_refused(tmp_path):
    (a, bias), (b, _), (c, _) = (peft_with_bias(tmp_path / n, i, alpha)
                                 for i, (n, alpha) in enumerate((("a", 8), ("b", 8), ("c", 4))))
    res = lora_resize.merge([f"{a}:0.5", f"{b}:-2"], tmp_path / "ab/", rank=8, precision="float")
    want = 0.5 * load_st(a / "adapter_model.safetensors")[0][bias].double() \
        - 2 * load_st(b / "adapter_model.safetensors")[0][bias].double()
    assert torch.equal(load_st(res.dst)[0][bias], want.float())
    with pytest.raises(lora_resize.LoraStructureError, match=r"lora_B\.bias.*scale this layer differently \(1, 2\)"):
        lora_resize.merge([a, c], tmp_path / "ac/", rank=8)
    assert not (tmp_path / "ac").exists()


@pytest.mark.thirdparty
@pytest.mark.parametrize("diffusers_first", [True, False], ids=["diffusers-first", "kohya-first-to-diffusers"])
def test_merged_diffusers_config_describes_every_module_written_and_diffusers_applies_each(tmp_path,
                                                                                          diffusers_first):
    """A diffusers-layout SD file (its PEFT config in `lora_adapter_metadata`) merged with a kohya SD file, the
    second input having modules the first lacks (kohya first: written with --output-format diffusers): the
    written config names every module written, with its rank and alpha, so diffusers' `load_lora_adapter` (which
    builds the LoraConfig from that metadata) patches each weight by the weighted sum. Before, the config was
    the first input's: the other input's modules were written as tensors but left out."""
    from diffusers import UNet2DConditionModel

    from helpers import loader_messages
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16, 32, 32), layers_per_block=2, cross_attention_dim=12,
        attention_head_dim=2, norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    mods = dict(unet.named_modules())
    attn = "down_blocks.0.attentions.0.transformer_blocks.0."
    shared = [attn + "attn1.to_q", attn + "attn1.to_k", attn + "attn2.to_k"]
    extra = [attn + "ff.net.2", "down_blocks.0.resnets.0.conv1"]
    g = torch.Generator().manual_seed(4)

    def factors(path, r):
        w = mods[path].weight
        down = torch.randn(r, *w.shape[1:], generator=g) * 0.3
        up = torch.randn(w.shape[0], r, *([1] * (w.dim() - 2)), generator=g) * 0.3
        return down, up

    # input A, diffusers' layout: rank 4 at lora_alpha 2 (scale 0.5), attn1.to_k at rank 6 through the patterns
    in_a, in_b = (shared, shared + extra) if diffusers_first else (shared + extra, shared)
    ranks_a = {p: 6 if p.endswith("attn1.to_k") else 4 for p in in_a}
    fa = {p: factors(p, r) for p, r in ranks_a.items()}
    cfg = {"r": 4, "lora_alpha": 2, "rank_pattern": {attn + "attn1.to_k": 6}, "alpha_pattern": {attn + "attn1.to_k": 3},
           "target_modules": sorted(in_a), "use_rslora": False, "use_dora": False, "lora_dropout": 0.0,
           "init_lora_weights": True, "bias": "none"}
    scale_a = {p: 3 / 6 if p.endswith("attn1.to_k") else 2 / 4 for p in in_a}
    sd_a = {f"unet.{p}.lora_{ab}.weight": t for p, (down, up) in fa.items() for ab, t in (("A", down), ("B", up))}
    a = write_lora(tmp_path / "a.safetensors", sd_a,
                   {"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in cfg.items()})})
    # input B, kohya: rank 4 at alphas of their own; the extra modules: a Linear and a 3x3 conv
    ranks_b = {p: 4 for p in in_b}
    alpha_b = {p: float(i + 1) for i, p in enumerate(in_b)}
    fb = {p: factors(p, r) for p, r in ranks_b.items()}
    sd_b = {}
    for p, (down, up) in fb.items():
        k = "lora_unet_" + p.replace(".", "_")
        sd_b.update({k + ".lora_down.weight": down, k + ".lora_up.weight": up, k + ".alpha": torch.tensor(alpha_b[p])})
    b = write_lora(tmp_path / "b.safetensors", sd_b)
    out = tmp_path / "ab.safetensors"
    inputs = [f"{a}:1", f"{b}:-0.5"] if diffusers_first else [f"{b}:-0.5", f"{a}:1", "--output-format", "diffusers"]
    assert main(["merge", *inputs, "-o", str(out), "--rank", "16", "--precision", "float", "-q"]) == 0

    O, meta = load_st(out)
    written = {k[len("unet."):-len(".lora_A.weight")]: v.shape[0] for k, v in O.items() if k.endswith(".lora_A.weight")}
    assert set(written) == set(shared + extra)
    got = {k[len("unet."):]: v for k, v in json.loads(meta["lora_adapter_metadata"]).items()}
    assert sorted(got["target_modules"]) == sorted(written)
    assert {p: got["rank_pattern"].get(p, got["r"]) for p in written} == written
    assert set(got["rank_pattern"]) <= set(written) and set(got["alpha_pattern"]) <= set(written)

    def dense(f, p, scale):
        down, up = f[p]
        return up.reshape(up.shape[0], -1).double() @ down.reshape(down.shape[0], -1).double() * scale
    expected = {p: dense(fa, p, scale_a[p]) if p in fa else 0 for p in written}
    for p in in_b:
        expected[p] = expected[p] - 0.5 * dense(fb, p, alpha_b[p] / ranks_b[p])
    before = {p: mods[p].weight.detach().clone() for p in written}
    with loader_messages() as msgs:
        unet.load_lora_adapter(str(out), prefix="unet", adapter_name="ab", use_safetensors=True)
        unet.fuse_lora()
    assert msgs == []
    for p in written:
        dw = (mods[p].weight.detach().double() - before[p].double()).reshape(before[p].shape[0], -1)
        assert rel_err(dw, expected[p]) < 2e-5, p  # float32 factors fused into float32 weights
