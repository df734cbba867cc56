"""Writing tensor files: a safetensors serialiser laid out exactly as the safetensors library lays out its files,
sd-scripts' `sshs_*` hashes, and atomic replacement of the destination."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import torch

from ..errors import NumericalError, OutputFileError
from .metadata import SideFile, with_hashes
from .reader import DTYPE_RANK, PICKLE_SUFFIXES, TORCH_TO_ST

TMP_PREFIX = ".lora-resize-"
TMP_SUFFIX = ".partial"
LEGACY_HASH_WINDOW = (0x100000, 0x110000)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without copying when it is already contiguous."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def ordered(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys in the safetensors library's data order: by dtype rank (descending), then by name."""
    def rank(k: str) -> int:
        if tensors[k].dtype not in TORCH_TO_ST:
            raise OutputFileError(f"tensor {k!r} has dtype {tensors[k].dtype}, which safetensors cannot store")
        return DTYPE_RANK.index(TORCH_TO_ST[tensors[k].dtype])
    return sorted(tensors, key=lambda k: (-rank(k), k))


def check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse to write NaN or Inf: a value that overflowed the save precision, or damage carried over from the
    input (in a tensor that is copied through, or an alpha)."""
    for k, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t if t.element_size() > 1 else t.float()
                                                                           ).all()):
            raise NumericalError(f"output tensor {k!r} would hold NaN or Inf ({t.dtype}): if the input's values "
                                 "are finite they overflow the save precision - use --precision float; otherwise "
                                 "the input is damaged - re-export it")


def header_bytes(tensors: Mapping[str, torch.Tensor], keys: list[str], metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length plus the space-padded JSON header, the same length the safetensors library writes."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for k in keys:
        t = tensors[k]
        n = t.numel() * t.element_size()
        header[k] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def sshs_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-scripts computes them: over the file the safetensors library
    would write with only the `ss_*` metadata. The model hash covers the tensor data; the legacy hash covers
    bytes [0x100000, 0x110000) of that file (its header length is fixed by the metadata's size)."""
    keys = ordered(tensors)
    ss_meta = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    head = header_bytes(tensors, keys, ss_meta)
    model = hashlib.sha256()
    legacy = hashlib.sha256()
    lo, hi = LEGACY_HASH_WINDOW
    pos = 0
    for chunk in [memoryview(head)] + [tensor_bytes(tensors[k]) for k in keys]:
        if pos >= len(head):
            model.update(chunk)
        a, b = max(lo, pos), min(hi, pos + len(chunk))
        if a < b:
            legacy.update(chunk[a - pos:b - pos])
        pos += len(chunk)
    return model.hexdigest(), legacy.hexdigest()[:8]


def remove_stale_partials(dst: Path) -> None:
    """Remove temporary files a killed earlier run left beside `dst` (same target name, owner process gone)."""
    for p in dst.parent.glob(f"{glob.escape(TMP_PREFIX + dst.name)}.*{TMP_SUFFIX}"):
        try:
            pid = int(p.name[len(TMP_PREFIX) + len(dst.name) + 1:-len(TMP_SUFFIX)].split("-")[0])
        except ValueError:
            continue
        if pid == os.getpid() or not _pid_alive(pid):
            with contextlib.suppress(OSError):
                p.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: not every file system lets a folder be fsynced)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output(dst: Path) -> Iterator[Path]:
    """Yield a temporary path beside `dst`; on success it replaces `dst` in one rename, on failure it is removed."""
    remove_stale_partials(dst)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{dst.name}.{os.getpid()}-", suffix=TMP_SUFFIX,
                                        dir=dst.parent)
    except OSError as e:
        raise OutputFileError(f"cannot create a file in {dst.parent}: {e.strerror}; "
                              "choose a writable output folder") from None
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600; an output gets the usual mode of a new file
    except OSError:
        pass
    finally:
        os.close(fd)
    try:
        yield tmp
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    except OSError as e:
        raise OutputFileError(f"writing {dst} failed: {e.strerror or e}; nothing was written "
                              "(check free space and permissions)") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_safetensors(dst: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write `tensors` and `metadata` to `dst` atomically, in the safetensors library's byte layout."""
    keys = ordered(tensors)
    check_finite(tensors)
    with atomic_output(dst) as tmp, open(tmp, "wb") as f:
        f.write(header_bytes(tensors, keys, metadata))
        for k in keys:
            f.write(tensor_bytes(tensors[k]))
        f.flush()
        os.fsync(f.fileno())


class _RecordingFile:
    """A file for torch.save that remembers the OSError of a failed write: torch's zip writer turns it into a
    RuntimeError, and the caller needs the real cause (disk full, quota, I/O error)."""

    def __init__(self, f):
        self._f = f
        self.error: OSError | None = None

    def write(self, b) -> int:
        try:
            return self._f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self._f.flush()


def write_pickle(dst: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write a plain state dict with torch.save, atomically (metadata cannot be stored in this format)."""
    check_finite(tensors)
    with atomic_output(dst) as tmp, open(tmp, "wb") as f:
        sink = _RecordingFile(f)
        try:
            torch.save(dict(tensors), sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise
        f.flush()
        os.fsync(f.fileno())


def write_output(dst: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str],
                 files: list[SideFile] = (), new_folder: bool = False) -> tuple[dict[str, str], list[str]]:
    """Write a job's output: `tensors` with `meta` and sd-scripts' hashes (safetensors; a pickle cannot hold
    metadata), atomically, then its companion files beside it (each atomically); `new_folder`: make dst's folder
    first (and remove it again if the write fails). Returns the metadata with its hashes, and notes."""
    notes = []
    meta = with_hashes(meta, sshs_hashes(tensors, meta))
    if new_folder:
        try:
            dst.parent.mkdir()
        except OSError as e:
            raise OutputFileError(f"cannot make the output folder {dst.parent}: {e.strerror or e}") from None
    try:
        if dst.suffix.lower() in PICKLE_SUFFIXES:
            write_pickle(dst, tensors)
            notes.append(f"{dst.suffix} files cannot hold metadata; use .safetensors to keep it")
        else:
            write_safetensors(dst, tensors, meta)
        for f in files:
            notes += write_side_file(dst, f)
    except BaseException:
        if new_folder:
            for p in dst.parent.iterdir() if dst.parent.is_dir() else ():
                with contextlib.suppress(OSError):
                    p.unlink()
            with contextlib.suppress(OSError):
                dst.parent.rmdir()
        raise
    return meta, notes


def write_side_file(dst: Path, f: SideFile) -> list[str]:
    """Write companion file `f` beside `dst` (atomically); returns notes (where it went, any rename advice)."""
    target = dst.parent / f.name
    notes = []
    if f.keep is not None and target.exists() and target.resolve() == Path(f.keep).resolve():
        target = dst.with_name(dst.stem + "_" + f.name)
        notes.append(f"the input's {f.name} is in the output's folder and is left alone: the new one is "
                     f"{target.name}; move it and {dst.name} to a folder of their own as {f.name}"
                     + (f" and {f.expects}" if f.expects else ""))
    elif f.expects is not None and dst.name != f.expects:
        notes.append(f"loaders read {f.name} beside a file named {f.expects}: rename {dst.name} so to load it")
    with atomic_output(target) as tmp:
        tmp.write_text(f.text, encoding="utf-8")
    return [f"{target.name} written beside {dst.name}" + (f": {f.summary}" if f.summary else "")] + notes
