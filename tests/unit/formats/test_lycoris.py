"""LyCORIS inputs (LoCon with a Tucker core, LoHa, LoKr; linear and conv; with and without Tucker cores) resized
into plain LoRA factors, checked against dense float64 updates built here from the LyCORIS formulas; kinds that
need the base model pass through, listed; half-recognised modules are errors; detection against kohya."""
from __future__ import annotations

import json

import pytest
import torch

import lora_resize
from lora_resize.cli import main
from lora_resize.errors import LoraStructureError
from lora_resize.formats import detect
from lora_resize.io.reader import open_tensor_file

from helpers import (ALPHA, BASE_METADATA, DOWN, UP, Spec, best_rank_k, file_sha, load_st, make_state_dict,
                      rel_err, write_lora)

LIN = "lora_te_text_model_encoder_layers_0_mlp_fc1"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
PW = "lycoris_down_blocks_0_attentions_0_proj_in"

# ----------------------------------------------------------------------------------------------------------------
# Dense float64 references, straight from the LyCORIS formulas (dW = the module's update, alpha scale included)


def _rebuild_tucker(t, wa, wb):
    """W[p, c, ...] = sum_ij t[i, j, ...] wa[i, p] wb[j, c] (wa: r x out, wb: r x in)."""
    return torch.einsum("ij...,ip,jc->pc...", t.double(), wa.double(), wb.double())


def ref_locon(sd, name):
    up, down, mid = sd[name + UP].double(), sd[name + DOWN].double(), sd.get(name + ".lora_mid.weight")
    r = down.shape[0]
    if mid is None:
        dw = up.reshape(up.shape[0], -1) @ down.reshape(r, -1)
    else:
        dw = torch.einsum("ijhw,oi,jc->ochw", mid.double(), up.reshape(up.shape[0], -1), down.reshape(r, -1))
    a = sd.get(name + ALPHA)
    return dw.reshape(dw.shape[0], -1) * (float(a) / r if a is not None else 1.0)


def ref_loha(sd, name):
    g = {p: sd[f"{name}.{p}"].double() for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                                                  "hada_t1", "hada_t2") if f"{name}.{p}" in sd}
    if "hada_t1" in g:
        w1 = _rebuild_tucker(g["hada_t1"], g["hada_w1_a"], g["hada_w1_b"])
        w2 = _rebuild_tucker(g["hada_t2"], g["hada_w2_a"], g["hada_w2_b"])
    else:
        b1, b2 = g["hada_w1_b"], g["hada_w2_b"]
        w1 = g["hada_w1_a"] @ b1.reshape(b1.shape[0], -1)
        w2 = g["hada_w2_a"] @ b2.reshape(b2.shape[0], -1)
    dw = w1 * w2
    r = g["hada_w1_b"].shape[0]
    a = sd.get(name + ALPHA)
    return dw.reshape(dw.shape[0], -1) * (float(a) / r if a is not None else 1.0)


def ref_lokr(sd, name):
    g = {p: sd[f"{name}.{p}"].double() for p in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                                                  "lokr_w2_b", "lokr_t2") if f"{name}.{p}" in sd}
    rank = None
    w1 = g.get("lokr_w1")
    if w1 is None:
        w1, rank = g["lokr_w1_a"] @ g["lokr_w1_b"], g["lokr_w1_b"].shape[0]
    w2 = g.get("lokr_w2")
    if w2 is None:
        rank = g["lokr_w2_b"].shape[0]
        if "lokr_t2" in g:
            w2 = _rebuild_tucker(g["lokr_t2"], g["lokr_w2_a"], g["lokr_w2_b"])
        else:
            b = g["lokr_w2_b"]
            w2 = (g["lokr_w2_a"] @ b.reshape(b.shape[0], -1)).reshape(-1, *b.shape[1:])
    while w1.ndim < w2.ndim:
        w1 = w1[..., None]
    dw = torch.kron(w1.contiguous(), w2.contiguous())
    a = sd.get(name + ALPHA)
    scale = float(a) / rank if (a is not None and rank is not None) else 1.0  # both full: alpha ignored
    return dw.reshape(dw.shape[0], -1) * scale


def out_dw(out, name):
    """Our output's update: up @ down * alpha / k, as an out x (in*kh*kw) float64 matrix."""
    up, down = out[name + UP].double(), out[name + DOWN].double()
    k = down.shape[0]
    return (up.reshape(up.shape[0], -1) @ down.reshape(k, -1)) * (float(out[name + ALPHA]) / k)


