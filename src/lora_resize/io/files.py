"""Files, without torch: what a tensor file's name and first bytes say it is, and writing a file atomically (a
temporary beside it, renamed over it; leftovers of killed runs removed). The reader, the writer and `batch`'s
bookkeeping share these, so a batch rerun with nothing left to do starts without importing torch."""
from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import OutputFileError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
TMP_PREFIX = ".lora-resize-"
TMP_SUFFIX = ".partial"


def looks_like_pickle(head: bytes) -> bool:
    """The first bytes of a torch.save zip archive or of a (legacy) pickle."""
    return head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04",
                                                                                     b"\x05"))


def claimed_header_length(head: bytes) -> int | None:
    """The header length claimed by a file whose first 9 bytes are `head`, if they start like safetensors (a
    length field, then the header's opening brace); None otherwise."""
    return int.from_bytes(head[:8], "little") if len(head) == 9 and head[8:] == b"{" else None


def looks_like_safetensors(path: Path) -> bool:
    """A plausible safetensors start: a length field within limits, then the header's opening brace."""
    try:
        with open(path, "rb") as f:
            n = claimed_header_length(f.read(9))
    except OSError:
        return False
    return n is not None and n <= MAX_HEADER_BYTES


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
