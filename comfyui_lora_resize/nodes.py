"""The nodes, in ComfyUI's conventions: `INPUT_TYPES` (a classmethod: "required"/"optional" inputs, a list for a
combo, ("INT"/"FLOAT"/"STRING"/"BOOLEAN", {options}) otherwise), `RETURN_TYPES`/`RETURN_NAMES`, `FUNCTION`,
`CATEGORY`, `OUTPUT_NODE`; LoRAs listed and found with `folder_paths` ("loras"), progress on ComfyUI's bar
(`comfy.utils.ProgressBar`: Cancel stops a job between layers, nothing written); `IS_CHANGED` from the input files'
size and time, so an edited LoRA is read again; Analyze previews its curve on the node (a PNG in ComfyUI's temp
folder, as PreviewImage does). A lora-resize error becomes the node's error with our one-line message; files are
written atomically into the first loras folder, never over an existing file (no name given: a free one).

Apply resized LoRA and the sweep apply a setting in memory (`lora_resize.resized`: the tensors the CLI would write)
through ComfyUI's own LoRA loading (`comfy.sd.load_lora_for_models`), nothing written; the sweep's outputs are
lists (OUTPUT_IS_LIST), which ComfyUI maps over the nodes downstream, and Tile lays the pictures out with their
labels."""
from __future__ import annotations

import os
import uuid
from collections import OrderedDict
from pathlib import Path

import folder_paths  # ComfyUI's

import lora_resize  # the public facade only (ARCHITECTURE.md): the jobs, the choices, the renderings

CATEGORY = "lora-resize"
KEEP = "same"  # keep the input's precision / layout
# what ComfyUI loads: single files (a PEFT adapter is a folder)
FILE_LAYOUTS = [x for x in lora_resize.LAYOUTS if x != "peft"]


def _lora_path(name: str) -> str:
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise FileNotFoundError(f"LoRA {name!r} is not in the loras folder")
    return path


def _stamp(*names: str) -> str:
    """IS_CHANGED's value: each input file's size and modification time (ComfyUI re-runs a node when it changes)."""
    out = []
    for name in names:
        path = folder_paths.get_full_path("loras", name) if name else None
        st = os.stat(path) if path and os.path.isfile(path) else None
        out.append((name, st.st_size, st.st_mtime_ns) if st else (name, None))
    return repr(out)


def _more(more: str) -> list[tuple[str, float]]:
    """Merge's extra inputs: lines `name.safetensors:weight` (weight 1 when absent)."""
    out = []
    for line in filter(None, (x.strip() for x in (more or "").splitlines())):
        name, _, w = line.rpartition(":")
        try:
            out.append((name.strip(), float(w)) if name.strip() else (line, 1.0))
        except ValueError:
            raise ValueError(f"bad input line {line!r}: write name.safetensors:weight") from None
    return out


NO_LORA = "None"  # a LoRA stack's empty slot, as the stacker nodes name it


def _stack(lora_stack) -> list[tuple[str, float]]:
    """Merge's inputs from a LORA_STACK (the type LoRA stacker packs pass between nodes - Comfyroll's CR LoRA Stack,
    Efficiency Nodes' LoRA Stacker, Easy-Use's loraStack: a list of (lora_name, strength_model, strength_clip)):
    (name, weight) with the model strength as the weight; empty slots ('None') skipped. A merge gives an input one
    weight for all its layers, so an entry whose clip strength differs from its model strength is refused (it would
    be applied otherwise than the stack applies it). Raises ValueError (one line)."""
    out = []
    for entry in lora_stack or ():
        if not isinstance(entry, (tuple, list)) or len(entry) < 2 or not isinstance(entry[0], (str, type(None))):
            raise ValueError(f"lora_stack entry {str(entry)[:80]!r} is not (lora_name, strength_model, "
                             "strength_clip): connect a LoRA stack node's LORA_STACK output")
        name, model = entry[0], float(entry[1])
        if not name or name == NO_LORA:
            continue
        if len(entry) > 2 and float(entry[2]) != model:
            raise ValueError(f"lora_stack entry {name}: clip strength {entry[2]} differs from model strength "
                             f"{entry[1]}; a merge gives each LoRA one weight: set both strengths to the weight")
        out.append((name, model))
    return out