# ----------------------------------------------------------------------------------------------------------------
# Module builders (random, non-zero, float32)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _r(g, *shape, std=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).float()


def locon_tucker(name, out, inp, r, k=3, alpha=None, seed=0):
    g = _g(seed)
    sd = {name + UP: _r(g, out, r, 1, 1), name + DOWN: _r(g, r, inp, 1, 1),
          name + ".lora_mid.weight": _r(g, r, r, k, k)}
    if alpha is not None:
        sd[name + ALPHA] = torch.tensor(float(alpha))
    return sd


def loha(name, out, inp, r1, r2=None, alpha=None, kernel=None, tucker=False, flat=False, seed=0):
    """LoHa as LyCORIS writes it: linear; conv with the kernel flattened (flat) or 4-D w_b; Tucker conv."""
    g = _g(seed)
    r2 = r1 if r2 is None else r2
    if tucker:
        sd = {f"{name}.hada_w1_a": _r(g, r1, out), f"{name}.hada_w1_b": _r(g, r1, inp),
              f"{name}.hada_t1": _r(g, r1, r1, kernel, kernel, std=0.5),
              f"{name}.hada_w2_a": _r(g, r2, out), f"{name}.hada_w2_b": _r(g, r2, inp),
              f"{name}.hada_t2": _r(g, r2, r2, kernel, kernel, std=0.5)}
    else:
        bshape = (inp,) if kernel is None else ((inp * kernel * kernel,) if flat else (inp, kernel, kernel))
        sd = {f"{name}.hada_w1_a": _r(g, out, r1), f"{name}.hada_w1_b": _r(g, r1, *bshape),
              f"{name}.hada_w2_a": _r(g, out, r2), f"{name}.hada_w2_b": _r(g, r2, *bshape)}
    if alpha is not None:
        sd[name + ALPHA] = torch.tensor(float(alpha))
    return sd


def lokr(name, a, b, c, d, r=None, w1_factored=False, w2="factored", kernel=None, alpha=None, seed=0):
    """LoKr: out = a*c, in = b*d. w1 full (a x b) or a x r, r x b; w2 "full" (c x d[ x k x k]), "factored"
    (c x r, r x d or r x d*k*k when flat), "flat" (conv, r x d*k*k), "tucker" (r x c, r x d, r x r x k x k)."""
    g = _g(seed)
    sd = {}
    if w1_factored:
        sd[f"{name}.lokr_w1_a"], sd[f"{name}.lokr_w1_b"] = _r(g, a, r), _r(g, r, b)
    else:
        sd[f"{name}.lokr_w1"] = _r(g, a, b)
    ks = () if kernel is None else (kernel, kernel)
    if w2 == "full":
        sd[f"{name}.lokr_w2"] = _r(g, c, d, *ks)
    elif w2 == "tucker":
        sd[f"{name}.lokr_w2_a"], sd[f"{name}.lokr_w2_b"] = _r(g, r, c), _r(g, r, d)
        sd[f"{name}.lokr_t2"] = _r(g, r, r, *ks)
    elif w2 == "flat":
        sd[f"{name}.lokr_w2_a"], sd[f"{name}.lokr_w2_b"] = _r(g, c, r), _r(g, r, d * kernel * kernel)
    else:
        sd[f"{name}.lokr_w2_a"], sd[f"{name}.lokr_w2_b"] = _r(g, c, r), _r(g, r, d, *ks)
    if alpha is not None:
        sd[name + ALPHA] = torch.tensor(float(alpha))
    return sd


