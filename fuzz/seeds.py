"""Fuzz stage 1, seeds: small valid kohya LoRA files (linear / conv 1x1 / conv 3x3, with and without alpha,
passthrough keys, metadata, several dtypes; .pt/.ckpt pickles), and the case file model the mutations work on (`Ctx`:
tensors, metadata, header entries and bytes, serialised by hand so a header can be made to say anything)."""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"

ST_DTYPES = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64",
             "F8_E4M3", "F8_E5M2"]
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}

# kohya-style names
LIN_A = "lora_te_text_model_encoder_layers_0_mlp_fc1"
LIN_B = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
CONV1_A = "lora_unet_down_blocks_0_attentions_0_proj_in"
CONV1_B = "lora_unet_down_blocks_0_attentions_0_proj_out"
CONV3_A = "lora_unet_down_blocks_0_resnets_0_conv1"
CONV3_B = "lora_unet_down_blocks_0_resnets_0_conv2"
META = {"ss_training_comment": "trained on 40 photos of a teapot", "ss_network_dim": "8", "ss_network_alpha": "4.0",
        "ss_network_module": "networks.lora", "modelspec.title": "teapot \u2014 th\u00e9i\u00e8re"}


# ------------------------------------------------------------------------------------------------------------------
# Valid starting points

_torch = None


def torch_module():
    global _torch
    if _torch is None:
        import torch
        torch.set_num_threads(1)
        _torch = torch
    return _torch


def st_name(dtype) -> str:
    torch = torch_module()
    return {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.uint16: "U16",
            torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32",
            torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64",
            torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}[dtype]


def torch_dtype(st: str):
    torch = torch_module()
    return {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
            "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32,
            "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64,
            "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}[st]


def layer(name: str, out: int, inp: int, rank: int, g, kernel: int | None = None, alpha: float | None = None,
          dtype=None) -> dict:
    torch = torch_module()
    dtype = dtype or torch.float32
    k = kernel or 1
    down = torch.randn(rank, inp * k * k, generator=g) / math.sqrt(inp * k * k)
    up = torch.randn(out, rank, generator=g) * 0.1
    if kernel is not None:
        down = down.reshape(rank, inp, k, k)
        up = up.reshape(out, rank, 1, 1)
    sd = {name + DOWN: down.to(dtype), name + UP: up.to(dtype)}
    if alpha is not None:
        sd[name + ALPHA] = torch.tensor(alpha, dtype=dtype)
    return sd


def build_bases() -> dict[str, tuple[str, dict, dict | None]]:
    """name -> (suffix, state dict, metadata)."""
    torch = torch_module()
    g = torch.Generator().manual_seed(20240601)

    def mixed(dtype):
        sd = {}
        sd.update(layer(LIN_A, 12, 10, 4, g, alpha=2.0, dtype=dtype))
        sd.update(layer(LIN_B, 8, 9, 3, g, dtype=dtype))
        sd.update(layer(CONV1_A, 8, 6, 4, g, kernel=1, alpha=4.0, dtype=dtype))
        sd.update(layer(CONV1_B, 6, 5, 2, g, kernel=1, dtype=dtype))
        sd.update(layer(CONV3_A, 6, 4, 5, g, kernel=3, alpha=3.0, dtype=dtype))
        sd.update(layer(CONV3_B, 4, 3, 3, g, kernel=3, dtype=dtype))
        sd["some.other.weight"] = torch.randn(5, 3, generator=g).to(dtype)
        sd["some.other.index"] = torch.arange(7, dtype=torch.int64) * 3 - 4
        return sd

    bases = {
        "lin_alpha_f32": (".safetensors", layer(LIN_A, 12, 10, 4, g, alpha=2.0), dict(META)),
        "lin_noalpha_f16": (".safetensors", layer(LIN_B, 10, 8, 3, g, dtype=torch.float16), None),
        "conv1_alpha_bf16": (".safetensors", layer(CONV1_A, 8, 6, 4, g, kernel=1, alpha=1.0, dtype=torch.bfloat16),
                             dict(META)),
        "conv1_noalpha_f32": (".safetensors", layer(CONV1_B, 6, 7, 3, g, kernel=1), {}),
        "conv3_alpha_f16": (".safetensors", layer(CONV3_A, 6, 4, 5, g, kernel=3, alpha=5.0, dtype=torch.float16),
                            dict(META)),
        "conv3_noalpha_f32": (".safetensors", layer(CONV3_B, 5, 3, 4, g, kernel=3), None),
        "mixed_f32": (".safetensors", mixed(torch.float32), dict(META)),
        "mixed_f16": (".safetensors", mixed(torch.float16), dict(META)),
        "mixed_pt": (".pt", mixed(torch.float32), None),
        "mixed_ckpt_state_dict": (".ckpt", mixed(torch.float16), None),
        "lin_alpha_pth": (".pth", layer(LIN_A, 12, 10, 4, g, alpha=2.0), None),
        # the layouts and kinds found in the wild (issue 12)
        "xlabs_f32": (".safetensors", renamed(layer("double_blocks.0.processor.qkv_lora1", 12, 4, 3, g)
                                              | layer("single_blocks.0.processor.proj_lora", 4, 4, 2, g),
                                              ".down.weight", ".up.weight"), None),
        "peft_named_f16": (".safetensors", renamed(layer("base_model.model.model.layers.0.mlp.up_proj", 10, 6, 4, g,
                                                         dtype=torch.float16),
                                                   ".lora_A.default.weight", ".lora_B.default.weight"), None),
        "ab_alpha_f32": (".safetensors", renamed(layer("diffusion_model.blocks.0.self_attn.q", 8, 8, 3, g, alpha=1.5),
                                                 ".lora_A.weight", ".lora_B.weight"), dict(META)),
        "kohya_diffs_bf16": (".safetensors", with_diffs(layer(LIN_A, 12, 10, 4, g, alpha=2.0, dtype=torch.bfloat16),
                                                        LIN_A, g), dict(META)),
        "conv3d_f32": (".safetensors", conv3d("lora_unet_patch_embedding", 8, 3, 4, g), None),
        "fp8_e4m3": (".safetensors", {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v)
                                      for k, v in layer(LIN_B, 10, 8, 3, g, alpha=2.0).items()}, dict(META)),
    }
    return bases


