"""Test helpers: tiny kohya LoRA files with known spectra, written with the real safetensors library (an
independent writer), float64 reference computations (dense dW, best rank-k approximation), sd-scripts' rank choice
re-implemented independently, and what the real loaders warn about. Fixtures live in conftest.py."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import logging
import os
import re
import shutil
import warnings
from contextlib import contextmanager

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_resize.units import format_size

DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"

BASE_COMMENT = "trained on 40 photos of a teapot"
BASE_METADATA = {
    "ss_training_comment": BASE_COMMENT,
    "ss_network_dim": "16",
    "ss_network_alpha": "8.0",
    "ss_network_module": "networks.lora",
    "ss_base_model_version": "sd_v1",
    "modelspec.title": "teapot",
}


# ----------------------------------------------------------------------------------------------------------------
# Building layers


def decaying_spectrum(p: int, s0: float = 2.0, power: float = 1.3, gap: float = 0.93) -> torch.Tensor:
    """p distinct, strictly decreasing singular values (float64): a power law, each one at most `gap` times the
    previous, so every best rank-k approximation is unique and well separated."""
    s = torch.empty(p, dtype=torch.float64)
    v = s0
    for i in range(p):
        if i:
            v = min(v * gap, s0 * ((i + 3) / 3) ** -power)
        s[i] = v
    return s


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return q


def factors_with_spectrum(out: int, n: int, rank: int, S: torch.Tensor, g: torch.Generator
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(up out x rank, down rank x n) in float64 with up @ down = U diag(S) V^T for random orthonormal U, V.
    len(S) may be below rank (the extra factor columns are mixed in, so the factors look full)."""
    p = len(S)
    assert p <= min(out, n, rank)
    U, V = _orthonormal(out, p, g), _orthonormal(n, p, g)
    mix = _orthonormal(rank, rank, g)[:p]  # p x rank, orthonormal rows
    root = S.sqrt()
    up = (U * root) @ mix
    down = mix.T @ (root[:, None] * V.T)
    return up, down


@dataclass
class Spec:
    """One LoRA layer to synthesise. kernel None: linear; 1 or 3: conv with that square kernel."""
    name: str
    out: int
    inp: int
    rank: int
    kernel: int | None = None
    alpha: float | None = None
    zero: bool = False
    spectrum: torch.Tensor | None = None  # default: decaying_spectrum(min(out, inp*k*k, rank))

    @property
    def flat_in(self) -> int:
        return self.inp * (self.kernel or 1) ** 2