# name -> (builder, reference, kernel of the output's conv factors or None, expected old (trained) rank)
CASES = {
    "locon_tucker_conv3": (lambda n: locon_tucker(n, 24, 16, 6, alpha=3.0, seed=1), ref_locon, (3, 3), 6),
    "loha_linear": (lambda n: loha(n, 40, 24, 3, alpha=2.0, seed=2), ref_loha, None, 3),
    "loha_linear_noalpha_r2": (lambda n: loha(n, 36, 30, 3, 4, seed=3), ref_loha, None, 3),
    # a flattened conv kernel: written as conv factors where the module's name says the kernel (an SD UNet conv),
    # as 2-D factors where nothing does
    "loha_conv_flat": (lambda n: loha(n, 20, 8, 3, alpha=1.5, kernel=3, flat=True, seed=4), ref_loha, (3, 3), 3),
    "loha_conv_flat_unnamed": (lambda n: loha(n, 20, 8, 3, alpha=1.5, kernel=3, flat=True, seed=4), ref_loha, None,
                               3),
    "loha_conv_4d": (lambda n: loha(n, 20, 8, 3, alpha=1.5, kernel=3, seed=5), ref_loha, (3, 3), 3),
    "loha_tucker_conv": (lambda n: loha(n, 24, 12, 2, alpha=1.0, kernel=3, tucker=True, seed=6), ref_loha, (3, 3),
                         2),
    "loha_dense_fallback": (lambda n: loha(n, 10, 12, 4, alpha=4.0, seed=7), ref_loha, None, 4),  # 16 > 10
    "lokr_w1full_w2fact": (lambda n: lokr(n, 4, 4, 10, 6, r=3, alpha=2.0, seed=8), ref_lokr, None, 3),
    "lokr_both_factored": (lambda n: lokr(n, 8, 6, 10, 12, r=2, w1_factored=True, alpha=1.0, seed=9), ref_lokr,
                           None, 2),
    "lokr_both_full_alpha_ignored": (lambda n: lokr(n, 3, 2, 5, 4, w2="full", alpha=7.0, seed=10), ref_lokr, None,
                                     None),
    "lokr_conv_full_w2": (lambda n: lokr(n, 3, 2, 4, 4, w2="full", kernel=3, alpha=3.0, seed=11), ref_lokr, (3, 3),
                          None),
    "lokr_conv_tucker": (lambda n: lokr(n, 4, 4, 8, 8, r=2, w2="tucker", kernel=3, alpha=1.5, seed=12), ref_lokr,
                         (3, 3), 2),
    "lokr_conv_flat": (lambda n: lokr(n, 4, 4, 8, 8, r=2, w2="flat", kernel=3, alpha=1.5, seed=13), ref_lokr, (3, 3),
                       2),
    "lokr_conv_flat_unnamed": (lambda n: lokr(n, 4, 4, 8, 8, r=2, w2="flat", kernel=3, alpha=1.5, seed=13), ref_lokr,
                               None, 2),
    "lokr_conv_full_w1_factored_flat": (lambda n: lokr(n, 2, 4, 6, 8, r=2, w1_factored=True, w2="flat", kernel=3,
                                                       alpha=1.0, seed=15), ref_lokr, (3, 3), 2),
    "lokr_conv_w2b_4d": (lambda n: lokr(n, 2, 2, 8, 6, r=3, kernel=3, alpha=0.5, seed=14), ref_lokr, (3, 3), 3),
}


