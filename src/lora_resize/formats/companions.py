"""Tensors that sit beside LoRA factors in every family's files but are not factors: loaders add them to the base
weight (or bias) as they are, or set it, so a resize copies them unchanged and lists them by kind (ComfyUI
comfy/lora.py `load_lora`: `.diff`, `.diff_b`, `.set_weight`).
ComfyUI's "Extract and Save Lora" and KJNodes' extractor write `diff_b`; LyCORIS's full module writes `diff`;
Wan lightx2v/CausVid and OneTrainer files carry bias diffs; BFL control LoRAs set norms and reshape weights.

How a merge combines each kind (`merge_rule`) follows from what the loader does with it. ComfyUI comfy/lora.py
`load_lora` makes `.diff`, `.diff_b`, `.w_norm` and `.b_norm` "diff" patches, which `calculate_weight` applies as
`weight += strength * diff`, and `.set_weight` a "set" patch (`weight.copy_(v)`, whatever the strength);
comfy/lora_convert.py `convert_lora_bfl_control` turns BFL's `lora_B.bias` into `diff_b` (added) and
`*_norm.scale` into `*_norm.set_weight` (set), and writes `img_in.reshape_weight` as the shape the weight is padded
to (comfy/weight_adapter/lora.py). Wan's `diff_m` is the trained modulation minus the base's (ComfyUI issue #8922).
PEFT adds `lora_B`'s bias with the LoRA's output (peft/tuners/lora/layer.py `Linear.forward`). A DoRA magnitude
replaces the column norms of the updated weight (Liu et al. 2024, arXiv:2402.09353), so it belongs to one update."""
from __future__ import annotations

import re

from .base import BIAS_KIND, DORA_KIND

COMPANIONS = (  # (key pattern, kind)
    (re.compile(r"\.diff$"), "full diff"),
    (re.compile(r"\.diff_b$"), "bias diff"),
    (re.compile(r"\.diff_m$"), "modulation diff"),
    (re.compile(r"\.set_weight$"), "set weight"),
    (re.compile(r"\.reshape_weight$"), "reshape weight"),
    (re.compile(r"\.(w_norm|b_norm)$"), "norm"),
    (re.compile(r"(^|[._])(\w+_)?norm\.scale$"), "norm scale"),
)

# kinds a loader adds to the base weight or bias (times the strength it is loaded with): a merge sums them,
# sum_i w_i * t_i, as it sums the LoRA updates
ADDED = frozenset({"full diff", "bias diff", "modulation diff", "norm", BIAS_KIND})
# kinds that are one update's own, applied with the strength: identical in the inputs, weights summing to 1
WHOLE = frozenset({DORA_KIND})
WHOLE_SUFFIX = " module"  # a LyCORIS module copied as it is (formats/lycoris.py: "<label> module")


def companion_kind(key: str) -> str | None:
    """The kind of a non-factor companion tensor, or None when `key` is not one."""
    return next((kind for rx, kind in COMPANIONS if rx.search(key)), None)


def merge_rule(kind: str | None) -> str:
    """How a merge combines a non-factor tensor of `kind` (None: an unknown tensor, 'other'):

    - 'add': the loader adds it (ADDED): the merged tensor is sum_i w_i * t_i over the inputs holding it;
    - 'whole': it belongs to one update and is applied with the strength (a DoRA magnitude, a LyCORIS module that
      cannot be written as factors): kept only when the inputs holding it hold identical values and their weights
      sum to 1 (the same update, split);
    - 'same': the loader sets it, whatever the strength (set weights, norm scales, reshape shapes, ControlNet
      weights), or its use is unknown: kept only when the inputs holding it hold identical values."""
    if kind in ADDED:
        return "add"
    if kind in WHOLE or (kind or "").endswith(WHOLE_SUFFIX):
        return "whole"
    return "same"
