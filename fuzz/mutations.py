"""Fuzz stage 2, mutations: each registered function changes one case (stage T on tensors and metadata, H on the
laid-out header entries and data, B on the final bytes, P/PB on pickles)."""
from __future__ import annotations

import math
import os
from typing import Callable

# ------------------------------------------------------------------------------------------------------------------
# Mutations. Stage "T": on tensors/metadata; "H": on the laid-out header entries and data; "B": on the final bytes;
# "P": on a pickle file's state dict; "PB": on the pickle's bytes.

MUTATIONS: dict[str, tuple[str, int, Callable]] = {}

from seeds import ALPHA, DOWN, ITEMSIZE, LIN_A, MISSING, ST_DTYPES, UP, header_len, json_text, torch_dtype, torch_module


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
    torch = torch_module()
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
    torch = torch_module()
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
    torch = torch_module()
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
    torch = torch_module()
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
    torch = torch_module()
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
    torch = torch_module()
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
    torch = torch_module()
    key = _pick_key(ctx)
    if key is None:
        return
    st = ctx.rng.choice(ST_DTYPES)
    t = _get(ctx, key)
    src = t.double() * (ctx.rng.choice([1, 10, 1000]) if st[0] in "IU" else 1)
    if st in ("U8", "U16", "U32", "U64"):
        src = src.abs()
    try:
        _set(ctx, key, src.to(torch_dtype(st)))
    except (RuntimeError, TypeError):
        _set(ctx, key, src.to(torch.int64).to(torch_dtype(st)))
    ctx.note(f"{key[-24:]}->{st}")


@mutation("T", 7)
def t_drop_key(ctx):
    key = _pick_key(ctx)
    if key is not None:
        del ctx.tensors[_idx(ctx, key)]
        ctx.note(key[-30:])


@mutation("T", 7)
def t_add_key(ctx):
    torch = torch_module()
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
    torch = torch_module()
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
    torch = torch_module()
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
