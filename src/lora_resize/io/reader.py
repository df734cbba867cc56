"""Lazy reading of tensor files: safetensors (header parsed and checked here, tensors read one at a time)
and PyTorch pickles (`torch.load(weights_only=True)` only, never arbitrary unpickling). Readers are context
managers: `with open_tensor_file(path) as reader: ...`."""
from __future__ import annotations

import errno
import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..errors import InputFileError
from .files import MAX_HEADER_BYTES, PICKLE_SUFFIXES, looks_like_pickle, looks_like_safetensors

# safetensors dtype names <-> torch dtypes, in the order the safetensors library ranks them
# (it writes tensors by descending rank, then by name).
DTYPE_RANK = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16",
              "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
ST_TO_TORCH = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32,
    "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}
READ_CHUNK = 1 << 26  # bytes per read where a read copies (os.pread, a seek and read)


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one stored tensor, known without reading its data."""
    shape: tuple[int, ...]
    dtype: torch.dtype


class TensorSource(Protocol):
    """What the jobs read from: names, shapes and dtypes up front, data one tensor at a time."""
    path: Path
    metadata: dict[str, str]

    def infos(self) -> dict[str, TensorInfo]: ...
    def get(self, key: str) -> torch.Tensor: ...
    def close(self) -> None: ...


class _Closing:
    """`with reader:` closes it on the way out."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafetensorsReader(_Closing):
    """Reads a .safetensors file lazily; the header is validated before any tensor is touched."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        try:
            self._file = open(path, "rb")
        except OSError as e:
            raise InputFileError(f"cannot open {path}: {e.strerror}; check the path and its permissions") from None
        try:
            self._parse_header()
        except BaseException:
            self._file.close()
            raise

    def _bad(self, why: str) -> InputFileError:
        return InputFileError(f"{self.path} is not a valid safetensors file ({why}); "
                              "re-download or re-export it")

    def _parse_header(self) -> None:
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise self._bad(f"only {size} bytes, too short for a header")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES:
            if looks_like_pickle(head):
                raise InputFileError(f"{self.path} is a PyTorch pickle, not a safetensors file; give it a .pt or "
                                     ".ckpt name to have it read (weights only)")
            raise self._bad(f"header length field says {n} bytes, over the {MAX_HEADER_BYTES} limit")
        if n + 8 > size:
            raise self._bad(f"header length field says {n} bytes but the file has {size} bytes: truncated?")
        raw = self._file.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, huge integers
            raise self._bad(f"header is not valid UTF-8 JSON: {type(e).__name__}") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise self._bad("__metadata__ must map strings to strings")
        bad_text = next((s for s in (*header, *meta, *meta.values()) if not is_unicode(s)), None)
        if bad_text is not None:
            raise self._bad(f"header string {bad_text[:60]!r} holds a lone surrogate escape, which is not Unicode")
        self.metadata: dict[str, str] = dict(meta)
        self._data_start = 8 + n
        data_len = size - self._data_start
        self._infos: dict[str, TensorInfo] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        spans = []
        for key, entry in header.items():
            if not isinstance(entry, dict):
                raise self._bad(f"entry {key!r} is not an object")
            dtype = ST_TO_TORCH.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
            shape = entry.get("shape")
            offs = entry.get("data_offsets")
            if dtype is None:
                raise self._bad(f"tensor {key!r} has unsupported dtype {entry.get('dtype')!r}")
            if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)):
                raise self._bad(f"tensor {key!r} has an invalid shape {shape!r}")
            if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                    or not 0 <= offs[0] <= offs[1] <= data_len):
                raise self._bad(f"tensor {key!r} has data offsets {offs!r} outside the {data_len}-byte data section")
            numel = 1
            for d in shape:
                numel *= d
            if numel * dtype.itemsize != offs[1] - offs[0]:
                raise self._bad(f"tensor {key!r} of shape {shape} and dtype {entry['dtype']} needs "
                                f"{numel * dtype.itemsize} bytes but its offsets span {offs[1] - offs[0]}")
            self._infos[key] = TensorInfo(tuple(shape), dtype)
            self._offsets[key] = (offs[0], offs[1])
            if offs[1] > offs[0]:
                spans.append((offs[0], offs[1], key))
        spans.sort()
        for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise self._bad(f"tensors {k0!r} and {k1!r} overlap in the data section")

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (thread-safe: positional reads, no shared file position)."""
        info = self._infos[key]
        begin, end = self._offsets[key]
        out = torch.empty(info.shape, dtype=info.dtype)
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        pos = 0
        while pos < end - begin:
            got = self._read_at(view[pos:], self._data_start + begin + pos)
            if got <= 0:
                raise self._bad(f"tensor {key!r} is cut short (file changed or truncated while reading)")
            pos += got
        return out

    def _read_at(self, view: memoryview, offset: int) -> int:
        """Read into `view` from byte `offset` of the file; returns the bytes read (0 at the end). Positional reads
        where the OS has them (os.preadv, os.pread: POSIX); elsewhere (Windows) a seek and read under this
        reader's lock, so threads sharing the reader never see each other's file position."""
        fd = self._file.fileno()
        preadv = getattr(os, "preadv", None)
        if preadv is not None:
            return preadv(fd, [view], offset)
        pread = getattr(os, "pread", None)
        if pread is not None:
            data = pread(fd, min(len(view), READ_CHUNK), offset)
            view[:len(data)] = data
            return len(data)
        with self._lock:
            self._file.seek(offset)
            return self._file.readinto(view[:READ_CHUNK]) or 0

    def close(self) -> None:
        self._file.close()


