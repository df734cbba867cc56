"""The extract job: a LoRA of W_tuned - W_base for every weight of a model that a fine-tune (or a distillation)
changed, with every rank setting resize has.

    base, tuned (io.checkpoint: one weight at a time) -> the differing weights, paired by name
    -> a dense difference per module (DenseSource: a LoRA "of full rank" whose pair is the difference and an
       identity on its smaller side, so the key families, the model tables and the layout conversions read it as
       any LoRA file) -> formats.read_layout (the architecture detected, the output layout)
    -> LayerJob with its own decomposition (core.dense.decompose_dense: the SVD of the difference itself)
    -> ops.job.build_output (a budget's planning pass, truncation, metadata) -> io.writer.write_output

Which weights: 2-D (linear) and 3- to 5-D (conv) weights of the denoiser and of the text encoders that LoRA
layouts name (formats.convert.read_name); a differing bias of such a module becomes its `.diff_b` (ComfyUI's
comfy/lora.py `load_lora` adds it to the bias) with `bias_diffs` in the kohya-style layouts (off by default:
diffusers' kohya loader refuses a file with such keys; diffusers' and PEFT's layouts have none); differing norms,
embeddings and weights of no LoRA module (a VAE) are listed in a note and left out."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch

from ..core.schedule import Progress, compute_device
from ..errors import InputFileError, LoraStructureError, OptionsError, OutputFileError
from ..formats import FORMATS, LORA_TOKEN, Layout, detect, read_layout
from ..formats.convert import KEY_FORM, copied_sources, detect_arch, read_name, scheme_of
from ..io.checkpoint import ACTIVATION_SCALES, COMFY_QUANT, WEIGHT_SCALES, Checkpoint
from ..io.metadata import PLAIN_MODULE, PLAIN_MODULE_OF, InputRecord
from ..io.paths import check_output_path, local_path, output_file
from ..models import SD
from ..options import ResizeOptions
from ..ranks.policies import POLICIES
from ..ranks.rules import RuleOutcome
from ..results import DEFAULT_MAX_EFFECT_ERROR, Analysis, LayerResult, ResizeResult
from .analyze import Evaluator, finish, split_options
from .diffs import Certified, Dense, DenseSource, ruled_jobs
from .job import (LayerJob, Output, as_options, clamp_notes, precision_of, produce, rules_outcome, spectra,
                  strengthened_companions)

BIAS_DIFF = ".diff_b"
# single-file checkpoints' prefixes, and the name each weight's module is read under (formats.convert.read_name):
# the denoiser's native (or SD's original UNet) paths as ComfyUI keys them, the CLIP text encoder as diffusers does
FILE_PREFIXES = (("model.diffusion_model.", "diffusion_model."), ("diffusion_model.", "diffusion_model."),
                 ("cond_stage_model.transformer.", "text_encoder."),
                 ("conditioner.embedders.0.transformer.", "text_encoder."))
# OpenCLIP text encoders in single files (SD2's, SDXL's second): prefix -> the diffusers component they are
OPEN_CLIP = (("conditioner.embedders.1.model.", "text_encoder_2"), ("cond_stage_model.model.", "text_encoder"))
OPEN_CLIP_TENSOR = re.compile(r"^transformer\.resblocks\.(\d+)\.(attn\.in_proj|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)"
                              r"[._](weight|bias)$")
OPEN_CLIP_NAMES = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
CLIP_UNWRAPPED = ("encoder.layers.", "embeddings.", "final_layer_norm.")
EMBEDDING = re.compile(r"(^|[._])(token_embedding|position_embedding|embed_tokens|embed_positions|wte|wpe|shared|"
                       r"word_embeddings|position_embeddings)$")
# sd-scripts' ss_base_model_version where the keys tell it (library/flux_utils.py MODEL_VERSION_FLUX_V1)
BASE_VERSIONS = {"flux1": "flux1"}


@dataclass
class Difference:
    """A differing tensor of the two checkpoints: its key, the module name it is read under, its shape and dtype
    (tuned's), and its rows of the stored tensor (None: all; an OpenCLIP q, k or v is a third of in_proj)."""
    key: str
    module: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    rows: tuple[int, int] | None = None

    def dense(self, base: Checkpoint, tuned: Checkpoint) -> Dense:
        """What a DenseSource serves for it: the difference's rows, read when asked for."""
        def read() -> torch.Tensor:
            d = _difference(base, tuned, self.key)
            return d if self.rows is None else d[self.rows[0]:self.rows[1]]
        return Dense(self.shape, self.dtype, read)


def difference_source(base: Checkpoint, tuned: Checkpoint, diffs: list[Difference], biases: list[Difference]
                      ) -> DenseSource:
    """The differences as a DenseSource: module `<name>` of each differing weight W_tuned - W_base, and
    `<name>.diff_b` = b_tuned - b_base for its differing bias."""
    return DenseSource(tuned.path, {}, {d.module: d.dense(base, tuned) for d in diffs},
                       {b.module + BIAS_DIFF: b.dense(base, tuned) for b in biases})


def _difference(base: Checkpoint, tuned: Checkpoint, key: str) -> torch.Tensor:
    """W_tuned - W_base of checkpoint key `key`, float64 (a weight as a matrix, fp8 with its scale). Raises
    InputFileError naming --base or --tuned when that one holds NaN or Inf."""
    return _read(tuned, key, "--tuned") - _read(base, key, "--base")


def _read(ck: Checkpoint, key: str, role: str) -> torch.Tensor:
    """Tensor `key` of checkpoint `ck` (passed as `role`) in float64, a weight as a matrix (fp8 with its scale).
    Raises InputFileError naming `role` when it holds NaN or Inf."""
    t = ck.matrix(key) if key.endswith(".weight") else ck.tensor(key).to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise InputFileError(f"{key} holds NaN or Inf in {role} {ck.path}; that checkpoint is damaged - "
                             "re-download or re-save it")
    return t


def module_name(key: str, folder: bool) -> str | None:
    """The LoRA module name checkpoint weight `key` (without `.weight`) is read under: a diffusers folder's
    `<component>.<path>` as it is; a single file's by its prefix (FILE_PREFIXES), a bare DiT path as ComfyUI's
    `diffusion_model.<path>`; None for a key of no known part (a VAE's, a second OpenCLIP encoder's)."""
    stem = key[: -len(".weight")]
    if folder and "." in stem and stem.split(".", 1)[0] in ("unet", "transformer", "text_encoder", "text_encoder_2",
                                                             "text_encoder_3", "connectors"):
        comp, _, rest = stem.partition(".")
        if comp.startswith("text_encoder") and rest.startswith(CLIP_UNWRAPPED):  # transformers >= 5 saves CLIP
            return f"{comp}.text_model.{rest}"  # without its text_model wrapper (formats.weights._unwrapped)
        return stem
    for prefix, name in FILE_PREFIXES:
        if stem.startswith(prefix):
            return name + stem[len(prefix):]
    if stem.startswith(("first_stage_model.", "vae.", "conditioner.", "cond_stage_model.", "text_encoders.")):
        return None
    return "diffusion_model." + stem


@dataclass
class Pairing:
    """The differing weights (`diffs`), their modules' differing biases (`biases`), what was left out (why ->
    keys), and notes (dtypes that differ, tensors that differ only by rounding)."""
    diffs: list[Difference]
    biases: list[Difference]
    left: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _scale_like(key: str) -> bool:
    suffix = key.rpartition(".")[2]
    return suffix in WEIGHT_SCALES or suffix in ACTIVATION_SCALES or suffix == COMFY_QUANT


def open_clip_parts(key: str, shape: tuple[int, ...]) -> tuple[str, list[tuple[str, tuple[int, int] | None]]] | None:
    """('weight' or 'bias', [(module, rows)]) of an OpenCLIP text-encoder tensor in a single-file checkpoint (SD2's
    encoder, SDXL's second) under CLIP's diffusers names, q, k and v as thirds of attn.in_proj (the inverse of
    formats.weights._open_clip); None for another key."""
    for prefix, comp in OPEN_CLIP:
        hit = OPEN_CLIP_TENSOR.match(key[len(prefix):]) if key.startswith(prefix) else None
        if hit is None:
            continue
        layer = f"{comp}.text_model.encoder.layers.{hit.group(1)}."
        if hit.group(2) == "attn.in_proj":
            w = shape[0] // 3
            return hit.group(3), [(f"{layer}self_attn.{x}_proj", (j * w, (j + 1) * w)) for j, x in enumerate("qkv")]
        return hit.group(3), [(layer + OPEN_CLIP_NAMES[hit.group(2)], None)]
    return None


def pair_weights(base: Checkpoint, tuned: Checkpoint, bias_diffs: bool) -> Pairing:
    """The weights of `tuned` that differ from `base`'s, paired by name; weights in only one of them are left out
    (unpaired). Where a tensor's dtypes differ, a difference within the coarser dtype's rounding (_compare) is not
    the fine-tune's: such a tensor is left out and a note says how many. Raises LoraStructureError when the two are
    different models (a shared weight of another shape, or under half the weights shared), identical, or differ
    only by rounding."""
    bkeys, tkeys = set(base.keys()), set(tuned.keys())
    shared = sorted(k for k in bkeys & tkeys if not _scale_like(k))
    for k in shared:
        if tuple(base.info(k).shape) != tuple(tuned.info(k).shape):
            raise LoraStructureError(f"--base and --tuned are different models: {k} is {list(base.info(k).shape)} "
                                     f"in one and {list(tuned.info(k).shape)} in the other; give the checkpoint the "
                                     "fine-tune started from")
    tensors = max(sum(1 for k in bkeys if not _scale_like(k)), sum(1 for k in tkeys if not _scale_like(k)))
    if 2 * len(shared) < tensors:
        raise LoraStructureError(f"--base and --tuned are different models (or layouts): only {len(shared)} of "
                                 f"{tensors} weights have the same name in both; give two checkpoints of one model in "
                                 "one layout (both single files, or both diffusers folders)")
    p = Pairing([], [])
    biases: list[Difference] = []
    rounding: list[str] = []
    for k in shared:
        seen = _compare(base, tuned, k)
        if seen != DIFFERS:
            rounding += [k] if seen == ROUNDING else []
            continue
        shape, dtype = tuple(base.info(k).shape), tuned.info(k).dtype
        stem, _, suffix = k.rpartition(".")
        clip = open_clip_parts(k, shape)
        if clip is not None:
            kind, parts = clip
            found = [Difference(k, m, (r[1] - r[0], *shape[1:]) if r else shape, dtype, r) for m, r in parts
                     if r is None or _compare(base, tuned, k, r) == DIFFERS]
            (biases if kind == "bias" else p.diffs).extend(found)
        elif suffix == "bias":
            name = module_name(stem + ".weight", base.folder)
            biases.append(Difference(k, name or stem, shape, dtype))
        elif suffix != "weight" or len(shape) < 2:
            p.left.setdefault("1-D weights (norms, scales) and other tensors", []).append(k)
        elif len(shape) > 5 or EMBEDDING.search(stem):
            p.left.setdefault("embeddings", []).append(k)
        elif module_name(k, base.folder) is None:
            p.left.setdefault("weights of no LoRA module (VAE, other encoders)", []).append(k)
        else:
            p.diffs.append(Difference(k, module_name(k, base.folder), shape, dtype))
    p.notes = _dtype_notes(base, tuned, shared, rounding)
    if not p.diffs and rounding:
        casts = sorted({f"{_dtype_name(base.info(k).dtype)} in --base, {_dtype_name(tuned.info(k).dtype)} in "
                        f"--tuned" for k in rounding})
        raise LoraStructureError(f"--base and --tuned differ only by the rounding of a cast ({'; '.join(casts)}): "
                                 f"{len(rounding)} tensor(s) differ, each element by at most the coarser dtype's "
                                 "rounding (eps x max(|W_base|, |W_tuned|)), and no linear or conv weight beyond it "
                                 "- there is nothing to extract; nothing was written")
    if not p.diffs and not biases and not p.left:
        raise LoraStructureError("--base and --tuned hold the same weights (no difference): there is nothing to "
                                 "extract; nothing was written")
    for role, keys in (("--base", bkeys - tkeys), ("--tuned", tkeys - bkeys)):
        alone = sorted(k for k in keys if not _scale_like(k))
        if alone:
            p.left[f"weights only in {role} (unpaired: nothing to subtract)"] = alone
    modules = {d.module for d in p.diffs}
    for b in biases:
        if b.module in modules and bias_diffs:
            p.biases.append(b)
        else:
            why = "biases" + ("" if bias_diffs else " (--bias-diffs writes them as .diff_b)")
            p.left.setdefault(why, []).append(b.key)
    return p


SAME, ROUNDING, DIFFERS = "same", "rounding", "differs"


def _coarser(base: Checkpoint, tuned: Checkpoint, key: str) -> torch.dtype | None:
    """The coarser (larger machine epsilon) of `key`'s two stored dtypes when they differ and both are floating
    point; None otherwise."""
    a, b = base.info(key).dtype, tuned.info(key).dtype
    if a == b or not (a.is_floating_point and b.is_floating_point):
        return None
    return max((a, b), key=lambda t: torch.finfo(t).eps)


def _compare(base: Checkpoint, tuned: Checkpoint, key: str, rows: tuple[int, int] | None = None) -> str:
    """Whether the tensor (its `rows`) is the SAME in both (bit for bit as stored, or, for a weight beside a scale
    (fp8), as read with it), differs only by ROUNDING, or DIFFERS.

    ROUNDING: the two dtypes differ and every element's difference is within the coarser dtype's rounding,
    |W_tuned - W_base| <= eps * max(|W_base|, |W_tuned|) + s (eps = torch.finfo(coarser).eps; s the larger of the
    two dtypes' subnormal spacings, finfo.tiny * finfo.eps, where fp16's gradual underflow is coarser than bf16's;
    no s for a scaled fp8 weight), judged elementwise.
    Rounding to nearest moves a value by at most eps/2 of it (Higham, Accuracy and Stability of Numerical
    Algorithms, 2nd ed., section 2.1), so a cast of one weight (fp32 -> fp16), or two casts of one weight (fp16 and
    bf16), always stays within this bound; a fine-tune's change that no element shows beyond it cannot be told
    from the cast."""
    stem = key.rpartition(".")[0]
    scaled = key.endswith(".weight") and any(f"{stem}.{s}" in c for s in WEIGHT_SCALES for c in (base, tuned))
    if scaled:
        a, b = base.matrix(key), tuned.matrix(key)
    else:
        a, b = base.tensor(key), tuned.tensor(key)
        if a.dtype != b.dtype:
            a, b = a.to(torch.float64), b.to(torch.float64)
    if rows is not None:
        a, b = a[rows[0]:rows[1]], b[rows[0]:rows[1]]
    if torch.equal(a, b):
        return SAME
    coarse = _coarser(base, tuned, key)
    if coarse is None:
        return DIFFERS
    spacing = 0.0 if scaled else max(torch.finfo(c.info(key).dtype).tiny * torch.finfo(c.info(key).dtype).eps
                                     for c in (base, tuned))
    a, b = a.to(torch.float64), b.to(torch.float64)
    bound = torch.finfo(coarse).eps * torch.maximum(a.abs(), b.abs()) + spacing
    return ROUNDING if bool(((a - b).abs() <= bound).all()) else DIFFERS


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_notes(base: Checkpoint, tuned: Checkpoint, shared: list[str], rounding: list[str]) -> list[str]:
    """A note per pair of dtypes that the shared tensors are stored in (--base's, --tuned's) where they differ:
    how many tensors, the rounding bound (_compare), and how many differ only by it (left out)."""
    pairs: dict[tuple[torch.dtype, torch.dtype], list[str]] = {}
    for k in shared:
        if _coarser(base, tuned, k) is not None:
            pairs.setdefault((base.info(k).dtype, tuned.info(k).dtype), []).append(k)
    notes = []
    for (bd, td), keys in pairs.items():
        coarse = max((bd, td), key=lambda t: torch.finfo(t).eps)
        only = sorted(set(keys) & set(rounding))
        notes.append(f"dtypes differ: {len(keys)} tensor(s) are {_dtype_name(bd)} in --base and {_dtype_name(td)} "
                     f"in --tuned; a difference within {_dtype_name(coarse)}'s rounding (|W_tuned - W_base| <= "
                     f"{torch.finfo(coarse).eps:.2g} x max(|W_base|, |W_tuned|) in every element) is the cast, not the "
                     f"fine-tune: {len(only)} of them differ only so (left out"
                     + (f", e.g. {only[0]}" if only else "") + "); a tensor that differs beyond it keeps its rounding "
                     "in the difference")
    return notes


@dataclass
class Extraction:
    """An extraction ready to run: the output, its precision, notes, the rule outcome and the certificates."""
    out: Output
    precision: str
    notes: list[str]
    rules: RuleOutcome
    certified: Certified
    tuned: Path
    layout: Layout
    input_precision: str


def _open(path: str, role: str, variant: str | None) -> Checkpoint:
    """Checkpoint `path` given as `role` (--base, --tuned), its errors naming that role. Raises InputFileError also
    for a variant asked of a single file (only a diffusers folder has variants) and for a LoRA file."""
    try:
        ck = Checkpoint(local_path(path, "input"), variant)
    except InputFileError as e:
        raise InputFileError(str(e).replace("--base", role)) from None
    if variant is not None and not ck.folder:
        ck.close()
        raise InputFileError(f"--base-variant reads a diffusers folder's variant weight files; {role} {ck.path} is a "
                             "single file: drop --base-variant")
    infos = {k: ck.info(k) for k in ck.keys()}
    lora = [k for k in infos if LORA_TOKEN.search(k) or any(f.marks(k) for f in FORMATS.values())]
    if infos and 2 * len(lora) > len(infos):
        ck.close()
        raise InputFileError(f"{role} {ck.path} is a LoRA file, not a checkpoint (keys like {lora[0]}): extract "
                             "subtracts two full models; give the model checkpoints (resize, merge or convert read "
                             "LoRA files)")
    return ck


def prepare(base: Checkpoint, tuned: Checkpoint, opts: ResizeOptions, bias_diffs: bool = False,
            partial: bool = True) -> Extraction:
    """The differences read as a LoRA in the output layout (opts.output_format, default kohya: the trainers'
    native names), with the jobs (`partial`: ops.diffs.layer_job's); nothing decomposed yet."""
    p = pair_weights(base, tuned, bias_diffs)
    target = opts.output_format or "kohya"
    if KEY_FORM.get(target) != "kohya" and p.biases:  # diffusers' and PEFT's loaders have no bias-diff key
        p.left.setdefault(f"biases (the {target} layout has no bias-diff key)", []).extend(b.key for b in p.biases)
        p.biases = []
    if not p.diffs:
        raise LoraStructureError("no linear or conv weight differs between --base and --tuned (only "
                                 f"{', '.join(p.left)}); there is no LoRA to extract - nothing was written")
    src = difference_source(base, tuned, p.diffs, p.biases)
    parsed = detect(src.infos(), {})
    arch = detect_arch(parsed, scheme_of(parsed), opts.arch, src.infos())
    scheme = scheme_of(parsed)
    unread = [m.name for m in parsed.modules if read_name(m.name, scheme, arch) is None]
    if 2 * len(unread) > len(parsed.modules):  # a wrong --arch (or model) would quietly drop most of the model
        title = arch.title if arch else "Stable Diffusion"
        fix = (f"--arch {opts.arch} is not these checkpoints' model: drop --arch, or give the right one"
               if opts.arch else "give --arch if the model is another")
        raise LoraStructureError(f"{len(unread)} of the {len(parsed.modules)} differing linear/conv weights are no "
                                 f"module a {title} LoRA names (e.g. {unread[0]}); {fix} - nothing was written")
    if unread:
        keep = [d for d in p.diffs if d.module not in set(unread)]
        p.left.setdefault(f"weights no {arch.title if arch else 'Stable Diffusion'} LoRA names", []).extend(
            d.key for d in p.diffs if d.module in set(unread))
        p.diffs = keep
        p.biases = [b for b in p.biases if b.module not in set(unread)]
        src = difference_source(base, tuned, p.diffs, p.biases)
    arch_name = SD if arch is None else arch.name
    src.metadata = _input_metadata(arch_name, target, any(len(d.shape) > 2 for d in p.diffs), tuned.path, base.path)
    layout = read_layout(src.infos(), src.metadata, None, target, arch_name)
    rules = rules_outcome(opts, layout, src.infos(), src.metadata)  # rank/drop rules, scale rules, block weights
    certified = Certified()
    jobs = ruled_jobs(layout.modules, src, opts, rules, certified, partial=partial)
    precision, precision_notes = precision_of(layout, src.infos(), opts.precision)
    out = Output(layout, jobs, strengthened_companions(copied_sources(layout, src), layout.known, rules),
                 [InputRecord(tuned.path.name, src.metadata)],
                 cast=opts.precision is not None)
    notes = precision_notes + p.notes + [f"{len(p.diffs)} weight(s) differ: extracted as {len(jobs)} layer(s) "
                               f"({arch.title if arch else 'Stable Diffusion'}, {target} layout)"]
    notes += [f"left out: {len(keys)} differing {why} (e.g. {keys[0]})" for why, keys in p.left.items()]
    if p.biases:
        notes.append(f"{len(p.biases)} differing bias(es) written as `.diff_b` (ComfyUI adds them to the bias; "
                     "diffusers' kohya loader refuses a file with them)")
    # the checkpoint's differences are read under an internal LoRA naming; how those names became the output's is
    # not something the user's files did (formats.convert's "key names ..." note), so it is not said
    shown = [n for n in layout.notes if not n.startswith("key names ")]
    return Extraction(out, precision, notes + shown, rules, certified, tuned.path, layout,
                      precision_of(layout, src.infos(), None)[0])


def _input_metadata(arch: str, target: str, conv: bool, tuned: Path, base: Path) -> dict[str, str]:
    """What the output's metadata starts from (io.metadata.output_metadata keeps it): sd-scripts' network module
    and base model version where known, and conv_dim in ss_network_args when conv layers are written (rewritten to
    the ranks written)."""
    meta = {"ss_training_comment": f"extracted by lora-resize: {tuned.name} - {base.name}"}
    if KEY_FORM.get(target) == "kohya":
        meta["ss_network_module"] = PLAIN_MODULE_OF.get(arch, PLAIN_MODULE)
        if conv:
            meta["ss_network_args"] = json.dumps({"conv_dim": "1", "conv_alpha": "1"})
    version = BASE_VERSIONS.get(arch)
    if version:
        meta["ss_base_model_version"] = version
    return meta


def refuse_base_measures(method: str | None, target_error: float | None) -> None:
    """OptionsError for the rank settings that measure a LoRA against a base model (a base-relative --method,
    --target-error): extract has none - its --base is the checkpoint the difference is taken from."""
    if target_error is not None or (method in POLICIES and POLICIES[method].base):
        what = "--target-error" if target_error is not None else f"--method {method}"
        raise OptionsError(f"{what} measures a LoRA's loss relative to a base model's weights, and extract has no base "
                           "model to measure against (its --base is the checkpoint the difference is taken from): use "
                           "--target-fro, --target-size, another --method or --rank")


def _options(options: ResizeOptions | None, fields: dict) -> None:
    """The base-relative settings refused (refuse_base_measures) before the options are built (ResizeOptions would
    ask for a base model)."""
    if options is not None:
        refuse_base_measures(options.method, options.target_error)
    else:
        refuse_base_measures(fields.get("method"), fields.get("target_error"))


@contextlib.contextmanager
def _extraction(base: str | os.PathLike, tuned: str | os.PathLike, opts: ResizeOptions, bias_diffs: bool,
                base_variant: str | None, partial: bool = True) -> Iterator[tuple[Extraction, Checkpoint, Checkpoint]]:
    """Both checkpoints open and the extraction prepared (prepare); closed on the way out."""
    if opts.diffs_to_lora:
        raise OptionsError("--diffs-to-lora turns the full diffs inside a LoRA file into pairs (resize); extract "
                           "writes every difference as a pair already: drop it")
    if opts.base is not None:
        raise OptionsError("extract reads its base model from its own base argument; the rank options' base (a "
                           "model to measure a LoRA against) does not apply")
    if opts.as_lora:
        raise OptionsError("--as-lora turns a LoKr/LoHa file's modules into plain pairs (resize); extract writes "
                           "plain pairs already: drop it")
    with _open(base, "--base", base_variant) as b, _open(tuned, "--tuned", base_variant) as t:
        yield prepare(b, t, opts, bias_diffs, partial), b, t


def extract(base: str | os.PathLike, tuned: str | os.PathLike, dst: str | os.PathLike,
            options: ResizeOptions | None = None, *, bias_diffs: bool = False, base_variant: str | None = None,
            progress: Progress | None = None, on_layer: Callable[[LayerResult], None] | None = None,
            **option_fields) -> ResizeResult:
    """A LoRA of `tuned` - `base` written to `dst` (atomically; neither input is modified): every linear and conv
    weight that differs, as the best rank-k factors of its difference under the rank options (rank=, method=,
    param=, target_size=, target_fro=, block_rules=, output_format=, arch=, precision=, ...; `bias_diffs`:
    differing biases as `.diff_b`, which ComfyUI reads and diffusers' kohya loader refuses; `base_variant`: the
    weight files of a diffusers folder's variant, in both).
    Each layer's alpha follows resize's rule (ops.job.alpha_rule): with --rank N, alpha = N (scale 1).

    `base`, `tuned`: .safetensors checkpoints (single files: SD/SDXL original, DiT native or ComfyUI keys) or
    diffusers model folders, in one layout. Raises OptionsError, InputFileError, LoraStructureError (different
    models, identical ones, nothing a LoRA names), NumericalError, OutputFileError, DeviceError."""
    t0 = time.perf_counter()
    _options(options, option_fields)
    opts = as_options(options, option_fields)
    local_path(dst, "output")
    device = compute_device(opts.device)
    with _extraction(base, tuned, opts, bias_diffs, base_variant) as (x, b, t):
        dst_path, new_folder = output_file(dst, t.path, x.layout.file_name)
        for src in (b.path, t.path):
            check_output_path(src, dst_path, new_folder)
            if src.is_dir() and dst_path.resolve().is_relative_to(src.resolve()):
                raise OutputFileError(f"output {dst_path} is inside the input folder {src}; write it elsewhere")
        done = produce(dst_path, x.out, opts, x.precision, device, progress, on_layer, new_folder)
    notes = (x.notes + x.certified.notes() + done.write_notes + clamp_notes(done.rows) + x.rules.notes
             + done.plan_notes)
    return ResizeResult(src=x.tuned, dst=dst_path, format=x.out.layout.format, precision=x.precision,
                        options={**done.options.as_dict(), "rule_hits": x.rules.hits, "extracted_from": str(b.path)},
                        layers=done.rows, passthrough=list(x.out.copied), copied=dict(x.out.layout.known),
                        cast=done.cast, input_bytes=_size(x.tuned), output_bytes=dst_path.stat().st_size,
                        seconds=time.perf_counter() - t0, metadata=done.metadata, notes=notes)


def extraction_analysis(base: str | os.PathLike, tuned: str | os.PathLike, options: ResizeOptions | None = None, *,
                        bias_diffs: bool = False, base_variant: str | None = None, progress: Progress | None = None,
                        sweep: Mapping[str, Sequence] | None = None,
                        max_effect_error: float = DEFAULT_MAX_EFFECT_ERROR, **option_fields) -> Analysis:
    """`extract --analyze`: every differing layer decomposed once, then the sizes and fidelities of a sweep of
    settings (ops.analyze's: `default_sweep()` unless given; a chosen setting as in `analyze`) for the LoRA
    `extract` would write - nothing is written. Options and errors as `extract` and `analyze`."""
    t0 = time.perf_counter()
    _options(options, option_fields)
    shared, chosen = split_options(options, option_fields)
    device = compute_device(shared.device)
    with _extraction(base, tuned, shared, bias_diffs, base_variant) as (x, b, t):
        t1 = time.perf_counter()
        sps = spectra(x.out.jobs, device, shared.threads, progress)
        t_dec = time.perf_counter() - t1
        ev = Evaluator(x.out, sps, x.precision, shared, x.input_precision, x.rules)
        a = finish(ev, dict(src=x.tuned, format=x.out.layout.format, precision=x.precision,
                            input_bytes=_size(x.tuned), dropped=x.rules.dropped, seconds=0.0,
                            decompose_seconds=t_dec, notes=x.notes + x.certified.notes() + x.rules.notes,
                            rule_hits=x.rules.hits),
                   shared, chosen, chosen.label() if chosen else "", sweep, max_effect_error,
                   reopen=partial(_reopened, base, tuned, shared, bias_diffs, base_variant),
                   hint=f"; extract measures no model output: write the LoRA, then `lora-resize analyze "
                        f"OUT.safetensors --base {shlex.quote(os.fspath(base))} --effect` measures it")
    a.command = shlex.join(["lora-resize", "extract", "--base", os.fspath(base), "--tuned", os.fspath(tuned),
                            "-o", "OUT.safetensors"])
    a.seconds = time.perf_counter() - t0
    return a


@contextlib.contextmanager
def _reopened(base, tuned, opts: ResizeOptions, bias_diffs: bool, base_variant: str | None, names: list[str]
              ) -> Iterator[list[LayerJob]]:
    """The jobs of layers `names` of the extraction, both checkpoints open again (ops.analyze.at_precisions)."""
    with _extraction(base, tuned, opts, bias_diffs, base_variant, partial=False) as (x, _, _):
        jobs = {j.name: j for j in x.out.jobs}
        yield [jobs[n] for n in names]


def _size(path: Path) -> int:
    """The bytes of a checkpoint: its file, or a diffusers folder's .safetensors files."""
    return sum(f.stat().st_size for f in path.rglob("*.safetensors")) if path.is_dir() else path.stat().st_size
