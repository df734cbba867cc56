"""Mutation fuzz campaign over the reader and the whole `lora-resize` command line.

Starts from small valid kohya LoRA files (linear / conv 1x1 / conv 3x3, with and without alpha, passthrough keys,
metadata, several dtypes; plus .pt/.ckpt pickles), mutates them (truncation, header length field, header JSON,
dtypes, shapes, offsets, duplicate keys, metadata, key names, NaN/Inf, zero-sized and rank-0 tensors, factors that
don't chain, shaped alphas, byte flips, pickle payloads, ...) and runs `lora_resize.cli.main([...])` in-process on
each case, in a pool of worker processes with a per-case time bound. Every case must end in

  - exit 0 with a valid output (readable by `safetensors.safe_open` / `torch.load(weights_only=True)`, finite
    floating tensors, LoRA pairs that chain, a scalar alpha per pair) and nothing on stderr, or
  - exit 2 with exactly one stderr line starting `lora-resize: error:`, no output file (a previous output at the
    destination byte-identical), and no `.lora-resize-*` temporary file;

and in both cases the input byte-identical (sha256), no other file created, no pickle payload executed.
Anything else is a finding: exit 1 (internal error), an exception escaping main(), a hang (past --timeout), a worker
crash, a partial/temporary file left, a modified input or a damaged previous output.

    .venv/bin/python fuzz/fuzz_cli.py --cases 10000 --seed 1
    .venv/bin/python fuzz/fuzz_cli.py --seed 1 --replay 1234     # rerun one case here, with the traceback

Cases are deterministic functions of (seed, index), so any finding is reproduced with --replay. (One exception:
torch.save's legacy format, used by the `p_legacy` mutation, writes per-process storage keys, so a byte flip in such
a file can land on different content from one run to the next.)
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import random
import resource
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import Any, Callable

DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
TMP_PREFIX = ".lora-resize-"
GOOD = ("ok_output", "clean_error")
OUTCOMES = ("ok_output", "clean_error", "internal_error", "escaped_exception", "bad_exit_code", "bad_error_message",
            "stderr_on_success", "invalid_output", "output_left_after_error", "previous_output_damaged",
            "partial_file_left", "stray_file", "input_modified", "payload_executed", "hang", "worker_crash",
            "harness_error")

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


def _t():
    global _torch
    if _torch is None:
        import torch
        torch.set_num_threads(1)
        _torch = torch
    return _torch


def _ST(dtype) -> str:
    torch = _t()
    return {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.uint16: "U16",
            torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32",
            torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64",
            torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}[dtype]


def _TORCH(st: str):
    torch = _t()
    return {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
            "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32,
            "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64,
            "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}[st]


def layer(name: str, out: int, inp: int, rank: int, g, kernel: int | None = None, alpha: float | None = None,
          dtype=None) -> dict:
    torch = _t()
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
    torch = _t()
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
    }
    return bases


# ------------------------------------------------------------------------------------------------------------------
# safetensors bytes, built by hand so that headers can be made to say anything

MISSING = object()


def tensor_raw(t) -> bytes:
    return t.contiguous().reshape(-1).view(_t().uint8).numpy().tobytes()


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
        ctx.entries.append([key, {"dtype": _ST(t.dtype), "shape": list(t.shape),
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


# ------------------------------------------------------------------------------------------------------------------
# Mutations. Stage "T": on tensors/metadata; "H": on the laid-out header entries and data; "B": on the final bytes;
# "P": on a pickle file's state dict; "PB": on the pickle's bytes.

MUTATIONS: dict[str, tuple[str, int, Callable]] = {}


def mutation(stage: str, weight: int = 10):
    def deco(fn):
        MUTATIONS[fn.__name__] = (stage, weight, fn)
        return fn
    return deco


def _layers(ctx) -> list[str]:
    keys = [k for k, _ in ctx.tensors]
    return sorted({k[:-len(DOWN)] for k in keys if k.endswith(DOWN)} | {k[:-len(UP)] for k in keys if k.endswith(UP)})


def _idx(ctx, key) -> int | None:
    for i, (k, _) in enumerate(ctx.tensors):
        if k == key:
            return i
    return None


def _set(ctx, key, t) -> None:
    i = _idx(ctx, key)
    if i is None:
        ctx.tensors.append([key, t])
    else:
        ctx.tensors[i][1] = t


def _get(ctx, key):
    i = _idx(ctx, key)
    return None if i is None else ctx.tensors[i][1]


def _pick_key(ctx, pred=lambda k, t: True):
    cands = [k for k, t in ctx.tensors if pred(k, t)]
    return ctx.rng.choice(cands) if cands else None


def _pick_layer(ctx):
    ls = _layers(ctx)
    return ctx.rng.choice(ls) if ls else None


SPECIAL_VALUES = [float("nan"), float("inf"), float("-inf"), 1e38, -3e38, 65504.0, 70000.0, 1e-40, 1e-45, 5e-8,
                  0.0, -0.0, 1e30, 1e-30]


@mutation("T", 12)
def t_special_values(ctx):
    key = _pick_key(ctx, lambda k, t: t.is_floating_point() and t.numel() > 0)
    if key is None:
        return
    t = _get(ctx, key)
    flat = t.double().reshape(-1)  # set in float64, then cast: out-of-range values become inf as in a real file
    val = ctx.rng.choice(SPECIAL_VALUES)
    n = ctx.rng.choice([1, 1, 2, flat.numel()])
    for _ in range(min(n, flat.numel())):
        flat[ctx.rng.randrange(flat.numel())] = val
    if n >= flat.numel():
        flat.fill_(val)
    _set(ctx, key, flat.reshape(t.shape).to(t.dtype))
    ctx.note(f"{val}x{n}@{key[-30:]}")


@mutation("T", 10)
def t_scale_layer(ctx):
    torch = _t()
    name = _pick_layer(ctx)
    if name is None:
        return
    e = ctx.rng.choice([-46, -40, -30, -20, -8, -4, 4, 8, 15, 19, 20, 30, 38, 60, 150, 300])
    for suf in ctx.rng.choice([(DOWN,), (UP,), (DOWN, UP)]):
        t = _get(ctx, name + suf)
        if t is not None and t.is_floating_point():
            wide = ctx.rng.random() < 0.3
            v = (t.double() * (10.0 ** e)).to(torch.float64 if wide else t.dtype)
            _set(ctx, name + suf, v)
    ctx.note(f"1e{e}")


@mutation("T", 6)
def t_zero_layer(ctx):
    name = _pick_layer(ctx)
    if name is None:
        return
    for suf in ctx.rng.choice([(DOWN,), (UP,), (DOWN, UP)]):
        t = _get(ctx, name + suf)
        if t is not None:
            _set(ctx, name + suf, t * 0)


@mutation("T", 6)
def t_equal_or_rank1(ctx):
    """Singular values all equal (orthonormal factors), or a rank-1 layer."""
    torch = _t()
    name = _pick_layer(ctx)
    if name is None or _get(ctx, name + DOWN) is None or _get(ctx, name + UP) is None:
        return
    d, u = _get(ctx, name + DOWN), _get(ctx, name + UP)
    r, n, m = d.shape[0], d[0].numel() if d.shape[0] else 0, u.shape[0]
    if r == 0 or n == 0 or m == 0 or u.ndim < 2 or u.shape[1] != r or u.numel() != m * r:
        return
    g = torch.Generator().manual_seed(ctx.rng.randrange(1 << 30))
    if ctx.rng.random() < 0.5 and r <= min(m, n):
        qd = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0].T
        qu = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
        s = ctx.rng.choice([1.0, 1e-3, 3.0])
        nd, nu = qd * s, qu * s
        ctx.note("equal_sv")
    else:
        a = torch.randn(m, 1, generator=g, dtype=torch.float64)
        b = torch.randn(1, n, generator=g, dtype=torch.float64)
        nu = a @ torch.randn(1, r, generator=g, dtype=torch.float64)
        nd = torch.randn(r, 1, generator=g, dtype=torch.float64) @ b / 10
        ctx.note("rank1")
    _set(ctx, name + DOWN, nd.reshape(d.shape).to(d.dtype))
    _set(ctx, name + UP, nu.reshape(u.shape).to(u.dtype))


@mutation("T", 8)
def t_zero_sized(ctx):
    torch = _t()
    key = _pick_key(ctx)
    if key is None:
        return
    t = _get(ctx, key)
    shape = list(t.shape) or [1]
    shape[ctx.rng.randrange(len(shape))] = 0
    _set(ctx, key, torch.zeros(shape, dtype=t.dtype))
    ctx.note(f"{key[-24:]}->{shape}")


@mutation("T", 6)
def t_rank_zero(ctx):
    torch = _t()
    name = _pick_layer(ctx)
    if name is None:
        return
    d, u = _get(ctx, name + DOWN), _get(ctx, name + UP)
    if d is None or u is None:
        return
    _set(ctx, name + DOWN, torch.zeros((0,) + tuple(d.shape[1:]), dtype=d.dtype))
    _set(ctx, name + UP, torch.zeros((u.shape[0], 0) + tuple(u.shape[2:]), dtype=u.dtype))


@mutation("T", 10)
def t_no_chain(ctx):
    """down/up pairs that don't chain: rank mismatch, ndim mismatch, wrong kernel, 1-D/3-D/5-D, swapped."""
    torch = _t()
    name = _pick_layer(ctx)
    if name is None:
        return
    d, u = _get(ctx, name + DOWN), _get(ctx, name + UP)
    if d is None or u is None:
        return
    how = ctx.rng.choice(["rank", "ndim_up", "ndim_down", "kernel_up", "kernel_down", "1d", "3d", "5d", "swap",
                          "transpose"])
    g = torch.Generator().manual_seed(ctx.rng.randrange(1 << 30))
    if how == "rank":
        r2 = max(1, u.shape[1] + ctx.rng.choice([-2, -1, 1, 3]))
        _set(ctx, name + UP, torch.randn((u.shape[0], r2) + tuple(u.shape[2:]), generator=g).to(u.dtype))
    elif how == "ndim_up":
        _set(ctx, name + UP, u.reshape(u.shape[0], u.shape[1]) if u.ndim == 4 else u.reshape(*u.shape, 1, 1))
    elif how == "ndim_down":
        _set(ctx, name + DOWN, d.reshape(d.shape[0], -1) if d.ndim == 4 else d.reshape(*d.shape, 1, 1))
    elif how == "kernel_up":
        _set(ctx, name + UP, torch.randn(u.shape[0], u.shape[1], 3, 3, generator=g).to(u.dtype))
    elif how == "kernel_down":
        k = ctx.rng.choice([(1, 5), (2, 2), (7, 1), (0, 3)])
        _set(ctx, name + DOWN, torch.randn(d.shape[0], 2, *k, generator=g).to(d.dtype))
        if u.ndim == 2:
            _set(ctx, name + UP, u.reshape(*u.shape, 1, 1))
    elif how == "1d":
        _set(ctx, name + ctx.rng.choice([DOWN, UP]), d.reshape(-1))
    elif how == "3d":
        _set(ctx, name + DOWN, d.reshape(d.shape[0], -1, 1))
        _set(ctx, name + UP, u.reshape(u.shape[0], u.shape[1], 1))
    elif how == "5d":
        _set(ctx, name + DOWN, d.reshape(d.shape[0], -1, 1, 1, 1))
        _set(ctx, name + UP, u.reshape(u.shape[0], u.shape[1], 1, 1, 1))
    elif how == "swap":
        _set(ctx, name + DOWN, u)
        _set(ctx, name + UP, d)
    else:
        _set(ctx, name + DOWN, d.reshape(d.shape[0], -1).T.contiguous())
    ctx.note(how)


