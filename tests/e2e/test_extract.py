"""`lora-resize extract`: a LoRA of W_tuned - W_base, judged against dense float64 SVDs of the true difference
(taken from the pipelines in memory, not from the files the job reads) and, for SD1.5, by diffusers' own loader.

The pair: the tiny SD1.5 pipeline (testing.pipelines) and a copy whose every linear and conv weight gets a known
rank-3 update plus small noise (the to_out biases a shift), saved both as diffusers folders and as single files."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from lora_resize import ResizeOptions, extract
from lora_resize.cli import main
from lora_resize.errors import InputFileError, LoraStructureError, OptionsError
from lora_resize.io.writer import write_safetensors
from lora_resize.models import MODELS, sd
from lora_resize.ops.extract import extraction_analysis
from lora_resize.testing import pipelines

from helpers import best_rank_k, file_sha, load_st, refused_in_one_line, rel_err

DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
TRUE_RANK = 3


def _perturbed(pipe, seed: int = 1, noise: float = 1e-5):
    """A copy of `pipe` whose UNet and text-encoder linear/conv weights get a rank-3 update (decaying so ranks
    differ between settings) plus noise, and the to_out biases a shift."""
    tuned = copy.deepcopy(pipe)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (tuned.unet, tuned.text_encoder):
            for name, mod in model.named_modules():
                if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                    w = mod.weight
                    m, n = w.shape[0], w[0].numel()
                    s = torch.tensor([1.0, 0.5, 0.25])[:TRUE_RANK] * 0.05
                    d = (torch.randn(m, TRUE_RANK, generator=g) * s) @ torch.randn(TRUE_RANK, n, generator=g)
                    w += d.reshape(w.shape) + noise * torch.randn(w.shape, generator=g)
                    if mod.bias is not None and name.endswith("to_out.0"):
                        mod.bias += 0.01
    return tuned


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """(base pipe, tuned pipe, folder with base/, tuned/ (diffusers) and base.safetensors, tuned.safetensors)."""
    root = tmp_path_factory.mktemp("extract")
    base = pipelines.tiny_pipeline("sd1", seed=0)
    tuned = _perturbed(base)
    for name, pipe in (("base", base), ("tuned", tuned)):
        pipelines.save_folder(pipe, root / name)
        pipelines.save_single_file(pipe, root / f"{name}.safetensors")
    return base, tuned, root


def true_delta(base, tuned, name: str) -> torch.Tensor:
    """W_tuned - W_base of kohya module `name` from the pipelines in memory, float64, as a matrix."""
    comp, path = sd.from_kohya(name)
    sds = [getattr(p, comp).state_dict() for p in (base, tuned)]
    key = path + ".weight"
    if key not in sds[0]:  # transformers >= 5 saves CLIP without its text_model wrapper
        key = path.removeprefix("text_model.") + ".weight"
    d = sds[1][key].double() - sds[0][key].double()
    return d.reshape(d.shape[0], -1)


def written(t: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    up, down = t[name + UP].double(), t[name + DOWN].double()
    k = down.shape[0]
    return (up.reshape(up.shape[0], -1) @ down.reshape(k, -1)) * float(t[name + ALPHA]) / k


def names_of(t: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k[: -len(DOWN)] for k in t if k.endswith(DOWN))


@pytest.mark.parametrize("form", ["folder", "single"])
def test_fixed_rank_is_the_best_rank_k_of_the_difference(sd1, tmp_path, form):
    base, tuned, root = sd1
    b, t = (root / "base", root / "tuned") if form == "folder" else (root / "base.safetensors",
                                                                      root / "tuned.safetensors")
    before = {p: file_sha(p) for p in (root / "base.safetensors", root / "tuned.safetensors")}
    r = extract(b, t, tmp_path / "x.safetensors", rank=2, bias_diffs=True)
    tensors, meta = load_st(tmp_path / "x.safetensors")
    names = names_of(tensors)
    # every linear/conv of the UNet and the text encoder differs (133 in the tiny SD1.5 pipeline)
    expected = sum(1 for m in (tuned.unet, tuned.text_encoder) for x in m.modules()
                   if isinstance(x, (torch.nn.Linear, torch.nn.Conv2d)))
    assert len(names) == len(r.layers) == expected
    assert any(n.startswith("lora_te_text_model_") for n in names) and "lora_unet_conv_in" in names
    for name in names:
        D = true_delta(base, tuned, name)
        assert tensors[name + DOWN].shape[0] == 2
        assert float(tensors[name + ALPHA]) == 2.0  # alpha = rank: scale 1
        assert rel_err(written(tensors, name), best_rank_k(D, 2)) < 1e-5, name
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "2"
    assert meta["ss_network_alpha"] == "2.0"
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "2"
    # the bias shift of every to_out is its .diff_b, as ComfyUI adds it
    diffs = [k for k in tensors if k.endswith(".diff_b")]
    assert len(diffs) == sum(1 for n, x in tuned.unet.named_modules() if n.endswith("to_out.0"))
    assert torch.allclose(tensors[diffs[0]].double(), torch.full_like(tensors[diffs[0]].double(), 0.01), atol=1e-6)
    assert {p: file_sha(p) for p in before} == before  # inputs unchanged
    assert any("decomposed exactly" in n or "certified: each written layer" in n for n in r.notes)


def test_dynamic_method_ranks_match_the_dense_spectrum(sd1, tmp_path):
    base, tuned, root = sd1
    extract(root / "base.safetensors", root / "tuned.safetensors", tmp_path / "x.safetensors", method="sv_fro",
            param=0.9)
    tensors, meta = load_st(tmp_path / "x.safetensors")
    ranks = set()
    for name in names_of(tensors):
        S = torch.linalg.svdvals(true_delta(base, tuned, name))
        cum = torch.cumsum(S ** 2, 0) / (S ** 2).sum()
        k = int((cum < 0.9 ** 2 - 1e-12).sum()) + 1
        assert tensors[name + DOWN].shape[0] == k, name
        assert rel_err(written(tensors, name), best_rank_k(true_delta(base, tuned, name), k)) < 1e-5
        ranks.add(k)
    assert len(ranks) > 1 and meta["ss_network_dim"] == "Dynamic"


@pytest.mark.parametrize("budget", [dict(target_size="250KB"), dict(target_fro=0.9)])
def test_budgets_are_exact(sd1, tmp_path, budget):
    base, tuned, root = sd1
    b, t = root / "base.safetensors", root / "tuned.safetensors"
    a = extraction_analysis(b, t, **budget)
    r = extract(b, t, tmp_path / "x.safetensors", **budget)
    size = (tmp_path / "x.safetensors").stat().st_size
    assert size == r.output_bytes == a.chosen.output_bytes  # what the analysis predicts is what is written
    tensors, _ = load_st(tmp_path / "x.safetensors")
    if "target_size" in budget:
        assert size <= 250_000
    else:
        kept = total = 0.0
        for name in names_of(tensors):
            D = true_delta(base, tuned, name)
            kept += float(torch.linalg.norm(written(tensors, name))) ** 2
            total += float(torch.linalg.norm(D)) ** 2
        assert math.sqrt(kept / total) >= 0.9 - 1e-9


def test_rules_and_analysis_command(sd1, tmp_path, capsys):
    base, tuned, root = sd1
    b, t = root / "base", root / "tuned"
    r = extract(b, t, tmp_path / "x.safetensors", rank=3, block_rules=("lora_te_*=drop", "*attn2*=1"))
    tensors, _ = load_st(tmp_path / "x.safetensors")
    names = names_of(tensors)
    assert names and not any(n.startswith("lora_te_") for n in names)
    assert all(tensors[n + DOWN].shape[0] == (1 if "attn2" in n else 3) for n in names)
    assert r.options["rule_hits"]
    assert main(["extract", "--base", str(b), "--tuned", str(t), "--analyze", "-q"]) == 0
    out = capsys.readouterr().out
    assert "lora-resize extract --base" in out and "target_size" in out
    assert not any(p.suffix == ".safetensors" for p in tmp_path.iterdir() if p.name != "x.safetensors")


def test_peft_output_of_one_model_kept_by_the_rules(sd1, tmp_path):
    """A PEFT adapter holds one model: refused while the UNet and the text encoder are both kept, written once a
    drop rule (the one the refusal names) leaves the UNet alone."""
    _, _, root = sd1
    with pytest.raises(LoraStructureError, match="holds one model") as e:
        extract(root / "base", root / "tuned", tmp_path / "a", rank=2, output_format="peft")
    rule = str(e.value).split("--rule '")[1].split("'")[0]
    extract(root / "base", root / "tuned", tmp_path / "a", rank=2, output_format="peft", block_rules=(rule,))
    tensors, _ = load_st(tmp_path / "a" / "adapter_model.safetensors")
    assert tensors and not any("text_model" in k for k in tensors) and any("down_blocks" in k for k in tensors)


def test_cli_writes_and_summarises(sd1, tmp_path, capsys):
    _, _, root = sd1
    dst = tmp_path / "x.safetensors"
    assert main(["extract", "--base", str(root / "base.safetensors"), "--tuned", str(root / "tuned.safetensors"),
                 "-o", str(dst), "--rank", "4", "-q"]) == 0
    out = capsys.readouterr().out
    assert "decomposed exactly" in out and "left out" in out and "biases (--bias-diffs writes" in out
    tensors, _ = load_st(dst)
    assert not any(k.endswith(".diff_b") for k in tensors)
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    helptext = capsys.readouterr().out
    for flag in ("--tuned", "--base", "--analyze", "--bias-diffs", "--target-size", "--rule", "--output-format"):
        assert flag in helptext


def test_refusals_write_nothing(sd1, tmp_path, capsys):
    base, _, root = sd1
    dst = tmp_path / "x.safetensors"
    err = refused_in_one_line(capsys, ["extract", "--base", str(root / "base.safetensors"), "--tuned",
                                       str(root / "base.safetensors"), "-o", str(dst), "--rank", "4"])
    assert "same weights" in err and not dst.exists()
    other = tmp_path / "flux.safetensors"
    pipelines.save_single_file(pipelines.tiny_pipeline("flux", seed=0), other)
    err = refused_in_one_line(capsys, ["extract", "--base", str(root / "base.safetensors"), "--tuned", str(other),
                                       "-o", str(dst), "--rank", "4"])
    assert "different models" in err and not dst.exists()
    err = refused_in_one_line(capsys, ["extract", "--base", str(root / "base"), "--tuned",
                                       str(root / "tuned.safetensors"), "-o", str(dst), "--rank", "4"])
    assert "different models" in err and not dst.exists()
    err = refused_in_one_line(capsys, ["extract", "--base", str(root / "base"), "--tuned", str(root / "tuned"),
                                       "-o", str(dst)])
    assert "--rank" in err and not dst.exists()
    err = refused_in_one_line(capsys, ["extract", "--base", str(root / "base"), "--tuned", str(root / "tuned"),
                                       "-o", str(root / "tuned" / "x.safetensors"), "--rank", "2"])
    assert "inside the input folder" in err and not (root / "tuned" / "x.safetensors").exists()
    # a damaged tuned weight (NaN) is found mid-job: one line, nothing written
    t, meta = load_st(root / "tuned.safetensors")
    key = next(k for k in sorted(t) if k.startswith("model.diffusion_model.") and k.endswith("proj_in.weight"))
    t[key] = t[key].clone()
    t[key][0, 0] = float("nan")
    bad = tmp_path / "bad.safetensors"
    with open(bad, "wb") as f:  # write_safetensors refuses NaN: write the bytes as the safetensors library does
        from safetensors.torch import save
        f.write(save(t, meta))
    with pytest.raises(InputFileError, match="NaN"):
        extract(root / "base.safetensors", bad, dst, rank=2)
    assert not dst.exists() and not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_half_and_fp8_inputs(sd1, tmp_path, dtype):
    """Checkpoints stored in fp16 / bf16, or fp8 with per-tensor `weight_scale` (ComfyUI's scaled fp8): the
    difference is that of the weights as stored (fp8 times its scale), the factors saved in the input's precision
    (fp8: bf16)."""
    base_pipe, tuned_pipe, _ = sd1
    stored = {}
    for name, pipe in (("base", base_pipe), ("tuned", tuned_pipe)):
        state = pipelines.single_file_state(pipe)
        out = {}
        for k, v in state.items():
            if dtype in (torch.float16, torch.bfloat16) or v.ndim < 2:
                out[k] = v.to(dtype if dtype != torch.float8_e4m3fn else torch.float32).contiguous()
                continue
            scale = v.abs().max().clamp(min=1e-12) / 448
            out[k] = (v / scale).to(torch.float8_e4m3fn).contiguous()
            out[k[: -len(".weight")] + ".weight_scale"] = scale.reshape(()).float()
        stored[name] = out
        write_safetensors(tmp_path / f"{name}.safetensors", out, {})
    r = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "x.safetensors", rank=2)
    tensors, _ = load_st(tmp_path / "x.safetensors")
    assert r.precision == {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float8_e4m3fn: "bf16"}[dtype]
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"

    def read(which):
        w = stored[which][key + ".weight"].double()
        s = stored[which].get(key + ".weight_scale")
        return w * float(s) if s is not None else w
    D = read("tuned") - read("base")
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float8_e4m3fn: 1.5e-2}[dtype]
    assert tensors[name + DOWN].dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[r.precision]
    assert rel_err(written(tensors, name), best_rank_k(D, 2)) < tol


@pytest.mark.thirdparty
@pytest.mark.parametrize("layout", [None, "diffusers"])
def test_diffusers_loads_the_extracted_lora(sd1, tmp_path, layout):
    """diffusers' load_lora_weights + fuse_lora on the base pipeline, the default (kohya) layout and diffusers':
    every linear and conv weight of the UNet and the text encoder becomes base + the best rank-k approximation of
    its difference."""
    from helpers import loader_messages
    base, tuned, root = sd1
    extract(root / "base", root / "tuned", tmp_path / "x.safetensors", rank=2, output_format=layout)
    pipe = copy.deepcopy(base)
    with loader_messages() as msgs:
        pipe.load_lora_weights(str(tmp_path / "x.safetensors"))
        pipe.fuse_lora(components=["unet", "text_encoder"])
    assert msgs == []
    checked = 0
    for comp in ("unet", "text_encoder"):
        fused, before, after = (dict(getattr(p, comp).named_modules()) for p in (pipe, base, tuned))
        for path, mod in before.items():
            if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            w0 = mod.weight.detach().double()
            got = (fused[path].weight.detach().double() - w0).reshape(w0.shape[0], -1)
            D = (after[path].weight.detach().double() - w0).reshape(w0.shape[0], -1)
            assert rel_err(got, best_rank_k(D, 2)) < 1e-4, (comp, path)
            checked += 1
    assert checked == 133


def test_flux_native_and_diffusers_layouts(tmp_path):
    """Flux.1: a native single file gives kohya names of the native weights; a diffusers folder gives the same
    names, q/k/v fused into the native qkv (the SVD of the stacked difference)."""
    base = pipelines.tiny_pipeline("flux", seed=0)
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mod in tuned.transformer.modules():
            if isinstance(mod, torch.nn.Linear):
                m, n = mod.weight.shape
                mod.weight += 0.05 * torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g)
    for name, pipe in (("base", base), ("tuned", tuned)):
        pipelines.save_single_file(pipe, tmp_path / f"{name}.safetensors")
        pipelines.save_folder(pipe, tmp_path / name)
    nb = pipelines.flux_native_state(base.transformer.state_dict())
    nt = pipelines.flux_native_state(tuned.transformer.state_dict())
    flux = MODELS["flux1"]
    results = {}
    for form, (b, t) in {"single": ("base.safetensors", "tuned.safetensors"), "folder": ("base", "tuned")}.items():
        r = extract(tmp_path / b, tmp_path / t, tmp_path / f"{form}.safetensors", rank=2)
        tensors, meta = load_st(tmp_path / f"{form}.safetensors")
        assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_base_model_version"] == "flux1"
        names = names_of(tensors)
        assert "lora_unet_double_blocks_0_img_attn_qkv" in names
        for name in names:
            native, _ = flux.native_of(name.removeprefix("lora_unet_"), flat=True)
            D = (nt[native + ".weight"].double() - nb[native + ".weight"].double())
            assert rel_err(written(tensors, name), best_rank_k(D, 2)) < 1e-5, (form, name)
        results[form] = set(names)
        assert r.layers
    assert results["single"] == results["folder"]


def test_sdxl_single_file_open_clip_thirds(tmp_path):
    """SDXL's single file keeps its second text encoder as OpenCLIP (q, k, v as thirds of attn.in_proj_weight):
    each third is its own module under CLIP's name (lora_te2_..._q_proj), the best rank-k of its rows'
    difference; its biases' thirds are the modules' .diff_b."""
    base = pipelines.tiny_pipeline("sdxl", seed=0)
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for mod in tuned.text_encoder_2.modules():
            if isinstance(mod, torch.nn.Linear) and mod.weight.shape[0] == mod.weight.shape[1]:
                mod.weight += 0.01 * torch.randn(mod.weight.shape, generator=g)
                mod.bias += 0.01 * torch.randn(mod.bias.shape, generator=g)
        q = tuned.text_encoder_2.text_model.encoder.layers[0].self_attn.v_proj
        q.weight -= 0.01 * torch.randn(q.weight.shape, generator=g)  # one more change on v
    for name, pipe in (("base", base), ("tuned", tuned)):
        pipelines.save_single_file(pipe, tmp_path / f"{name}.safetensors")
    r = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "x.safetensors", rank=2,
                bias_diffs=True)
    tensors, _ = load_st(tmp_path / "x.safetensors")
    names = names_of(tensors)
    assert names and all(n.startswith("lora_te2_text_model_encoder_layers_") for n in names)
    assert {n.rsplit("_", 2)[-2] for n in names if "self_attn" in n} >= {"q", "k", "v", "out"}
    sdt, sdb = tuned.text_encoder_2.state_dict(), base.text_encoder_2.state_dict()
    for name in names:
        path = sd.from_kohya(name)[1]
        key = path if path + ".weight" in sdt else path.removeprefix("text_model.")
        D = sdt[key + ".weight"].double() - sdb[key + ".weight"].double()
        assert rel_err(written(tensors, name), best_rank_k(D, 2)) < 1e-5, name
        assert torch.allclose(tensors[name + ".diff_b"].double(), sdt[key + ".bias"].double()
                              - sdb[key + ".bias"].double(), atol=1e-7), name
    assert len(r.layers) == len(names)


def test_extract_bakes_scale_rules_and_obeys_rank_constraints(sd1, tmp_path):
    """Issue 22's parts together: a scale rule multiplies a module's difference before its rank is chosen, and
    --rank-multiple rounds every chosen rank up: each written update is the best rank-k of strength * D, k a
    multiple of 4 (or the layer's size)."""
    base, tuned, root = sd1
    r = extract(root / "base.safetensors", root / "tuned.safetensors", tmp_path / "x.safetensors", method="sv_fro",
                param=0.9, rank=8, rank_multiple=4, block_rules=("*attn1_to_q=scale:-0.5",), precision="float")
    tensors, _ = load_st(tmp_path / "x.safetensors")
    scaled = [n for n in names_of(tensors) if n.endswith("attn1_to_q")]
    assert scaled and len(r.layers) == len(names_of(tensors))
    for row in r.layers:
        k = tensors[row.name + DOWN].shape[0]
        D = true_delta(base, tuned, row.name)
        assert k == row.new_rank and (k % 4 == 0 or k == min(D.shape)), (row.name, k)
        strength = -0.5 if row.name in scaled else 1.0
        assert rel_err(written(tensors, row.name), best_rank_k(strength * D, k)) < 1e-5, row.name


def _state(root: Path, name: str) -> dict[str, torch.Tensor]:
    return load_st(root / f"{name}.safetensors")[0]


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def test_dtype_rounding_is_told_from_the_fine_tune(sd1, tmp_path, capsys):
    """Checkpoints whose dtypes differ: a note says so; a tensor whose every element differs by at most the coarser
    dtype's rounding (eps x max|W|) is the cast, not the fine-tune - left out, and refused when that is all."""
    _, _, root = sd1
    base, tuned = _state(root, "base"), _state(root, "tuned")
    write_safetensors(tmp_path / "b16.safetensors", _cast(base, torch.float16), {})
    dst = tmp_path / "x.safetensors"
    # the same weights cast to fp16: only rounding - refused, nothing written
    err = refused_in_one_line(capsys, ["extract", "--base", str(root / "base.safetensors"), "--tuned",
                                       str(tmp_path / "b16.safetensors"), "-o", str(dst), "--rank", "4"])
    assert "only by the rounding" in err and "float32 in --base, float16 in --tuned" in err and not dst.exists()
    # fp16 vs bf16 casts of one model: rounding as well (the coarser dtype, bf16, bounds it)
    write_safetensors(tmp_path / "bbf.safetensors", _cast(base, torch.bfloat16), {})
    err = refused_in_one_line(capsys, ["extract", "--base", str(tmp_path / "b16.safetensors"), "--tuned",
                                       str(tmp_path / "bbf.safetensors"), "-o", str(dst), "--rank", "4"])
    assert "only by the rounding" in err and "float16 in --base, bfloat16 in --tuned" in err
    # one element moved past the bound (3 eps of fp16) is a difference: that one weight is extracted, with a note
    key = next(k for k in sorted(base) if k.startswith("model.diffusion_model.") and k.endswith("proj_in.weight"))
    moved = _cast(base, torch.float16)
    moved[key] = moved[key].clone()
    moved[key][0, 0] = (moved[key][0, 0].double() * (1 + 3 * torch.finfo(torch.float16).eps)).half()
    write_safetensors(tmp_path / "m16.safetensors", moved, {})
    r = extract(root / "base.safetensors", tmp_path / "m16.safetensors", dst, rank=1)
    note = next(n for n in r.notes if n.startswith("dtypes differ"))
    assert f"{len(base)} tensor(s) are float32 in --base and float16 in --tuned" in note
    cast = [k for k in base if k != key and not torch.equal(base[k].double(), base[k].half().double())]
    assert cast and f"{len(cast)} of them differ only so" in note
    assert any(n.startswith("1 weight(s) differ") for n in r.notes)
    assert not any("VAE" in n or n.startswith("left out") and "biases" in n for n in r.notes), r.notes
    # a real fine-tune across dtypes (fp16 base, bf16 tuned) is extracted, the note telling of the cast
    write_safetensors(tmp_path / "tbf.safetensors", _cast(tuned, torch.bfloat16), {})
    r = extract(tmp_path / "b16.safetensors", tmp_path / "tbf.safetensors", dst, rank=2)
    assert any(n.startswith("dtypes differ") and "float16 in --base and bfloat16 in --tuned" in n for n in r.notes)
    assert r.layers


def test_wrong_arch_is_refused(sd1, tmp_path, capsys):
    """An --arch that names few of the differing weights is refused, not a LoRA of the few it names."""
    _, _, root = sd1
    dst = tmp_path / "x.safetensors"
    err = refused_in_one_line(capsys, ["extract", "--base", str(root / "base.safetensors"), "--tuned",
                                       str(root / "tuned.safetensors"), "-o", str(dst), "--rank", "4",
                                       "--arch", "flux1"])
    assert "--arch flux1 is not these checkpoints' model" in err and not dst.exists()


def test_lora_files_are_not_checkpoints(sd1, tmp_path, capsys):
    """A LoRA file (kohya pairs, LyCORIS LoKr) given as --base or --tuned is named as such."""
    _, _, root = sd1
    lora = tmp_path / "lora.safetensors"
    extract(root / "base.safetensors", root / "tuned.safetensors", lora, rank=2)
    lokr = tmp_path / "lokr.safetensors"
    write_safetensors(lokr, {f"lora_unet_m{i}.{k}": torch.randn(4, 4) for i in range(3)
                             for k in ("lokr_w1", "lokr_w2")} | {f"lora_unet_m{i}.alpha": torch.tensor(1.0)
                                                                 for i in range(3)}, {})
    dst = tmp_path / "x.safetensors"
    for b, t, role, bad in ((root / "base.safetensors", lora, "--tuned", lora), (lora, lora, "--base", lora),
                            (lokr, lokr, "--base", lokr)):
        err = refused_in_one_line(capsys, ["extract", "--base", str(b), "--tuned", str(t), "-o", str(dst),
                                           "--rank", "4"])
        assert f"{role} {bad} is a LoRA file, not a checkpoint" in err and not dst.exists()


def test_unpaired_weights_are_noted(sd1, tmp_path):
    _, _, root = sd1
    tuned = _state(root, "tuned")
    gone = sorted(k for k in tuned if k.startswith("model.diffusion_model.output_blocks."))[:5]
    for k in gone:
        del tuned[k]
    tuned["model.diffusion_model.extra.weight"] = torch.randn(4, 4)
    write_safetensors(tmp_path / "t.safetensors", tuned, {})
    r = extract(root / "base.safetensors", tmp_path / "t.safetensors", tmp_path / "x.safetensors", rank=2)
    assert any(f"left out: {len(gone)} differing weights only in --base" in n and gone[0] in n for n in r.notes)
    assert any("left out: 1 differing weights only in --tuned" in n and "extra.weight" in n for n in r.notes)


def test_options_extract_cannot_honour_are_refused(sd1, tmp_path, capsys):
    _, _, root = sd1
    b, t, dst = root / "base.safetensors", root / "tuned.safetensors", tmp_path / "x.safetensors"
    cmd = ["extract", "--base", str(b), "--tuned", str(t), "-o", str(dst)]
    assert "--as-lora" in refused_in_one_line(capsys, cmd + ["--rank", "4", "--as-lora"])
    err = refused_in_one_line(capsys, cmd + ["--rank", "4", "--base-variant", "fp16"])
    assert "--base-variant" in err and "single file" in err
    for extra in (["--method", "base_fro", "--param", "0.01"], ["--target-error", "0.01"]):
        err = refused_in_one_line(capsys, cmd + extra)
        assert "extract has no base model to measure against" in err and not dst.exists()
    with pytest.raises(OptionsError, match="no base model"):  # the library refuses as the CLI does
        extract(b, t, dst, method="base_fro", param=0.01)
    with pytest.raises(OptionsError, match="no base model"):
        extraction_analysis(b, t, target_error=0.01)


def test_analyze_points_to_a_measure_extract_has(sd1, capsys):
    _, _, root = sd1
    a = extraction_analysis(root / "base.safetensors", root / "tuned.safetensors")
    assert "--base MODEL --effect" not in a.recommended_reason
    assert f"lora-resize analyze OUT.safetensors --base {root / 'base.safetensors'} --effect" in a.recommended_reason


def test_missing_and_damaged_inputs_are_named(sd1, tmp_path, capsys):
    _, _, root = sd1
    dst = tmp_path / "x.safetensors"
    for role in ("--base", "--tuned"):
        paths = {"--base": str(root / "base.safetensors"), "--tuned": str(root / "tuned.safetensors")}
        paths[role] = str(tmp_path / "nope.safetensors")
        err = refused_in_one_line(capsys, ["extract", "--base", paths["--base"], "--tuned", paths["--tuned"],
                                           "-o", str(dst), "--rank", "2"])
        assert f"{role} {tmp_path / 'nope.safetensors'} not found" in err
    from safetensors.torch import save
    for role in ("base", "tuned"):
        t, meta = load_st(root / f"{role}.safetensors")
        key = next(k for k in sorted(t) if k.startswith("model.diffusion_model.") and k.endswith("proj_in.weight"))
        t[key] = t[key].clone()
        t[key][0, 0] = float("inf")
        (tmp_path / f"{role}.safetensors").write_bytes(save(t, meta))
        paths = {"base": root / "base.safetensors", "tuned": root / "tuned.safetensors"}
        paths[role] = tmp_path / f"{role}.safetensors"
        with pytest.raises(InputFileError, match=f"NaN or Inf in --{role} {paths[role]}"):
            extract(paths["base"], paths["tuned"], dst, rank=2)
        assert not dst.exists()


@pytest.mark.parametrize("form", ["folder", "single"])
def test_no_conversion_note_for_names_the_user_never_had(sd1, tmp_path, form):
    """The differences are read under an internal LoRA naming: the summary must not say the user's key names were
    converted (it said 'key names converted from comfy to kohya' for an original SD checkpoint)."""
    _, _, root = sd1
    b, t = (root / "base", root / "tuned") if form == "folder" else (root / "base.safetensors",
                                                                      root / "tuned.safetensors")
    r = extract(b, t, tmp_path / "x.safetensors", rank=2)
    assert not [n for n in r.notes if n.startswith("key names ")], r.notes
