"""The nodes, in ComfyUI's conventions: `INPUT_TYPES` (a classmethod: "required"/"optional" inputs, a list for a
combo, ("INT"/"FLOAT"/"STRING"/"BOOLEAN", {options}) otherwise), `RETURN_TYPES`/`RETURN_NAMES`, `FUNCTION`,
`CATEGORY`, `OUTPUT_NODE`; LoRAs listed and found with `folder_paths` ("loras"), progress on ComfyUI's bar
(`comfy.utils.ProgressBar`: Cancel stops a job between layers, nothing written); `IS_CHANGED` from the input files'
size and time, so an edited LoRA is read again; Analyze previews its curve on the node (a PNG in ComfyUI's temp
folder, as PreviewImage does). A lora-resize error becomes the node's error with our one-line message; files are
written atomically into the first loras folder, never over an existing file."""
from __future__ import annotations

import os
import uuid
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


def _output_path(name: str) -> Path:
    """A new file in the first loras folder; a name any loras folder already holds is refused (the new file would
    hide it from the LoRA lists), as are names that are not plain file names."""
    name = name.strip()
    if not name.lower().endswith(".safetensors"):
        name += ".safetensors"
    problem = lora_resize.name_problem(name) or ("it would be hidden" if name.startswith(".") else None)
    if problem:  # on every platform, so a workflow made on one runs on the others
        raise ValueError(f"output name {name[:60]!r} must be a plain file name: {problem}")
    folders = [Path(f) for f in folder_paths.get_folder_paths("loras")]
    if any(os.path.lexists(f / name) for f in folders):
        raise FileExistsError(f"{name} already exists in a loras folder; choose another output name")
    folders[0].mkdir(parents=True, exist_ok=True)
    return folders[0] / name


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
             precision: str) -> dict:
    """Option fields from the nodes' inputs: method 'fixed' uses rank alone; conv_rank 0 follows rank; a target
    size replaces the method (rank still caps)."""
    fields = dict(rank=rank, conv_rank=conv_rank or None, rank_rule=rank_rule,
                  precision=None if precision == KEEP else precision)
    if target_size.strip():
        fields["target_size"] = target_size.strip()
    elif method != "fixed":
        fields.update(method=method, param=param)
    return fields


RANK_INPUTS = {
    "method": (["fixed", *lora_resize.dynamic_methods()], {"default": "sv_fro"}),
    "param": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 10000.0, "step": 0.001}),  # 0.995 must fit
    "rank": ("INT", {"default": 64, "min": 1, "max": 8192, "tooltip": "fixed rank, or the cap of a method/target"}),
    "conv_rank": ("INT", {"default": 0, "min": 0, "max": 8192, "tooltip": "0: the same as rank"}),
    "rank_rule": (list(lora_resize.RANK_RULES), {"default": "exact"}),
    "target_size": ("STRING", {"default": "", "tooltip": "e.g. 50MB: the best file that fits (replaces method)"}),
    "precision": ([KEEP, *lora_resize.PRECISIONS], {"default": KEEP}),
}


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
                             "output_name": ("STRING", {"default": "resized.safetensors"})}}

    FUNCTION = "resize"

    def resize(self, lora_name, method, param, rank, conv_rank, rank_rule, target_size, precision, output_layout,
               output_name):
        dst = _output_path(output_name)
        fields = _options(method, param, rank, conv_rank, rank_rule, target_size, precision)
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
    """A weighted sum of LoRAs (weights may be negative), reduced like a resize, into a new file."""

    @classmethod
    def INPUT_TYPES(cls):
        loras = folder_paths.get_filename_list("loras")
        return {"required": {"lora_a": (loras,), "weight_a": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0,
                                                                         "step": 0.01}),
                             "lora_b": (loras,), "weight_b": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0,
                                                                         "step": 0.01}),
                             **RANK_INPUTS, "output_name": ("STRING", {"default": "merged.safetensors"})},
                "optional": {"more": ("STRING", {"default": "", "multiline": True,
                                                 "tooltip": "more inputs, one per line: name.safetensors:weight"})}}

    FUNCTION = "merge"

    @classmethod
    def IS_CHANGED(cls, lora_a=None, lora_b=None, more="", **_):
        try:
            return _stamp(lora_a, lora_b, *(name for name, _ in _more(more)))
        except ValueError:
            return float("nan")  # always run: the node says what is wrong

    def merge(self, lora_a, weight_a, lora_b, weight_b, method, param, rank, conv_rank, rank_rule, target_size,
              precision, output_name, more=""):
        dst = _output_path(output_name)
        sources = [lora_resize.Source(Path(_lora_path(lora_a)), weight_a),
                   lora_resize.Source(Path(_lora_path(lora_b)), weight_b)]
        sources += [lora_resize.Source(Path(_lora_path(name)), w) for name, w in _more(more)]
        fields = _options(method, param, rank, conv_rank, rank_rule, target_size, precision)
        return _written(dst, lambda: lora_resize.merge(sources, dst, progress=_progress(), **fields))


class ConvertLora(_WritesLora):
    """A LoRA written in another layout (kohya, comfy, diffusers, onetrainer), every update kept."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora_name": (folder_paths.get_filename_list("loras"),),
                             "layout": (FILE_LAYOUTS, {"default": "comfy"}),
                             "output_name": ("STRING", {"default": "converted.safetensors"})}}

    FUNCTION = "convert"

    def convert(self, lora_name, layout, output_name):
        dst = _output_path(output_name)
        return _written(dst, lambda: lora_resize.convert(_lora_path(lora_name), dst, layout, progress=_progress()))


NODE_CLASS_MAPPINGS = {"LoraResize": ResizeLora, "LoraResizeAnalyze": AnalyzeLora, "LoraResizeMerge": MergeLoras,
                       "LoraResizeConvert": ConvertLora}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraResize": "Resize LoRA", "LoraResizeAnalyze": "Analyze LoRA",
                              "LoraResizeMerge": "Merge LoRAs", "LoraResizeConvert": "Convert LoRA"}