@mutation("T", 8)
def t_alpha(ctx):
    """alpha with a shape, or odd alpha values / dtypes."""
    torch = _t()
    name = _pick_layer(ctx)
    if name is None:
        return
    how = ctx.rng.choice(["shape2", "shape1", "shape11", "shape0", "shape33", "value", "value", "int", "bool",
                          "f64", "f8"])
    val = ctx.rng.choice([0.0, -4.0, 1e-30, 1e30, 3e38, 70000.0, float("nan"), float("inf"), 1e-45, 1e300, 2.0])
    shapes = {"shape2": [2], "shape1": [1], "shape11": [1, 1], "shape0": [0], "shape33": [3, 3]}
    if how in shapes:
        a = torch.full(shapes[how], 4.0)
    elif how == "value":
        a = torch.tensor(val, dtype=torch.float64 if abs(val) > 3.4e38 else torch.float32)
    elif how == "int":
        a = torch.tensor(ctx.rng.choice([0, 4, -3, 2 ** 40]), dtype=torch.int64)
    elif how == "bool":
        a = torch.tensor(True)
    elif how == "f64":
        a = torch.tensor(val, dtype=torch.float64)
    else:
        a = torch.tensor(4.0).to(torch.float8_e4m3fn)
    _set(ctx, name + ALPHA, a)
    ctx.note(f"{how}:{val if how in ('value', 'f64') else ''}")


@mutation("T", 8)
def t_cast(ctx):
    """A tensor stored (correctly) in another dtype: integer or bool factors, float8, float64, ..."""
    torch = _t()
    key = _pick_key(ctx)
    if key is None:
        return
    st = ctx.rng.choice(ST_DTYPES)
    t = _get(ctx, key)
    src = t.double() * (ctx.rng.choice([1, 10, 1000]) if st[0] in "IU" else 1)
    if st in ("U8", "U16", "U32", "U64"):
        src = src.abs()
    try:
        _set(ctx, key, src.to(_TORCH(st)))
    except (RuntimeError, TypeError):
        _set(ctx, key, src.to(torch.int64).to(_TORCH(st)))
    ctx.note(f"{key[-24:]}->{st}")


@mutation("T", 7)
def t_drop_key(ctx):
    key = _pick_key(ctx)
    if key is not None:
        del ctx.tensors[_idx(ctx, key)]
        ctx.note(key[-30:])