def _merge_settings(merge_method: str, values: dict):
    """The MergeSettings of the Merge node's inputs: `merge_method` and the MERGE_PARAMS widgets' `values`
    (lora_resize.MergeSettings.given: a widget always holds a value, so a parameter the method does not read is
    ignored); a FLOAT parameter's 0 means the method's default (density's valid values are in (0, 1]). Raises
    OptionsError (unknown method, bad value) and ValueError (an input that is no parameter)."""
    floats = {name for name, p in lora_resize.MERGE_PARAMS.items() if p.type is float}
    return lora_resize.MergeSettings.given(merge_method, {name: None if name in floats and v == 0 else v
                                                          for name, v in values.items()})


def _output_path(name: str, default: str) -> Path:
    """A new file in the first loras folder. No name given: `default` (`<input>_resized`), or the first of its
    `_2`, `_3`... that no loras folder holds (`lora_resize.free_name`), so a re-queued node writes a new file and
    never over one. A name given that any loras folder already holds is refused (the new file would hide it from
    the LoRA lists), as are names that are not plain file names."""
    name = name.strip()
    given = bool(name)
    name = name if given else default
    if not name.lower().endswith(".safetensors"):
        name += ".safetensors"
    problem = lora_resize.name_problem(name) or ("it would be hidden" if name.startswith(".") else None)
    if problem:  # on every platform, so a workflow made on one runs on the others
        raise ValueError(f"output name {name[:60]!r} must be a plain file name: {problem}")
    folders = [Path(f) for f in folder_paths.get_folder_paths("loras")]

    def taken(n: str) -> bool:  # a dangling link counts: never written through
        return any(os.path.lexists(f / n) for f in folders)
    if not given:
        name = lora_resize.free_name(name, taken)
    elif taken(name):
        raise FileExistsError(f"{name} already exists in a loras folder; choose another output name")
    folders[0].mkdir(parents=True, exist_ok=True)
    return folders[0] / name


def _stem(lora_name: str) -> str:
    """The name of a LoRA of the list without its folder and suffix: `style/c.safetensors` -> `c`."""
    return Path(lora_name).stem


def _progress():
    """lora-resize's progress callable (iterable, total) on ComfyUI's progress bar."""
    import comfy.utils

    def wrap(iterable, total):
        bar = comfy.utils.ProgressBar(total)
        for x in iterable:
            yield x
            bar.update(1)
    return wrap


def _run(fn):
    """A lora-resize error as the node's error, with our one-line message."""
    try:
        return fn()
    except lora_resize.LoraResizeError as e:
        raise RuntimeError(f"lora-resize: {e}") from None


def _options(method: str, param: float, rank: int, conv_rank: int, rank_rule: str, target_size: str,
             precision: str, block_weights: str = "") -> dict:
    """Option fields from the nodes' inputs: method 'fixed' uses rank alone; rank 0 is no cap (as the Analyze
    node's rank_cap, so its recommendation is what these nodes write); conv_rank 0 follows rank; a target size
    replaces the method (rank still caps); `block_weights` (empty: none) is --block-weights. Raises RuntimeError
    (one line) for method 'fixed' without a rank."""
    if method == "fixed" and not rank and not target_size.strip():
        raise RuntimeError("lora-resize: method 'fixed' needs a rank >= 1 (rank 0 means no cap, for the other "
                           "methods)")
    fields = dict(rank=rank or None, conv_rank=conv_rank or None, rank_rule=rank_rule,
                  precision=None if precision == KEEP else precision)
    if block_weights.strip():
        fields["block_weights"] = block_weights.strip()
    if target_size.strip():
        fields["target_size"] = target_size.strip()
    elif method != "fixed":
        fields.update(method=method, param=param)
    return fields


RANK_INPUTS = {
    "method": (["fixed", *lora_resize.dynamic_methods()], {"default": "sv_fro"}),
    "param": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 10000.0, "step": 0.001}),  # 0.995 must fit
    "rank": ("INT", {"default": 0, "min": 0, "max": 8192,
                     "tooltip": "fixed rank, or the cap of a method/target (0: no cap, as the Analyze node)"}),
    "conv_rank": ("INT", {"default": 0, "min": 0, "max": 8192, "tooltip": "0: the same as rank"}),
    "rank_rule": (list(lora_resize.RANK_RULES), {"default": "exact"}),
    "target_size": ("STRING", {"default": "", "tooltip": "e.g. 50MB: the best file that fits (replaces method)"}),
    "precision": ([KEEP, *lora_resize.PRECISIONS], {"default": KEEP}),
}


