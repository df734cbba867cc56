"""What a setting does to the model's output: the effect error of `analyze --effect` and `preview`.

The base model's denoiser is run at a few fixed probes (prompts, a seed, timesteps spread over the sampling
schedule: lora_resize.diffusion.BaseModel.probes) three ways: with no LoRA (eps_b), with the original LoRA as
stored in its file (eps_o), and with the tensors a setting's resize writes (eps_s, from `lora_resize.resized`:
exactly the file's tensors, applied in memory, nothing written). A setting's effect error is the share of the
LoRA's change to the prediction that it loses,

    mean over probes of ||eps_s - eps_o|| / ||eps_o - eps_b||      (lora_resize.diffusion.effect_error)

0 when the setting's tensors are the original's. The base weights are loaded once; a setting patches only the
LoRA's modules and restores them after (BaseModel.patched). Settings that write the same tensors (the same rank
for every layer, the same save precision: many settings of a sweep coincide) are measured once.

Everything that imports diffusers lives in lora_resize.diffusion; this module is the job around it."""
from __future__ import annotations

import contextlib
import numbers
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..core.schedule import Progress
from ..errors import OptionsError
from ..io.metadata import SideFile
from ..io.paths import local_path, resolve_input
from ..io.reader import open_tensor_file
from ..options import ResizeOptions
from ..ranks.policies import get_policy
from ..results import DEFAULT_PROBE_STEPS, DEFAULT_SEED, MAX_SEED, MAX_SIDE, MAX_STEPS, SettingRow


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_steps(steps, flag: str = "--steps") -> int:
    """`steps`, a count of sampling steps or probe timesteps (`flag` names it in the error), as an int; the one
    rule for both, used by Probing, `preview` and every caller (CLI, API, page): a whole number from 1 to
    results.MAX_STEPS. Raises OptionsError otherwise."""
    if not (_whole(steps) and 1 <= steps <= MAX_STEPS):
        raise OptionsError(f"{flag} must be a whole number from 1 to {MAX_STEPS}, got {steps!r}")
    return int(steps)


@dataclass(frozen=True)
class Probing:
    """How the base model is loaded and probed.

    Attributes:
        base: the base model: a diffusers folder, or a single-file checkpoint (.safetensors: SD1.5, SDXL, Flux.1).
        config: for a single file, a diffusers folder holding that model's configs and tokenizers (read instead
            of the Hub); None: the library's own lookup.
        variant: a diffusers folder's weight variant (e.g. "fp16"), as --base-variant.
        prompts: the probes' prompts; None: lora_resize.diffusion's DEFAULT_PROMPTS (a subject, a style, a scene);
            seed: the seed of their initial latents; timesteps: the denoiser calls recorded per prompt.
        size: (width, height) in pixels of the probes' latents (8 to results.MAX_SIDE a side; the pipeline may
            ask for a multiple of its own: BaseModel.check_size); None: the model's default.
        device: "auto", "cpu", "cuda" or "cuda:N" (as ResizeOptions.device).

    Every check of these options is made here, once, for the CLI, the API and the page: OptionsError for an empty
    prompt, a seed outside 0..results.MAX_SEED (what torch.Generator.manual_seed takes), probe timesteps outside
    check_steps' range or a size outside 8..MAX_SIDE pixels a side."""
    base: str
    config: str | None = None
    variant: str | None = None
    prompts: tuple[str, ...] | None = None
    seed: int = DEFAULT_SEED
    timesteps: int = DEFAULT_PROBE_STEPS
    size: tuple[int, int] | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.prompts is not None and not (self.prompts and all(isinstance(p, str) and p.strip()
                                                                  for p in self.prompts)):
            raise OptionsError("a --prompt must not be empty")
        if not (_whole(self.seed) and 0 <= self.seed <= MAX_SEED):
            raise OptionsError(f"--seed must be a whole number from 0 to 2**63 - 1 ({MAX_SEED}), got {self.seed!r}")
        check_steps(self.timesteps, "--probe-steps")
        if self.size is not None and not (len(self.size) == 2 and all(_whole(v) and 8 <= v <= MAX_SIDE
                                                                       for v in self.size)):
            raise OptionsError(f"--size must be 8 to {MAX_SIDE} pixels a side, got {self.size!r}")


@dataclass
class InMemory:
    """A LoRA to apply: its tensors and metadata, and where its companion files are read from - `path`, its file
    (the input's own, with its adapter_config.json beside it), or `files`, those a resize would write beside it
    (Resized.files). Without them a PEFT adapter would be applied at scale 1."""
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    path: Path | None = None
    files: Sequence[SideFile] = ()

    @classmethod
    def of(cls, r) -> "InMemory":
        """A `lora_resize.resized` result."""
        return cls(r.tensors, r.metadata, files=r.files)

    @contextlib.contextmanager
    def applied(self, model) -> Iterator:
        """`model.patched(...)` with this LoRA, its companion files beside a placeholder path (a temporary
        folder) when it has any."""
        with contextlib.ExitStack() as stack:
            path = self.path
            if self.files:
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lora-resize-")))
                for f in self.files:
                    (folder / f.name).write_text(f.text, encoding="utf-8")
                path = folder / "adapter_model.safetensors"
            yield stack.enter_context(model.patched(self.tensors, self.metadata, path=path))


def as_stored(src: str | os.PathLike) -> InMemory:
    """The LoRA at `src` (a file, or an adapter folder holding one) as stored: every tensor, the metadata, and its
    path (its companion files are read beside it). Raises InputFileError for a file that cannot be read."""
    path = resolve_input(local_path(src, "input"))
    with open_tensor_file(path) as reader:
        return InMemory({k: reader.get(k) for k in reader.infos()}, dict(reader.metadata), path)