@mutation("T", 7)
def t_add_key(ctx):
    torch = _t()
    how = ctx.rng.choice(["stray_alpha", "lone_down", "lone_up", "bool", "scalar", "empty", "many_dims",
                          "int_pass", "f8_pass", "big_pass", "u64_pass"])
    if how == "stray_alpha":
        _set(ctx, "lora_unet_nowhere" + ALPHA, torch.tensor(1.0))
    elif how == "lone_down":
        _set(ctx, "lora_unet_lonely" + DOWN, torch.randn(2, 3))
    elif how == "lone_up":
        _set(ctx, "lora_unet_lonely" + UP, torch.randn(3, 2))
    elif how == "bool":
        _set(ctx, "mask", torch.tensor([True, False, True]))
    elif how == "scalar":
        _set(ctx, "step", torch.tensor(1234.5))
    elif how == "empty":
        _set(ctx, "nothing", torch.zeros(0, 7))
    elif how == "many_dims":
        _set(ctx, "deep", torch.ones([1] * 60))
    elif how == "int_pass":
        _set(ctx, "counts", torch.arange(10, dtype=torch.int32))
    elif how == "f8_pass":
        _set(ctx, "f8", torch.randn(4).to(torch.float8_e5m2))
    elif how == "big_pass":
        _set(ctx, "bigval", torch.tensor([1e20, -7e4, 3e38], dtype=torch.float32))
    else:
        _set(ctx, "u64", torch.tensor([2 ** 63 + 5], dtype=torch.uint64))
    ctx.note(how)


NAME_JUNK = ["\n", "\r\n", "\x1b[31m", "\x00", "\t", "\u2028", "\U0001F600", "\u00e9", "\\", "\"", " ", "..", "/",
             "\udc80", "\ud800", "\ufeff", "%s%n", "{}", ""]


@mutation("T", 8)
def t_rename(ctx):
    key = _pick_key(ctx)
    if key is None:
        return
    i = _idx(ctx, key)
    how = ctx.rng.choice(["junk_in_name", "empty_base", "long", "suffix_swap", "suffix_drop", "collide", "meta_name",
                          "case"])
    if how == "junk_in_name":
        j = ctx.rng.choice(NAME_JUNK)
        pos = ctx.rng.randrange(len(key) + 1)
        new = key[:pos] + j + key[pos:]
    elif how == "empty_base":
        new = next((s for s in (DOWN, UP, ALPHA) if key.endswith(s)), "")
    elif how == "long":
        new = "x" * ctx.rng.choice([300, 5000, 100000]) + key
    elif how == "suffix_swap":
        new = key.replace(DOWN, UP) if DOWN in key else key.replace(UP, DOWN)
    elif how == "suffix_drop":
        new = key.rsplit(".", 1)[0]
    elif how == "collide":
        other = _pick_key(ctx)
        new = other
    elif how == "meta_name":
        new = "__metadata__"
    else:
        new = key.upper()
    ctx.tensors[i][0] = new
    ctx.note(f"{how}:{new[:40]!r}")


@mutation("T", 10)
def t_metadata(ctx):
    rng = ctx.rng
    how = rng.choice(["huge_value", "many_keys", "control", "non_string_value", "not_object", "remove", "null",
                      "surrogate", "unicode", "empty_key", "ours", "hashes", "huge_key"])
    meta = dict(ctx.meta) if isinstance(ctx.meta, dict) else {}
    if how == "huge_value":
        n = rng.choice([1 << 16, 1 << 20, 3 << 20, 9 << 20])
        meta["ss_training_comment"] = "\u00e9\n" * (n // 3) if rng.random() < 0.5 else "x" * n
    elif how == "many_keys":
        for i in range(rng.choice([1000, 20000])):
            meta[f"k{i}"] = str(i)
    elif how == "control":
        meta["ss_training_comment"] = "".join(chr(c) for c in range(32)) + "\x7f\u0085"
    elif how == "non_string_value":
        meta["ss_network_dim"] = rng.choice([8, 8.5, None, True, [1, 2], {"a": "b"}, float("nan")])
    elif how == "not_object":
        meta = rng.choice([[1, 2], "text", 5, True, [["a", "b"]]])
    elif how == "remove":
        meta = MISSING
    elif how == "null":
        meta = None
    elif how == "surrogate":
        meta["ss_training_comment"] = "bad \ud800 surrogate"
    elif how == "unicode":
        meta["\u00fc\U0001F600"] = "\u4e2d\u6587\u0000"
    elif how == "empty_key":
        meta[""] = ""
    elif how == "ours":
        meta["lora_resize"] = "{not json"
    elif how == "hashes":
        meta["sshs_model_hash"] = "x" * 64
    else:
        meta["k" * (1 << 20)] = "v"
    ctx.meta = meta
    ctx.note(how)


@mutation("T", 3)
def t_equal_keys_reordered(ctx):
    """Valid: tensors in an unusual data order (must just work)."""
    ctx.rng.shuffle(ctx.tensors)


# --- header-level ---------------------------------------------------------------------------------------------------

def _pick_entry(ctx):
    return ctx.rng.choice(ctx.entries) if ctx.entries else None


@mutation("H", 8)
def h_offsets(ctx):
    rng = ctx.rng
    e = _pick_entry(ctx)
    if e is None:
        return
    k, v = e
    b, en = v["data_offsets"]
    n = len(ctx.data)
    how = rng.choice(["overlap", "swap", "past_end", "begin_gt_end", "negative", "three", "float", "string", "huge",
                      "bool", "null", "shift_all", "zero_len"])
    if how == "overlap" and len(ctx.entries) > 1:
        other = rng.choice(ctx.entries)[1]
        ob = other["data_offsets"][0]
        size = en - b
        nb = max(0, min(ob + rng.randrange(1, 8), n - size))
        v["data_offsets"] = [nb, nb + size]
    elif how == "swap" and len(ctx.entries) > 1:
        other = rng.choice(ctx.entries)[1]
        v["data_offsets"], other["data_offsets"] = other["data_offsets"], v["data_offsets"]
    elif how == "past_end":
        v["data_offsets"] = [b, n + rng.choice([1, 8, 4096, 1 << 40])]
    elif how == "begin_gt_end":
        v["data_offsets"] = [en, b]
    elif how == "negative":
        v["data_offsets"] = [-8, en - b - 8]
    elif how == "three":
        v["data_offsets"] = [b, en, en]
    elif how == "float":
        v["data_offsets"] = [float(b), float(en)]
    elif how == "string":
        v["data_offsets"] = [str(b), str(en)]
    elif how == "huge":
        v["data_offsets"] = [2 ** 64 + b, 2 ** 64 + en]
    elif how == "bool":
        v["data_offsets"] = [False, True]
    elif how == "null":
        v["data_offsets"] = None
    elif how == "shift_all":
        d = rng.choice([-1, 1, 2])
        for _, w in ctx.entries:
            w["data_offsets"] = [w["data_offsets"][0] + d, w["data_offsets"][1] + d]
    else:
        v["data_offsets"] = [b, b]
    ctx.note(how)


@mutation("H", 4)
def h_reverse_data(ctx):
    """Valid: data laid out in reverse order of the header entries."""
    chunks = [(k, v, bytes(ctx.data[v["data_offsets"][0]:v["data_offsets"][1]])) for k, v in ctx.entries]
    ctx.data = bytearray()
    off = 0
    for k, v, c in reversed(chunks):
        v["data_offsets"] = [off, off + len(c)]
        ctx.data += c
        off += len(c)


@mutation("H", 8)
def h_shape(ctx):
    rng = ctx.rng
    e = _pick_entry(ctx)
    if e is None:
        return
    v = e[1]
    s = list(v["shape"])
    how = rng.choice(["plus1", "minus1", "negative", "float", "bool", "string", "huge", "null", "nested", "extra",
                      "drop", "not_list", "reshape_same_bytes", "zero"])
    if how == "plus1" and s:
        s[rng.randrange(len(s))] += 1
    elif how == "minus1" and s:
        i = rng.randrange(len(s))
        s[i] = max(0, s[i] - 1)
    elif how == "negative" and s:
        s[0] = -s[0]
    elif how == "float" and s:
        s[0] = float(s[0])
    elif how == "bool":
        s = [True] * max(1, len(s))
    elif how == "string" and s:
        s[0] = str(s[0])
    elif how == "huge":
        s = [2 ** 31, 2 ** 31] if rng.random() < 0.5 else [2 ** 64, 0]
    elif how == "null":
        s = None
    elif how == "nested" and s:
        s = [s]
    elif how == "extra":
        s = s + [1, 1]
    elif how == "drop" and s:
        s = s[1:]
    elif how == "not_list":
        s = rng.choice([5, "5", {"0": 5}])
    elif how == "reshape_same_bytes" and s:
        numel = 1
        for x in s:
            numel *= x
        s = rng.choice([[numel], [numel, 1], [1, numel], list(reversed(s))])
    elif how == "zero" and s:
        s[rng.randrange(len(s))] = 0
    v["shape"] = s
    ctx.note(how)


@mutation("H", 8)
def h_dtype(ctx):
    rng = ctx.rng
    e = _pick_entry(ctx)
    if e is None:
        return
    v = e[1]
    how = rng.choice(["other", "reinterpret", "reinterpret", "invalid", "non_string"])
    if how == "other":
        v["dtype"] = rng.choice(ST_DTYPES)
    elif how == "reinterpret" and v.get("dtype") in ITEMSIZE:
        b, en = v["data_offsets"]
        span = en - b
        new = rng.choice(ST_DTYPES)
        size = ITEMSIZE[new]
        s = list(v["shape"])
        if span % size == 0:
            if s and (span // size) % max(1, math.prod(s[:-1])) == 0 and math.prod(s[:-1]) > 0:
                s[-1] = (span // size) // math.prod(s[:-1])
            else:
                s = [span // size]
            v["dtype"], v["shape"] = new, s
    elif how == "invalid":
        v["dtype"] = rng.choice(["F128", "", "f32", "float32", "C64", "F4", "F8_E8M0", "I4", "\u00c932", "F32 "])
    else:
        v["dtype"] = rng.choice([5, None, ["F32"], {"F": 32}, True, 4.0])
    ctx.note(f"{how}->{v.get('dtype')!r}")


@mutation("H", 6)
def h_entry(ctx):
    rng = ctx.rng
    e = _pick_entry(ctx)
    if e is None:
        return
    how = rng.choice(["not_object", "missing_field", "extra_field", "empty"])
    if how == "not_object":
        e[1] = rng.choice([[1, 2], "F32", None, 7, True])
    elif how == "missing_field":
        e[1] = dict(e[1])
        del e[1][rng.choice(["dtype", "shape", "data_offsets"])]
    elif how == "extra_field":
        e[1] = dict(e[1], extra=rng.choice([1, "x", None, {"a": [1]}]))
    else:
        e[1] = {}
    ctx.note(how)


@mutation("H", 8)
def h_duplicate(ctx):
    """Duplicate keys in the header JSON: same entry twice, a second entry with other offsets, two __metadata__."""
    rng = ctx.rng
    e = _pick_entry(ctx)
    how = rng.choice(["same", "other_offsets", "metadata", "metadata_bad"])
    if how == "same" and e is not None:
        ctx.extra_pairs.append((json_text(e[0], True), dict(e[1])))
    elif how == "other_offsets" and e is not None and len(ctx.entries) > 1:
        other = rng.choice(ctx.entries)[1]
        ctx.extra_pairs.append((json_text(e[0], True), dict(other)))
    elif how == "metadata":
        ctx.extra_pairs.append(('"__metadata__"', {"ss_training_comment": "second"}))
    else:
        ctx.extra_pairs.append(('"__metadata__"', [1, 2]))
    ctx.note(how)


@mutation("H", 4)
def h_top(ctx):
    rng = ctx.rng
    how = rng.choice(["list", "string", "number", "null", "empty_obj", "deep", "bignum", "nan", "empty"])
    ctx.top_override = {
        "list": "[1, 2, 3]", "string": '"hello"', "number": "12345", "null": "null", "empty_obj": "{}",
        "deep": "[" * 200000 + "]" * 200000, "bignum": '{"a": ' + "9" * 20000 + "}",
        "nan": '{"x": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, Infinity]}}', "empty": "",
    }[how]
    ctx.note(how)


@mutation("H", 5)
def h_data_layout(ctx):
    """Gaps and trailing bytes in the data section (valid), or a leading hole."""
    rng = ctx.rng
    how = rng.choice(["trailing", "gap", "lead"])
    if how == "trailing":
        ctx.data += bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 100])))
    else:
        pad = rng.choice([1, 3, 16])
        for _, v in ctx.entries:
            if isinstance(v, dict) and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2:
                v["data_offsets"] = [v["data_offsets"][0] + pad, v["data_offsets"][1] + pad]
        ctx.data = bytearray(b"\0" * pad) + ctx.data
    ctx.note(how)


