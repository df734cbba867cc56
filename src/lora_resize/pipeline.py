"""The resize job: check everything first, then decompose one layer at a time, then write atomically."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ._version import __version__
from .decompose import Decomposition
from .errors import InputFileError, NumericalError, OptionsError, OutputFileError
from .formats import Layout, LowRankLayer, Module, detect
from .formats.convert import convert
from .metadata import OUR_KEY, our_record, sd_scripts_fields, updated
from .options import PRECISIONS, ResizeOptions
from .schedule import Progress, through_engine
from .policies import get_policy
from .rules import choose_layer_rank, is_dropped, rule_hits, rule_notes
from .result import LayerResult, ResizeResult
from .tensorfile import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, TensorSource, open_tensor_file
from .writer import sshs_hashes, write_pickle, write_safetensors

OUTPUT_SUFFIXES = SAFETENSORS_SUFFIXES + (".pt", ".pth", ".ckpt")


def check_output_path(src: Path, dst: Path) -> None:
    """Refuse outputs that would lose data or cannot be written, before any work is done."""
    if dst.suffix.lower() not in OUTPUT_SUFFIXES:
        raise OutputFileError(f"output {dst} must end in .safetensors (or .pt/.pth/.ckpt)")
    if dst.is_symlink():
        raise OutputFileError(f"output {dst} is a symbolic link; give the real path (or remove the link)")
    if dst.is_dir():
        raise OutputFileError(f"output {dst} is a directory; give a file name such as {dst / 'out.safetensors'}")
    if not dst.parent.is_dir():
        raise OutputFileError(f"output folder {dst.parent} does not exist; create it first")
    same = src.resolve() == dst.resolve()
    if not same and dst.exists():
        try:
            same = os.path.samefile(src, dst)
        except OSError:
            pass
    if same:
        raise OutputFileError(f"output {dst} is the input file; choose another name (the input is never overwritten)")


ADAPTER_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors", "adapter_model.bin")


def local_path(x: str | os.PathLike, role: str) -> Path:
    """`x` as a local path; a URL is refused with a message (only `batch` reads and writes URLs)."""
    text = os.fspath(x)
    if "://" in text:
        error, what = ((InputFileError, "copy the file here first") if role == "input" else
                       (OutputFileError, "write a local file and upload it"))
        raise error(f"{role} {text} is a URL; only `lora-resize batch` reads and writes URLs (fsspec): {what}, or "
                    "run batch on its folder")
    return Path(text)


def resolve_input(path: Path) -> Path:
    """A LoRA file, or a folder holding one (a PEFT/diffusers adapter folder): the tensor file to read."""
    if not path.is_dir():
        return path
    for name in ADAPTER_FILES:
        if (path / name).is_file():
            return path / name
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    raise InputFileError(f"input {path} is a folder without {ADAPTER_FILES[0]}"
                         + (f" and with {len(found)} .safetensors files" if found else "")
                         + "; give the LoRA file itself")


def precision_of(layout: Layout, src: TensorSource, requested: str | None) -> str:
    """The save precision: the requested one, else the dtype most of the LoRA factors are stored in."""
    if requested:
        return requested
    infos = src.infos()
    counts: dict[torch.dtype, int] = {}
    for m in layout.modules:
        for k in m.keys:
            if infos[k].dtype.is_floating_point and len(infos[k].shape) >= 2:
                counts[infos[k].dtype] = counts.get(infos[k].dtype, 0) + 1
    dtype = max(counts, key=counts.get) if counts else torch.float32
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "float")


def layer_kind(layer: LowRankLayer) -> str:
    return "linear" if layer.kernel is None else f"conv{layer.kernel[0]}x{layer.kernel[1]}"


def new_alpha(name: str, alpha: float | None, rank: int, k: int) -> float:
    """The resized layer's alpha as sd-scripts computes it: (alpha / old rank, in float32) * k; k without alpha."""
    if alpha is None:
        return float(k)
    with np.errstate(over="ignore"):
        value = float(np.float32(np.float32(alpha) / np.float32(rank)) * np.float32(k))
    if not math.isfinite(value):
        raise NumericalError(f"layer {name}: alpha {alpha} times rank {k} overflows float32; the file is "
                             "damaged - re-export it")
    return value


def retention(S: np.ndarray, k: int) -> tuple[float, float, float]:
    """(sum(S) retained, Frobenius retained, S[0] / S[k-1]) when the k leading singular values are kept."""
    total, total2 = float(S.sum()), float((S * S).sum())
    kept = S[:k]
    max_ratio = (float(S[0]) / float(S[k - 1]) if k <= len(S) and S[k - 1] > 0 else
                 (float("inf") if S.size and S[0] > 0 else float("nan")))
    return (float(kept.sum()) / total if total > 0 else float("nan"),
            math.sqrt(float((kept * kept).sum()) / total2) if total2 > 0 else float("nan"), max_ratio)


