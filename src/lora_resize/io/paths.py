"""Where a job reads and writes: input paths (a LoRA file, or an adapter folder holding one) and output paths,
checked before any work is done. Single-file jobs take local paths; only batch reads and writes URLs."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputFileError, OutputFileError
from .reader import SAFETENSORS_SUFFIXES

OUTPUT_SUFFIXES = SAFETENSORS_SUFFIXES + (".pt", ".pth", ".ckpt")
ADAPTER_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors", "adapter_model.bin")


def local_path(x: str | os.PathLike, role: str) -> Path:
    """`x` as a local path; a URL is refused (InputFileError / OutputFileError by `role`) with a pointer to batch."""
    text = os.fspath(x)
    if "://" in text:
        error, what = ((InputFileError, "copy the file here first") if role == "input" else
                       (OutputFileError, "write a local file and upload it"))
        raise error(f"{role} {text} is a URL; only `lora-resize batch` reads and writes URLs (fsspec): {what}, or "
                    "run batch on its folder")
    return Path(text)


def resolve_input(path: Path) -> Path:
    """A LoRA file, or a folder holding one (a PEFT/diffusers adapter folder): the tensor file to read. Raises
    InputFileError for a folder without a single LoRA file."""
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


def check_output_path(src: Path, dst: Path) -> None:
    """Refuse outputs that would lose data or cannot be written (OutputFileError), before any work is done."""
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
