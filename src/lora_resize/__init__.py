"""lora-resize: make LoRA files smaller, exactly and fast.

    >>> import lora_resize
    >>> result = lora_resize.resize("in.safetensors", "out.safetensors", method="sv_fro", param=0.9)

The public API is below; its names are imported on first use, so `import lora_resize` (and the CLI's start-up)
stays cheap."""
from importlib import import_module

from ._version import __version__
from .errors import (DeviceError, InputFileError, LoraResizeError, LoraStructureError, NumericalError,
                     OptionsError, OutputFileError)

_LAZY = {
    "resize": "ops.resize", "convert": "ops.convert", "merge": "ops.merge", "Source": "ops.merge", "analyze": "ops.analyze",
    "Analysis": "results", "SettingRow": "results", "ResizeResult": "results", "LayerResult": "results",
    "ResizeOptions": "options", "decompose": "core.decompose", "Decomposition": "core.decompose",
}

__all__ = ["__version__", "resize", "convert", "analyze", "Analysis", "SettingRow", "merge", "Source", "ResizeOptions",
           "ResizeResult", "LayerResult", "decompose", "Decomposition", "LoraResizeError", "OptionsError",
           "InputFileError", "LoraStructureError", "NumericalError", "OutputFileError", "DeviceError"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lora_resize' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
