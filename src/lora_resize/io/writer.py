"""Writing tensor files: a safetensors serialiser laid out exactly as the safetensors library lays out its files,
sd-scripts' `sshs_*` hashes, and atomic replacement of the destination."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from itertools import chain
from pathlib import Path
from typing import Mapping, MutableMapping

import torch

from ..core.parallel import torch_threads
from ..errors import NumericalError, OutputFileError
from .files import PICKLE_SUFFIXES, TMP_PREFIX, atomic_output
from .metadata import SideFile, with_hashes
from .reader import DTYPE_RANK, TORCH_TO_ST

LEGACY_HASH_WINDOW = (0x100000, 0x110000)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without copying when it is already contiguous."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


class HeldTensors(MutableMapping):
    """A job's output tensors held in an unnamed scratch file until the atomic write, instead of in memory (issue
    24: the SD1.5 LoCon 512 resize's 268 MB of output were resident through the whole run). Each tensor is checked
    (finite) and written when it is added; looking one up reads its bytes back into a tensor of its own (the writer
    looks up one at a time, so one tensor is in memory at once); dtypes and shapes are in `meta`, without reading. The
    file is made in `folder` (beside the output: the disk it goes to, not a temp folder that may be in RAM), gone
    when closed or when the process ends (a context manager).

    Raises OutputFileError, as atomic_output, when the scratch file cannot be made or written (no room, no
    permission)."""

    def __init__(self, folder: Path):
        self._folder = folder
        try:
            self._file = tempfile.TemporaryFile(dir=folder, prefix=TMP_PREFIX)
        except OSError as e:
            raise OutputFileError(f"cannot create a file in {folder}: {e.strerror or e}; choose a writable output "
                                  "folder") from None
        self._where: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        self._meta: dict[str, torch.Tensor] = {}
        self._end = 0

    def _error(self, e: OSError) -> OutputFileError:
        return OutputFileError(f"keeping the output in a scratch file in {self._folder} failed: {e.strerror or e}; "
                               "nothing was written (the folder needs free space for about twice the output until "
                               "the end, and write permission)")

    def __setitem__(self, key: str, t: torch.Tensor) -> None:
        """Hold `t` under `key`, checked as check_finite checks a file's tensors (while it is in memory: the
        writer's check then reads none back). Raises NumericalError, OutputFileError."""
        t = t.detach().cpu()
        check_finite({key: t})
        data = tensor_bytes(t)
        pad = -len(data) % 8  # every tensor's bytes start 8-aligned, as in memory
        try:
            self._file.write(data)
            self._file.write(bytes(pad))
        except OSError as e:
            raise self._error(e) from None
        self._where[key] = (self._end, tuple(t.shape), t.dtype)
        self._meta[key] = torch.empty(t.shape, dtype=t.dtype, device="meta")
        self._end += len(data) + pad

    @property
    def meta(self) -> dict[str, torch.Tensor]:
        """The tensors' dtypes and shapes as meta tensors (no data): what the header and the order need."""
        return self._meta

    def __getitem__(self, key: str) -> torch.Tensor:
        at, shape, dtype = self._where[key]
        n = math.prod(shape) * dtype.itemsize
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        buf = bytearray(n)  # read back as a copy: a mapping per tensor would hold a file descriptor per tensor, and
        try:                # torch.save of a .pt output looks up every tensor at once (1050 for an SD1.5 LoCon)
            self._file.flush()
            self._file.seek(at)
            got = self._file.readinto(buf)
        except OSError as e:
            raise self._error(e) from None
        finally:
            self._file.seek(self._end)
        if got != n:
            raise self._error(OSError(f"the scratch file ended early ({got} of {n} bytes of {key!r})"))
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def __delitem__(self, key: str) -> None:
        del self._where[key], self._meta[key]

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        self._where, self._meta = {}, {}
        with contextlib.suppress(OSError):  # what it still buffers is thrown away with it
            self._file.close()

    def __enter__(self) -> "HeldTensors":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shapes(tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """What the header and the data order read of `tensors` (dtypes and shapes): HeldTensors' meta tensors, so
    no data is read back for them; any other mapping as it is."""
    return tensors.meta if isinstance(tensors, HeldTensors) else tensors


def ordered(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys in the safetensors library's data order: by dtype rank (descending), then by name."""
    def rank(k: str) -> int:
        dtype = tensors[k].dtype
        if dtype not in TORCH_TO_ST:
            raise OutputFileError(f"tensor {k!r} has dtype {dtype}, which safetensors cannot store")
        return DTYPE_RANK.index(TORCH_TO_ST[dtype])
    return sorted(tensors, key=lambda k: (-rank(k), k))


def copied_dtype(dtype: torch.dtype, cast: torch.dtype | None) -> torch.dtype:
    """The dtype a copied tensor (not a LoRA factor: a bias or full diff, a DoRA magnitude, an embedding, ...) is
    written in: its own, so it is copied bit for bit, unless `cast` (an explicit --precision) is given and it is
    floating point. Loaders add these tensors to the weights as they are, so a narrower dtype loses their values
    (a float32 bias diff in bf16 keeps 8 of its 24 significant bits)."""
    return cast if cast is not None and dtype.is_floating_point else dtype


def copied_tensor(t: torch.Tensor, cast: torch.dtype | None) -> torch.Tensor:
    """`t` as it is written when copied (copied_dtype): the same tensor, or cast to `cast`."""
    dtype = copied_dtype(t.dtype, cast)
    return t if dtype == t.dtype else t.to(dtype)


def check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse to write NaN or Inf: a value that overflowed the save precision, or damage carried over from the
    input (in a tensor that is copied through, or an alpha). On one torch thread: a file's hundreds of small
    tensors make as many parallel regions, each waiting for every thread to be scheduled, which cost seconds on a
    busy machine (the Flux rank-128 resize's 912 tensors: 1.2-2.6 s on two threads, 0.07 s on one). A HeldTensors
    checked each tensor as it was added: nothing to do."""
    if isinstance(tensors, HeldTensors):
        return  # each was checked as it was added
    with torch_threads(1):
        for k, t in tensors.items():
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t if t.element_size() > 1 else
                                                                               t.float()).all()):
                raise NumericalError(f"output tensor {k!r} would hold NaN or Inf ({t.dtype}): if the input's values "
                                     "are finite they overflow the save precision - use --precision float; "
                                     "otherwise the input is damaged - re-export it")


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
    keys = ordered(_shapes(tensors))
    ss_meta = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    head = header_bytes(_shapes(tensors), keys, ss_meta)
    model = hashlib.sha256()
    legacy = hashlib.sha256()
    lo, hi = LEGACY_HASH_WINDOW
    pos = 0
    for chunk in chain([memoryview(head)], (tensor_bytes(tensors[k]) for k in keys)):  # one tensor at a time
        if pos >= len(head):
            model.update(chunk)
        a, b = max(lo, pos), min(hi, pos + len(chunk))
        if a < b:
            legacy.update(chunk[a - pos:b - pos])
        pos += len(chunk)
    return model.hexdigest(), legacy.hexdigest()[:8]


def hashed(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> tuple[dict[str, str], int]:
    """(the metadata with its sshs hashes, the size in bytes of the safetensors file `write_safetensors` writes
    with them), without writing: what an in-memory job hands its consumer. Raises NumericalError as the writer."""
    check_finite(tensors)
    meta = with_hashes(meta, sshs_hashes(tensors, meta))
    keys = ordered(tensors)
    return meta, len(header_bytes(tensors, keys, meta)) + sum(t.numel() * t.element_size() for t in tensors.values())


def write_safetensors(dst: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write `tensors` and `metadata` to `dst` atomically, in the safetensors library's byte layout."""
    keys = ordered(_shapes(tensors))
    check_finite(tensors)
    with atomic_output(dst) as tmp, open(tmp, "wb") as f:
        f.write(header_bytes(_shapes(tensors), keys, metadata))
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
        if target.exists():  # another file's companion: left alone
            target = dst.with_name(dst.stem + "_" + f.name)
            notes.append(f"{f.name} beside {dst.name} belongs to another file and is left alone: the new one is "
                         f"{target.name}; move it and {dst.name} to a folder of their own as {f.name} and "
                         f"{f.expects}")
        else:
            notes.append(f"loaders read {f.name} beside a file named {f.expects}: rename {dst.name} so to load it")
    with atomic_output(target) as tmp:
        tmp.write_text(f.text, encoding="utf-8")
    return [f"{target.name} written beside {dst.name}" + (f": {f.summary}" if f.summary else "")] + notes
