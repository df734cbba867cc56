"""Merges of many inputs: per-input block strengths (Source.rules / block_weights, --input-rule /
--input-block-weights), the per-input report (LayerResult.input_shares / input_kept) judged by a dense float64
computation, and bounded memory (no more than the engine's windows of layers loaded at once)."""
from __future__ import annotations

import json
import weakref

import pytest
import torch

import lora_resize
from helpers import (BLOCKY, Spec, best_rank_k, dense_dw, layer_names, load_st, make_state_dict, refused_in_one_line,
                     rel_err, write_lora)
from lora_resize.cli import main
from lora_resize.ops.merge import Source

SPECS = [Spec("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 48, 40, 8, alpha=4.0),
         Spec("lora_unet_down_blocks_0_attentions_0_proj_in", 32, 32, 6, kernel=1, alpha=3.0),
         Spec("lora_unet_down_blocks_0_resnets_0_conv1", 24, 8, 6, kernel=3, alpha=2.0),
         Spec("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 40, 24, 8)]


def inputs(tmp_path, n: int, specs=SPECS) -> list:
    return [write_lora(tmp_path / f"in{i}.safetensors", make_state_dict(specs, seed=10 + i)) for i in range(n)]


def dense_report(taus: list[torch.Tensor | None], W: torch.Tensor) -> tuple[list[float], list[float]]:
    """The definitions on dense float64 matrices: share_i = <tau_i, W> / ||W||^2; kept_i = ||P_U tau_i P_V||^2 /
    ||tau_i||^2 with U, V W's singular vectors of nonzero singular values (an input without the layer: 0, NaN)."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    live = S > S[0] * 1e-10
    U, V = U[:, live], Vh[live].T
    shares = [float((t * W).sum() / (W * W).sum()) if t is not None else 0.0 for t in taus]
    kept = [float(((U.T @ t @ V) ** 2).sum() / (t * t).sum()) if t is not None else float("nan") for t in taus]
    return shares, kept


@pytest.mark.parametrize("method, k, global_rules", [("sum", 3, ()), ("sum", 64, ()),
                                                     ("sum", 4, ("*attn2*=scale:-2",)), ("iso", 64, ()),
                                                     ("tsv", 3, ())])  # iso: equal values, no unique rank-k
def test_input_shares_and_kept_match_the_dense_definitions(tmp_path, method, k, global_rules):
    """Three inputs with weights (one negative), truncated to rank k (64: nothing cut) or with a global strength,
    merged by the sum or a basis-invariant method: each layer's shares and kept fractions equal the dense float64
    computation on the written layer (the best rank-k of the method's dense merge), the shares of the weighted sum
    add up to 1, and an input without a layer has share 0."""
    from lora_resize.testing.dense_merge import dense_merge

    paths = inputs(tmp_path, 2) + [write_lora(tmp_path / "part.safetensors", make_state_dict(SPECS[:2], seed=30))]
    weights = [0.8, -0.5, 1.3]
    res = lora_resize.merge([Source(p, w) for p, w in zip(paths, weights)], tmp_path / "out.safetensors", rank=k,
                            precision="float", block_rules=global_rules, merge_method=method)
    sds = [load_st(p)[0] for p in paths]
    for row in res.layers:
        taus = [w * dense_dw(sd, row.name).reshape(row.out_features, -1) if row.name + ".lora_down.weight" in sd
                else None for w, sd in zip(weights, sds)]
        W = best_rank_k(dense_merge(method, [t for t in taus if t is not None]), row.new_rank)
        shares, kept = dense_report(taus, W)
        assert row.input_shares == pytest.approx(shares, rel=1e-7, abs=1e-9), row.name
        assert row.input_kept == pytest.approx(kept, rel=1e-7, abs=1e-9, nan_ok=True), row.name
        if method == "sum":
            assert sum(row.input_shares) == pytest.approx(1, abs=1e-10)
        energies = [float((t * t).sum()) if t is not None else 0.0 for t in taus]
        assert row.input_energy == pytest.approx(energies, rel=1e-10)
        if k == 64:
            assert all(x == pytest.approx(1, abs=1e-10) for x in row.input_kept if x == x)


def test_report_in_the_summary_and_json(tmp_path, capsys):
    """The summary names, per input, the layers it dominates and its energy-weighted kept fraction (computed here
    from the JSON's per-layer values); the JSON carries the per-layer values."""
    a, b = inputs(tmp_path, 2)
    out = tmp_path / "ab.safetensors"
    assert main(["merge", f"{a}:1", f"{b}:0.1", "-o", str(out), "--rank", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["layers"]
    assert all(len(r["input_shares"]) == 2 and len(r["input_kept"]) == 2 for r in rows)
    assert all(r["input_shares"][0] > r["input_shares"][1] for r in rows)  # weight 1 vs 0.1 of alike inputs
    assert main(["merge", f"{a}:1", f"{b}:0.1", "-o", str(out), "--rank", "2"]) == 0
    text = capsys.readouterr().out
    kept = [sum(r["input_kept"][i] * r["input_energy"][i] for r in rows) / sum(r["input_energy"][i] for r in rows)
            for i in range(2)]
    assert (f"in0.safetensors dominates {len(rows)} of {len(rows)} layers, keeps {kept[0]:.2%}; "
            f"in1.safetensors dominates 0 of {len(rows)} layers, keeps {kept[1]:.2%}") in text


def test_input_scale_and_drop_rules_apply_to_that_input_before_the_sum(tmp_path):
    """Input 2's own rules (scale 0.5 on the text encoder, -2 on attn2, dropped from conv layers) multiply its
    weight per layer before the sum; a global scale rule then multiplies the merged layer; the summary says what
    each input's rules hit."""
    a, b = inputs(tmp_path, 2)
    own = ("lora_te_*=scale:0.5", "*attn2*=scale:-2", "*conv*=drop")
    res = lora_resize.merge([Source(a, 0.7), Source(b, 0.9, rules=own)], tmp_path / "o.safetensors", rank=5,
                            precision="float", block_rules=("lora_unet_down*=scale:3",))
    A, B, O = load_st(a)[0], load_st(b)[0], load_st(tmp_path / "o.safetensors")[0]
    strength_b = {SPECS[0].name: 0.5, SPECS[1].name: 1.0, SPECS[2].name: 0.0, SPECS[3].name: -2.0}
    strength = {SPECS[1].name: 3.0, SPECS[2].name: 3.0}
    for name in layer_names(A):
        ref = strength.get(name, 1) * (0.7 * dense_dw(A, name) + 0.9 * strength_b[name] * dense_dw(B, name))
        ref = best_rank_k(ref.reshape(ref.shape[0], -1), 5)
        assert rel_err(dense_dw(O, name).reshape(ref.shape), ref) < 1e-6, name
    conv = next(r for r in res.layers if r.name == SPECS[2].name)
    assert conv.input_shares == pytest.approx((1.0, 0.0)) and conv.input_kept[1] != conv.input_kept[1]
    assert res.options["input_rules"] == [{"input": 2, "file": "in1.safetensors", "rules": list(own),
                                           "block_weights": None, "preset_modules": 0,
                                           "hits": {own[0]: 1, own[1]: 1, own[2]: 1}}]
    assert ("input 2 (in1.safetensors) rules: lora_te_*=scale:0.5: 1 module; *attn2*=scale:-2: 1 module; "
            "*conv*=drop: 1 module") in lora_resize.summary(res)
    sources = json.loads(load_st(tmp_path / "o.safetensors")[1]["lora_resize"])["sources"]  # the file's record
    assert [s.get("rules") for s in sources] == [None, list(own)]


def test_input_block_weights_equal_that_input_resized_with_them(tmp_path):
    """--input-block-weights 1:SD15:... on an SD1.5-shaped input: the merge equals the sum of that input resized
    whole with the same --block-weights (the global preset's block mapping) and the other input as it is."""
    specs = BLOCKY
    a = write_lora(tmp_path / "a.safetensors", make_state_dict(specs, seed=1))
    b = write_lora(tmp_path / "b.safetensors", make_state_dict(specs, seed=2))
    preset = "SD15:0.5,1,0.25,0,1,1,0,0,1,2,1,1,1,0.5,1,1,-1"
    alone = tmp_path / "alone.safetensors"
    lora_resize.resize(a, alone, rank=512, precision="float", block_weights=preset)
    out = tmp_path / "ab.safetensors"
    assert main(["merge", str(a), f"{b}:0.5", "-o", str(out), "--rank", "3", "--precision", "float",
                 "--input-block-weights", f"1:{preset}", "--quiet"]) == 0
    assert json.loads(load_st(out)[1]["lora_resize"])["sources"][0]["block_weights"] == preset
    S, B, O = load_st(alone)[0], load_st(b)[0], load_st(out)[0]
    for name in layer_names(B):
        ref = 0.5 * dense_dw(B, name)
        if name in layer_names(S):
            ref = ref + dense_dw(S, name)
        ref = best_rank_k(ref.reshape(ref.shape[0], -1), 3)
        assert rel_err(dense_dw(O, name).reshape(ref.shape), ref) < 1e-6, name


@pytest.mark.parametrize("argv, says", [
    (["--input-rule", "3:*=scale:0.5"], "--input-rule '3:*=scale:0.5': there is no input 3; the merge has 2"),
    (["--input-rule", "0:*=scale:0.5"], "there is no input 0"),
    (["--input-rule", "*=scale:0.5"], "write N:RULE with N the input's position (1 to 2)"),
    (["--input-rule", "2:*attn*=cap:4"], "input 2 (b.safetensors): rule *attn*=cap:4 sets a rank, which belongs to "
                                          "the merged layer: give it with --rule"),
    (["--input-rule", "1:*=8"], "input 1 (a.safetensors): rule *=8 sets a rank"),
    (["--input-rule", "1:*=scale:x"], "input 1 (a.safetensors): rule '*=scale:x': 'x' is not a strength"),
    (["--input-rule", "1:*=drop"], "input 1 (a.safetensors): its own rules leave out every module; give it "
                                    "weight 0 to leave it out"),
    (["--input-rule", "1:*=scale:0"], "input 1 (a.safetensors): its own rules leave out every module"),
    (["--input-block-weights", "1:SD15:1,1"], "input 1 (a.safetensors): --block-weights SD15 takes 17 or 26"),
    (["--input-block-weights", "2:SD15:ALL", "--input-block-weights", "2:SD15:OUTALL"],
     "--input-block-weights is given 2 times for input 2"),
])
def test_bad_input_rules_are_refused_in_one_line(tmp_path, capsys, argv, says):
    a, b = (write_lora(tmp_path / f"{n}.safetensors", make_state_dict(SPECS, seed=i)) for i, n in enumerate("ab"))
    out = tmp_path / "o.safetensors"
    err = refused_in_one_line(capsys, ["merge", str(a), str(b), "-o", str(out), "--rank", "2", *argv])
    assert says in err
    assert not out.exists()


def test_windows_path_with_weight_and_input_rule_are_unambiguous():
    """A Windows path's drive colon is part of FILE[:WEIGHT]; the input rules are separate flags numbered N:."""
    from lora_resize.cli import build_parser
    from lora_resize.cli.merge import merge_sources

    args = build_parser().parse_args(["merge", r"C:\x.safetensors:0.8", r"D:\y.safetensors", "-o", "o.safetensors",
                                      "--input-rule", "2:*=scale:0.5", "--input-block-weights", "1:SD15:ALL"])
    a, b = merge_sources(args)
    assert (str(a.path), a.weight, a.rules, a.block_weights) == (r"C:\x.safetensors", 0.8, (), "SD15:ALL")
    assert (str(b.path), b.weight, b.rules, b.block_weights) == (r"D:\y.safetensors", 1.0, ("*=scale:0.5",), None)


def test_a_ten_input_merge_loads_no_more_than_a_window_of_layers_at_once(tmp_path, monkeypatch):
    """Bounded memory, counted rather than timed: every tensor the inputs' readers hand out is tracked (weakref)
    until it is freed; with windows of one layer and one worker, at most one layer's factors of each input (two
    tensors per input) are alive at any read, whatever the number of layers, so nothing per input is held across
    layers (the loaded parts the report needs included), with and without a budget's planning pass."""
    from lora_resize.core import schedule
    from lora_resize.io import reader

    specs = [Spec(f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_{i}_attn1_to_q", 24, 24, 4)
             for i in range(12)]
    paths = inputs(tmp_path, 10, specs)
    alive: set[int] = set()
    most = [0]
    real_get = reader.SafetensorsReader.get

    def get(self, key):
        t = real_get(self, key)
        alive.add(id(t))
        weakref.finalize(t, alive.discard, id(t))
        most[0] = max(most[0], len(alive))
        return t
    monkeypatch.setattr(reader.SafetensorsReader, "get", get)
    monkeypatch.setattr(schedule, "window_bytes", lambda device: (1, 1))  # one layer per window
    for budget in ({}, {"target_size": 20_000}):
        most[0] = 0
        res = lora_resize.merge(paths, tmp_path / "o.safetensors", rank=3, threads=1, **budget)
        assert len(res.layers) == 12 and all(len(r.input_shares) == 10 for r in res.layers)
        assert most[0] <= 2 * 10, (budget, most[0])


@pytest.mark.parametrize("strength", [0.5, 0.0])
def test_an_inputs_strength_scales_its_added_tensors_too(tmp_path, strength):
    """The tensors a loader adds beside a module's factors (full, bias and modulation diffs) are that input's
    update too: input 2's own scale rule multiplies them before the weighted sum (at 0 they are left out of it),
    as the global strengths do (ops.job.strengthened_companions)."""
    from test_merge import MOD, with_companions

    other = make_state_dict([Spec("lora_unet_blocks_1_attn_qkv", 24, 16, 4)], seed=3)  # not left out
    a = with_companions(tmp_path / "a.safetensors", 1, (torch.float32,) * 3, other)
    b = with_companions(tmp_path / "b.safetensors", 2, (torch.float32,) * 3, other)
    out = tmp_path / "o.safetensors"
    lora_resize.merge([Source(a, 0.5), Source(b, -2.0, rules=(f"{MOD}=scale:{strength}",))], out, rank=64)
    A, B, O = load_st(a)[0], load_st(b)[0], load_st(out)[0]
    for end in (".diff", ".diff_b", ".diff_m"):
        want = 0.5 * A[MOD + end].double() + (-2.0 * strength) * B[MOD + end].double()
        assert torch.allclose(O[MOD + end].double(), want, rtol=1e-6, atol=0), end
