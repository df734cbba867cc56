"""Named exceptions. Each message states what is wrong and what to do; only the CLI maps them to exit codes."""
from __future__ import annotations


MAX_MESSAGE = 2000


def one_line(text: str) -> str:
    """`text` with line breaks and other control characters escaped (as Python writes them in a string literal),
    so that a message naming a key from a hostile file (newlines, terminal escapes) stays one printable line; a
    huge one (a megabyte-long key name) is shortened in the middle, keeping the advice at its end."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(text) > MAX_MESSAGE:
        text = f"{text[:MAX_MESSAGE * 2 // 3]} [...] {text[-MAX_MESSAGE // 3:]}"
    return text


class LoraResizeError(Exception):
    """Base of every error this package raises on bad input, bad options or a failed write. The message is
    always one line (control characters in it are escaped)."""

    def __init__(self, *args: object) -> None:
        if args and isinstance(args[0], str):
            args = (one_line(args[0]),) + args[1:]
        super().__init__(*args)


class OptionsError(LoraResizeError, ValueError):
    """An option or a combination of options is invalid."""


class InputFileError(LoraResizeError):
    """The input file is missing, unreadable, not a tensor file, corrupt, or unsafe to load."""


class LoraStructureError(LoraResizeError):
    """The file is readable, but its LoRA layers are malformed (unpaired, shapes that don't chain, bad alpha)."""


class NumericalError(LoraResizeError):
    """A layer holds NaN or Inf values, or a result cannot be represented in the save precision."""


class DeviceError(LoraResizeError):
    """The compute device cannot run the job (a layer does not fit in the GPU's memory)."""


class OutputFileError(LoraResizeError):
    """The output path is unusable (the input itself, a directory, unwritable) or writing failed."""


# Optional dependencies: the module each optional feature imports -> the extra of pyproject.toml that installs it.
# Every lazily imported third-party module of the package is here (tests/unit/test_extras.py reads the imports);
# the CLI checks the ones a command line needs before any work (cli/flags.py: `requires`), the library where it
# imports them (`require`).
EXTRAS = {"matplotlib": "plot", "gradio": "ui", "distributed": "dask", "fsspec": "dask", "diffusers": "preview",
          "transformers": "preview", "PIL": "preview", "skimage": "preview"}


class MissingDependency(OptionsError):
    """An optional dependency that a feature needs is not installed (or cannot be imported)."""


def require(module: str, feature: str):
    """Import and return the optional `module` that `feature` (e.g. '--plot') needs.

    Raises MissingDependency, one line naming the extra to install (pip install 'lora-resize[plot]'), when it
    cannot be imported; KeyError for a module that is not declared in EXTRAS (a bug: declare it)."""
    from importlib import import_module
    extra = EXTRAS[module]
    try:
        return import_module(module)
    except ImportError:
        raise MissingDependency(f"{feature} needs {module}, which is not installed: pip install "
                                f"'lora-resize[{extra}]'") from None
