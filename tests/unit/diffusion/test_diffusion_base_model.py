"""lora_resize.diffusion.BaseModel on the tiny pipelines (lora_resize.testing.pipelines): a LoRA applied in memory
equals the dense float64 merge, is undone bit for bit, and its effect on the denoiser's output is measured at the
base's own inputs."""
from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("diffusers")

import lora_resize
from lora_resize.diffusion import BaseModel, effect_error
from lora_resize.errors import InputFileError, LoraStructureError, OptionsError
from lora_resize.io.reader import open_tensor_file
from lora_resize.io.writer import write_safetensors
from lora_resize.testing import pipelines

SIZE = (pipelines.SIZE, pipelines.SIZE)


def read(path) -> dict[str, torch.Tensor]:
    with open_tensor_file(path) as r:
        return {k: r.get(k) for k in r.infos()}, dict(r.metadata)


@pytest.fixture(scope="module")
def lora_of(tiny_base, tmp_path_factory):
    """lora_of(family) -> (tensors, metadata, path) of tiny_lora (rank 8, text encoders too) for that pipeline."""
    root = tmp_path_factory.mktemp("loras")
    made = {}

    def get(family: str):
        if family not in made:
            folder, _ = tiny_base(family)
            pipe = pipelines.tiny_pipeline(family, seed=0)
            path = pipelines.tiny_lora(pipe, root / f"{family}.safetensors", rank=8)
            made[family] = (*read(path), path)
        return made[family]
    return get