@mutation("H", 6)
def h_big_claim(ctx):
    """A header that claims gigabytes of data in a tiny file."""
    rng = ctx.rng
    name = rng.choice(["lora_unet_huge" + DOWN, "big.weight"])
    gb = rng.choice([1, 4, 64, 1 << 20])
    shape = [gb * (1 << 18), 1024] if rng.random() < 0.5 else [1 << 20, gb * 256]
    ctx.entries.append([name, {"dtype": "F32", "shape": shape, "data_offsets": [0, 4 * shape[0] * shape[1]]}])
    if name.endswith(DOWN):
        ctx.entries.append(["lora_unet_huge" + UP, {"dtype": "F32", "shape": [4, shape[0]],
                                                   "data_offsets": [0, 16 * shape[0]]}])
    ctx.note(f"{gb}GB")


@mutation("H", 5)
def h_padding(ctx):
    rng = ctx.rng
    how = rng.choice(["nul", "newline", "none", "garbage_tail", "spaces_tail", "bom"])
    if how == "nul":
        ctx.pad = b"\0"
    elif how == "newline":
        ctx.pad = b"\n"
    elif how == "none":
        ctx.pad = b""
    elif how == "garbage_tail":
        ctx.header_tail = b"xyz"
    elif how == "spaces_tail":
        ctx.header_tail = b" " * rng.choice([1, 9, 4096])
    else:
        ctx.header_tail = b"\xef\xbb\xbf"
    ctx.note(how)


@mutation("H", 3)
def h_unicode_json(ctx):
    ctx.ascii_json = False


# --- byte-level ------------------------------------------------------------------------------------------------------

def _regions(blob: bytes, ctx) -> list[tuple[int, int]]:
    n = header_len(blob)
    out = [(0, 8), (8, min(len(blob), 8 + n))]
    start = 8 + n
    for _, v in ctx.entries:
        try:
            b, e = v["data_offsets"]
            if isinstance(b, int) and isinstance(e, int) and 0 <= b <= e:
                out.append((min(start + b, len(blob)), min(start + e, len(blob))))
        except (TypeError, ValueError, KeyError):
            pass
    return out


