"""Files, without torch: what a tensor file's name and first bytes say it is, and writing a file atomically (a
temporary beside it, renamed over it; leftovers of killed runs removed). The reader, the writer and `batch`'s
bookkeeping share these, so a batch rerun with nothing left to do starts without importing torch."""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import secrets
import socket
import threading
from pathlib import Path
from typing import Iterator

from ..errors import OutputFileError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
INPUT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES  # the names a LoRA file is listed by (batch, the page)
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


# The names of the temporaries this process is writing now (unique: host, pid, random token; a name, not a path, so
# a folder given as a relative path and as an absolute one is the same): another thread's cleanup must never take
# one for a dead run's.
_LIVE: set[str] = set()
_LIVE_LOCK = threading.Lock()
# Which machine wrote a temporary: a process id means nothing on another machine sharing the folder.
HOST_TAG = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
TMP_NAME_BYTES = 120  # the output's name in a temporary's name is cut to this, so the whole name fits NAME_MAX


def _tmp_stem(dst: Path) -> str:
    """The start of every temporary's name for output `dst` (its name, cut at TMP_NAME_BYTES bytes)."""
    name = dst.name.encode("utf-8", "surrogateescape")[:TMP_NAME_BYTES].decode("utf-8", "ignore")
    return f"{TMP_PREFIX}{name}."


def _owner(tmp_name: str, stem: str) -> tuple[str | None, int] | None:
    """(host tag, pid) from a temporary's name `<stem><host>-<pid>-<token><TMP_SUFFIX>`; the form of earlier
    versions, `<stem><pid>-<token><TMP_SUFFIX>`, gives host None (this machine's). None: not a temporary's name."""
    parts = tmp_name[len(stem):-len(TMP_SUFFIX)].split("-")
    try:
        if len(parts) == 3:
            return parts[0], int(parts[1])
        if len(parts) == 2:
            return None, int(parts[0])
    except ValueError:
        pass
    return None


def remove_stale_partials(dst: Path) -> None:
    """Remove temporary files that killed earlier runs left beside `dst`: those written on this machine by a
    process that is gone, or by this process but no longer being written (a reused process id). Never a temporary
    another thread or process is writing, nor one from another machine (its process cannot be checked from here)."""
    stem = _tmp_stem(dst)
    for p in dst.parent.glob(f"{glob.escape(stem)}*{TMP_SUFFIX}"):
        owner = _owner(p.name, stem)
        if owner is None or owner[0] not in (None, HOST_TAG):
            continue
        pid = owner[1]
        with _LIVE_LOCK:
            if p.name in _LIVE or (pid != os.getpid() and pid_alive(pid)):
                continue
            with contextlib.suppress(OSError):
                p.unlink()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine; True when that cannot be told (a temporary is then kept).
    POSIX: signal 0 (no signal sent, only the check). Windows, where os.kill(pid, 0) would send CTRL_C_EVENT
    (signal 0) or terminate the process: OpenProcess and GetExitCodeProcess (STILL_ACTIVE while it runs), the
    Win32 API's documented probe."""
    if pid <= 0:
        return False
    if os.name == "nt":
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def _windows_pid_alive(pid: int) -> bool:
    import ctypes
    from ctypes import wintypes
    try:
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    except (AttributeError, OSError):  # not Windows after all: cannot tell
        return True
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() != 87  # ERROR_INVALID_PARAMETER: no such process; denied: it exists
    try:
        code = wintypes.DWORD()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _new_temp(dst: Path) -> Path:
    """Create a new empty temporary beside `dst`, under a name no other write uses (this machine's tag, this
    process's id, a random token; created exclusively), registered as being written. The mode is the usual one of
    a new file (0666 less the umask, applied by the OS: no chmod, which Windows lacks for descriptors). Raises
    OSError when the folder does not take it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = dst.parent / f"{_tmp_stem(dst)}{HOST_TAG}-{os.getpid()}-{secrets.token_hex(6)}{TMP_SUFFIX}"
        with _LIVE_LOCK:
            _LIVE.add(tmp.name)
        try:
            os.close(os.open(tmp, flags, 0o666))
            return tmp
        except FileExistsError:
            _forget(tmp)
        except BaseException:
            _forget(tmp)
            raise
    raise FileExistsError(errno.EEXIST, "no free temporary name")


def _forget(tmp: Path) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(tmp.name)


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
    """Yield a new temporary path beside `dst` (its own: concurrent writes of the same `dst`, from threads or
    processes, each get one and never remove another's); on success it replaces `dst` in one rename (the last
    finished write wins), on failure it is removed. Raises OutputFileError with the fix."""
    remove_stale_partials(dst)
    try:
        tmp = _new_temp(dst)
    except OSError as e:
        raise OutputFileError(f"cannot create a file in {dst.parent}: {e.strerror or e}; "
                              "choose a writable output folder") from None
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
        _forget(tmp)