def snapshot(bm: BaseModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in bm.weights.items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", pipelines.FAMILIES)
def test_the_patch_is_the_dense_float64_merge_and_is_undone_bit_for_bit(family, tiny_base, lora_of):
    """Every weight inside `patched` equals the reference merge (W + scale * up @ down in float64, rounded once;
    Flux's fused qkv and linear1 split into their diffusers parts, text encoders included); after it, and after an
    error inside it, every weight is the original's bit for bit."""
    folder, _ = tiny_base(family)
    tensors, metadata, _ = lora_of(family)
    ref = pipelines.tiny_pipeline(family, seed=0)
    merged = pipelines.merge_lora(ref, tensors)
    want = {f"{name}.{k}": p.detach() for name, c in ref.components.items() if isinstance(c, torch.nn.Module)
            for k, p in c.named_parameters()}
    with BaseModel(folder) as bm:
        before = snapshot(bm)
        with bm.patched(tensors, metadata) as report:
            assert report.matched == report.modules == merged and not report.unmatched
            changed = {k for k in want if not torch.equal(bm.weights[k], before[k])}
            assert any(k.startswith("text_encoder.") for k in changed)  # the text encoders are patched too
            for k, w in want.items():
                assert torch.equal(bm.weights[k], w), k
        assert same(snapshot(bm), before)
        with pytest.raises(ZeroDivisionError):
            with bm.patched(tensors, metadata):
                1 / 0
        assert same(snapshot(bm), before)


def conv_lora(bm: BaseModel) -> dict[str, torch.Tensor]:
    """A kohya LoCon for SD1: a 3x3 conv (down r x in x 3 x 3, up out x r x 1 x 1) and a linear, alpha 2 of rank 4."""
    g = torch.Generator().manual_seed(5)
    conv = bm.weights["unet.down_blocks.0.resnets.0.conv1.weight"]
    lin = bm.weights["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
    out = {}
    for name, w in (("lora_unet_down_blocks_0_resnets_0_conv1", conv),
                    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", lin)):
        kernel = tuple(w.shape[2:])
        out[f"{name}.lora_down.weight"] = torch.randn(4, w.shape[1], *kernel, generator=g) * 0.1
        out[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], 4, *((1,) * len(kernel)), generator=g) * 0.1
        out[f"{name}.alpha"] = torch.tensor(2.0)
    return out


def test_a_conv_and_a_linear_module_are_patched_as_their_dense_reference(tiny_base):
    folder, _ = tiny_base("sd1")
    with BaseModel(folder) as bm:
        lora = conv_lora(bm)
        before = snapshot(bm)
        with bm.patched(lora, {}):
            for name, key in (("lora_unet_down_blocks_0_resnets_0_conv1", "unet.down_blocks.0.resnets.0.conv1.weight"),
                              ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight")):
                W = before[key].double()
                up, down = lora[f"{name}.lora_up.weight"].double(), lora[f"{name}.lora_down.weight"].double()
                ref = W + 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(W.shape)
                assert torch.equal(bm.weights[key], ref.float()), key
        assert same(snapshot(bm), before)


@pytest.fixture(scope="module")
def sd1(tiny_base):
    folder, _ = tiny_base("sd1")
    with BaseModel(folder) as bm:
        yield bm


@pytest.fixture(scope="module")
def probes(sd1):
    return sd1.probes(prompts=["a red cube"], seeds=[0, 1], timesteps=3, size=SIZE)


def test_probes_record_the_base_denoisers_input_at_each_step(sd1, probes):
    assert len(probes) == 2 and probes.runs() == [("a red cube", 0), ("a red cube", 1)]
    assert all(len(calls) == 3 for calls in probes.inputs)  # one denoiser call per step
    assert not torch.equal(probes.inputs[0][0], probes.inputs[1][0])  # the seeds' noises differ
    eps = sd1.predict(probes)
    assert [tuple(e.shape) for e in eps] == [(3, *probes.inputs[0][0].shape)] * 2 and eps[0].dtype == torch.float64


def test_the_same_tensors_patched_twice_predict_the_same_and_effect_error_0(sd1, probes, lora_of):
    tensors, metadata, _ = lora_of("sd1")
    eps_b = sd1.predict(probes)
    with sd1.patched(tensors, metadata):
        eps_o = sd1.predict(probes)
    with sd1.patched(tensors, metadata):
        eps_again = sd1.predict(probes)
    assert all(torch.equal(a, b) for a, b in zip(eps_o, eps_again))
    assert all(torch.equal(a, b) for a, b in zip(eps_b, sd1.predict(probes)))  # the base is back
    assert not any(torch.equal(a, b) for a, b in zip(eps_o, eps_b))
    assert effect_error(eps_again, eps_o, eps_b) == 0.0
    assert effect_error(eps_b, eps_o, eps_b) == 1.0
    with sd1.patched(None, {}) as report:  # no LoRA: the base
        assert report.modules == 0 and all(torch.equal(a, b) for a, b in zip(eps_b, sd1.predict(probes)))


@pytest.mark.parametrize("family", pipelines.FAMILIES)
def test_effect_error_grows_as_ranks_shrink_and_an_exact_copy_has_none(family, tiny_base, lora_of):
    """lora_resize.resized at ranks 8 (the LoRA's own), 4, 2, 1 loses more and more of the original's change to
    the prediction; a resize that copies the factors bit for bit predicts bit for bit what the original does."""
    folder, _ = tiny_base(family)
    tensors, metadata, path = lora_of(family)
    with BaseModel(folder) as bm:
        probes = bm.probes(prompts=["a red cube"], seeds=[0], timesteps=2, size=SIZE)
        eps_b = bm.predict(probes)
        with bm.patched(tensors, metadata):
            eps_o = bm.predict(probes)
        errors = []
        for rank in (8, 4, 2, 1):
            r = lora_resize.resized(path, rank=rank)
            t0 = time.perf_counter()
            with bm.patched(r.tensors, r.metadata):
                eps_s = bm.predict(probes)
            print(f"{family}: patch + predict {time.perf_counter() - t0:.3f} s")
            errors.append(effect_error(eps_s, eps_o, eps_b))
        assert errors[0] < 1e-4  # the full rank: re-factored in float32, the same update to rounding
        assert errors == sorted(errors) and len(set(errors)) == 4, errors
        copy = lora_resize.resized(path, rank=8, output_format="kohya")  # a conversion at the planned rank: copied
        assert all(torch.equal(copy.tensors[k], v) for k, v in tensors.items())
        with bm.patched(copy.tensors, copy.metadata):
            eps_c = bm.predict(probes)
        assert all(torch.equal(a, b) for a, b in zip(eps_c, eps_o))
        assert effect_error(eps_c, eps_o, eps_b) == 0.0


def test_text_encoder_modules_alone_change_the_prediction(sd1, probes, lora_of):
    tensors, metadata, _ = lora_of("sd1")
    te = {k: v for k, v in tensors.items() if k.startswith("lora_te")}
    eps_b = sd1.predict(probes)
    before = snapshot(sd1)
    with sd1.patched(te, metadata) as report:
        assert report.matched == report.modules > 0
        changed = {k for k, v in sd1.weights.items() if not torch.equal(v, before[k])}
        assert changed and all(k.startswith("text_encoder.") for k in changed)
        eps_t = sd1.predict(probes)
    assert not any(torch.equal(a, b) for a, b in zip(eps_t, eps_b))


def test_unmatched_modules_are_listed_and_a_lora_of_another_model_is_refused(sd1, lora_of):
    tensors, metadata, _ = lora_of("sd1")
    stray = {"lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.ones(2, 32),
             "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": torch.ones(32, 2)}
    with sd1.patched({**tensors, **stray}, metadata) as report:
        assert report.unmatched == ["lora_unet_down_blocks_9_attentions_0_proj_in"]
        assert report.matched == report.modules - 1
        assert "1 not applied" in report.summary()
    with pytest.raises(LoraStructureError, match="is not this .* LoRA.s model: only 0 of its 1 modules"):
        with sd1.patched(stray, {}):
            pass
    wrong = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(2, 7),
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(5, 2)}
    with pytest.raises(LoraStructureError, match="LoRA.s model: only 0 of"):  # the weight is there, of another shape
        with sd1.patched(wrong, {}):
            pass


def test_render_is_deterministic_and_follows_the_patch(sd1, lora_of):
    tensors, metadata, _ = lora_of("sd1")
    a = sd1.render("a red cube", seed=3, steps=2, size=SIZE)
    assert a.size == SIZE
    with sd1.patched(tensors, metadata):
        c = sd1.render("a red cube", seed=3, steps=2, size=SIZE)
    b = sd1.render("a red cube", seed=3, steps=2, size=SIZE)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def test_bases_that_cannot_be_loaded_are_refused_in_one_line(tmp_path, tiny_base):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="model_index.json"):
        BaseModel(tmp_path / "empty")
    junk = tmp_path / "junk.safetensors"
    write_safetensors(junk, {"x": torch.ones(2)}, {})
    with pytest.raises(InputFileError, match="not a single-file SD1.5, SDXL or Flux.1 checkpoint"):
        BaseModel(junk)
    with pytest.raises(InputFileError, match="not a diffusers folder or a .safetensors"):
        BaseModel(tmp_path / "missing.ckpt")
    folder, _ = tiny_base("sd1")
    with pytest.raises(OptionsError, match="--base-config"):
        BaseModel(folder, config=tmp_path / "empty")


@pytest.mark.parametrize("family", pipelines.FAMILIES)
def test_a_single_file_base_predicts_what_its_diffusers_folder_does(family, tiny_base, lora_of):
    """The original-layout checkpoint (SD1.5 ldm, SDXL sgm, Flux.1 BFL) with --base-config: the same weights as the
    folder's, and the same predictions bit for bit, without and with the LoRA."""
    folder, _ = tiny_base(family)
    single, config = tiny_base(family, "single")
    tensors, metadata, _ = lora_of(family)
    with BaseModel(folder) as a, BaseModel(single, config=config) as b:
        assert a.family == b.family == family
        assert a.weights.keys() == b.weights.keys()
        assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
        probes = a.probes(prompts=["a red cube"], seeds=[0], timesteps=2, size=SIZE)
        assert all(torch.equal(x, y) for x, y in zip(a.predict(probes), b.predict(probes)))
        with a.patched(tensors, metadata), b.patched(tensors, metadata):
            assert all(torch.equal(x, y) for x, y in zip(a.predict(probes), b.predict(probes)))


def test_a_flux_transformer_file_without_its_config_folder_names_base_config(tiny_base):
    single, _ = tiny_base("flux", "single")
    with pytest.raises(OptionsError, match="--base-config DIR"):
        BaseModel(single)


@pytest.mark.parametrize("layout", ["diffusers", "comfy"])
def test_a_setting_written_in_another_layout_patches_the_same_update(sd1, layout, tiny_base, lora_of):
    """The diffusers layout (A/B, alpha in its metadata config) and ComfyUI's names are read as the same modules
    of the same weights: the patched weights are those of the kohya file at the same rank, to float32 rounding."""
    _, _, path = lora_of("sd1")
    kohya = lora_resize.resized(path, rank=4)
    other = lora_resize.resized(path, rank=4, output_format=layout)
    assert set(other.tensors) != set(kohya.tensors) or layout == "comfy"
    with sd1.patched(kohya.tensors, kohya.metadata):
        want = snapshot(sd1)
    with sd1.patched(other.tensors, other.metadata) as report:
        assert report.matched == report.modules == len(kohya.result.layers)
        for k, w in want.items():
            torch.testing.assert_close(sd1.weights[k], w, rtol=1e-6, atol=1e-7)


def test_a_dora_is_refused_rather_than_measured_without_its_magnitudes(sd1, lora_of):
    tensors, metadata, _ = lora_of("sd1")
    name = next(k for k in tensors if k.endswith(".lora_down.weight")).removesuffix(".lora_down.weight")
    out = tensors[f"{name}.lora_up.weight"].shape[0]
    with pytest.raises(LoraStructureError, match="DoRA"):
        with sd1.patched({**tensors, f"{name}.dora_scale": torch.ones(1, out)}, metadata):
            pass


def test_a_folders_weight_variant_is_loaded_as_diffusers_loads_it(tmp_path, sd1):
    """variant='fp16': the fp16 weight files, loaded to float32 on the CPU (the default compute dtype there)."""
    pipe = pipelines.tiny_pipeline("sd1", seed=0)
    pipe.to(torch.float16).save_pretrained(tmp_path / "v", variant="fp16", safe_serialization=True)
    with BaseModel(tmp_path / "v", variant="fp16") as bm:
        assert bm.dtype == torch.float32
        assert all(torch.equal(bm.weights[k], w.half().float()) for k, w in sd1.weights.items())


def test_flux_fused_qkv_and_linear1_rows_go_to_their_diffusers_parts(tiny_base):
    """Written out by hand: a kohya Flux module of the fused img_attn.qkv updates to_q, to_k, to_v with its row
    thirds; single_blocks.0.linear1 updates to_q, to_k, to_v (d rows each) and proj_mlp (the rest), each the float64
    W + scale * up @ down of its rows, rounded once."""
    folder, _ = tiny_base("flux")
    g = torch.Generator().manual_seed(11)
    with BaseModel(folder) as bm:
        before = snapshot(bm)
        d = before["transformer.transformer_blocks.0.attn.to_q.weight"].shape[1]
        groups = {"lora_unet_double_blocks_0_img_attn_qkv": [f"transformer_blocks.0.attn.to_{x}" for x in "qkv"],
                  "lora_unet_single_blocks_0_linear1": [f"single_transformer_blocks.0.attn.to_{x}" for x in "qkv"]
                  + ["single_transformer_blocks.0.proj_mlp"]}
        lora = {}
        for name, parts in groups.items():
            out = sum(before[f"transformer.{p}.weight"].shape[0] for p in parts)
            lora[f"{name}.lora_down.weight"] = torch.randn(3, d, generator=g)
            lora[f"{name}.lora_up.weight"] = torch.randn(out, 3, generator=g)
            lora[f"{name}.alpha"] = torch.tensor(1.5)
        with bm.patched(lora, {}) as report:
            assert report.matched == 2 and report.weights == 7
            for name, parts in groups.items():
                delta = 0.5 * (lora[f"{name}.lora_up.weight"].double() @ lora[f"{name}.lora_down.weight"].double())
                rows = [(0, d), (d, 2 * d), (2 * d, 3 * d), (3 * d, delta.shape[0])]
                for p, (a, b) in zip(parts, rows):
                    key = f"transformer.{p}.weight"
                    assert torch.equal(bm.weights[key], (before[key].double() + delta[a:b]).float()), key
        assert same(snapshot(bm), before)