@mutation("B", 14)
def b_truncate(ctx):
    rng = ctx.rng
    blob = ctx.blob
    if not blob:
        return
    n = header_len(blob)
    how = rng.choice(["length_field", "header", "header_end", "data_boundary", "data", "last_byte", "empty"])
    if how == "length_field":
        cut = rng.randrange(0, 8)
    elif how == "header":
        cut = rng.randrange(8, max(9, min(len(blob), 8 + n)))
    elif how == "header_end":
        cut = min(len(blob), 8 + n + rng.choice([-1, 0, 1]))
    elif how == "data_boundary":
        regs = _regions(blob, ctx)[2:]
        cut = (rng.choice(regs)[rng.randrange(2)] + rng.choice([-1, 0, 1])) if regs else len(blob) - 1
    elif how == "data":
        cut = rng.randrange(min(len(blob), 8 + n), len(blob) + 1)
    elif how == "last_byte":
        cut = len(blob) - 1
    else:
        cut = 0
    cut = max(0, min(cut, len(blob)))
    ctx.blob = blob[:cut]
    ctx.note(f"{how}@{cut}/{len(blob)}")


@mutation("B", 10)
def b_length_field(ctx):
    rng = ctx.rng
    blob = ctx.blob
    n = header_len(blob)
    v = rng.choice([n + 1, n - 1, n + 8, n - 8, n + 3, 0, 1, 7, len(blob), len(blob) - 8, len(blob) - 7,
                    2 ** 63, 2 ** 64 - 1, 2 ** 32, 2 ** 40, 100_000_001, 99_999_999, n * 2,
                    rng.randrange(2 ** 64)])
    v %= 2 ** 64
    ctx.blob = v.to_bytes(8, "little") + blob[8:]
    ctx.note(str(v))


@mutation("B", 12)
def b_flip(ctx):
    rng = ctx.rng
    blob = bytearray(ctx.blob)
    if not blob:
        return
    n = header_len(blob)
    where = rng.choice(["anywhere", "header", "data", "length"])
    lo, hi = {"anywhere": (0, len(blob)), "header": (8, min(len(blob), 8 + n)),
              "data": (min(len(blob), 8 + n), len(blob)), "length": (0, min(8, len(blob)))}[where]
    if hi <= lo:
        lo, hi = 0, len(blob)
    k = rng.choice([1, 1, 2, 4, 16])
    for _ in range(k):
        i = rng.randrange(lo, hi)
        blob[i] ^= 1 << rng.randrange(8)
    ctx.blob = bytes(blob)
    ctx.note(f"{where}x{k}")


JSON_BYTES = [b"{", b"}", b"[", b"]", b'"', b",", b":", b"\\", b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80",
              b"\\u", b"\\ud800", b"NaN", b"1e999", b"-", b"\n", b"\x80", b"\xf4\x90\x80\x80"]


@mutation("B", 10)
def b_json(ctx):
    """Corrupt the header JSON: replace, insert or delete bytes (the length field fixed up or not)."""
    rng = ctx.rng
    blob = ctx.blob
    n = header_len(blob)
    if len(blob) < 8 + n or n == 0:
        return
    head = bytearray(blob[8:8 + n])
    tok = rng.choice(JSON_BYTES)
    i = rng.randrange(len(head))
    how = rng.choice(["replace", "insert", "delete"])
    if how == "replace":
        head[i:i + len(tok)] = tok
    elif how == "insert":
        head[i:i] = tok
    else:
        del head[i:i + rng.choice([1, 2, 10])]
    fix = rng.random() < 0.7
    length = len(head) if fix else n
    ctx.blob = length.to_bytes(8, "little") + bytes(head) + blob[8 + n:]
    ctx.note(f"{how}{tok!r}@{i}{' fixed' if fix else ''}")


@mutation("B", 5)
def b_nonutf8_meta(ctx):
    """Raw non-UTF-8 bytes (or a UTF-8-encoded surrogate) inside a header string."""
    rng = ctx.rng
    blob = ctx.blob
    n = header_len(blob)
    head = bytes(blob[8:8 + n])
    i = head.find(b'"', rng.randrange(max(1, len(head))))
    if i < 0:
        return
    bad = rng.choice([b"\xff\xfe", b"\xc0\xaf", b"\xed\xb2\x80", b"\x80", b"\xf8\x88\x80\x80\x80"])
    head = head[:i + 1] + bad + head[i + 1:]
    ctx.blob = len(head).to_bytes(8, "little") + head + blob[8 + n:]
    ctx.note(repr(bad))


@mutation("B", 3)
def b_append(ctx):
    ctx.blob = ctx.blob + bytes(ctx.rng.randrange(256) for _ in range(ctx.rng.choice([1, 8, 1000])))


@mutation("B", 2)
def b_random_file(ctx):
    rng = ctx.rng
    how = rng.choice(["noise", "text", "zip", "pickle", "only_len"])
    if how == "noise":
        ctx.blob = bytes(rng.randrange(256) for _ in range(rng.choice([0, 5, 8, 64, 4096])))
    elif how == "text":
        ctx.blob = b"This is not a LoRA\n" * 40
    elif how == "zip":
        ctx.blob = b"PK\x03\x04" + bytes(60)
    elif how == "pickle":
        ctx.blob = b"\x80\x04\x95" + bytes(30)
    else:
        ctx.blob = (8).to_bytes(8, "little") + b"{}      "
    ctx.note(how)


# --- pickle inputs ---------------------------------------------------------------------------------------------------