def strengths_only(opts: ResizeOptions | None) -> ResizeOptions | None:
    """The options that write a LoRA with `opts`' block strengths (its scale rules and --block-weights) baked in
    and every layer kept whole, in float (no rank setting: each layer its numerical rank, ops.job.with_strength);
    None when `opts` gives no strength (the original as stored is the reference)."""
    if opts is None or (opts.block_weights is None and not any(r.scales for r in opts.block_rules)):
        return None
    return ResizeOptions(block_rules=tuple(r for r in opts.block_rules if r.scales),
                         block_weights=opts.block_weights, arch=opts.arch, keep_unranked=True, precision="float",
                         device=opts.device)


def needs_base(opts: ResizeOptions) -> bool:
    """Whether the setting `opts` chooses its ranks by losses measured against --base (a base policy or budget)."""
    budget = opts.budget
    return bool(get_policy(opts.method).base or (budget is not None and budget[0].needs_base))


def without_base(opts: ResizeOptions) -> ResizeOptions:
    """`opts` without its weight-space --base where the setting does not choose ranks by it: the tensors written
    are the same, and the base's norms are not read again for every setting."""
    return opts if opts.base is None or needs_base(opts) else replace(opts, base=None, base_variant=None)


def as_planned(row: SettingRow, names: Sequence[str] | None = None) -> ResizeOptions:
    """The options that write `row`'s file again without reading --base: given `names` (the analysis' layers, in
    the order of `row.ranks`), the ranks the analysis planned pinned as explicit ranks (which win over the
    setting's own choice, as a budget's resize writes its plan: ops/job.with_budget_plan), so the file measured
    is the row's file even where the setting ranked by the base (--target-size with --base, a base policy; a
    single-file base's text encoders came from --base-config, which a resize does not take); a setting that needs
    the base keeps only the pinned ranks. Without `names`: `without_base`."""
    opts = row.options
    if names is None or len(names) != len(row.ranks):
        return without_base(opts)
    pinned = {n: int(k) for n, k in zip(names, row.ranks) if int(k) >= 1}
    if needs_base(opts):
        return replace(opts.with_setting(ranks=pinned), base=None, base_variant=None)
    return replace(opts, ranks={**pinned, **(opts.ranks or {})}, base=None, base_variant=None)


def written_key(row: SettingRow) -> tuple:
    """What a setting's written tensors depend on, given the options its sweep shares: every layer's rank and the
    save precision asked for (a resize writes the rank-k truncation of each layer, its alpha a function of k)."""
    return tuple(int(k) for k in row.ranks), row.options.precision


class EffectMeter:
    """A base model loaded once, its probes, the original LoRA as stored (`original`) and the predictions with no
    LoRA and with the original one; `error` measures a setting's tensors against them. Use as a context manager
    (the model is released on exit). `options`: the options the settings share; where they bake block strengths
    in (scale rules, --block-weights) the original is the LoRA with those strengths at full rank (strengths_only),
    so the effect error measures the resize, not the strengths asked for.

    Raises OptionsError / MissingDependency for bad probing options or a missing extra ('preview'),
    InputFileError for a base that is not a model, LoraStructureError for a LoRA none of whose modules the base
    has (a LoRA for another model)."""

    def __init__(self, src: str | os.PathLike, probing: Probing, options: ResizeOptions | None = None):
        self.src, self.probing, self.strengths = src, probing, strengths_only(options)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "EffectMeter":
        from ..core.schedule import compute_device
        from ..diffusion import BaseModel
        from .resize import resized
        p = self.probing
        try:
            self.model = self._stack.enter_context(BaseModel(p.base, variant=p.variant, config=p.config,
                                                             device=str(compute_device(p.device))))
            self.probes = self.model.probes(prompts=p.prompts, seeds=[p.seed], timesteps=p.timesteps, size=p.size)
            self.eps_base = self.model.predict(self.probes)
            self.original = (as_stored(self.src) if self.strengths is None else  # read once: the preview
                             InMemory.of(resized(self.src, self.strengths)))  # applies it again to render
            self.eps_original = self.predict(self.original)
            self.report = self.model.patch_report  # what the original LoRA patched (PatchReport)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def predict(self, lora: InMemory) -> list[torch.Tensor]:
        """The denoiser's outputs at the probes with a LoRA applied (in memory, restored after)."""
        with lora.applied(self.model):
            return self.model.predict(self.probes)

    def error(self, lora: InMemory) -> float:
        """The effect error of a LoRA against the original's (module docstring)."""
        return self.error_of(self.predict(lora))

    def error_of(self, eps: list[torch.Tensor]) -> float:
        """The effect error of predictions `eps` at the probes (made under a patch the caller holds)."""
        from ..diffusion import effect_error
        return effect_error(eps, self.eps_original, self.eps_base)


def measure_effects(meter: EffectMeter, rows: Sequence[SettingRow], progress: Progress | None = None,
                    names: Sequence[str] | None = None) -> None:
    """Fill `row.effect_error` for every row: each distinct written file (`written_key`) is made in memory with
    `lora_resize.resized(src, as_planned(row, names))` and measured once. Raises what `resized` raises."""
    from .resize import resized
    groups: dict[tuple, list[SettingRow]] = {}
    for row in rows:
        groups.setdefault(written_key(row), []).append(row)
    todo = list(groups.values())
    for same in (progress or (lambda it, total: it))(todo, len(todo)):
        error = meter.error(InMemory.of(resized(meter.src, as_planned(same[0], names))))
        for row in same:
            row.effect_error = error

