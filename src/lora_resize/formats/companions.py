"""Tensors that sit beside LoRA factors in every family's files but are not factors: loaders add them to the base
weight (or bias) as they are, or set it, so a resize copies them unchanged and lists them by kind (ComfyUI
comfy/lora.py `load_lora`: `.diff`, `.diff_b`, `.set_weight`).
ComfyUI's "Extract and Save Lora" and KJNodes' extractor write `diff_b`; LyCORIS's full module writes `diff`;
Wan lightx2v/CausVid and OneTrainer files carry bias diffs; BFL control LoRAs set norms and reshape weights."""
from __future__ import annotations

import re

COMPANIONS = (  # (key pattern, kind)
    (re.compile(r"\.diff$"), "full diff"),
    (re.compile(r"\.diff_b$"), "bias diff"),
    (re.compile(r"\.diff_m$"), "modulation diff"),
    (re.compile(r"\.set_weight$"), "set weight"),
    (re.compile(r"\.reshape_weight$"), "reshape weight"),
    (re.compile(r"\.(w_norm|b_norm)$"), "norm"),
    (re.compile(r"(^|[._])(\w+_)?norm\.scale$"), "norm scale"),
)


def companion_kind(key: str) -> str | None:
    """The kind of a non-factor companion tensor, or None when `key` is not one."""
    return next((kind for rx, kind in COMPANIONS if rx.search(key)), None)