BLOCK_WEIGHTS = {"block_weights": ("STRING", {  # optional: workflows saved before it load unchanged
    "default": "", "tooltip": "bake block strengths in (LoRA Block Weight notation), e.g. "
                              "SD15:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1, SDXL:OUTALL or FLUX:<58 values>; empty: none"})}


def _param_widget(p) -> tuple:
    """The Merge node's widget of a merge parameter (lora_resize.MERGE_PARAMS): FLOAT with 0 for the method's
    default, or INT; its tooltip names the methods that read it."""
    readers = [m for m in lora_resize.merge_methods() if p.name in lora_resize.MergeSettings(m).as_dict()]
    read = (f"read by {', '.join(readers)}; ignored by the other methods" if readers else
            "read by no method yet")
    if p.type is float:
        top = 1.0 if p.name == "density" else 10000.0
        return ("FLOAT", {"default": 0.0, "min": 0.0, "max": top, "step": 0.01,
                          "tooltip": f"{p.help}; 0: the method's default ({read})"})
    # an INT named seed would get the frontend's control_after_generate, 'randomize' by default (its useIntWidget):
    # a new file on every queue and one more saved widget value; the seed stays as set
    return ("INT", {"default": 0, "min": 0, "max": 2**63 - 1, "control_after_generate": False,
                    "tooltip": f"{p.help} ({read})"})


def _merge_inputs() -> dict:
    """The Merge node's optional inputs after `more`: the merge method (every registered one,
    lora_resize.merge_methods()), the per-input strengths, a LORA_STACK socket, then one widget per merge parameter
    (lora_resize.MERGE_PARAMS, last: a parameter declared later is appended). Optional and after the older inputs,
    so a workflow saved before them loads with its widget values in place (sum: the file it made then)."""
    return {"merge_method": (lora_resize.merge_methods(), {
                "default": "sum", "tooltip": "how the weighted inputs combine (lora-resize merge --merge-method): "
                                             "sum is the exact weighted sum; the README's Merge methods lists the "
                                             "others"}),
            "input_strengths": ("STRING", {"default": "", "multiline": True, "tooltip": (
                "block strengths of single inputs, applied before the merge method, one per line: "
                "N:PRESET:W1,... or N:PATTERN=scale:X (N: lora_a 1, lora_b 2, then the more lines, then the "
                "stack's LoRAs), e.g. 2:SDXL:OUTALL or 1:*attn2*=scale:0.5; the CLI's --input-block-weights / "
                "--input-rule")}),
            "lora_stack": ("LORA_STACK", {"tooltip": "more inputs from a LoRA stack node (name, model strength, "
                                                     "clip strength): the model strength is the weight, the two "
                                                     "must be equal; 'None' slots are skipped"}),
            **{p.name: _param_widget(p) for p in lora_resize.MERGE_PARAMS.values()}}


AUTO_NAME = "empty: <input>_%s.safetensors, or _2, _3... when taken (never over a file)"


def _written(dst: Path, job) -> tuple[str, str]:
    """Run `job` (a lora-resize call writing `dst`): the new file's name and the job's summary."""
    return dst.name, lora_resize.summary(_run(job))


class _Node:
    """What every node shares: its menu category, being an output node (it acts, so ComfyUI runs it without a
    consumer), and IS_CHANGED from the LoRA it reads (`lora_name`)."""
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    @classmethod
    def IS_CHANGED(cls, lora_name=None, **_):
        return _stamp(lora_name)


class _WritesLora(_Node):
    """A node that writes a new LoRA into the loras folder: it returns the file's name and the job's summary."""
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("file_name", "summary")