def is_unicode(s: str) -> bool:
    """False for strings that cannot be written as UTF-8 (lone surrogates, from JSON escapes or pickles)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _load_error_summary(e: BaseException) -> str:
    """The informative part of a torch.load failure: the refused global or op, without torch's preamble on loading
    unsafely and its advice to allowlist the global (wrong advice for a file from a stranger)."""
    text = str(e).strip()
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    else:
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        if len(paragraphs) > 1 and paragraphs[0].startswith("Weights only load failed"):
            text = paragraphs[1]
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    if not lines:
        return type(e).__name__
    return lines[0].split(". Please use", 1)[0].strip()


class MemorySource(_Closing):
    """A LoRA held in memory (a state dict and its metadata, e.g. `lora_resize.resized(...)`'s) as a TensorSource:
    `get` returns the tensors themselves (not copies); `path` is a placeholder (`<memory>`), so a family that reads
    a companion file beside its input finds none. Closing drops the references."""

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
        self.path = Path("<memory>")
        self.metadata = dict(metadata or {})
        self._tensors = dict(tensors)
        self._infos = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in self._tensors.items()}

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def close(self) -> None:
        self._tensors = {}


class PickleReader(MemorySource):
    """Reads a PyTorch pickle with `weights_only=True`: plain tensors load, anything executable is refused."""

    def __init__(self, path: Path):
        self.path = path
        self.metadata = {}
        try:
            with warnings.catch_warnings():  # torch warns on stderr about old formats; our errors are one line
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
        except FileNotFoundError:
            raise InputFileError(f"cannot open {path}: no such file") from None
        except IsADirectoryError:
            raise InputFileError(f"input {path} is a directory; give a .pt/.ckpt file") from None
        except Exception as e:  # noqa: BLE001 - whatever a damaged or hostile file makes torch.load raise
            if isinstance(e, OSError) and e.errno != errno.EINVAL:  # EINVAL: torch's reader on a damaged archive
                raise InputFileError(f"cannot read {path}: {e.strerror or e}; check the file and its permissions"
                                     ) from None
            if looks_like_safetensors(path):
                raise InputFileError(f"{path} is a safetensors file, not a PyTorch pickle; give it a .safetensors "
                                     "name") from None
            raise InputFileError(
                f"refusing to load {path}: it is not a plain tensor pickle ({_load_error_summary(e)[:160]}); only "
                "weights-only PyTorch files are read, never arbitrary code - convert it to .safetensors with a "
                "tool you trust"
            ) from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise InputFileError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
        self._tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        total = 0
        for k, v in self._tensors.items():
            if not is_unicode(k):
                raise InputFileError(f"{path} has a key {k[:60]!r} that is not valid Unicode; the file is damaged")
            if v.layout != torch.strided or v.dtype not in TORCH_TO_ST or v.device.type != "cpu":
                raise InputFileError(f"{path}: tensor {k!r} is a {v.layout} {v.dtype} tensor, which a LoRA file "
                                     "cannot hold; only dense real tensors are supported - re-save it without it")
            total += v.numel() * v.element_size()
        size = path.stat().st_size
        if total > 2 * size + (1 << 20):
            # expanded or shared storages: a few bytes in the file that would become gigabytes on writing
            raise InputFileError(f"{path} holds tensors totalling {total} bytes from a {size}-byte file (broadcast "
                                 "or repeatedly shared storage); refusing it - re-save it with plain tensors")
        super().__init__(self._tensors, {})
        self.path = path


def open_tensor_file(path: str | os.PathLike) -> TensorSource:
    """Open a LoRA file for lazy reading; raise InputFileError with the fix when it cannot be used."""
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"input file {p} does not exist; check the path")
    if p.is_dir():
        raise InputFileError(f"input {p} is a directory; give a .safetensors file")
    if not p.is_file():
        raise InputFileError(f"input {p} is not a regular file (a pipe or device?); save it to a file first")
    if p.suffix.lower() in PICKLE_SUFFIXES:
        return PickleReader(p)
    return SafetensorsReader(p)
