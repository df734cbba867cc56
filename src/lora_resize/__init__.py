"""lora-resize: make LoRA files smaller, exactly and fast.

    >>> import lora_resize
    >>> result = lora_resize.resize("in.safetensors", "out.safetensors", method="sv_fro", param=0.9)

The public API is below; its names are imported on first use, so `import lora_resize` (and the CLI's start-up)
stays cheap. It is also the one facade for consumers outside the package (the ComfyUI nodes, extensions): the jobs
(`resized`: a resize in memory, for applying a setting without a file; `preview` and `Probing`: pictures and
effect errors on a base model),
the choices their inputs offer (`LAYOUTS`, `PRECISIONS`, `RANK_RULES`, `dynamic_methods()`; the merge methods
`merge_methods()`, the parameters they read `MERGE_PARAMS` and a merge's `MergeSettings`; per-input strengths
from lines, `with_input_strengths`), the renderings of
results (`summary`, `analysis_table`, `write_png`, `format_size`, `labelled_grid`: pictures with their labels), a
setting read from flags as the CLI reads them
(`options_from_flags`) and the output names (`name_problem`, `free_name`)."""
from importlib import import_module

from ._version import __version__
from .errors import (DeviceError, InputFileError, LoraResizeError, LoraStructureError, NumericalError,
                     OptionsError, OutputFileError)

_LAZY = {
    "resize": "ops.resize", "resized": "ops.resize", "Resized": "ops.resize", "convert": "ops.convert", "extract": "ops.extract", "merge": "ops.merge", "Source": "ops.merge", "average": "ops.average", "WEIGHTINGS": "ops.average", "analyze": "ops.analyze",
    "Analysis": "results", "SettingRow": "results", "ResizeResult": "results", "LayerResult": "results",
    "ResizeOptions": "options", "decompose": "core.decompose", "Decomposition": "core.decompose",
    # for consumers: choices, renderings, the output names, a setting from flags
    "LAYOUTS": "models", "PRECISIONS": "options", "RANK_RULES": "ranks.policies", "dynamic_methods": "ranks.policies",
    "summary": "report.text", "analysis_table": "report.text", "write_png": "report.png", "name_problem": "io.paths",
    "free_name": "io.paths", "format_size": "units", "options_from_flags": "cli.flags",
    "labelled_grid": "report.grid", "preview": "ops.preview", "Preview": "ops.preview", "Probing": "ops.effect",
    "merge_methods": "core.merging", "MERGE_PARAMS": "core.merging", "MergeSettings": "core.merging",
    "with_input_strengths": "cli.merge",
}

__all__ = ["__version__", "resize", "resized", "Resized", "convert", "extract", "analyze", "Analysis", "SettingRow", "merge", "Source", "average", "WEIGHTINGS", "ResizeOptions",
           "ResizeResult", "LayerResult", "decompose", "Decomposition", "LoraResizeError", "OptionsError",
           "InputFileError", "LoraStructureError", "NumericalError", "OutputFileError", "DeviceError", "LAYOUTS",
           "PRECISIONS", "RANK_RULES", "dynamic_methods", "summary", "analysis_table", "write_png", "name_problem",
           "free_name", "format_size", "options_from_flags", "labelled_grid", "preview", "Preview", "Probing",
           "merge_methods", "MERGE_PARAMS", "MergeSettings", "with_input_strengths"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lora_resize' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