class ResizeLora(_WritesLora):
    """Resize a LoRA from the loras list into a new file in the loras folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora_name": (folder_paths.get_filename_list("loras"),), **RANK_INPUTS,
                             "output_layout": ([KEEP, *FILE_LAYOUTS], {"default": KEEP}),
                             "output_name": ("STRING", {"default": "", "tooltip": AUTO_NAME % "resized"})},
                "optional": BLOCK_WEIGHTS}

    FUNCTION = "resize"

    def resize(self, lora_name, method, param, rank, conv_rank, rank_rule, target_size, precision, output_layout,
               output_name, block_weights=""):
        dst = _output_path(output_name, f"{_stem(lora_name)}_resized")
        fields = _options(method, param, rank, conv_rank, rank_rule, target_size, precision, block_weights)
        if output_layout != KEEP:
            fields["output_format"] = output_layout
        return _written(dst, lambda: lora_resize.resize(_lora_path(lora_name), dst, progress=_progress(), **fields))


class AnalyzeLora(_Node):
    """Which setting gives which size and fidelity, before any file is written: the size/fidelity curve as an
    IMAGE and the table as text."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora_name": (folder_paths.get_filename_list("loras"),),
                             "rank_cap": ("INT", {"default": 0, "min": 0, "max": 8192, "tooltip": "0: no cap"}),
                             "rank_rule": (list(lora_resize.RANK_RULES), {"default": "exact"}),
                             "precision": ([KEEP, *lora_resize.PRECISIONS], {"default": KEEP})}}

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("curve", "table")
    FUNCTION = "analyze"

    def analyze(self, lora_name, rank_cap, rank_rule, precision):
        import numpy as np
        import torch
        from PIL import Image

        a = _run(lambda: lora_resize.analyze(_lora_path(lora_name), rank=rank_cap or None, rank_rule=rank_rule,
                                             precision=None if precision == KEEP else precision,
                                             progress=_progress()))
        temp = Path(folder_paths.get_temp_directory())
        temp.mkdir(parents=True, exist_ok=True)
        png = _run(lambda: lora_resize.write_png(a, temp / f"lora-resize-analyze-{uuid.uuid4().hex[:12]}.png"))
        pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32) / 255.0
        image = torch.from_numpy(pixels)[None]  # IMAGE: (batch, height, width, channels), 0..1
        return {"ui": {"images": [{"filename": png.name, "subfolder": "", "type": "temp"}]},
                "result": (image, lora_resize.analysis_table(a))}


class MergeLoras(_WritesLora):
    """LoRAs merged by a merge method (default: the exact weighted sum; weights may be negative), reduced like a
    resize, into a new file. Inputs: lora_a and lora_b, then as many as wanted as `more` lines
    (name.safetensors:weight) and from a LoRA stack node (`lora_stack`), in that order; a weight of 0 leaves that
    input out; `input_strengths` gives single inputs block strengths (lora_resize.with_input_strengths)."""

    @classmethod
    def INPUT_TYPES(cls):
        loras = folder_paths.get_filename_list("loras")
        return {"required": {"lora_a": (loras,), "weight_a": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0,
                                                                         "step": 0.01}),
                             "lora_b": (loras,), "weight_b": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0,
                                                                         "step": 0.01}),
                             **RANK_INPUTS,
                             "output_name": ("STRING", {"default": "", "tooltip": AUTO_NAME % "merged"})},
                "optional": {"more": ("STRING", {"default": "", "multiline": True,
                                                 "tooltip": "more inputs, one per line: name.safetensors:weight "
                                                            "(as many as wanted; weight 1 when absent)"}),
                             **_merge_inputs()}}

    FUNCTION = "merge"

    @classmethod
    def IS_CHANGED(cls, lora_a=None, lora_b=None, more="", lora_stack=None, **_):
        try:
            return _stamp(lora_a, lora_b, *(name for name, _ in _more(more) + _stack(lora_stack)))
        except ValueError:
            return float("nan")  # always run: the node says what is wrong

    def merge(self, lora_a, weight_a, lora_b, weight_b, method, param, rank, conv_rank, rank_rule, target_size,
              precision, output_name, more="", merge_method="sum", input_strengths="", lora_stack=None,
              **merge_params):
        settings = _run(lambda: _merge_settings(merge_method, merge_params))  # checked before any work
        inputs = [(lora_a, weight_a), (lora_b, weight_b), *_more(more), *_stack(lora_stack)]
        sources = _run(lambda: lora_resize.with_input_strengths(
            [lora_resize.Source(Path(_lora_path(name)), w) for name, w in inputs], input_strengths))
        dst = _output_path(output_name, f"{_stem(lora_a)}_merged")
        fields = _options(method, param, rank, conv_rank, rank_rule, target_size, precision)
        return _written(dst, lambda: lora_resize.merge(sources, dst, progress=_progress(), merge_method=settings,
                                                       **fields))


