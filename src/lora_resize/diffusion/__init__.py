"""The diffusers room: a base model loaded as a diffusers pipeline, a LoRA applied to it in memory, and what that
does to the model's output - the denoiser's predictions at fixed probes (the effect error) and rendered images.

Everything here that needs diffusers or transformers imports them lazily (`errors.require`; the `preview` extra),
so the command line starts without them:

    with BaseModel(base) as bm:                       # a diffusers folder or a single-file checkpoint
        probes = bm.probes(prompts, seeds=[0])        # the base's own trajectories (no LoRA)
        eps_b = bm.predict(probes)
        with bm.patched(tensors, metadata):           # any layout lora-resize reads, applied in memory
            eps_o = bm.predict(probes)
        ...
        effect_error(eps_s, eps_o, eps_b)             # mean ||eps_s - eps_o|| / ||eps_o - eps_b||

Leaving `patched` restores every touched weight bit for bit; only the LoRA's modules are touched, so a sweep of
settings reloads nothing."""
from __future__ import annotations

from .effect import effect_error
from .patch import PatchReport
from .pipeline import BaseModel, Probes

__all__ = ["BaseModel", "PatchReport", "Probes", "effect_error"]