def make_layer(spec: Spec, g: torch.Generator, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The kohya tensors of one layer: down (r,in) / (r,in,k,k), up (out,r) / (out,r,1,1), 0-d alpha."""
    n = spec.flat_in
    p = min(spec.out, n, spec.rank)
    S = spec.spectrum if spec.spectrum is not None else decaying_spectrum(p)
    up, down = factors_with_spectrum(spec.out, n, spec.rank, S.to(torch.float64), g)
    if spec.zero:
        up = torch.zeros_like(up)
    if spec.kernel is not None:
        up = up.reshape(spec.out, spec.rank, 1, 1)
        down = down.reshape(spec.rank, spec.inp, spec.kernel, spec.kernel)
    sd = {spec.name + DOWN: down.to(dtype).contiguous(), spec.name + UP: up.to(dtype).contiguous()}
    if spec.alpha is not None:
        sd[spec.name + ALPHA] = torch.tensor(float(spec.alpha), dtype=dtype)
    return sd


def make_state_dict(specs: list[Spec], seed: int = 0, dtype: torch.dtype = torch.float32,
                    passthrough: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for s in specs:
        sd.update(make_layer(s, g, dtype))
    if passthrough:
        sd["some.other.weight"] = torch.randn(5, 3, generator=g).to(dtype)
        sd["some.other.index"] = torch.arange(7, dtype=torch.int64) * 3 - 4
    return sd


def write_lora(path: Path, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write with the real safetensors library."""
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return Path(path)


# Names as kohya writes them (all well under 75 characters).
LIN_A = "lora_te_text_model_encoder_layers_0_mlp_fc1"
LIN_NOALPHA = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
CONV1_A = "lora_unet_down_blocks_0_attentions_0_proj_in"
CONV1_NOALPHA = "lora_unet_down_blocks_0_attentions_0_proj_out"
CONV3_A = "lora_unet_down_blocks_0_resnets_0_conv1"
CONV3_NOALPHA = "lora_unet_down_blocks_0_resnets_0_conv2"
OVERSIZE = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
ZERO = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"


def standard_specs() -> list[Spec]:
    """Linear, conv 1x1 and conv 3x3, with and without alpha; a layer of rank 16 but only 6 outputs; a zero layer."""
    return [
        Spec(LIN_A, out=96, inp=64, rank=16, alpha=8.0),
        Spec(LIN_NOALPHA, out=48, inp=72, rank=12),
        Spec(CONV1_A, out=40, inp=40, rank=16, kernel=1, alpha=4.0),
        Spec(CONV1_NOALPHA, out=32, inp=24, rank=8, kernel=1),
        Spec(CONV3_A, out=32, inp=16, rank=16, kernel=3, alpha=5.0),
        Spec(CONV3_NOALPHA, out=24, inp=8, rank=10, kernel=3),
        Spec(OVERSIZE, out=6, inp=40, rank=16, alpha=16.0),
        Spec(ZERO, out=20, inp=30, rank=8, alpha=4.0, zero=True),
    ]


# ----------------------------------------------------------------------------------------------------------------
# Reference computations (float64, from tensors alone)


def layer_names(sd: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k[: -len(DOWN)] for k in sd if k.endswith(DOWN))


def dense_dw(sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """up.reshape(out,-1) @ down.reshape(r,-1) * alpha/r (scale 1 without alpha), float64."""
    up, down = sd[name + UP], sd[name + DOWN]
    r = down.shape[0]
    dw = up.reshape(up.shape[0], -1).double() @ down.reshape(r, -1).double()
    a = sd.get(name + ALPHA)
    return dw * (float(a) / r) if a is not None else dw


def raw_product(sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """up @ down as matrices (no alpha scale), float64: what sd-scripts takes the SVD of."""
    up, down = sd[name + UP], sd[name + DOWN]
    return up.reshape(up.shape[0], -1).double() @ down.reshape(down.shape[0], -1).double()


def one_alpha(sd: dict[str, torch.Tensor], rank: int) -> float:
    """The alpha that every layer of a default (exact rank rule) kohya output carries: the most common input scale
    (alpha / rank in float32, 1 without alpha; zero scales left out) times `rank` (the --rank flag)."""
    scales = []
    for name in layer_names(sd):
        r = sd[name + DOWN].shape[0]
        a = sd.get(name + ALPHA)
        s = float(a.float() / r) if a is not None else 1.0
        if s != 0:
            scales.append(float(torch.tensor(s, dtype=torch.float32)))
    s = max(set(scales), key=scales.count) if scales else 1.0
    return float(torch.tensor(s, dtype=torch.float32) * rank)


def best_rank_k(dw: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(dw.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F (absolute error when b is zero)."""
    nb = float(torch.linalg.norm(b))
    d = float(torch.linalg.norm(a.double() - b.double()))
    return d / nb if nb > 0 else d


def load_st(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, read with the safetensors library."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def raw_header(buf: bytes) -> tuple[int, dict]:
    """(n, header JSON with key order kept) of safetensors bytes."""
    n = int.from_bytes(buf[:8], "little")
    return n, json.loads(buf[8:8 + n].decode("utf-8"))


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def file_sha(path: Path) -> str:
    return sha256(Path(path).read_bytes())


MIN_SV = 1e-6  # sd-scripts' threshold for a zero layer


# Independent reference: sd-scripts v0.10.1's rank choice as networks/resize_lora.py makes it (`rank_resize`),
# in torch float32 like
# sd-scripts (S: the float32 singular values of up @ down, full length min(out, in*kh*kw)).
def kohya_reference(S32: torch.Tensor, method: str | None, param: float | None, cap: int | None) -> int:
    n = len(S32)
    if method is None:
        new_rank = cap
    else:
        if method == "sv_ratio":
            index = int(torch.sum(S32 > S32[0] / param).item())
        elif method == "sv_cumulative":
            frac = torch.cumsum(S32, dim=0) / float(torch.sum(S32))
            index = int(torch.searchsorted(frac, param)) + 1
        elif method == "sv_fro":
            sq = S32.pow(2)
            frac = torch.cumsum(sq, dim=0) / float(torch.sum(sq))
            index = int(torch.searchsorted(frac, param ** 2)) + 1
        else:
            raise AssertionError(method)
        index = max(1, min(index, n - 1))
        new_rank = index + 1
    if float(S32[0]) <= MIN_SV:
        return 1
    if cap is not None and new_rank > cap:
        new_rank = cap
    return new_rank



def boundary_margin(S32: torch.Tensor, method: str, param: float) -> float:
    """How far (relatively) the spectrum is from a tie with the method's threshold, in float32 and float64 alike."""
    S64 = S32.double()
    if method == "sv_ratio":
        thr = float(S64[0]) / param
        return float(((S64 - thr).abs() / thr).min())
    if method == "sv_cumulative":
        fr64 = torch.cumsum(S64, 0) / S64.sum()
        fr32 = (torch.cumsum(S32, 0) / float(S32.sum())).double()
        return float(torch.minimum((fr64 - param).abs(), (fr32 - param).abs()).min())
    sq64 = S64 ** 2
    fr64 = torch.cumsum(sq64, 0) / sq64.sum()
    sq32 = S32.pow(2)
    fr32 = (torch.cumsum(sq32, 0) / float(sq32.sum())).double()
    t = param ** 2
    return float(torch.minimum((fr64 - t).abs(), (fr32 - t).abs()).min())


BLOCKY = [  # a blocky SD1.5-style LoRA: names from each SD1.5 block group, linear and conv, different alphas and spectra
    Spec("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 48, 48, 12, alpha=6.0),
    Spec("lora_te_text_model_encoder_layers_0_mlp_fc1", 96, 48, 12, alpha=12.0),
    Spec("lora_unet_down_blocks_0_attentions_0_proj_in", 40, 40, 10, kernel=1, alpha=5.0),
    Spec("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 40, 64, 10, alpha=1.0),
    Spec("lora_unet_down_blocks_0_resnets_0_conv1", 32, 16, 12, kernel=3, alpha=3.0),
    Spec("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q", 64, 64, 16, alpha=16.0,
         spectrum=decaying_spectrum(16, s0=5.0, power=0.6)),
    Spec("lora_unet_mid_block_resnets_0_conv2", 48, 24, 8, kernel=3),
    Spec("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v", 40, 64, 10, alpha=2.0,
         spectrum=decaying_spectrum(10, s0=0.5, power=2.0)),
    Spec("lora_unet_up_blocks_1_resnets_0_conv_shortcut", 24, 56, 8, kernel=1, alpha=8.0),
    Spec("lora_unet_up_blocks_2_attentions_0_transformer_blocks_0_ff_net_2", 32, 128, 12, alpha=6.0),
]


@contextmanager
def loader_messages():
    """Collect WARNING+ records of diffusers/peft/transformers (their loggers do not propagate) and warnings
    (deprecation notices about the libraries' own APIs left out: they say nothing about the file)."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                records.append(f"{record.name}: {record.getMessage()}")
    handler = Keep()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
        records.extend(f"warning: {w.message}" for w in caught
                       if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)))
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


# ----------------------------------------------------------------------------------------------------------------
# One small file of every key family (and its scale conventions), for tests that must hold for all of them


def _loha_lokr(g: torch.Generator) -> dict[str, torch.Tensor]:
    """A LyCORIS file: a LoHa (alpha), a LoKr with a factored second half (alpha), a Tucker LoCon conv and a LoHa
    3x3 conv with its kernel folded into hada_w_b (as lycoris-lora stores it; written as conv factors)."""
    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).float() * 0.3
    n1, n2, n3, n4 = ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1",
                      "lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_resnets_0_conv2")
    return {f"{n1}.hada_w1_a": r(24, 4), f"{n1}.hada_w1_b": r(4, 20), f"{n1}.hada_w2_a": r(24, 4),
            f"{n1}.hada_w2_b": r(4, 20), f"{n1}.alpha": torch.tensor(2.0),
            f"{n2}.lokr_w1": r(4, 4), f"{n2}.lokr_w2_a": r(8, 3), f"{n2}.lokr_w2_b": r(3, 6),
            f"{n2}.alpha": torch.tensor(1.5),
            f"{n3}.lora_down.weight": r(5, 6, 1, 1), f"{n3}.lora_mid.weight": r(5, 5, 3, 3),
            f"{n3}.lora_up.weight": r(8, 5, 1, 1), f"{n3}.alpha": torch.tensor(4.0),
            f"{n4}.hada_w1_a": r(8, 2), f"{n4}.hada_w1_b": r(2, 8 * 9), f"{n4}.hada_w2_a": r(8, 2),
            f"{n4}.hada_w2_b": r(2, 8 * 9), f"{n4}.alpha": torch.tensor(1.0)}


def family_files(folder: Path) -> dict[str, Path]:
    """One small LoRA per key family and scale convention, each with trained-like spectra and copied tensors:
    kohya (alphas, some missing), LyCORIS (LoHa, LoKr, Tucker LoCon), PEFT (adapter folder with a config using
    rank/alpha patterns and rsLoRA), diffusers with `lora_adapter_metadata` (per component, and unprefixed),
    diffusers without alphas (ai-toolkit), ControlLoRA, XLabs."""
    from lora_resize.testing import archs, loras
    from lora_resize.testing.archs import ModuleShape
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    files["kohya"] = write_lora(folder / "kohya.safetensors", make_state_dict(standard_specs(), seed=11,
                                                                                 passthrough=True),
                                dict(BASE_METADATA))
    files["lycoris"] = write_lora(folder / "lycoris.safetensors", _loha_lokr(torch.Generator().manual_seed(12)),
                                  dict(BASE_METADATA))
    peft = folder / "peft"
    peft.mkdir()
    shapes = archs.llama(hidden=24, kv=8, inter=40, layers=2)
    write_lora(peft / "adapter_model.safetensors", loras.lora_state_dict(shapes, "peft", rank=8, seed=13))
    (peft / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 8, "lora_alpha": 12, "use_rslora": True, "rank_pattern": {},
        "alpha_pattern": {r"layers\.0\.self_attn\.q_proj": 3}, "target_modules": ["q_proj", "k_proj"]}))
    files["peft"] = peft / "adapter_model.safetensors"
    sd3 = archs.sd3(width=16, blocks=2)
    te = [ModuleShape("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 16, 16)]
    sd = {**loras.lora_state_dict(sd3, "diffusers", rank=8, seed=14), **loras.lora_state_dict(te, "diffusers",
                                                                                              rank=8, seed=15)}
    cfg = {"transformer.r": 8, "transformer.lora_alpha": 16, "transformer.rank_pattern": {},
           "transformer.alpha_pattern": {"^transformer_blocks.0.attn.to_q": 4}, "text_encoder.r": 8,
           "text_encoder.lora_alpha": 8}
    files["diffusers_metadata"] = write_lora(folder / "diffusers_meta.safetensors", sd,
                                             {"lora_adapter_metadata": json.dumps(cfg), "format": "pt"})
    bare = [ModuleShape(m.name[len("transformer."):], m.out, m.inp) for m in archs.sd3(width=16, blocks=1)]
    files["diffusers_unprefixed"] = write_lora(
        folder / "diffusers_unprefixed.safetensors", loras.lora_state_dict(bare, "diffusers", rank=6, seed=16),
        {"lora_adapter_metadata": json.dumps({"r": 6, "lora_alpha": 3, "use_rslora": False})})
    files["ai_toolkit"] = write_lora(folder / "ai_toolkit.safetensors",
                                     loras.lora_state_dict(sd3, "diffusers", rank=8, seed=17, dtype=torch.bfloat16),
                                     {"software": "ai-toolkit"})
    cl = loras.lora_state_dict([ModuleShape("input_blocks.4.1.proj_in", 16, 16),
                                ModuleShape("input_blocks.4.1.transformer_blocks.0.attn2.to_k", 16, 24)],
                               "diffusers", rank=6, seed=18)
    cl = {k.replace(".lora_A.weight", ".down").replace(".lora_B.weight", ".up"): v for k, v in cl.items()}
    cl["input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(19))
    cl["lora_controlnet"] = torch.tensor([])
    files["controllora"] = write_lora(folder / "controllora.safetensors", cl)
    g = torch.Generator().manual_seed(20)
    xl = {}
    for name, (o, i) in {"double_blocks.0.processor.qkv_lora1": (48, 16), "double_blocks.0.processor.proj_lora2":
                         (16, 16), "single_blocks.0.processor.qkv_lora": (48, 16)}.items():
        up, down = factors_with_spectrum(o, i, 6, decaying_spectrum(6), g)
        xl[name + ".down.weight"], xl[name + ".up.weight"] = down.float(), up.float()
    files["xlabs"] = write_lora(folder / "xlabs.safetensors", xl)
    return files


# ----------------------------------------------------------------------------------------------------------------
# Sizes as printed

SIZE = re.compile(r"\d+(?:\.\d+)?[\s\xa0]?(?:[KMGT]i?B|B)\b")
EXACT = re.compile(r"\b\d{1,3}(?:,\d{3})+\b")  # a byte count as the tables print it: 9,899,876


def other_conventions(n: int) -> set[str]:
    """`n` bytes as other conventions write it: steps of 1024 labelled KB/MB/GB (as Gradio's file box does) or
    KiB/MiB/GiB, and SI with another number of decimals."""
    out = set()
    for k, unit in enumerate(("K", "M", "G"), start=1):
        out |= {f"{n / 1024 ** k:.1f} {unit}B", f"{n / 1024 ** k:.1f} {unit}iB", f"{n / 1000 ** k:.2f} {unit}B",
                f"{n / 1000 ** k:.0f} {unit}B"}
    return out - {format_size(n)}


def sizes_disagreeing(text: str, files: dict[str, int]) -> list[str]:
    """Sizes in `text` (a printout, a report, a page's text) that write one of `files` in another convention than
    units.format_size (a size that is format_size of a byte count the text prints, e.g. another row of a table, is
    that row's, not the file's)."""
    text = text.replace("\xa0", " ")
    legit = {format_size(int(m.replace(",", ""))) for m in EXACT.findall(text)}
    shown = {m.replace("\xa0", " ") for m in SIZE.findall(text)} - legit
    return sorted(f"{s} for the {name} ({n} bytes; one convention: {format_size(n)})"
                  for name, n in files.items() for s in shown & other_conventions(n))



# ----------------------------------------------------------------------------------------------------------------
# The browser


def chromium() -> tuple[str, str]:
    """(chromium, chromedriver) for the browser tests: $LORA_RESIZE_CHROMIUM / $LORA_RESIZE_CHROMEDRIVER, else
    the ones on PATH (Debian's chromium and chromium-driver). Where they cannot be found, the test is skipped with
    the reason - except under CI=true, where a missing browser is a failure (CI installs it: .ci/run)."""
    binary = os.environ.get("LORA_RESIZE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("LORA_RESIZE_CHROMEDRIVER") or shutil.which("chromedriver")
    if binary and driver and Path(binary).exists() and Path(driver).exists():
        return binary, driver
    why = ("headless Chromium is not installed (apt-get install -y chromium chromium-driver; .ci/run does this)")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why}, and CI=true needs it")
    pytest.skip(why)


def refused_in_one_line(capsys, argv: list[str]) -> str:
    """Run the CLI on `argv`; check it exits 2 (a LoraResizeError) with one line on stderr, our error's; return it."""
    from lora_resize.cli import main
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("lora-resize: error:"), err
    return err


def scaled_sum(name, parts, settings, positions=None):
    """A merge method for tests that register one of their own (the nodes and the page must offer it): the
    weighted sum with every weight times `density`."""
    from lora_resize.core.core_space import stacked
    return stacked(name, [(w * settings.value("density"), layer) for w, layer in parts])