class AverageLoraCheckpoints(_WritesLora):
    """The weighted mean of one training run's checkpoints' updates (lora_resize.average: uniform, linear, EMA,
    power EMA over their steps), reduced like a resize, into a new file."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "checkpoints": ("STRING", {"default": "", "multiline": True,
                                       "tooltip": "two or more LoRAs of the loras folder, one name per line"}),
            "weighting": (list(lora_resize.WEIGHTINGS), {"default": "uniform", "tooltip": "; ".join(
                f"{k}: {v}" for k, v in lora_resize.WEIGHTINGS.items())}),
            "beta": ("FLOAT", {"default": 0.9, "min": 0.01, "max": 0.99, "step": 0.01,
                               "tooltip": "the EMA's decay (weighting ema only)"}),
            "sigma_rel": ("FLOAT", {"default": 0.1, "min": 0.01, "max": 0.3, "step": 0.01,
                                    "tooltip": "the power EMA's relative width, EDM2 (weighting power only)"}),
            "steps": ("STRING", {"default": "", "tooltip": "each checkpoint's training step, in the order of the "
                                                           "lines, e.g. 500,1000,1500; empty: from metadata or names"}),
            **RANK_INPUTS,
            "output_name": ("STRING", {"default": "", "tooltip": AUTO_NAME % "averaged"})}}

    FUNCTION = "average"

    @classmethod
    def IS_CHANGED(cls, checkpoints="", **_):
        return _stamp(*_lines(checkpoints))

    def average(self, checkpoints, weighting, beta, sigma_rel, steps, method, param, rank, conv_rank, rank_rule,
                target_size, precision, output_name):
        names = _lines(checkpoints)
        paths = [Path(_lora_path(name)) for name in names]
        dst = _output_path(output_name, f"{_stem(names[0]) if names else 'checkpoints'}_averaged")
        fields = _options(method, param, rank, conv_rank, rank_rule, target_size, precision)
        return _written(dst, lambda: lora_resize.average(
            paths, dst, weighting=weighting, beta=beta if weighting == "ema" else None,
            sigma_rel=sigma_rel if weighting == "power" else None, steps=steps.strip() or None,
            progress=_progress(), **fields))


def _lines(text: str) -> list[str]:
    """The non-empty lines of a multiline input, stripped."""
    return [x.strip() for x in (text or "").splitlines() if x.strip()]


class ConvertLora(_WritesLora):
    """A LoRA written in another layout (kohya, comfy, diffusers, onetrainer), every update kept."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora_name": (folder_paths.get_filename_list("loras"),),
                             "layout": (FILE_LAYOUTS, {"default": "comfy"}),
                             "output_name": ("STRING", {"default": "", "tooltip": AUTO_NAME % "<layout>"})}}

    FUNCTION = "convert"

    def convert(self, lora_name, layout, output_name):
        dst = _output_path(output_name, f"{_stem(lora_name)}_{layout}")
        return _written(dst, lambda: lora_resize.convert(_lora_path(lora_name), dst, layout, progress=_progress()))


# --- applying a setting in memory: no file written -------------------------------------------------------------

STRENGTH = ("FLOAT", {"default": 1.0, "min": -20.0, "max": 20.0, "step": 0.01})  # as ComfyUI's Load LoRA
BASE, ORIGINAL = "base", "original"  # the sweep's two settings that are not resizes
# the blog's comparison (sv_ratio 128/32/8/4/2), after the model without and with the LoRA as it is
DEFAULT_SWEEP = "\n".join([BASE, ORIGINAL, *(f"--method sv_ratio --param {r}" for r in (128, 32, 8, 4, 2))])
CACHE_BYTES = 4 * 10**9  # the resized tensors kept for re-queued settings, newest first, at most this many bytes
_cache: OrderedDict = OrderedDict()  # (file, size, mtime, setting) -> (tensors, bytes)


