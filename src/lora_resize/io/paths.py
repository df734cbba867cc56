"""Where a job reads and writes: input paths (a LoRA file, or an adapter folder holding one) and output paths,
checked before any work is done. Single-file jobs take local paths; only batch reads and writes URLs."""
from __future__ import annotations

import os
from pathlib import Path, PurePath, PurePosixPath
from typing import Callable

from ..errors import InputFileError, OutputFileError
from .files import SAFETENSORS_SUFFIXES

OUTPUT_SUFFIXES = SAFETENSORS_SUFFIXES + (".pt", ".pth", ".ckpt")
# Windows' rules for a file name (Microsoft's "Naming Files, Paths, and Namespaces"), the narrowest of the three
# platforms: these characters, control characters, a trailing space or dot, and the device names, any suffix added
WINDOWS_FORBIDDEN = frozenset('<>:"/\\|?*')
WINDOWS_DEVICES = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                             *(f"LPT{i}" for i in range(1, 10))})
NAME_MAX = 255  # bytes, on Linux' and macOS' file systems (and characters on NTFS)
ADAPTER_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors", "adapter_model.bin")
# layouts whose output is a folder, as PEFT's `save_pretrained` writes one: the tensor file's name in it and the
# companion files beside it (peft/utils/constants.py SAFETENSORS_WEIGHTS_NAME, peft/config.py CONFIG_NAME)
FOLDER_LAYOUTS = {"peft": (ADAPTER_FILES[0], ("adapter_config.json",))}


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


def output_file(dst: str | os.PathLike, src: Path, file_name: str | None) -> tuple[Path, bool]:
    """The file to write for output `dst`, and whether its folder is to be made. `dst` may name a folder (a path
    ending in '/', an existing folder without a tensor-file suffix, as PEFT's save_pretrained makes, or a new path
    without a suffix when the layout is a folder's, `file_name` set): the file
    is then `file_name` in it (the input's name when None), and a missing folder is made when the output is
    written, never when the job fails. (A folder named like a file, `out.safetensors/`, stays an error.)"""
    text = os.fspath(dst)
    path = Path(text)
    folder = (text.endswith(("/", os.sep)) or (path.is_dir() and not path.is_symlink()
                                               and path.suffix.lower() not in OUTPUT_SUFFIXES)
              or (file_name is not None and path.suffix == "" and not path.exists()))
    if folder:
        return file_in_folder(path, src.name, file_name), not path.is_dir()
    return path, False


def file_in_folder(folder: PurePath, src_name: str, file_name: str | None) -> PurePath:
    """The output file in output folder `folder`: `file_name` (a folder layout's, e.g. PEFT's
    adapter_model.safetensors), else the input's name as .safetensors."""
    return folder / (file_name or Path(src_name).with_suffix(".safetensors").name)


def batch_output(rel: str, output_format: str | None) -> tuple[str, tuple[str, ...]]:
    """Where batch writes input `rel` (a '/'-separated path relative to the input folder), relative to the
    output folder, and the companion files written with it. The same path as .safetensors; in a folder layout
    (FOLDER_LAYOUTS: --output-format peft) a folder per input, named after it (`sub/x.pt` -> `sub/x/`; an input
    already named as the layout's file keeps its folder), holding the layout's file and companions, as
    `resize -o DIR/` writes them (output_file, file_in_folder)."""
    path = PurePosixPath(rel)
    if output_format not in FOLDER_LAYOUTS:
        return path.with_suffix(".safetensors").as_posix(), ()
    name, companions = FOLDER_LAYOUTS[output_format]
    folder = path.parent if path.name == name else path.with_suffix("")
    return file_in_folder(folder, rel, name).as_posix(), tuple((folder / c).as_posix() for c in companions)


def name_problem(name: str) -> str | None:
    """Why `name` cannot be one file's name on every platform, or None. On Windows `a:b` would write an alternate
    data stream of file `a`, `x.` is stored as `x`, `NUL.safetensors` is the null device."""
    if not name.strip() or name in (".", ".."):
        return "it is empty"
    bad = sorted({c for c in name if c in WINDOWS_FORBIDDEN or ord(c) < 32 or ord(c) == 127})
    if bad:
        return f"it holds {''.join(bad)!r}, which a file name cannot hold on Windows"
    if name[-1] in " .":
        return "it ends in a space or a dot, which Windows drops"
    if name.split(".", 1)[0].rstrip(" ").upper() in WINDOWS_DEVICES:
        return f"{name.split('.', 1)[0]} is a device on Windows"
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        return f"it is longer than {NAME_MAX} bytes"
    return None


def free_name(name: str, taken: Callable[[str], bool]) -> str:
    """`name` when `taken(name)` is false, else the first free one of `<stem>_2<suffix>`, `<stem>_3<suffix>`, ...
    (`a_resized.safetensors` -> `a_resized_2.safetensors`): a new file that is written over nothing. `taken` says
    whether a name is in use (a file, a dangling link, a name reserved by a job still running)."""
    stem, suffix = os.path.splitext(name)
    n = 1
    while taken(name):
        n += 1
        name = f"{stem}_{n}{suffix}"
    return name


def check_output_path(src: Path, dst: Path, new_folder: bool = False) -> None:
    """Refuse outputs that would lose data or cannot be written (OutputFileError), before any work is done.
    `new_folder`: dst's folder is made when it is written (its parent must exist)."""
    if dst.suffix.lower() not in OUTPUT_SUFFIXES:
        raise OutputFileError(f"output {dst} must end in .safetensors (or .pt/.pth/.ckpt), or end in / for a folder")
    problem = name_problem(dst.name) if os.name == "nt" else None
    if problem:
        raise OutputFileError(f"output name {dst.name!r} cannot be written here: {problem}; choose another name")
    if dst.is_symlink():
        raise OutputFileError(f"output {dst} is a symbolic link; give the real path (or remove the link)")
    if dst.is_dir():
        raise OutputFileError(f"output {dst} is a directory; give a file name such as {dst / 'out.safetensors'}")
    if new_folder:
        if dst.parent.exists() or not dst.parent.parent.is_dir():
            raise OutputFileError(f"output folder {dst.parent} cannot be made here (its parent must be a folder)")
    elif not dst.parent.is_dir():
        raise OutputFileError(f"output folder {dst.parent} does not exist; create it first (or end the output in / "
                              "to have it made)")
    same = src.resolve() == dst.resolve()
    if not same and dst.exists():
        try:
            same = os.path.samefile(src, dst)
        except OSError:
            pass
    if same:
        raise OutputFileError(f"output {dst} is the input file; choose another name (the input is never overwritten)")