def _true_rank(ref):
    S = torch.linalg.svdvals(ref)
    return int((S > S[0] * 1e-9).sum())


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("cut", [False, True], ids=["full_rank", "truncated"])
def test_kind_matches_dense_reference(tmp_path, capsys, case, cut):
    build, ref_fn, kernel, trained_rank = CASES[case]
    name = CONV if kernel else LIN
    sd = build(name)
    ref = ref_fn(sd, name)
    rank = _true_rank(ref)
    k = max(1, rank // 2) if cut else rank + 3  # beyond the rank: clamped to the layer's size, still exact
    src = write_lora(tmp_path / "in.safetensors", sd, dict(BASE_METADATA))
    dst = tmp_path / "out.safetensors"
    rc = main(["resize", str(src), "-o", str(dst), "--rank", str(k), "--conv-rank", str(k), "--precision", "float",
               "--json", "--as-lora"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    out, meta = load_st(dst)
    assert sorted(out) == sorted([name + DOWN, name + UP, name + ALPHA]), sorted(out)  # no LyCORIS part left
    got = out_dw(out, name)
    want = best_rank_k(ref, k) if cut else ref
    assert rel_err(got, want) < 2e-5, (case, rel_err(got, want))
    if cut:  # Eckart-Young: the error is exactly the dropped tail
        S = torch.linalg.svdvals(ref)
        assert abs(float(torch.linalg.norm(got - ref)) - float(S[k:].norm())) <= 1e-4 * float(S[0])
    down, up = out[name + DOWN], out[name + UP]
    if kernel:
        assert down.ndim == 4 and tuple(down.shape[2:]) == kernel and tuple(up.shape[2:]) == (1, 1)
    else:
        assert down.ndim == 2 and up.ndim == 2
    report = json.loads(cap.out)
    (layer,) = report["layers"]
    assert report["format"] == "lycoris"
    if trained_rank is not None:
        assert layer["old_rank"] == trained_rank
        a = sd.get(name + ALPHA)
        scale = float(a) / trained_rank if a is not None else 1.0
        # one alpha for all (the scale times --rank; a clamped layer's ratio is in its factors): strength kept
        assert abs(float(out[name + ALPHA]) / k - scale) <= 1e-6 * scale
    else:  # LoKr with both sides full: scale 1 whatever alpha says
        assert float(out[name + ALPHA]) == k


def test_mixed_file_dynamic_fp16(tmp_path):
    """A realistic mix (kohya pairs, LoHa, LoKr, Tucker LoCon) in fp16 with a dynamic method: every module
    becomes plain factors in fp16, each the exact sv_fro truncation of its own update."""
    sd = {}
    sd.update(make_state_dict([Spec("lora_te_text_model_encoder_layers_1_mlp_fc2", 32, 48, 8, alpha=4.0)], seed=3))
    sd.update(loha("lora_unet_mid_block_attentions_0_proj_out", 40, 40, 4, alpha=2.0, seed=21))
    sd.update(lokr("lora_unet_up_blocks_0_attentions_0_proj_in", 4, 4, 10, 10, r=3, alpha=3.0, seed=22))
    sd.update(locon_tucker("lora_unet_up_blocks_0_resnets_0_conv1", 16, 12, 4, alpha=2.0, seed=23))
    sd = {k: v.half() for k, v in sd.items()}
    src = write_lora(tmp_path / "mix.safetensors", sd, dict(BASE_METADATA))
    dst = tmp_path / "out.safetensors"
    res = lora_resize.resize(src, dst, method="sv_fro", param=0.9, as_lora=True)
    assert res.format == "lycoris" and res.precision == "fp16"
    out, meta = load_st(dst)
    assert {v.dtype for v in out.values()} == {torch.float16}
    refs = {"lora_te_text_model_encoder_layers_1_mlp_fc2": ref_locon,
            "lora_unet_mid_block_attentions_0_proj_out": ref_loha,
            "lora_unet_up_blocks_0_attentions_0_proj_in": ref_lokr,
            "lora_unet_up_blocks_0_resnets_0_conv1": ref_locon}
    assert sorted(out) == sorted(n + s for n in refs for s in (DOWN, UP, ALPHA))
    rows = {r.name: r for r in res.layers}
    for n, fn in refs.items():
        ref = fn(sd, n)
        S = torch.linalg.svdvals(ref)
        fro = torch.sqrt(torch.cumsum(S ** 2, 0) / (S ** 2).sum())
        k = int((fro < 0.9 - 1e-12).sum()) + 1
        assert out[n + DOWN].shape[0] == k == rows[n].new_rank, n
        assert rel_err(out_dw(out, n), best_rank_k(ref, k)) < 3e-3, n
    assert any("1 LoHa" in x and "1 LoKr" in x and "1 Tucker LoCon" in x for x in res.notes), res.notes
    assert json.loads(meta["lora_resize"])["format"] == "lycoris"


def test_plain_kohya_file_stays_kohya(tmp_path, standard_lora):
    """A plain kohya file ties between the two families and kohya (registered first) wins; adding one LyCORIS
    module tips it to lycoris, and the kohya pairs come out the same either way."""
    reader = open_tensor_file(standard_lora)
    try:
        assert detect(reader.infos(), reader.metadata).format == "kohya"
    finally:
        reader.close()
    sd, _ = load_st(standard_lora)
    a = lora_resize.resize(standard_lora, tmp_path / "a.safetensors", rank=4, precision="float")
    sd2 = dict(sd)
    sd2.update(loha(PW, 16, 16, 2, alpha=1.0, seed=31))
    src2 = write_lora(tmp_path / "b_in.safetensors", sd2, dict(BASE_METADATA))
    b = lora_resize.resize(src2, tmp_path / "b.safetensors", rank=4, precision="float")
    assert (a.format, b.format) == ("kohya", "lycoris")
    out_a, _ = load_st(tmp_path / "a.safetensors")
    out_b, _ = load_st(tmp_path / "b.safetensors")
    for k, v in out_a.items():
        assert torch.equal(out_b[k], v), k
    assert set(out_b) - set(out_a) == {PW + DOWN, PW + UP, PW + ALPHA}


def test_dora_scale_kept_and_noted(tmp_path):
    sd = loha(LIN, 20, 16, 2, alpha=1.0, seed=41)
    sd.update(make_state_dict([Spec(PW, 12, 10, 4, alpha=2.0)], seed=42))
    mags = {LIN + ".dora_scale": torch.rand(20, 1) + 0.5, PW + ".dora_scale": torch.rand(12, 1) + 0.5}
    sd.update(mags)
    src = write_lora(tmp_path / "in.safetensors", sd, dict(BASE_METADATA))
    res = lora_resize.resize(src, tmp_path / "out.safetensors", rank=2, precision="float")
    assert res.format == "lycoris"  # the DoRA magnitudes are LyCORIS keys: kohya alone would not mention them
    out, _ = load_st(tmp_path / "out.safetensors")
    for k, v in mags.items():
        assert torch.equal(out[k], v)
    assert any("2 DoRA" in n and "kept as trained" in n for n in res.notes), res.notes


PASS_MODULES = {
    "lycoris_oft": {"oft_blocks": (4, 5, 5), "rescale": (20, 1), "alpha": ()},
    "lycoris_ia3": {"weight": (16,), "on_input": ()},
    "lycoris_glora": {"a1.weight": (2, 12), "a2.weight": (12, 2), "b1.weight": (2, 12), "b2.weight": (12, 2),
                      "alpha": ()},
    "lycoris_full": {"diff": (12, 10), "diff_b": (12,)},
    "lycoris_norm": {"w_norm": (12,), "b_norm": (12,)},
}


def test_unresizable_kinds_pass_through_listed(tmp_path, capsys):
    g = _g(51)
    sd = loha(LIN, 20, 16, 2, alpha=1.0, seed=52)
    for n, parts in PASS_MODULES.items():
        for p, shape in parts.items():
            sd[f"{n}.{p}"] = (torch.tensor(1, dtype=torch.int64) if p == "on_input" else
                              _r(g, *shape) if shape else torch.tensor(1.5))
    sd["lycoris_conv1d.lora_down.weight"] = _r(g, 2, 6, 3)  # a conv1d LoCon: resized like conv2d
    sd["lycoris_conv1d.lora_up.weight"] = _r(g, 8, 2, 1)
    src = write_lora(tmp_path / "in.safetensors", sd, dict(BASE_METADATA))
    dst = tmp_path / "out.safetensors"
    rc = main(["resize", str(src), "-o", str(dst), "--rank", "1", "--precision", "float"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    out, _ = load_st(dst)
    for k, v in sd.items():
        if not k.startswith((LIN, "lycoris_conv1d")):
            assert torch.equal(out[k], v), k
    assert {LIN + DOWN, LIN + UP, LIN + ALPHA} <= set(out)
    for kind, n in (("OFT/BOFT", "lycoris_oft"), ("(IA)^3", "lycoris_ia3"), ("GLoRA", "lycoris_glora")):
        assert any(f"1 {kind} module(s) copied, not resized" in line and n in line for line in cap.out.splitlines()), \
            (kind, cap.out)
    # full and bias diffs and norms are companions of any family's layers: copied, and counted by kind
    copied = next(line for line in cap.out.splitlines() if "copied unchanged:" in line)
    assert "1 full diff" in copied and "1 bias diff" in copied and "2 norm" in copied, copied
    assert out["lycoris_conv1d.lora_down.weight"].shape == (1, 6, 3)
    assert out["lycoris_conv1d.lora_up.weight"].shape == (8, 1, 1)
    want = best_rank_k(sd["lycoris_conv1d.lora_up.weight"].reshape(8, 2).double()
                       @ sd["lycoris_conv1d.lora_down.weight"].reshape(2, 18).double(), 1)
    got = (out["lycoris_conv1d.lora_up.weight"].reshape(8, 1).double()
           @ out["lycoris_conv1d.lora_down.weight"].reshape(1, 18).double() * float(out["lycoris_conv1d.alpha"]))
    assert rel_err(got, want) < 1e-6


def _drop(sd, part):
    return {k: v for k, v in sd.items() if not k.endswith("." + part)}


BROKEN = {
    "loha_missing_w2_b": (lambda: _drop(loha(LIN, 12, 10, 2, alpha=1.0), "hada_w2_b"), "hada_w2_b"),
    "loha_one_tucker_core": (lambda: _drop(loha(CONV, 12, 8, 2, kernel=3, tucker=True), "hada_t2"), "hada_t2"),
    "lokr_w1_and_w1_a": (lambda: {**lokr(LIN, 2, 2, 6, 5, r=2), f"{LIN}.lokr_w1_a": torch.ones(2, 2),
                                  f"{LIN}.lokr_w1_b": torch.ones(2, 2)}, "lokr_w1"),
    "lokr_missing_w2": (lambda: _drop(_drop(lokr(LIN, 2, 2, 6, 5, r=2), "lokr_w2_a"), "lokr_w2_b"), "lokr_w2"),
    "locon_mid_without_up": (lambda: _drop(locon_tucker(CONV, 12, 8, 2), "lora_up.weight"), "lora_up"),
    "mixed_kinds": (lambda: {**loha(LIN, 12, 10, 2), f"{LIN}.lokr_w1": torch.ones(2, 2)}, "mixes"),
    "loha_shapes_do_not_chain": (lambda: {**loha(LIN, 12, 10, 2), f"{LIN}.hada_w2_b": torch.ones(3, 10)},
                                 "do not chain"),
    "tucker_mid_bad_rank": (lambda: {**locon_tucker(CONV, 12, 8, 2), f"{CONV}.lora_mid.weight":
                                     torch.ones(3, 2, 3, 3)}, "chain"),
    "dora_scale_alone": (lambda: {**loha(LIN, 12, 10, 2), "lycoris_x.dora_scale": torch.ones(4, 1)},
                         "lycoris_x.dora_scale"),
    "stray_alpha": (lambda: {**loha(LIN, 12, 10, 2), "lycoris_y.alpha": torch.tensor(1.0)}, "lycoris_y.alpha"),
    "peft_loha": (lambda: loha("base_model.model.layers.0.q_proj", 12, 10, 2), "PEFT"),
    "lokr_t1": (lambda: {**lokr(LIN, 2, 2, 6, 5, r=2), f"{LIN}.lokr_t1": torch.ones(2, 2)}, "lokr_t1"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_half_recognised_module_is_an_error(tmp_path, capsys, case):
    build, words = BROKEN[case]
    src = write_lora(tmp_path / "in.safetensors", build(), dict(BASE_METADATA))
    before = file_sha(src)
    dst = tmp_path / "out.safetensors"
    rc = main(["resize", str(src), "-o", str(dst), "--rank", "2"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("lora-resize: error:") and words in err, err
    assert not dst.exists() and file_sha(src) == before
    with pytest.raises(LoraStructureError):
        lora_resize.resize(src, dst, rank=2)


@pytest.mark.parametrize("fault", ["nan", "huge_alpha"])
def test_numerical_faults_named(tmp_path, capsys, fault):
    sd = loha(LIN, 12, 10, 2, alpha=1.0)
    if fault == "nan":
        sd[f"{LIN}.hada_w2_a"][3, 1] = float("nan")
    else:
        sd[LIN + ALPHA] = torch.tensor(3e38)
    src = write_lora(tmp_path / "in.safetensors", sd, dict(BASE_METADATA))
    dst = tmp_path / "out.safetensors"
    rc = main(["resize", str(src), "-o", str(dst), "--rank", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and LIN in err and not dst.exists(), err


def test_merge_reads_lycoris_inputs(tmp_path):
    """The merge command stacks a LoHa and a LoKr of the same layer through the same loaders."""
    from lora_resize.ops.merge import merge
    sd1 = loha(LIN, 24, 20, 2, alpha=1.0, seed=61)
    sd2 = lokr(LIN, 4, 4, 6, 5, r=2, alpha=3.0, seed=62)
    a = write_lora(tmp_path / "a.safetensors", sd1, dict(BASE_METADATA))
    b = write_lora(tmp_path / "b.safetensors", sd2, dict(BASE_METADATA))
    dst = tmp_path / "m.safetensors"
    merge([str(a), str(b) + ":0.5"], dst, rank=12, precision="float")
    out, _ = load_st(dst)
    want = ref_loha(sd1, LIN) + 0.5 * ref_lokr(sd2, LIN)
    assert rel_err(out_dw(out, LIN), want) < 2e-5


@pytest.mark.parametrize("sizes", [(12, 10, 2, 3), (10, 12, 4, 4), (30, 8, 3, 3)])
def test_structured_pairs_are_exact_and_never_wider_than_the_layer(sizes):
    """The Khatri-Rao and Kronecker pairs reproduce their products; when r1*r2 exceeds min(out, in) the pair
    falls back to the dense update beside an identity, so the engine never sees an inner size above the layer's."""
    from lora_resize.formats.lycoris import khatri_rao_pair, kron_pair
    m, n, r1, r2 = sizes
    g = _g(71)
    a1, b1, a2, b2 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((m, r1), (r1, n), (m, r2), (r2, n)))
    up, down = khatri_rao_pair(a1, b1, a2, b2)
    assert up.shape[1] == down.shape[0] <= min(m, n)
    assert rel_err(up @ down, (a1 @ b1) * (a2 @ b2)) < 1e-12
    u1, v1, u2, v2 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((3, r1), (r1, 2), (m, r2), (r2, n)))
    up, down = kron_pair(u1, v1, u2, v2)
    assert up.shape[1] == down.shape[0] <= min(3 * m, 2 * n)
    assert rel_err(up @ down, torch.kron(u1 @ v1, u2 @ v2)) < 1e-12


# ----------------------------------------------------------------------------------------------------------------
# The output's network metadata describes what is written


LYCO_ARGS = {"conv_dim": "4", "conv_alpha": "2", "dropout": "0.1", "factor": "8", "use_tucker": "True",
             "full_matrix": "False", "preset": "full", "rs_lora": "False"}
# sd-scripts' networks.lora reads these; conv_dim / conv_alpha only while conv layers are written (written_conv)
STILL_HOLD = {"dropout": "0.1"}
NETWORK_INPUTS = {  # kind -> (the file's modules, algo in its ss_network_args)
    "loha": (lambda: {**loha(LIN, 20, 16, 2, alpha=1.0, seed=61), **loha(PW, 12, 10, 2, alpha=1.0, seed=62)}, "loha"),
    "lokr": (lambda: lokr(LIN, 4, 4, 5, 4, r=2, alpha=1.0, seed=63), "lokr"),
    "locon": (lambda: {**locon_tucker(CONV, 16, 8, 2, alpha=1.0, seed=64),
                       **make_state_dict([Spec(LIN, 20, 16, 4, alpha=2.0)], seed=65)}, "locon"),
    "locon_plain": (lambda: make_state_dict([Spec(LIN, 20, 16, 4, alpha=2.0)], seed=66), "locon"),  # read as kohya
    "mixed": (lambda: {**loha(LIN, 20, 16, 2, alpha=1.0, seed=67), **lokr(PW, 4, 4, 3, 2, r=2, seed=68),
                       **locon_tucker(CONV, 16, 8, 2, alpha=1.0, seed=69)}, "loha"),
}


def lycoris_metadata(algo: str, **extra) -> dict[str, str]:
    return {**BASE_METADATA, "ss_network_module": "lycoris.kohya",
            "ss_network_args": json.dumps({**LYCO_ARGS, "algo": algo, **extra})}


@pytest.mark.parametrize("kind", sorted(NETWORK_INPUTS))
def test_lycoris_written_as_plain_lora_says_so_in_its_metadata(tmp_path, kind):
    """A LyCORIS file (any algo) written as plain LoRA pairs is sd-scripts' networks.lora: the written file's
    ss_network_module says so and its ss_network_args keep only what networks.lora reads (dropouts; conv_dim and
    conv_alpha those of the conv layers written, none without any), never LyCORIS's algo/factor fields."""
    build, algo = NETWORK_INPUTS[kind]
    src = write_lora(tmp_path / "in.safetensors", build(), lycoris_metadata(algo))
    lora_resize.resize(src, tmp_path / "out.safetensors", rank=2, as_lora=True)
    _, meta = load_st(tmp_path / "out.safetensors")
    assert meta["ss_network_module"] == "networks.lora"
    assert json.loads(meta["ss_network_args"]) == {**STILL_HOLD, **written_conv(tmp_path / "out.safetensors")}
    assert meta["ss_base_model_version"] == BASE_METADATA["ss_base_model_version"]  # the rest is kept


def written_conv(path) -> dict[str, str]:
    """conv_dim / conv_alpha of the conv (4-D) pairs in the file at `path` ({} without any): what its
    ss_network_args must say, read from the tensors written."""
    tensors, _ = load_st(path)
    convs = [k[: -len(".lora_down.weight")] for k, t in tensors.items() if k.endswith(".lora_down.weight") and t.dim() == 4]
    if not convs:
        return {}
    name = convs[-1]
    return {"conv_dim": str(tensors[f"{name}.lora_down.weight"].shape[0]),
            "conv_alpha": str(float(tensors[f"{name}.alpha"]))}


def test_flux_lycoris_written_as_plain_lora_names_sd_scripts_flux_module(tmp_path):
    """sd-scripts trains Flux (and Chroma) LoRAs with networks.lora_flux: a Flux LoHa (its keys Flux's) written as
    plain LoRA says so; an SD LoHa whose metadata names Flux stays networks.lora (the keys decide, as convert
    reads them)."""
    from lora_resize.testing import archs
    fn, tiny, _ = archs.NATIVE["flux1"]
    flux = {}
    for i, m in enumerate(s for s in fn(**tiny) if not s.spatial):
        flux.update(loha("lora_unet_" + m.name.replace(".", "_"), m.out, m.inp, 2, alpha=1.0, seed=80 + i))
    for sd, module in ((flux, "networks.lora_flux"), (NETWORK_INPUTS["loha"][0](), "networks.lora")):
        src = write_lora(tmp_path / "in.safetensors", sd, {**lycoris_metadata("loha"), "ss_base_model_version": "flux1"})
        lora_resize.resize(src, tmp_path / "out.safetensors", rank=2)
        _, meta = load_st(tmp_path / "out.safetensors")
        assert meta["ss_network_module"] == module


@pytest.mark.parametrize("first", ["loha", "kohya"])
def test_merged_lycoris_and_lora_are_described_as_plain_lora(tmp_path, first):
    a = write_lora(tmp_path / "a.safetensors", NETWORK_INPUTS["loha"][0](), lycoris_metadata("loha"))
    b = write_lora(tmp_path / "b.safetensors", make_state_dict([Spec(LIN, 20, 16, 4, alpha=2.0)], seed=70),
                   dict(BASE_METADATA))
    lora_resize.merge([a, b] if first == "loha" else [b, a], tmp_path / "m.safetensors", rank=2)
    _, meta = load_st(tmp_path / "m.safetensors")
    assert meta["ss_network_module"] == "networks.lora"
    assert "algo" not in meta.get("ss_network_args", "")


def test_lycoris_with_dora_magnitudes_is_described_as_locon_with_dora(tmp_path):
    """Plain pairs beside DoRA magnitudes (dora_scale) are LyCORIS's LoCon with weight decomposition: the module
    stays lycoris.kohya, the args say algo locon and dora_wd, the factor fields go."""
    sd = {**loha(LIN, 20, 16, 2, alpha=1.0, seed=71), LIN + ".dora_scale": torch.rand(20, 1) + 0.5}
    src = write_lora(tmp_path / "in.safetensors", sd, lycoris_metadata("loha", dora_wd="True", wd_on_output="True"))
    lora_resize.resize(src, tmp_path / "out.safetensors", rank=2)
    _, meta = load_st(tmp_path / "out.safetensors")
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {**STILL_HOLD, **written_conv(tmp_path / "out.safetensors"),
                                                   "preset": "full", "algo": "locon", "dora_wd": "True",
                                                   "wd_on_output": "True"}


def test_lycoris_modules_copied_through_keep_the_network_metadata(tmp_path):
    """With modules that stay LyCORIS (OFT copied as it is), the input's network fields still describe them."""
    sd = {**loha(LIN, 20, 16, 2, alpha=1.0, seed=72), "lycoris_oft.oft_blocks": torch.randn(4, 5, 5),
          "lycoris_oft.alpha": torch.tensor(1.0)}
    meta_in = lycoris_metadata("oft")
    src = write_lora(tmp_path / "in.safetensors", sd, meta_in)
    lora_resize.resize(src, tmp_path / "out.safetensors", rank=2)
    _, meta = load_st(tmp_path / "out.safetensors")
    assert (meta["ss_network_module"], meta["ss_network_args"]) == (meta_in["ss_network_module"],
                                                                    meta_in["ss_network_args"])
