"""The tiny test pipelines (lora_resize.testing.pipelines) every preview/effect test builds on: they load back
through diffusers itself, their LoRA is read by lora-resize and by diffusers' own kohya loader, and it changes the
denoiser's output."""
from __future__ import annotations

import pytest
import torch

from lora_resize.testing import pipelines

pytestmark = pytest.mark.thirdparty
diffusers = pytest.importorskip("diffusers", reason="the [preview] extra")


def _state(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {n: c.state_dict() for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def _assert_same_weights(a, b):
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for comp in sa:
        assert sa[comp].keys() == sb[comp].keys(), comp
        bad = [k for k in sa[comp] if not torch.equal(sa[comp][k], sb[comp][k])]
        assert not bad, (comp, bad[:5])


def _eps(pipe, family: str) -> torch.Tensor:
    """The denoiser's output on fixed inputs (latents, timestep, text embeddings from the pipeline's encoders)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        if family == "flux":
            emb, pooled, ids = pipe.encode_prompt("a red cat", None, max_sequence_length=32)[:3]
            lat = torch.randn(1, 4, 16, 16, generator=g)
            packed = pipe._pack_latents(lat, 1, 4, 16, 16)
            img_ids = pipe._prepare_latent_image_ids(1, 8, 8, lat.device, lat.dtype)
            return pipe.transformer(hidden_states=packed, timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                                    pooled_projections=pooled, encoder_hidden_states=emb, txt_ids=ids,
                                    img_ids=img_ids).sample
        lat = torch.randn(1, 4, 16, 16, generator=g)
        if family == "sdxl":
            emb, _, pooled, _ = pipe.encode_prompt("a red cat", do_classifier_free_guidance=False)
            cond = {"text_embeds": pooled, "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
            return pipe.unet(lat, 500, encoder_hidden_states=emb, added_cond_kwargs=cond).sample
        emb = pipe.encode_prompt("a red cat", "cpu", 1, False)[0]
        return pipe.unet(lat, 500, encoder_hidden_states=emb).sample


@pytest.mark.parametrize("family", pipelines.FAMILIES)
def test_folder_loads_back_bit_for_bit_through_diffusers(tiny_base, family):
    folder, config = tiny_base(family, "folder")
    assert folder == config and (folder / "model_index.json").is_file()
    loaded = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert pipelines.family_of(loaded) == family
    _assert_same_weights(pipelines.tiny_pipeline(family, seed=0), loaded)
    # the tokenizers came back from the folder and encode offline
    ids = loaded.tokenizer("a red cat").input_ids
    assert ids[0] == loaded.tokenizer.bos_token_id and ids[-1] == loaded.tokenizer.eos_token_id and len(ids) > 3
    if family == "flux":
        ids2 = loaded.tokenizer_2("a red cat").input_ids
        assert ids2[-1] == loaded.tokenizer_2.eos_token_id and loaded.tokenizer_2.unk_token_id not in ids2


@pytest.mark.parametrize("family", pipelines.FAMILIES)
def test_build_is_deterministic_and_seeded(family):
    a, b, c = (pipelines.tiny_pipeline(family, seed=s) for s in (0, 0, 1))
    _assert_same_weights(a, b)
    assert not torch.equal(_eps(a, family), _eps(c, family))


@pytest.mark.parametrize("family", pipelines.FAMILIES)
def test_render_is_a_32px_image_in_well_under_a_second(family):
    import time

    pipe = pipelines.tiny_pipeline(family)
    kw = {"max_sequence_length": 32} if family == "flux" else {}
    t0 = time.perf_counter()
    img = pipe("a red cat", num_inference_steps=4, height=32, width=32,
               generator=torch.Generator().manual_seed(0), **kw).images[0]
    assert img.size == (32, 32)
    assert time.perf_counter() - t0 < 5.0  # generous for a shared 2-core machine; ~0.1 s alone


@pytest.mark.parametrize("family", pipelines.FAMILIES)
def test_lora_is_read_by_analyze_with_decaying_spectra(tmp_path, family):
    import lora_resize

    pipe = pipelines.tiny_pipeline(family)
    path = pipelines.tiny_lora(pipe, tmp_path / "l.safetensors", rank=8, decay=0.7)
    a = lora_resize.analyze(path)
    targets = pipelines.lora_targets(pipe)
    assert {s.name for s in a.layers} == set(targets)
    assert any(n.startswith("lora_te") for n in targets) and any(n.startswith("lora_unet_") for n in targets)
    for s in a.layers:
        sv = torch.as_tensor(s.S, dtype=torch.float64)
        assert len(sv) == 8
        torch.testing.assert_close(sv[1:] / sv[:-1], torch.full((7,), 0.7, dtype=torch.float64), rtol=1e-4, atol=0)
    # every module carries the name its trainers give it: kohya's SD names read back to a UNet / CLIP path
    # (text encoders always under `text_model.`, however transformers nests CLIPTextModel), Flux's to a BFL weight
    from lora_resize.models import sd as sd_names
    from lora_resize.models.dit import FLUX1

    for name in targets:
        if family != "flux" or name.startswith("lora_te"):
            comp_path = sd_names.from_kohya(name.replace("lora_te1_", "lora_te_"))
            assert comp_path is not None, name
            assert name.startswith("lora_unet_") or comp_path[1].startswith("text_model.encoder.layers."), name
        else:
            assert FLUX1.native_of(name[len("lora_unet_"):], flat=True) is not None, name
    without = pipelines.lora_targets(pipe, text_encoder=False)
    assert without and not any(n.startswith("lora_te") for n in without)


@pytest.mark.parametrize("family", pipelines.FAMILIES)
def test_lora_changes_the_denoiser_output(tmp_path, family):
    from safetensors.torch import load_file

    pipe = pipelines.tiny_pipeline(family)
    base = _eps(pipe, family)
    lora = load_file(pipelines.tiny_lora(pipe, tmp_path / "l.safetensors"))
    assert pipelines.merge_lora(pipe, lora) == len(pipelines.lora_targets(pipe))
    change = (_eps(pipe, family) - base).norm() / base.norm()
    assert change > 0.02, change


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_reference_merge_matches_diffusers_kohya_loader(tmp_path, family):
    """merge_lora, the dense reference, agrees with diffusers' own reading of the kohya file (for Flux, diffusers'
    kohya converter assumes the real model's 3072 width, lora_conversion_utils._convert_sd_scripts_to_ai_toolkit,
    so it cannot read a tiny Flux LoRA)."""
    from safetensors.torch import load_file

    path = pipelines.tiny_lora(pipelines.tiny_pipeline(family), tmp_path / "l.safetensors")
    ref = pipelines.tiny_pipeline(family)
    pipelines.merge_lora(ref, load_file(path))
    pipe = pipelines.tiny_pipeline(family)
    pipe.load_lora_weights(path)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        if getattr(pipe, comp, None) is None:
            continue
        mine, theirs = getattr(ref, comp).state_dict(), getattr(pipe, comp).state_dict()
        assert mine.keys() == theirs.keys()
        for k in mine:
            torch.testing.assert_close(theirs[k], mine[k], rtol=1e-5, atol=1e-6, msg=f"{comp}.{k}")


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="sd1, sdxl, flux"):
        pipelines.tiny_pipeline("sd3")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_single_file_loads_back_bit_for_bit_through_diffusers(tiny_base, family):
    """diffusers' own single-file loader, offline with the folder's configs, reads the checkpoint back to every
    weight of the pipeline (unet, vae, both text encoders) bit for bit."""
    path, config = tiny_base(family, "single")
    assert path.suffix == ".safetensors" and path.is_file()
    cls = {"sd1": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline}[family]
    loaded = cls.from_single_file(str(path), config=str(config), local_files_only=True)
    _assert_same_weights(pipelines.tiny_pipeline(family, seed=0), loaded)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_single_file_has_the_original_layout(tiny_base, family):
    from safetensors import safe_open

    path, _ = tiny_base(family, "single")
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        vae_q = f.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight")
    assert vae_q.ndim == 4  # the ldm VAE's attention projections are 1x1 convolutions
    expected = {"model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.0.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight",
                "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
                "first_stage_model.decoder.up.0.block.0.conv1.weight", "first_stage_model.encoder.norm_out.weight"}
    if family == "sd1":
        expected |= {"cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                     "model.diffusion_model.output_blocks.2.1.conv.weight"}
        assert not any(k.startswith("conditioner.") for k in keys)
    else:
        expected |= {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                     "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
                     "conditioner.embedders.1.model.text_projection",
                     "conditioner.embedders.1.model.positional_embedding",
                     "model.diffusion_model.label_emb.0.0.weight",
                     "model.diffusion_model.output_blocks.2.2.conv.weight",
                     "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"}
        assert not any(k.startswith("cond_stage_model.") for k in keys)
    assert expected <= keys, expected - keys


def test_flux_single_file_is_the_layout_diffusers_reads():
    """The Flux transformer's BFL keys, judged by diffusers' own converter. That converter assumes Flux.1's width
    (single_file_utils.convert_flux_transformer_checkpoint_to_diffusers: inner_dim = 3072, mlp_ratio 4 for the
    single blocks' linear1 split), so it cannot read the tiny model's file; the same mapping is judged here at
    Flux.1's real shapes (from a meta-device model, two blocks of each kind) with one column per weight - the
    conversions only move rows - every row distinct, and must come back bit for bit."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        real = diffusers.FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape[0], *([1] if v.ndim > 1 else []), generator=g) for k, v in real.state_dict().items()}
    bfl = pipelines.flux_native_state(sd)
    assert {"double_blocks.1.img_attn.qkv.weight", "single_blocks.1.linear1.bias", "img_in.weight",
            "time_in.in_layer.weight", "guidance_in.out_layer.bias", "final_layer.adaLN_modulation.1.weight",
            "single_blocks.0.norm.key_norm.scale", "double_blocks.0.txt_attn.norm.query_norm.scale"} <= set(bfl)
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert back.keys() == sd.keys()
    assert [k for k in sd if not torch.equal(back[k], sd[k])] == []


def test_flux_single_file_is_the_tiny_transformer_in_bfl_names(tiny_base):
    """The tiny Flux single file holds the transformer alone (as flux1-dev.safetensors does), each weight the BFL
    name flux_native_state gives it - the mapping the previous test judges - with the tiny model's tensors."""
    from safetensors.torch import load_file

    path, config = tiny_base("flux", "single")
    stored = load_file(path)
    transformer = diffusers.FluxTransformer2DModel.from_pretrained(config, subfolder="transformer",
                                                                   local_files_only=True)
    want = pipelines.flux_native_state(transformer.state_dict())
    assert stored.keys() == want.keys()
    assert all(torch.equal(stored[k], want[k]) for k in want)
    adaln = transformer.norm_out.linear.weight  # diffusers (scale, shift); BFL (shift, scale)
    torch.testing.assert_close(stored["final_layer.adaLN_modulation.1.weight"],
                               torch.cat(adaln.chunk(2)[::-1]), rtol=0, atol=0)


def test_flux_bfl_names_read_back_at_any_width_as_diffusers_reads_them_at_flux1s(tiny_base):
    """flux_diffusers_state, the inverse mapping a loader of tiny Flux files needs: at Flux.1's real shapes it gives
    what diffusers' converter gives (every row, bit for bit), and on the tiny file it gives back the tiny
    transformer, which then loads strictly."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    with torch.device("meta"):
        real = diffusers.FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    g = torch.Generator().manual_seed(1)
    # one column per weight, rows drawn at random (the conversions only move rows); the single block's linear1 at
    # its real input width, which the inverse reads to split it, as int16 (diffusers' converter copies it)
    bfl = pipelines.flux_native_state({k: torch.randint(-2**15, 2**15, (v.shape[0], *([1] if v.ndim > 1 else [])),
                                                        generator=g, dtype=torch.int16)
                                       for k, v in real.state_dict().items()})
    bfl["single_blocks.0.linear1.weight"] = bfl["single_blocks.0.linear1.weight"].expand(-1, 3072)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    mine = pipelines.flux_diffusers_state(bfl)
    assert mine.keys() == theirs.keys()
    assert [k for k in mine if not torch.equal(mine[k][..., :1], theirs[k][..., :1])] == []

    path, config = tiny_base("flux", "single")
    tiny = diffusers.FluxTransformer2DModel.from_pretrained(config, subfolder="transformer", local_files_only=True)
    stored = load_file(path)
    back = pipelines.flux_diffusers_state(stored)
    want = tiny.state_dict()
    assert back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)
    prefixed = pipelines.flux_diffusers_state({"model.diffusion_model." + k: v for k, v in stored.items()})
    assert prefixed.keys() == want.keys()
    with pytest.raises(KeyError):
        pipelines.flux_diffusers_state({**stored, "double_blocks.0.img_attn.rope.weight": torch.zeros(1)})