class Payload:
    """Unpickling this would run `fn(*args)` (open(marker, 'w'), os.system('touch marker'), exec(...)): a stand-in
    for arbitrary code in a malicious checkpoint."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


@mutation("P", 10)
def p_payload(ctx):
    rng = ctx.rng
    marker = str(ctx.marker)
    fn, args = rng.choice([(open, (marker, "w")), (os.system, (f"touch {marker}",)),
                           (exec, (f"open({marker!r}, 'w').close()",)),
                           (eval, (f"open({marker!r}, 'w')",))])
    where = rng.choice(["key", "value_in_wrapper", "top"])
    if where == "key":
        ctx.obj["_payload"] = Payload(fn, args)
    elif where == "value_in_wrapper":
        ctx.wrapper = dict(ctx.wrapper or {}, epoch=Payload(fn, args))
    else:
        ctx.top = Payload(fn, args)
    ctx.note(f"{fn.__name__}/{where}")


@mutation("P", 8)
def p_odd_tensors(ctx):
    torch = _t()
    rng = ctx.rng
    how = rng.choice(["complex", "sparse", "expand_bomb", "shared_many", "noncontig", "int_lora", "f8_lora",
                      "quantized", "nested_dict", "nonstr_keys", "list", "empty", "scalar_alpha_float",
                      "big_view_of_small", "uint_pass", "requires_grad", "f64_lora"])
    o = ctx.obj
    if how == "complex":
        o["cplx"] = torch.randn(3, 2, dtype=torch.complex64)
    elif how == "sparse":
        d = o[LIN_A + DOWN] if LIN_A + DOWN in o else torch.randn(4, 10)
        key = rng.choice([LIN_A + DOWN, "sparse.weight"])
        o[key] = d.to_sparse()
    elif how == "expand_bomb":
        key = rng.choice(["bomb.weight", LIN_A + DOWN])
        o[key] = torch.zeros(1).expand(1 << 15, 1 << 15)
    elif how == "shared_many":
        big = torch.randn(256, 256)
        for i in range(rng.choice([10, 200])):
            o[f"shared.{i}"] = big
    elif how == "noncontig":
        for k in list(o):
            if k.endswith(DOWN) and o[k].ndim == 2:
                o[k] = o[k].T.contiguous().T
    elif how == "int_lora":
        for k in list(o):
            if k.endswith((DOWN, UP)):
                o[k] = (o[k] * 100).to(torch.int32)
                break
    elif how == "f8_lora":
        for k in list(o):
            if k.endswith((DOWN, UP)):
                o[k] = o[k].to(torch.float8_e4m3fn)
    elif how == "quantized":
        o["q"] = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    elif how == "nested_dict":
        o["nested"] = {"a": torch.randn(2)}
    elif how == "nonstr_keys":
        o[5] = torch.randn(2)
        o[("a", 1)] = torch.randn(2)
    elif how == "list":
        ctx.top = list(o.values())
    elif how == "empty":
        ctx.obj = {}
    elif how == "scalar_alpha_float":
        for k in list(o):
            if k.endswith(ALPHA):
                o[k] = 4.0
    elif how == "big_view_of_small":
        base = torch.randn(1 << 14)
        o["strided"] = base.as_strided((1 << 14, 1 << 14), (0, 1))
    elif how == "uint_pass":
        o["u16"] = torch.arange(5, dtype=torch.int32).to(torch.uint16)
    elif how == "requires_grad":
        for k in list(o):
            if k.endswith(UP):
                o[k] = torch.nn.Parameter(o[k].float())
    else:
        for k in list(o):
            if k.endswith((DOWN, UP)):
                o[k] = o[k].double() * 1e250
                break
    ctx.note(how)


@mutation("P", 5)
def p_values(ctx):
    torch = _t()
    o = ctx.obj
    keys = [k for k, v in o.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()]
    if not keys:
        return
    k = ctx.rng.choice(keys)
    t = o[k].clone()
    t.reshape(-1)[0] = ctx.rng.choice(SPECIAL_VALUES)
    o[k] = t


@mutation("P", 4)
def p_legacy(ctx):
    ctx.legacy = True


@mutation("PB", 12)
def pb_flip(ctx):
    rng = ctx.rng
    blob = bytearray(ctx.blob)
    if not blob:
        return
    k = rng.choice([1, 1, 3, 20])
    for _ in range(k):
        i = rng.randrange(len(blob))
        blob[i] ^= 1 << rng.randrange(8)
    ctx.blob = bytes(blob)
    ctx.note(f"x{k}")


@mutation("PB", 8)
def pb_truncate(ctx):
    cut = ctx.rng.randrange(len(ctx.blob) + 1) if ctx.blob else 0
    ctx.note(f"@{cut}/{len(ctx.blob)}")
    ctx.blob = ctx.blob[:cut]


@mutation("PB", 3)
def pb_append(ctx):
    ctx.blob = ctx.blob + bytes(ctx.rng.randrange(256) for _ in range(ctx.rng.choice([1, 100])))


# ------------------------------------------------------------------------------------------------------------------
# Cases

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


_BASES: dict | None = None
_PREVIOUS: bytes | None = None


def bases():
    global _BASES, _PREVIOUS
    if _BASES is None:
        _BASES = build_bases()
        from safetensors.torch import save
        _, sd, meta = _BASES["lin_alpha_f32"]
        _PREVIOUS = save({k: v.contiguous() for k, v in sd.items()}, {"previous": "output"})
    return _BASES


def _weighted(rng: random.Random, stages: tuple[str, ...]) -> str:
    names = [n for n, (s, w, _) in MUTATIONS.items() if s in stages]
    return rng.choices(names, weights=[MUTATIONS[n][1] for n in names])[0]


def choose_argv(rng: random.Random, src: Path, dst: Path) -> list[str]:
    opts: list[str] = []
    kind = rng.choice(["fixed", "fixed", "sv_fro", "sv_ratio", "sv_cumulative"])
    if kind == "fixed":
        opts += ["--rank", str(rng.choice([1, 2, 3, 4, 8, 64]))]
    else:
        param = {"sv_fro": rng.choice([0.5, 0.9, 0.99, 1.0]), "sv_ratio": rng.choice([1, 2, 10, 1000]),
                 "sv_cumulative": rng.choice([0.3, 0.8, 1.0])}[kind]
        opts += ["--method", kind, "--param", str(param)]
        if rng.random() < 0.5:
            opts += ["--rank", str(rng.choice([2, 4, 16]))]
    if rng.random() < 0.3:
        opts += ["--conv-rank", str(rng.choice([1, 2, 5]))]
    if rng.random() < 0.3:
        opts += ["--rank-rule", "kohya"]
    if rng.random() < 0.6:
        opts += ["--precision", rng.choice(["fp16", "bf16", "float"])]
    if rng.random() < 0.2:
        opts += ["-v"]
    if rng.random() < 0.1:
        opts += ["--json"]
    if rng.random() < 0.2:
        opts += ["--threads", rng.choice(["1", "3"])]
    opts += ["--device", "cpu"]
    if rng.random() < 0.8:
        return ["resize", str(src), "-o", str(dst)] + opts
    sd = {"--rank": "--new_rank", "--conv-rank": "--new_conv_rank", "--method": "--dynamic_method",
          "--param": "--dynamic_param", "--precision": "--save_precision"}
    return ["--model", str(src), "--save_to", str(dst)] + [sd.get(a, a) for a in opts if a != "--rank-rule"
                                                           and a != "kohya" and a != "--json"]


def apply(ctx: Ctx, name: str, muts: list) -> None:
    """Apply one mutation. Stacked mutations meet states a mutation does not expect (an entry that is no longer an
    object, a tensor already reshaped); such a mutation is skipped, and the case stays deterministic."""
    ctx.notes = []
    try:
        MUTATIONS[name][2](ctx)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError, NotImplementedError) as e:
        ctx.notes.append(f"skipped: {type(e).__name__}")
    muts.append(f"{name}({','.join(ctx.notes)})" if ctx.notes else name)


def make_case(seed: int, index: int, root: Path) -> Case:
    """Build case `index` of campaign `seed` under `root` (input file, argv, destination)."""
    rng = random.Random(f"lora-resize-fuzz:{seed}:{index}")
    bs = bases()
    base = rng.choice(sorted(bs))
    suffix, sd, meta = bs[base]
    indir, outdir = root / "in", root / "out"
    indir.mkdir(parents=True)
    outdir.mkdir()
    marker = root / "payload_marker"
    src_suffix = suffix
    if rng.random() < 0.03:
        src_suffix = rng.choice([".bin", ".SAFETENSORS", ".lora", ""])  # unusual input names
    src = indir / f"input{src_suffix}"
    out_suffix = ".safetensors" if rng.random() < 0.85 else rng.choice([".pt", ".ckpt", ".pth"])
    dst = outdir / f"output{out_suffix}"
    muts: list[str] = []
    if suffix == ".safetensors":
        k = rng.choice([0, 1, 1, 1, 2, 2, 3])
        picks = [_weighted(rng, ("T", "H", "B")) for _ in range(k)]
        order = {"T": 0, "H": 1, "B": 2}
        picks.sort(key=lambda n: order[MUTATIONS[n][0]])
        ctx = Ctx(rng=rng, tensors=[[k2, v.clone()] for k2, v in sd.items()],
                  meta=dict(meta) if meta is not None else MISSING)
        laid = False
        for name in picks:
            stage = MUTATIONS[name][0]
            if stage != "T" and not laid:
                layout(ctx)
                laid = True
            if stage == "B" and not ctx.blob:
                ctx.blob = serialize(ctx)
            apply(ctx, name, muts)
        if not laid:
            layout(ctx)
        blob = ctx.blob or serialize(ctx)
    else:
        ctx = Ctx(rng=rng, tensors=[], meta=MISSING)
        ctx.marker, ctx.legacy, ctx.top = marker, False, None
        ctx.obj = {k2: v.clone() for k2, v in sd.items()}
        ctx.wrapper = {"global_step": 100} if base == "mixed_ckpt_state_dict" else None
        k = rng.choice([0, 1, 1, 2, 2])
        picks = [_weighted(rng, ("P", "PB")) for _ in range(k)]
        picks.sort(key=lambda n: MUTATIONS[n][0] == "PB")
        saved = False
        for name in picks:
            if MUTATIONS[name][0] == "PB" and not saved:
                ctx.blob = _save_pickle(ctx)
                saved = True
            apply(ctx, name, muts)
        blob = ctx.blob if saved else _save_pickle(ctx)
    src.write_bytes(blob)
    previous = None
    if rng.random() < 0.4:
        previous = _PREVIOUS if rng.random() < 0.7 else b"an older output that is not even a tensor file"
        dst.write_bytes(previous)
    argv = choose_argv(rng, src, dst)
    desc = f"case {index}: base={base} muts=[{'; '.join(muts)}] argv={' '.join(argv[:1] + argv[4:])}" \
           f"{' previous' if previous else ''} out={out_suffix}"
    return Case(index, base, muts, argv, src, dst, marker, previous, desc)


def _save_pickle(ctx) -> bytes:
    torch = _t()
    buf = io.BytesIO()
    obj = ctx.top if ctx.top is not None else (
        dict(ctx.wrapper, state_dict=ctx.obj) if ctx.wrapper is not None else ctx.obj)
    torch.save(obj, buf, _use_new_zipfile_serialization=not ctx.legacy)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------------------
# Running and judging one case


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def check_output(dst: Path, input_bytes: int) -> str | None:
    """None when `dst` is a valid LoRA output, else why not."""
    size = dst.stat().st_size
    if size > 5 * input_bytes + (1 << 20):  # fp8 -> float32 is the largest legitimate growth (x4)
        return f"output of {size} bytes from a {input_bytes}-byte input (amplification)"
    try:
        return _check_output(dst)
    except Exception as e:  # noqa: BLE001 - anything that stops a reader is a finding
        return f"unreadable output: {type(e).__name__}: {str(e)[:200]}"


def _check_output(dst: Path) -> str | None:
    torch = _t()
    if dst.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(dst), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
        if "sshs_model_hash" not in meta:
            return "no sshs_model_hash in metadata"
        json.loads(meta["lora_resize"])
    else:
        tensors = torch.load(dst, map_location="cpu", weights_only=True)
        if not isinstance(tensors, dict):
            return f"pickle output holds {type(tensors).__name__}"
    for k, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.float()).all()):
            return f"non-finite values in output tensor {k!r} ({t.dtype})"
    downs = [k for k in tensors if k.endswith(DOWN)]
    if not downs:
        return "no LoRA pairs in output"
    for k in downs:
        base = k[:-len(DOWN)]
        d, u, a = tensors.get(k), tensors.get(base + UP), tensors.get(base + ALPHA)
        if u is None or a is None:
            return f"{base}: missing up or alpha in output"
        if a.numel() != 1 or u.ndim != d.ndim or u.shape[1] != d.shape[0] or d.shape[0] < 1:
            return (f"{base}: output factors don't chain (down {list(d.shape)}, up {list(u.shape)}, "
                    f"alpha {list(a.shape)})")
    return None


def judge(case: Case, rc, err: str, exc: str | None, src_sha: str, in_before: list[str],
          out_before: list[str]) -> tuple[str, str]:
    """(outcome, detail). The first violated rule names the outcome."""
    outdir, indir = case.dst.parent, case.src.parent
    if case.marker.exists():
        return "payload_executed", "the pickle payload ran"
    if not case.src.exists() or sha(case.src) != src_sha:
        return "input_modified", "input changed"
    if listing(indir) != in_before:
        return "stray_file", f"input folder now {listing(indir)}"
    partials = [p for p in listing(outdir) if p.startswith(TMP_PREFIX)]
    if partials:
        return "partial_file_left", f"{partials}"
    if exc is not None:
        return "escaped_exception", exc
    if rc == 1:
        return "internal_error", err.strip()[:400]
    if rc == 2:
        if not (err.startswith("lora-resize: error:") and err.endswith("\n") and err.count("\n") == 1):
            return "bad_error_message", repr(err[:400])
        if case.previous is not None:
            if not case.dst.exists() or case.dst.read_bytes() != case.previous:
                return "previous_output_damaged", "previous output changed by a failed run"
        elif case.dst.exists():
            return "output_left_after_error", err.strip()[:300]
        if listing(outdir) != out_before:
            return "stray_file", f"output folder now {listing(outdir)}"
        return "clean_error", err.strip()[:300]
    if rc == 0:
        if err:
            return "stderr_on_success", err[:400]
        if not case.dst.exists():
            return "invalid_output", "exit 0 but no output file"
        why = check_output(case.dst, case.src.stat().st_size)
        if why:
            return "invalid_output", why
        extra = set(listing(outdir)) - set(out_before) - {case.dst.name}
        if extra:
            return "stray_file", f"{sorted(extra)}"
        return "ok_output", ""
    return "bad_exit_code", f"rc={rc!r} {err.strip()[:300]}"


def run_case(seed: int, index: int, root: Path, debug: bool = False) -> dict:
    """Build, run and judge one case in this process; the case folder is removed afterwards (unless debug)."""
    from lora_resize.cli import main
    t0 = time.perf_counter()
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation warnings while building odd pickles
            case = make_case(seed, index, root)
    except Exception as e:  # noqa: BLE001
        return {"index": index, "outcome": "harness_error", "detail": f"building the case: {e!r}",
                "description": traceback.format_exc()[-800:], "seconds": time.perf_counter() - t0}
    src_sha = sha(case.src)
    in_before, out_before = listing(case.src.parent), listing(case.dst.parent)
    out, err = io.StringIO(), io.StringIO()
    exc, rc = None, None
    t1 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(case.argv)
    except BaseException as e:  # noqa: BLE001 - escaping main() at all is a finding
        exc = f"{type(e).__name__}: {str(e)[:300]}"
        if debug:
            traceback.print_exc()
    run_s = time.perf_counter() - t1
    try:
        outcome, detail = judge(case, rc, err.getvalue(), exc, src_sha, in_before, out_before)
    except Exception as e:  # noqa: BLE001
        outcome, detail = "harness_error", f"judging: {e!r}"
    if debug:
        print(out.getvalue(), end="")
        print(err.getvalue(), end="", file=sys.stderr)
    else:
        shutil.rmtree(root, ignore_errors=True)
    return {"index": index, "outcome": outcome, "detail": detail, "description": case.description,
            "seconds": run_s, "rc": rc, "base": case.base,
            "mutations": sorted({m.split("(")[0] for m in case.mutations}) or ["none"]}


# ------------------------------------------------------------------------------------------------------------------
# Worker pool with a per-case time bound


def _find_package() -> None:
    """Use the installed lora_resize (or one on PYTHONPATH); fall back to this checkout's src/."""
    import importlib.util
    if importlib.util.find_spec("lora_resize") is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _worker(conn, seed: int, workdir: str, mem_limit: int, inject: dict | None = None) -> None:
    if mem_limit:
        resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    os.environ.pop("LORA_RESIZE_DEBUG", None)
    _find_package()
    import warnings
    warnings.simplefilter("default")
    bases()
    conn.send(("ready", os.getpid()))
    while True:
        msg = conn.recv()
        if msg is None:
            return
        if inject and msg in inject.get("hang", ()):  # self-test of the harness: a case that never ends
            time.sleep(3600)
        if inject and msg in inject.get("crash", ()):  # ... and one that takes its worker down
            os._exit(3)
        res = run_case(seed, msg, Path(workdir) / f"case-{msg}")
        conn.send(("done", res))