def _cached(key: tuple, make) -> tuple[dict, int]:
    """`make()` -> (tensors, bytes), remembered under `key` (the newest entries within CACHE_BYTES; the newest
    always), so re-queuing a workflow or going back to a setting does not resize again."""
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    value = _cache[key] = make()
    while len(_cache) > 1 and sum(nbytes for _, nbytes in _cache.values()) > CACHE_BYTES:
        _cache.popitem(last=False)
    return value


def _file_key(path: str) -> tuple:
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


def _resized(path: str, opts) -> tuple[dict, str]:
    """The tensors `lora-resize resize` writes for `opts` (lora_resize.resized: in memory, the same bits), and the
    label: the setting and the size its file would have ('sv_ratio 32 - 14.2 MB')."""
    def make():
        r = _run(lambda: lora_resize.resized(path, opts, progress=_progress()))
        return r.tensors, r.result.output_bytes
    tensors, nbytes = _cached((*_file_key(path), opts.flags()), make)
    return tensors, f"{opts.label()} - {lora_resize.format_size(nbytes)}"


def _original(path: str) -> tuple[dict, str]:
    """The LoRA file's own tensors, read as ComfyUI's Load LoRA reads them (comfy.utils.load_torch_file), and its
    label ('original - 1.2 GB'): the sweep's reference, exactly what Load LoRA would apply."""
    import comfy.utils
    key = _file_key(path)
    tensors, nbytes = _cached((*key, ORIGINAL), lambda: (comfy.utils.load_torch_file(path, safe_load=True), key[1]))
    return tensors, f"{ORIGINAL} - {lora_resize.format_size(nbytes)}"


def _patched(model, clip, tensors: dict, strength_model: float, strength_clip: float):
    """(model, clip) with the LoRA `tensors` added by ComfyUI's own loader, as Load LoRA adds a file's: clones that
    patch their weights when sampled (comfy.sd.load_lora_for_models maps the keys with comfy/lora.py's key maps)."""
    import comfy.sd
    return comfy.sd.load_lora_for_models(model, clip, tensors, strength_model, strength_clip)


def _sweep_settings(text: str) -> list:
    """The sweep's settings, one per line: `base`, `original`, or `lora-resize resize` flags (read by
    lora_resize.options_from_flags, as the CLI reads them). Blank lines and `#` comments are skipped. Every line is
    checked before any work; a bad one is a one-line error naming it."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.lower() in (BASE, ORIGINAL):
            out.append(line.lower())
            continue
        try:
            opts = lora_resize.options_from_flags(line)
        except lora_resize.LoraResizeError as e:
            raise ValueError(f"settings line {n} ({line[:80]!r}): {e}") from None
        if opts.output_format is not None and opts.output_format not in FILE_LAYOUTS:
            raise ValueError(f"settings line {n} ({line[:80]!r}): --output-format {opts.output_format} is not a "
                             f"layout ComfyUI applies (its scale is in a companion file); use one of "
                             f"{', '.join(FILE_LAYOUTS)}")
        out.append(opts)
    if not out:
        raise ValueError("no settings: write one per line, e.g. --method sv_ratio --param 32, or base / original")
    return out


class _Applies(_Node):
    """A node that patches a MODEL and CLIP (not an output node: KSampler consumes what it returns); it runs again
    when its LoRA file changes."""
    OUTPUT_NODE = False


class ApplyResizedLora(_Applies):
    """A LoRA resized in memory and applied to MODEL and CLIP by ComfyUI's own LoRA loading, as Load LoRA applies
    a file: see a setting's pictures before any file is written. The label names the setting and the size its file
    would have."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",),
                             "lora_name": (folder_paths.get_filename_list("loras"),), **RANK_INPUTS,
                             "strength_model": STRENGTH, "strength_clip": STRENGTH},
                "optional": BLOCK_WEIGHTS}

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "label")
    FUNCTION = "apply"

    def apply(self, model, clip, lora_name, method, param, rank, conv_rank, rank_rule, target_size, precision,
              strength_model, strength_clip, block_weights=""):
        opts = _run(lambda: lora_resize.ResizeOptions(**_options(method, param, rank, conv_rank, rank_rule,
                                                                 target_size, precision, block_weights)))
        tensors, label = _resized(_lora_path(lora_name), opts)
        return (*_patched(model, clip, tensors, strength_model, strength_clip), label)