@dataclass
class Queued:
    """A layer whose new factors are computed (on a GPU: queued) on the compute device."""
    name: str
    layer: LowRankLayer
    S: np.ndarray
    shape: tuple[int, int]
    rank: int
    clamped: bool
    zero: bool
    alpha: float
    alpha_t: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


def start_layer(name: str, layer: LowRankLayer, dec: Decomposition, opts: ResizeOptions,
                save_dtype: torch.dtype) -> Queued:
    """Choose the layer's rank and compute its best rank-k factors in save_dtype, on the compute device.

    The new alpha is scale * k (strength unchanged); if the save dtype rounds it, the factors absorb the rounding,
    so new_up @ new_down * alpha_stored / k equals the rank-k truncation of dW exactly (to float precision)."""
    out_f, in_f = dec.shape
    choice = choose_layer_rank(name, dec.S, min(out_f, in_f), layer.kernel is not None, opts, get_policy(opts.method))
    k = choice.rank
    alpha = new_alpha(name, layer.alpha, layer.rank, k)
    alpha_t = torch.tensor(alpha, dtype=torch.float32).to(save_dtype)
    stored = float(alpha_t)
    true_scale = layer.alpha / layer.rank if layer.alpha is not None else 1.0
    c = true_scale * k / stored if stored != 0 and true_scale != 0 else 1.0
    U, Sk, Vh = dec.factors(k)
    sq = torch.sqrt(Sk * abs(c))
    up = (U * (sq * math.copysign(1.0, c))).to(save_dtype)
    down = (sq[:, None] * Vh).to(save_dtype)
    return Queued(name, layer, dec.S, dec.shape, k, choice.clamped_to_size, choice.zero_layer, alpha, alpha_t, up,
                  down)