@dataclass
class Campaign:
    counts: collections.Counter
    findings: list
    cases: int
    seconds: float
    slowest: list
    by_mutation: dict = field(default_factory=dict)  # mutation -> Counter of outcomes


def run_campaign(cases: int, seed: int, workers: int | None = None, timeout: float = 30.0, start: int = 0,
                 workdir: str | None = None, mem_limit: int = 3 << 30, progress: bool = False,
                 inject: dict | None = None, log: Path | None = None) -> Campaign:
    """Run cases start..start+cases-1 of campaign `seed` on `workers` processes, each case bounded by `timeout`
    seconds (past it the worker is killed and the case counted as a hang). `inject` is for testing the harness."""
    workers = workers or os.cpu_count() or 1
    own_dir = workdir is None
    if own_dir:
        workdir = tempfile.mkdtemp(prefix="lora-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    ctx = mp.get_context("spawn")
    t0 = time.perf_counter()
    counts: collections.Counter = collections.Counter()
    findings: list = []
    timings: list = []
    todo = collections.deque(range(start, start + cases))
    slots: dict = {}  # conn -> [process, case index or None, start time]

    def spawn():
        a, b = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(b, seed, workdir, mem_limit, inject), daemon=True)
        p.start()
        b.close()
        slots[a] = [p, None, 0.0]
        return a

    def give(conn):
        if todo:
            i = todo.popleft()
            conn.send(i)
            slots[conn][1], slots[conn][2] = i, time.perf_counter()
        else:
            conn.send(None)
            slots[conn][0].join(5)
            del slots[conn]

    by_mutation: dict = collections.defaultdict(collections.Counter)

    log_file = open(log, "w") if log else None

    def record(res):
        if log_file:
            log_file.write(json.dumps(res, default=str) + "\n")
        counts[res["outcome"]] += 1
        for m in res.get("mutations", ["?"]):
            by_mutation[m][res["outcome"]] += 1
        timings.append((res.get("seconds", 0.0), res["index"]))
        if res["outcome"] not in GOOD:
            findings.append(res)
            if progress:
                print(f"FINDING {res['outcome']}: {res['description']}\n    {res['detail']}", flush=True)

    try:
        for _ in range(min(workers, len(todo))):
            spawn()
        done = 0
        last_report = time.perf_counter()
        while slots:
            ready = mp_wait(list(slots), timeout=1.0)
            for conn in ready:
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):
                    p, i, _ = slots.pop(conn)
                    p.join(1)
                    if i is not None:
                        done += 1
                        record({"index": i, "outcome": "worker_crash", "seconds": 0.0,
                                "detail": f"worker exit code {p.exitcode}", "description": f"case {i}"})
                        shutil.rmtree(Path(workdir) / f"case-{i}", ignore_errors=True)
                    if todo:
                        spawn()
                    continue
                if kind == "done":
                    done += 1
                    record(payload)
                    slots[conn][1] = None
                give(conn)
            now = time.perf_counter()
            for conn, (p, i, since) in list(slots.items()):
                if i is not None and now - since > timeout:
                    p.kill()
                    p.join(5)
                    slots.pop(conn)
                    done += 1
                    record({"index": i, "outcome": "hang", "seconds": now - since,
                            "detail": f"no result after {timeout:.0f} s (worker killed)", "description": f"case {i}"})
                    shutil.rmtree(Path(workdir) / f"case-{i}", ignore_errors=True)
                    if todo:
                        spawn()
            if progress and now - last_report > 15:
                last_report = now
                print(f"  {done}/{cases} cases, {now - t0:.0f} s: {dict(counts)}", flush=True)
    finally:
        if log_file:
            log_file.close()
        for conn, (p, _, _) in slots.items():
            p.kill()
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    timings.sort(reverse=True)
    return Campaign(counts, findings, cases, time.perf_counter() - t0, timings[:5], dict(by_mutation))


