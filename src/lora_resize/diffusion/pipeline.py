"""A base model as a diffusers pipeline, loaded once: probes of its own trajectories, its denoiser's predictions
at those probes with or without a LoRA applied in memory, and rendered images.

Loading (diffusers, local files only wherever a folder is given): a diffusers folder with `DiffusionPipeline.
from_pretrained` (`variant`: its weight files of that variant, as diffusers takes it); a single-file SD1.5/SDXL
checkpoint with `StableDiffusion(XL)Pipeline.from_single_file(path, config=config)`; a Flux.1 transformer file
in BFL's layout read into the `config` folder's FluxTransformer2DModel through the project's tables (flux.py),
the rest of the pipeline (text encoders, VAE, scheduler) from the `config` folder. `config`: a diffusers folder of
that model (its model_index.json, component configs and tokenizers); without it diffusers fetches the configs
from the Hugging Face Hub, and where that fails the error names `--base-config`.

Probes (`probes`, `predict`): the base pipeline (no LoRA) is run once per (prompt, seed) with
`num_inference_steps=timesteps` (the scheduler spreads them over its schedule), recording the denoiser's latent
input at every call; a prediction runs the pipeline again with the same settings, replacing each call's latent
input by the recorded one and recording the output. So every state - base, original LoRA, each setting - is
measured at the same x_t and t, with its own (possibly patched) text encoders: the difference between two states'
predictions is the difference the LoRA's weights make, not the drift of two trajectories."""
from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from ..errors import DeviceError, InputFileError, LoraResizeError, OptionsError, one_line, require
from ..io.checkpoint import Checkpoint
from ..models import MODELS
from .flux import load_transformer
from .patch import Patch, PatchReport, dense_updates

FEATURE = "--effect / preview"
# diffusers' pipeline class for each family this room loads
PIPELINES = {"sd1": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}
FAMILY_OF_CLASS = {v: k for k, v in PIPELINES.items()}
DEFAULT_PROMPTS = ("a photo of a cat sitting on a wooden table", "a watercolor landscape with mountains and a lake",
                   "a portrait of a woman in soft studio light")
MAX_SIZE = 512  # default probe/render side: the pipeline's own default, at most this and a 64 x 64 latent
MAX_LATENT = 64
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ALIGN = 64  # bytes: what torch's CPU allocator gives a new tensor


@dataclass(frozen=True)
class Probes:
    """Fixed inputs to measure a model's output at: one probe per (prompt, seed), prompts outer; `inputs[p]` the
    denoiser's latent inputs at each of its calls in the base pipeline's run (CPU tensors; a call per step, the
    batch holding the unconditional and conditional halves where the pipeline uses classifier-free guidance).
    `size` (width, height) in pixels; `guidance` None: the pipeline's default guidance scale."""
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    timesteps: int
    size: tuple[int, int]
    guidance: float | None
    inputs: tuple[tuple[torch.Tensor, ...], ...]

    def runs(self) -> list[tuple[str, int]]:
        return [(p, s) for p in self.prompts for s in self.seeds]

    def __len__(self) -> int:
        return len(self.inputs)


