"""Fixtures shared by every room of the suite (helpers are in helpers.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import BASE_METADATA, BLOCKY, LIN_A, Spec, make_state_dict, standard_specs, write_lora

# On small CPUs, MKL's threaded LAPACK takes ~0.4 s for each tiny reference SVD once the OpenMP pool is busy;
# one thread keeps the float64 reference computations (and so the suite) fast. Results do not depend on it.
torch.set_num_threads(1)


@pytest.fixture
def standard_sd() -> dict[str, torch.Tensor]:
    return make_state_dict(standard_specs(), seed=1234, passthrough=True)


@pytest.fixture
def standard_lora(tmp_path, standard_sd) -> Path:
    """A float32 kohya LoCon file with every layer kind, passthrough keys and sd-scripts-style metadata."""
    return write_lora(tmp_path / "in.safetensors", standard_sd, dict(BASE_METADATA))


@pytest.fixture
def simple_lora(tmp_path) -> Path:
    """One small linear layer, float32, with alpha: the input for option/CLI error cases."""
    sd = make_state_dict([Spec(LIN_A, out=24, inp=20, rank=8, alpha=4.0)], seed=7)
    return write_lora(tmp_path / "simple.safetensors", sd, dict(BASE_METADATA))


@pytest.fixture
def blocky_lora(tmp_path) -> Path:
    """An fp16 SD1.5-style LoRA with a layer from each block group (helpers.BLOCKY), passthrough keys, metadata."""
    sd = make_state_dict(BLOCKY, seed=99, dtype=torch.float16, passthrough=True)
    return write_lora(tmp_path / "blocky.safetensors", sd, dict(BASE_METADATA))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """tiny_base(family, form="folder") -> (base, config_folder): a tiny pipeline of `family` ("sd1", "sdxl",
    "flux"; lora_resize.testing.pipelines, random weights from seed 0) saved once per session as a diffusers
    folder (form "folder": base is that folder) or as one single-file checkpoint in the original layout (form
    "single": base is the .safetensors file); config_folder is the diffusers folder either way (the configs and
    tokenizers from_single_file needs offline)."""
    from lora_resize.testing import pipelines

    root = tmp_path_factory.mktemp("tiny_base")
    built: dict = {}

    def get(family: str, form: str = "folder"):
        if family not in built:
            pipe = pipelines.tiny_pipeline(family, seed=0)
            folder = pipelines.save_folder(pipe, root / family)
            built[family] = (pipe, folder, {})
        pipe, folder, singles = built[family]
        if form == "folder":
            return folder, folder
        if form != "single":
            raise ValueError(f"form must be 'folder' or 'single', got {form!r}")
        if family not in singles:
            singles[family] = pipelines.save_single_file(pipe, root / f"{family}.safetensors")
        return singles[family], folder

    return get


@pytest.fixture(scope="session")
def tiny_loras(tmp_path_factory):
    """tiny_loras(family) -> a rank-4 kohya LoRA (testing.pipelines.tiny_lora, text encoders included) on the tiny
    pipeline of `family`, the one tiny_base(family) holds; made once per session."""
    from lora_resize.testing import pipelines

    folder = tmp_path_factory.mktemp("family_loras")
    made: dict = {}

    def get(family: str):
        if family not in made:
            made[family] = pipelines.tiny_lora(pipelines.tiny_pipeline(family, seed=0),
                                               folder / f"{family}.safetensors", rank=4)
        return made[family]

    return get


@pytest.fixture(scope="session")
def tiny_sd1_lora(tmp_path_factory):
    """A rank-8 kohya LoRA on the tiny SD1.5-like pipeline's UNet and text encoder (testing.pipelines.tiny_lora:
    spectra decaying by 0.7 a rank, so the effect error grows as ranks shrink), for the base tiny_base("sd1")."""
    from lora_resize.testing import pipelines

    pipe = pipelines.tiny_pipeline("sd1", seed=0)
    return pipelines.tiny_lora(pipe, tmp_path_factory.mktemp("tiny_lora") / "tiny.safetensors", rank=8)