class SweepResizedLora(_Applies):
    """One MODEL, CLIP and label per setting, as lists: ComfyUI runs what follows (CLIPTextEncode, KSampler,
    VAEDecode) once per setting, so one queued run renders the comparison - `base` (the model without the LoRA),
    `original` (the file as Load LoRA applies it) and each resize setting, in the order given."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",),
                             "lora_name": (folder_paths.get_filename_list("loras"),),
                             "settings": ("STRING", {"default": DEFAULT_SWEEP, "multiline": True,
                                                     "tooltip": "one per line: base, original, or lora-resize "
                                                                "resize flags, e.g. --method sv_ratio --param 32"}),
                             "strength_model": STRENGTH, "strength_clip": STRENGTH}}

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("models", "clips", "labels")
    OUTPUT_IS_LIST = (True, True, True)
    FUNCTION = "sweep"

    def sweep(self, model, clip, lora_name, settings, strength_model, strength_clip):
        plan = _sweep_settings(settings)
        path = _lora_path(lora_name)
        models, clips, labels = [], [], []
        for setting in plan:
            if setting == BASE:
                m, c, label = model, clip, "base (no LoRA)"
            else:
                tensors, label = _original(path) if setting == ORIGINAL else _resized(path, setting)
                m, c = _patched(model, clip, tensors, strength_model, strength_clip)
            models.append(m)
            clips.append(c)
            labels.append(label)
        return models, clips, labels


class TileImages:
    """Images side by side in one grid, each with its label under it (the sweep's pictures with their settings):
    a list of IMAGE batches and a list of labels - one per image, or one per batch - in, one IMAGE out."""
    CATEGORY = CATEGORY
    OUTPUT_NODE = False
    INPUT_IS_LIST = True  # ComfyUI hands every input as the list of what the upstream runs gave

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "labels": ("STRING", {"forceInput": True}),
                             "columns": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "0: about square"})}}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("grid",)
    FUNCTION = "tile"

    def tile(self, images, labels, columns):
        import torch
        frames = [frame for batch in images for frame in batch]  # IMAGE: (batch, height, width, channels), 0..1
        if len(labels) == len(images) and len(frames) != len(images):  # a label per batch: each of its frames
            labels = [label for batch, label in zip(images, labels) for _ in range(len(batch))]
        if len(labels) != len(frames):
            raise ValueError(f"{len(frames)} images but {len(labels)} labels: connect the labels of the node that "
                             "made the images (one per image, or one per batch)")
        grid = _grid([(frame.cpu().numpy() * 255).round().clip(0, 255).astype("uint8") for frame in frames],
                     [str(x) for x in labels], columns[0] if isinstance(columns, list) else columns)
        import numpy as np
        return (torch.from_numpy(np.asarray(grid, dtype=np.float32) / 255.0)[None],)


GAP = 8  # white pixels between the grid's cells


def _grid(pixels: list, labels: list[str], columns: int):
    """A PIL image: the pictures (H x W x 3 uint8 arrays) in rows of `columns` (0: about square), each label
    wrapped under its picture, GAP pixels between cells (lora_resize.labelled_grid, the grid of `preview`)."""
    return lora_resize.labelled_grid(pixels, labels, columns, gap=GAP)


NODE_CLASS_MAPPINGS = {"LoraResize": ResizeLora, "LoraResizeAnalyze": AnalyzeLora, "LoraResizeMerge": MergeLoras,
                       "LoraResizeConvert": ConvertLora, "LoraResizeApply": ApplyResizedLora,
                       "LoraResizeSweep": SweepResizedLora, "LoraResizeTile": TileImages,
                       "LoraResizeAverage": AverageLoraCheckpoints}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraResize": "Resize LoRA", "LoraResizeAnalyze": "Analyze LoRA",
                              "LoraResizeMerge": "Merge LoRAs", "LoraResizeConvert": "Convert LoRA",
                              "LoraResizeApply": "Apply resized LoRA", "LoraResizeSweep": "Sweep resized LoRA",
                              "LoraResizeTile": "Tile images with labels",
                              "LoraResizeAverage": "Average LoRA checkpoints"}
