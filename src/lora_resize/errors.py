"""Named exceptions. Each message states what is wrong and what to do; only the CLI maps them to exit codes."""
from __future__ import annotations


class LoraResizeError(Exception):
    """Base of every error this package raises on bad input, bad options or a failed write."""


class OptionsError(LoraResizeError, ValueError):
    """An option or a combination of options is invalid."""


class InputFileError(LoraResizeError):
    """The input file is missing, unreadable, not a tensor file, corrupt, or unsafe to load."""


class LoraStructureError(LoraResizeError):
    """The file is readable, but its LoRA layers are malformed (unpaired, shapes that don't chain, bad alpha)."""


class NumericalError(LoraResizeError):
    """A layer holds NaN or Inf values, or a result cannot be represented in the save precision."""


class OutputFileError(LoraResizeError):
    """The output path is unusable (the input itself, a directory, unwritable) or writing failed."""