def finish_layer(q: Queued) -> tuple[LayerResult, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's row and its new (up, down, alpha) on the CPU, checked to fit the save precision."""
    up, down = q.up.cpu(), q.down.cpu()
    if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
        if up.dtype == torch.float32:
            raise NumericalError(f"layer {q.name} has values beyond float32's range after resizing; the file is "
                                 "damaged - re-export it")
        raise NumericalError(f"layer {q.name} does not fit the save precision ({up.dtype}) after resizing; "
                             "use --precision float or bf16")
    S, k, layer = q.S, q.rank, q.layer
    sum_kept, fro_kept, max_ratio = retention(S, k)
    row = LayerResult(
        name=q.name, kind=layer_kind(layer), out_features=q.shape[0], in_features=q.shape[1], old_rank=layer.rank,
        new_rank=k, old_alpha=layer.alpha, new_alpha=q.alpha, sum_retained=sum_kept, fro_retained=fro_kept,
        max_ratio=max_ratio, clamped=q.clamped, zero=q.zero, singular_values=S,
        underflow=bool(S.size and S[0] > 0 and not (bool(up.any()) and bool(down.any()))))
    return row, up, down, q.alpha_t


@dataclass
class Unit:
    """One output layer to compute: how to load its low-rank form and how to key the new factors; nbytes: about
    how large its factors are in float64 (sizes the GPU's windows)."""
    name: str
    load: Callable[[], LowRankLayer]
    emit: Callable[[LowRankLayer, torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
    nbytes: int = 0


def factor_bytes(module: Module, src: TensorSource) -> int:
    """About how large `module`'s tensors are in float64."""
    infos = src.infos()
    return sum(8 * math.prod(infos[k].shape) for k in module.keys if k in infos)


def module_unit(module: Module, src: TensorSource) -> Unit:
    """A unit that reads `module` from `src` and writes it back in the same key family."""
    return Unit(module.name, lambda: module.load(src), module.emit, factor_bytes(module, src))


def run_units(units: list[Unit], opts: ResizeOptions, device: torch.device, save_dtype: torch.dtype,
              progress: Progress | None = None, on_layer: Callable[[LayerResult], None] | None = None
              ) -> tuple[list[LayerResult], dict[str, torch.Tensor]]:
    """Decompose and truncate every unit (schedule.through_engine), in order; returns rows and tensors."""
    def start(unit: Unit, layer: LowRankLayer, dec: Decomposition) -> tuple[Unit, Queued]:
        return unit, start_layer(unit.name, layer, dec, opts, save_dtype)

    def finish(handle: tuple[Unit, Queued]) -> tuple[LayerResult, dict[str, torch.Tensor]]:
        unit, q = handle
        row, up, down, alpha = finish_layer(q)
        return row, unit.emit(q.layer, up, down, alpha)

    rows: list[LayerResult] = []
    out: dict[str, torch.Tensor] = {}
    for row, tensors in through_engine(units, device, start, finish, opts.threads, progress):
        out.update(tensors)
        rows.append(row)
        if on_layer:
            on_layer(row)
    return rows, out


def write_output(dst: Path, out: dict[str, torch.Tensor], meta: dict[str, str], layout: Layout,
                 rows: list[LayerResult]) -> list[str]:
    """Let the key family adjust `meta`, add the sshs hashes, write `out` atomically, then the family's companion
    files; returns notes for the user."""
    layout.finish_metadata(meta, rows)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = sshs_hashes(out, meta)
    notes = list(layout.notes)
    if dst.suffix.lower() in PICKLE_SUFFIXES:
        write_pickle(dst, out)
        notes.append(f"{dst.suffix} files cannot hold metadata; use .safetensors to keep it")
    else:
        write_safetensors(dst, out, meta)
    return notes + layout.write_sidecars(dst, rows)


def clamp_notes(rows: list[LayerResult]) -> list[str]:
    """Notes on layers that could not be given what was asked: smaller than the rank, or lost to underflow."""
    notes = []
    clamped = [r for r in rows if r.clamped]
    if clamped:
        notes.append(f"{len(clamped)} layer(s) were smaller than the rank asked for and keep their full rank "
                     f"(e.g. {clamped[0].name}: {clamped[0].new_rank})")
    lost = [r for r in rows if r.underflow]
    if lost:
        notes.append(f"{len(lost)} layer(s) are too small for the save precision and were saved as zeros (e.g. "
                     f"{lost[0].name}); use --precision bf16 or float to keep them")
    return notes


def apply_drop_rules(opts: ResizeOptions, modules: list[Module]) -> tuple[list[Module], dict]:
    """The modules no `drop` rule removes, and {"hits": {rule: modules it decides}, "notes": warnings}."""
    names = [m.name for m in modules]
    kept = [m for m in modules if not is_dropped(opts.block_rules, m.name)]
    if modules and not kept:
        raise OptionsError("every module is dropped by the rules; nothing would be left to write")
    return kept, {"hits": rule_hits(opts.block_rules, names), "notes": rule_notes(opts.block_rules, names)}


def as_options(options: ResizeOptions | None, fields: dict) -> ResizeOptions:
    if options is not None and fields:
        raise OptionsError("pass either options=ResizeOptions(...) or option fields, not both")
    return options if options is not None else ResizeOptions(**fields)


def resize(src: str | os.PathLike, dst: str | os.PathLike, options: ResizeOptions | None = None, *,
           progress: Progress | None = None, on_layer: Callable[[LayerResult], None] | None = None,
           **option_fields) -> ResizeResult:
    """Resize the LoRA at `src` and write it to `dst` (atomically; the input is never modified).

    Options come as a ResizeOptions or as its fields (rank=, conv_rank=, method=, param=, rule=, precision=,
    device=, threads=). `progress(iterable, total)` wraps the layer loop; `on_layer(row)` sees each layer as it
    is done.

    Raises: OptionsError, InputFileError, LoraStructureError, NumericalError, OutputFileError."""
    t0 = time.perf_counter()
    opts = as_options(options, option_fields)
    src, dst = resolve_input(local_path(src, "input")), local_path(dst, "output")
    # CHECKS: options, paths, the file's header and every module's shapes, before any computation.
    device = opts.resolve_device()
    reader = open_tensor_file(src)
    try:
        check_output_path(src, dst)
        layout = convert(detect(reader.infos(), reader.metadata, src), opts.output_format)
        precision = precision_of(layout, reader, opts.precision)
        save_dtype = PRECISIONS[precision]
        # CONVERSION: a layer per worker in memory at a time, plus the output being built.
        modules, rule_info = apply_drop_rules(opts, layout.modules)
        units = [module_unit(m, reader) for m in modules]
        if opts.has_target:  # a budget is global: first every layer's spectrum, then the ranks, then the factors
            from .analyze import plan_ranks
            ranks, plan_notes = plan_ranks(units, reader, layout, precision, src, opts, device, progress)
            opts = replace(opts, ranks={**ranks, **(opts.ranks or {})})
            rule_info["notes"] += plan_notes
        rows, out = run_units(units, opts, device, save_dtype, progress, on_layer)
        for key in layout.passthrough:
            t = reader.get(key)
            out[key] = t.to(save_dtype) if t.is_floating_point() else t
        # METADATA and WRITE
        old_dim = max(r.old_rank for r in rows)
        meta = updated(reader.metadata, sd_scripts_fields(
            opts, old_dim, rows[-1].new_alpha, reader.metadata.get("ss_training_comment", "")))
        meta[OUR_KEY] = our_record(__version__, opts, precision, src.name, layout.format, rows)
        notes = write_output(dst, out, meta, layout, rows) + clamp_notes(rows) + rule_info["notes"]
        return ResizeResult(src=src, dst=dst, format=layout.format, precision=precision,
                            options={**vars(opts), "block_rules": [str(r) for r in opts.block_rules],
                                     "rule_hits": rule_info["hits"]},
                            layers=rows, passthrough=list(layout.passthrough), input_bytes=src.stat().st_size,
                            output_bytes=dst.stat().st_size, seconds=time.perf_counter() - t0, metadata=meta,
                            notes=notes)
    finally:
        reader.close()
