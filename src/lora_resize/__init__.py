"""lora-resize: make LoRA files smaller, exactly and fast.

    >>> import lora_resize
    >>> result = lora_resize.resize("in.safetensors", "out.safetensors", method="sv_fro", param=0.9)
"""
from ._version import __version__
from .decompose import Decomposition, decompose
from .errors import (InputFileError, LoraResizeError, LoraStructureError, NumericalError, OptionsError,
                     OutputFileError)
from .options import ResizeOptions
from .merge import Source, merge
from .pipeline import resize
from .analyze import Analysis, analyze
from .result import LayerResult, ResizeResult

__all__ = ["__version__", "resize", "analyze", "Analysis", "merge", "Source", "ResizeOptions", "ResizeResult", "LayerResult", "decompose", "Decomposition",
           "LoraResizeError", "OptionsError", "InputFileError", "LoraStructureError", "NumericalError",
           "OutputFileError"]