def renamed(sd: dict, down: str, up: str) -> dict:
    """A kohya layer's tensors under another family's down/up suffixes (its alpha kept)."""
    return {k.replace(DOWN, down).replace(UP, up): v for k, v in sd.items()}


def with_diffs(sd: dict, name: str, g) -> dict:
    """Beside a LoRA pair: its bias diff, a full diff and a norm on other modules (copied unchanged)."""
    torch = torch_module()
    out = sd[name + UP].shape[0]
    return {**sd, name + ".diff_b": torch.randn(out, generator=g),
            "lora_unet_blocks_0_cross_attn_o.diff": torch.randn(6, 6, generator=g),
            "lora_unet_blocks_0_norm3.w_norm": torch.randn(6, generator=g)}


def conv3d(name: str, out: int, inp: int, rank: int, g) -> dict:
    """A conv3d LoRA (Wan's patch_embedding): down (r, in, 1, 2, 2), up (out, r, 1, 1, 1)."""
    torch = torch_module()
    return {name + DOWN: torch.randn(rank, inp, 1, 2, 2, generator=g) / 4,
            name + UP: torch.randn(out, rank, 1, 1, 1, generator=g) * 0.1}


# ------------------------------------------------------------------------------------------------------------------
# safetensors bytes, built by hand so that headers can be made to say anything

MISSING = object()


def tensor_raw(t) -> bytes:
    return t.contiguous().reshape(-1).view(torch_module().uint8).numpy().tobytes()


def json_text(v, ascii_: bool) -> str:
    return json.dumps(v, ensure_ascii=ascii_, separators=(",", ":"), allow_nan=True)


@dataclass
class Ctx:
    rng: random.Random
    tensors: list  # [key, torch tensor] in data order
    meta: Any  # dict, MISSING, or any JSON value
    entries: list = field(default_factory=list)  # [key, entry dict] after layout
    data: bytearray = field(default_factory=bytearray)
    extra_pairs: list = field(default_factory=list)  # (key text, value) appended to the header object
    top_override: str | None = None  # header JSON replaced wholesale
    header_tail: bytes = b""  # bytes inside the header after the JSON (before padding)
    pad: bytes = b" "
    ascii_json: bool = True
    blob: bytes = b""
    notes: list = field(default_factory=list)

    def note(self, s: str) -> None:
        self.notes.append(s)


def layout(ctx: Ctx) -> None:
    off = 0
    ctx.entries, ctx.data = [], bytearray()
    for key, t in ctx.tensors:
        raw = tensor_raw(t)
        ctx.entries.append([key, {"dtype": st_name(t.dtype), "shape": list(t.shape),
                                  "data_offsets": [off, off + len(raw)]}])
        ctx.data += raw
        off += len(raw)


def serialize(ctx: Ctx) -> bytes:
    if ctx.top_override is not None:
        text = ctx.top_override
    else:
        parts = []
        if ctx.meta is not MISSING:
            parts.append(f"{json_text('__metadata__', True)}:{json_text(ctx.meta, ctx.ascii_json)}")
        for k, v in ctx.entries:
            parts.append(f"{json_text(k, ctx.ascii_json)}:{json_text(v, ctx.ascii_json)}")
        for ktext, v in ctx.extra_pairs:
            parts.append(f"{ktext}:{json_text(v, ctx.ascii_json)}")
        text = "{" + ",".join(parts) + "}"
    raw = text.encode("utf-8", "surrogatepass") + ctx.header_tail
    raw += ctx.pad[:1] * (-len(raw) % 8) if ctx.pad else b""
    return len(raw).to_bytes(8, "little") + raw + bytes(ctx.data)


def header_len(blob: bytes) -> int:
    return int.from_bytes(blob[:8], "little") if len(blob) >= 8 else 0


@dataclass
class Case:
    index: int
    base: str
    mutations: list
    argv: list
    src: Path
    dst: Path
    marker: Path
    previous: bytes | None
    description: str = ""