@contextmanager
def quiet() -> Iterator[None]:
    """Inside: diffusers' and transformers' loggers at error level and Python warnings ignored (their notices -
    "`local_files_only` is True ... Attempting to download", "modules ... should be kept in float32",
    "CLIPImageProcessor requires torchvision" - would go to stderr beside our one-line errors and progress); the
    previous verbosities and warning filters are restored on leaving. Raises MissingDependency without them."""
    logs = [require("transformers", FEATURE).utils.logging, require("diffusers", FEATURE).utils.logging]
    before = [log.get_verbosity() for log in logs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for log in logs:
            log.set_verbosity_error()
        try:
            yield
        finally:
            for log, level in zip(logs, before):
                log.set_verbosity(level)


def folder_family(folder: Path) -> str:
    """'sd1', 'sdxl' or 'flux' from a diffusers folder's model_index.json `_class_name`. Raises InputFileError for
    a folder that is not a pipeline, or another pipeline's."""
    index = folder / "model_index.json"
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise InputFileError(f"--base {folder} has no readable model_index.json, so it is not a diffusers pipeline "
                             "folder; give the whole pipeline folder (or a single-file checkpoint)") from None
    if name not in FAMILY_OF_CLASS:
        raise InputFileError(f"--base {folder} is a {name} pipeline; --effect and preview load "
                             f"{', '.join(PIPELINES.values())} (SD1.5, SDXL, Flux.1)")
    return FAMILY_OF_CLASS[name]


def single_file_family(keys: Sequence[str]) -> str | None:
    """'sdxl', 'sd1' or 'flux' from a single-file checkpoint's keys (SDXL: its second text encoder under
    `conditioner.embedders.1.` or the UNet's `label_emb`; SD: the original UNet's `input_blocks`; Flux.1: the
    templates only its transformer has, models.dit), None for none of them."""
    if any(k.startswith(("conditioner.embedders.1.", "model.diffusion_model.label_emb.")) for k in keys):
        return "sdxl"
    if any(k.startswith("model.diffusion_model.input_blocks.") for k in keys):
        return "sd1"
    paths = {k.removesuffix(".weight") for k in keys}
    if MODELS["flux1"].evidence(paths, "native", False) > MODELS["flux2"].evidence(paths, "native", False):
        return "flux"
    return None


def stored_dtype(ck: Checkpoint, prefixes: tuple[str, ...]) -> torch.dtype:
    """The floating dtype most of the weights under `prefixes` (all where none is) are stored in; float32 for
    another (fp8) or none."""
    keys = [k for k in ck.keys() if k.startswith(prefixes)] or ck.keys()
    counts = Counter(ck.info(k).dtype for k in keys)
    best = max(counts, key=counts.get, default=torch.float32)
    return best if best in FLOAT_DTYPES else torch.bfloat16 if best.is_floating_point else torch.float32


def own_storage(pipe) -> None:
    """Give every parameter and buffer its own 64-byte-aligned copy where it is not one already (a view into a
    safetensors file mapped at an odd offset, a slice of a fused weight a single-file converter split): the CPU
    kernels round differently at another memory alignment (seen: a Linear's output differing in the last bit),
    and the same weights must predict the same bits however the base was stored."""
    with torch.no_grad():
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                for t in [*component.parameters(), *component.buffers()]:
                    if (t.data_ptr() % ALIGN or t.storage_offset() != 0
                            or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
                        t.data = t.data.clone()


def pipeline_weights(pipe) -> dict[str, torch.Tensor]:
    """A pipeline's parameters keyed as a diffusers folder keys them (`<component>.<parameter>`), which is how
    formats.weights finds a LoRA module's weight. A CLIP text encoder's also under `text_model.`: transformers 5
    dropped CLIPTextModel's `text_model` wrapper (its parameters are `encoder.layers.0...`), while LoRAs (kohya's
    `lora_te_text_model_encoder_...`, diffusers' `text_encoder.text_model.encoder...`) and checkpoints name it."""
    weights: dict[str, torch.Tensor] = {}
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        clip = type(component).__name__.startswith("CLIPText")
        for key, p in component.named_parameters():
            weights[f"{name}.{key}"] = p
            if clip and not key.startswith("text_model."):
                weights[f"{name}.text_model.{key}"] = p
    return weights


def base_family(base: str | os.PathLike, config: str | os.PathLike | None = None) -> str:
    """'sd1', 'sdxl' or 'flux': what BaseModel would load from `base` with the configs folder `config`, found
    without loading it (a folder's model_index.json, a single file's safetensors header) - the checks BaseModel
    makes first, also run where a base is named long before it is loaded (`lora-resize ui --base`). Raises
    OptionsError for a `config` that is not a diffusers folder or a Flux.1 transformer file without one,
    InputFileError for a base that is none of those loadable here."""
    path = Path(base)
    if config is not None and not (Path(config) / "model_index.json").is_file():
        raise OptionsError(f"--base-config {config} is not a diffusers pipeline folder (no model_index.json); give "
                           "the folder of this model's diffusers release")
    if path.is_dir():
        return folder_family(path)
    if not (path.is_file() and path.suffix.lower() == ".safetensors"):
        raise InputFileError(f"--base {path} is not a diffusers folder or a .safetensors checkpoint file; give "
                             "one of those")
    with Checkpoint(path) as ck:
        family = single_file_family(ck.keys())
    if family is None:
        raise InputFileError(f"--base {path} is not a single-file SD1.5, SDXL or Flux.1 checkpoint (none of "
                             "their keys); give one of those, or a diffusers folder")
    if family == "flux" and config is None:
        raise OptionsError(f"--base {path} is a Flux.1 transformer file, which holds no text encoders, VAE or "
                           "configs: give --base-config DIR, a diffusers folder of Flux.1 (its model_index.json, "
                           "configs, tokenizers, text encoders and VAE)")
    return family


class BaseModel:
    """A base model loaded once as a diffusers pipeline (module docstring): `family` 'sd1', 'sdxl' or 'flux',
    `pipe` the pipeline, `patch_report` what the last `patched` applied.

    base: a diffusers folder or a single-file .safetensors checkpoint; variant: a folder's weight variant (fp16);
    config: a diffusers folder holding the model's configs and tokenizers (single files; needed offline and for a
    Flux.1 transformer file); device: 'cpu', 'cuda', 'cuda:1'; dtype: the compute dtype - default float32 on the
    CPU (half precision is slow or missing there), the dtype the denoiser's weights are stored in elsewhere.
    Raises InputFileError for a base that is not a pipeline diffusers can load here, OptionsError when the configs
    are missing (naming --base-config), DeviceError for a device torch cannot use, MissingDependency without
    diffusers/transformers (the `preview` extra). A context manager: leaving it restores any patch and frees
    the pipeline."""

    def __init__(self, base: str | os.PathLike, variant: str | None = None, config: str | os.PathLike | None = None,
                 device: str = "cpu", dtype: torch.dtype | None = None):
        self.base = Path(base)
        self.variant = variant
        self.config = Path(config) if config is not None else None
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(f"device {device} was asked for, but torch sees no CUDA GPU here; use --device cpu")
        self.patch_report = PatchReport()
        self._patch: Patch | None = None
        with quiet():  # their notices are not ours to print: our errors are one line, our output our own
            self.pipe = self._load(dtype)
            self.dtype = self.denoiser.dtype
            self.pipe.to(self.device)
        own_storage(self.pipe)  # after the move: a GPU copy is a fresh allocation already
        self.pipe.set_progress_bar_config(disable=True)
        self.weights = pipeline_weights(self.pipe)

    # -- loading -------------------------------------------------------------------------------------------------
    def _load(self, dtype: torch.dtype | None):
        diffusers = require("diffusers", FEATURE)
        require("transformers", FEATURE)
        path = self.base
        self.family = base_family(path, self.config)
        if path.is_dir():
            with Checkpoint(path, self.variant) as ck:
                dtype = dtype or self._default_dtype(ck, ("unet.", "transformer."))
            return self._call(lambda: diffusers.DiffusionPipeline.from_pretrained(
                path, local_files_only=True, variant=self.variant, torch_dtype=dtype))
        with Checkpoint(path) as ck:
            dtype = dtype or self._default_dtype(ck, ("model.diffusion_model.",))
        config = str(self.config) if self.config is not None else None
        if self.family == "flux":
            def flux():
                transformer = load_transformer(diffusers, path, config, dtype)
                return diffusers.FluxPipeline.from_pretrained(config, transformer=transformer, local_files_only=True,
                                                              torch_dtype=dtype)
            return self._call(flux)
        cls = getattr(diffusers, PIPELINES[self.family])
        return self._call(lambda: cls.from_single_file(str(path), config=config, local_files_only=config is not None,
                                                       torch_dtype=dtype))

    def _default_dtype(self, ck: Checkpoint, prefixes: tuple[str, ...]) -> torch.dtype:
        return torch.float32 if self.device.type == "cpu" else stored_dtype(ck, prefixes)

    def _call(self, load):
        """Run a diffusers loader; its failures become one-line errors naming the fix."""
        bars = [require("diffusers", FEATURE).utils.logging, require("transformers", FEATURE).utils.logging]
        try:  # called under quiet() (BaseModel.__init__): their warnings, e.g. torch_dtype's rename, are ignored
            for b in bars:  # their loading bars: the jobs report progress their own way
                b.disable_progress_bar()
            return load()
        except LoraResizeError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever diffusers/transformers raise on a base they cannot load
            why = one_line(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")[:300]
            if self.base.is_file() and self.config is None:
                raise OptionsError(f"--base {self.base}: diffusers could not get this model's configs and "
                                   f"tokenizers, which it fetches from the Hugging Face Hub ({why}); give "
                                   "--base-config DIR, a diffusers folder of this model") from None
            raise InputFileError(f"--base {self.base} is not a pipeline diffusers can load ({why}); give a complete "
                                 "diffusers folder or a single-file SD1.5 / SDXL / Flux.1 checkpoint (with "
                                 "--base-config for its configs)") from None
        finally:
            for b in bars:
                b.enable_progress_bar()

    def __enter__(self) -> "BaseModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._patch is not None:
            self._patch.restore()
            self._patch = None
        self.pipe = None
        self.weights = {}

    # -- the LoRA ------------------------------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        """The pipeline's UNet or transformer."""
        return self.pipe.unet if getattr(self.pipe, "unet", None) is not None else self.pipe.transformer

    @contextmanager
    def patched(self, tensors: Mapping[str, torch.Tensor] | None, metadata: Mapping[str, str] | None = None,
                arch: str | None = None, path: Path | None = None) -> Iterator[PatchReport]:
        """Inside: the LoRA `tensors` (a state dict in any layout lora-resize reads, with its safetensors
        `metadata`; None or empty: the base) applied in memory - each module's scale * up @ down, computed in
        float64 on the model's device, added to the weight it updates (its rows of a fused weight; conv kernels
        reshaped) and rounded once to the weight's dtype, one module at a time. Only the touched weights are saved
        (in host memory); leaving restores them bit for bit, on errors too. `arch`: the LoRA's architecture
        (--arch) where its keys leave it open; `path`: where its file is, so a companion file beside it is read
        (PEFT's adapter_config.json: without it a PEFT adapter's scale is taken as 1). Yields the PatchReport (also
        `self.patch_report`). Raises LoraStructureError when none of its modules has its weight here; RuntimeError
        when nested."""
        if self._patch is not None:
            raise RuntimeError("BaseModel.patched is already active; leave it before applying another LoRA")
        if not tensors:
            self.patch_report = PatchReport()
            yield self.patch_report
            return
        updates, self.patch_report = dense_updates(tensors, metadata, self.weights, str(self.base), arch, path)
        self._patch = Patch(self.weights, updates)
        try:
            yield self.patch_report
        finally:
            self._patch.restore()
            self._patch = None

    # -- probes and predictions ----------------------------------------------------------------------------------
    def size_step(self) -> int:
        """The multiple of which each side of a picture must be, in pixels: the VAE's scale factor (8 for SD1.5,
        SDXL and Flux.1), twice that for Flux, whose transformer takes the latent in 2 x 2 patches (diffusers'
        FluxPipeline.check_inputs: `vae_scale_factor * 2`)."""
        vsf = int(getattr(self.pipe, "vae_scale_factor", 8))
        return 2 * vsf if self.family == "flux" else vsf

    def check_size(self, size: Sequence[int]) -> tuple[int, int]:
        """`size` (width, height) as a tuple; raises OptionsError naming the nearest valid sizes when a side is not
        a multiple of size_step() (diffusers would raise ValueError deep in the pipeline)."""
        step = self.size_step()
        w, h = (int(v) for v in size)
        if w % step or h % step:
            near = f"{max(step, w // step * step)}x{max(step, h // step * step)}"
            raise OptionsError(f"--size {w}x{h}: this model's pictures need each side a multiple of {step} pixels; "
                               f"give e.g. --size {near}")
        return w, h

    def default_size(self) -> tuple[int, int]:
        """(width, height): the pipeline's own default image side, at most MAX_SIZE pixels and a MAX_LATENT x
        MAX_LATENT latent (SD1.5: 512; SDXL and Flux.1, whose own default is 1024: 512), rounded down to what the
        pipeline accepts (size_step)."""
        vsf = int(getattr(self.pipe, "vae_scale_factor", 8))
        if self.family == "flux":
            own = int(getattr(self.pipe, "default_sample_size", 128)) * vsf
        else:
            own = int(self.pipe.unet.config.sample_size) * vsf
        step = self.size_step()
        side = max(step, min(own, MAX_SIZE, MAX_LATENT * vsf) // step * step)
        return side, side

    def _run(self, prompt: str, seed: int, steps: int, size: tuple[int, int], guidance: float | None,
             output_type: str):
        kwargs = {"num_inference_steps": steps, "width": size[0], "height": size[1], "output_type": output_type,
                  "generator": torch.Generator("cpu").manual_seed(seed)}
        if guidance is not None:
            kwargs["guidance_scale"] = guidance
        with torch.no_grad(), quiet():
            return self.pipe(prompt, **kwargs)

    def probes(self, prompts: Sequence[str] | None = None, seeds: Sequence[int] = (0,), timesteps: int = 4,
               size: tuple[int, int] | None = None, guidance: float | None = None) -> Probes:
        """Record the base pipeline's own denoiser inputs (module docstring) for each (prompt, seed): prompts
        default to DEFAULT_PROMPTS, size (width, height) to default_size(). Raises OptionsError for no prompts,
        timesteps < 1 or a size the pipeline cannot take (check_size). Run it unpatched (it records the base's
        trajectory)."""
        prompts = tuple(prompts) if prompts else DEFAULT_PROMPTS
        if timesteps < 1 or not seeds:
            raise OptionsError(f"probes need at least one timestep and one seed (got {timesteps}, {list(seeds)})")
        size = self.check_size(size) if size is not None else self.default_size()
        if self._patch is not None:
            raise RuntimeError("record probes from the base: leave BaseModel.patched first")
        inputs = []
        for prompt in prompts:
            for seed in seeds:
                seen: list[torch.Tensor] = []

                def record(module, args, kwargs):
                    seen.append(_latent(args, kwargs)[0].detach().to("cpu", copy=True))
                handle = self.denoiser.register_forward_pre_hook(record, with_kwargs=True)
                try:
                    self._run(prompt, seed, timesteps, size, guidance, "latent")
                finally:
                    handle.remove()
                inputs.append(tuple(seen))
        return Probes(prompts, tuple(seeds), timesteps, size, guidance, tuple(inputs))

    def predict(self, probes: Probes) -> list[torch.Tensor]:
        """The denoiser's outputs at `probes` in the current patch state: one float64 CPU tensor per probe, its
        calls stacked ([calls, *output shape]). Each call's latent input is the recorded base one (module
        docstring); the text encoders run as patched."""
        outs = []
        for (prompt, seed), recorded in zip(probes.runs(), probes.inputs):
            got: list[torch.Tensor] = []
            calls = iter(recorded)

            def replace(module, args, kwargs):
                x, where = _latent(args, kwargs)
                r = next(calls, None)
                if r is None or r.shape != x.shape:
                    raise RuntimeError("the pipeline called its denoiser differently from when the probes were "
                                       "recorded; record the probes with this BaseModel")
                r = r.to(x.device, x.dtype)
                if where == 0:
                    return (r, *args[1:]), kwargs
                return args, {**kwargs, where: r}

            def output(module, args, kwargs, out):
                y = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
                got.append(y.detach().to("cpu", torch.float64))
            pre = self.denoiser.register_forward_pre_hook(replace, with_kwargs=True)
            post = self.denoiser.register_forward_hook(output, with_kwargs=True)
            try:
                self._run(prompt, seed, probes.timesteps, probes.size, probes.guidance, "latent")
            finally:
                pre.remove()
                post.remove()
            outs.append(torch.stack(got))
        return outs

    def render(self, prompt: str, seed: int = 0, steps: int = 20, size: tuple[int, int] | None = None,
               guidance: float | None = None):
        """One image (PIL.Image) of `prompt` in the current patch state: the pipeline's own sampler with `steps`
        steps, the initial noise from a CPU torch.Generator seeded with `seed` (the same on every device and in
        every state); size (width, height) defaults to default_size(). Raises OptionsError for a size the pipeline
        cannot take (check_size)."""
        size = self.check_size(size) if size is not None else self.default_size()
        return self._run(prompt, seed, steps, size, guidance, "pil").images[0]


def _latent(args: tuple, kwargs: dict) -> tuple[torch.Tensor, int | str]:
    """The denoiser call's latent input and where it is: positional 0 (diffusers' UNet call), or the keyword
    `sample` / `hidden_states` (the transformers')."""
    if args:
        return args[0], 0
    for key in ("sample", "hidden_states"):
        if key in kwargs:
            return kwargs[key], key
    raise RuntimeError("the denoiser was called without a latent input (no positional argument, `sample` or "
                       "`hidden_states`)")