def summary_lines(c: Campaign, seed: int) -> list[str]:
    good = c.counts["ok_output"] + c.counts["clean_error"]
    lines = [f"{c.cases} cases, seed {seed}, {c.seconds:.1f} s wall",
             f"  clean outputs (exit 0, valid file):      {c.counts['ok_output']}",
             f"  clean errors (exit 2, one line):         {c.counts['clean_error']}"]
    for o in OUTCOMES[2:]:
        lines.append(f"  {o + ':':40} {c.counts[o]}")
    lines.append(f"  findings: {c.cases - good}")
    lines.append("  slowest cases: " + ", ".join(f"#{i} {s:.2f} s" for s, i in c.slowest))
    return lines


def mutation_table(c: Campaign) -> list[str]:
    """Cases per mutation (a case with several mutations counts for each): clean outputs, clean errors, findings."""
    lines = [f"  {'mutation':24} {'cases':>6} {'exit 0':>7} {'exit 2':>7} {'findings':>8}"]
    for m in sorted(c.by_mutation):
        cnt = c.by_mutation[m]
        n = sum(cnt.values())
        bad = n - cnt["ok_output"] - cnt["clean_error"]
        lines.append(f"  {m:24} {n:6d} {cnt['ok_output']:7d} {cnt['clean_error']:7d} {bad:8d}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--start", type=int, default=0, help="first case index")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    ap.add_argument("--timeout", type=float, default=30.0, help="per-case time bound in seconds")
    ap.add_argument("--mem-limit-gb", type=float, default=3.0, help="address-space limit per worker (0: none)")
    ap.add_argument("--replay", type=int, default=None, help="run this one case here, with tracebacks")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--findings", type=Path, default=None, help="write every finding here as JSON lines")
    ap.add_argument("--log", type=Path, default=None, help="write every case's result here as JSON lines")
    a = ap.parse_args(argv)
    if a.replay is not None:
        _find_package()
        os.environ["LORA_RESIZE_DEBUG"] = "1"
        root = Path(tempfile.mkdtemp(prefix="lora-fuzz-replay-")) / f"case-{a.replay}"
        res = run_case(a.seed, a.replay, root, debug=True)
        print(json.dumps(res, indent=1, default=str))
        print(f"files kept in {root}")
        return 0 if res["outcome"] in GOOD else 1
    c = run_campaign(a.cases, a.seed, a.workers, a.timeout, a.start, mem_limit=int(a.mem_limit_gb * (1 << 30)),
                     progress=not a.quiet, log=a.log)
    if a.findings:
        a.findings.write_text("".join(json.dumps(f, default=str) + "\n" for f in c.findings))
    for f in c.findings[:50]:
        print(f"FINDING {f['outcome']}: {f['description']}\n    {f['detail']}")
    print("\n".join(summary_lines(c, a.seed)))
    if not a.quiet:
        print("\n".join(mutation_table(c)))
    return 0 if not c.findings else 1


if __name__ == "__main__":
    sys.exit(main())
