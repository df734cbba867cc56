"""Where batch inputs and outputs live: a local folder, or an fsspec URL (s3://, gs://, az://, hf://, memory://,
...) that every worker can reach. Local folders and file:// URLs are used in place; on other stores a worker
copies each input to a local temporary folder, resizes it there, and uploads the finished output (one upload
per file: on object stores an object appears whole or not at all)."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import OptionsError, require
from .files import atomic_output

CHUNK = 1 << 22


class Folder:
    """A root folder, local (`.fs` None, `.root` a Path) or on an fsspec store (`.root` its path there); files
    inside are named by '/'-separated paths relative to the root."""

    def __init__(self, spec: str | os.PathLike):
        self.spec = os.fspath(spec)
        self.fs = None
        self.root: Path | str = Path(self.spec)
        if "://" in self.spec:
            fs, root = url_filesystem(self.spec)
            if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
                self.root = Path(root)
            else:
                self.fs, self.root = fs, root.rstrip("/")

    @property
    def local(self) -> bool:
        return self.fs is None

    def __str__(self) -> str:
        return self.spec

    def location(self, rel: str) -> str:
        """A path (local) or URL (remote) for `rel`, as a worker is given it."""
        if self.local:
            return str(self.root / rel)
        return self.fs.unstrip_protocol(f"{self.root}/{rel}")

    def is_dir(self) -> bool:
        return self.root.is_dir() if self.local else bool(self.fs.isdir(self.root))

    def makedirs(self) -> None:
        if self.local:
            self.root.mkdir(parents=True, exist_ok=True)
        else:
            self.fs.makedirs(self.root, exist_ok=True)

    def files(self) -> list[str]:
        """Every file under the root, recursively, as sorted relative paths."""
        if self.local:
            return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        prefix = self.root + "/"
        return sorted(p[len(prefix):] for p in self.fs.find(self.root) if p.startswith(prefix))

    def size(self, rel: str) -> int:
        return (self.root / rel).stat().st_size if self.local else int(self.fs.size(f"{self.root}/{rel}"))

    def exists(self, rel: str) -> bool:
        return (self.root / rel).exists() if self.local else bool(self.fs.exists(f"{self.root}/{rel}"))

    def open(self, rel: str):
        return open(self.root / rel, "rb") if self.local else self.fs.open(f"{self.root}/{rel}", "rb")

    def sha256(self, rel: str) -> str:
        with self.open(rel) as f:
            return sha256_of(f)

    def remove(self, rel: str) -> None:
        """Delete file `rel` (nothing when it is not there)."""
        if self.local:
            (self.root / rel).unlink(missing_ok=True)
        elif self.fs.exists(f"{self.root}/{rel}"):
            self.fs.rm_file(f"{self.root}/{rel}")

    def read_text(self, rel: str) -> str | None:
        try:
            with self.open(rel) as f:
                return f.read().decode()
        except (OSError, UnicodeDecodeError):
            return None

    def write_text(self, rel: str, text: str) -> None:
        """Replace `rel` with `text` whole: atomically on a local disk, as one upload on a store."""
        if self.local:
            with atomic_output(self.root / rel) as tmp:
                tmp.write_text(text)
        else:
            self.fs.pipe_file(f"{self.root}/{rel}", text.encode())


def sha256_of(f) -> str:
    """Hex sha256 of what is left to read in the binary file `f`, read in chunks."""
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(CHUNK), b""):
        h.update(chunk)
    return h.hexdigest()


def url_filesystem(url: str):
    """(fsspec filesystem, path) for a URL, or an OptionsError saying what is missing."""
    fsspec = require("fsspec", "a folder given as a URL")
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:  # fsspec knows the protocol but its package is not installed (s3fs, gcsfs, ...)
        raise OptionsError(f"cannot open {url}: {e}") from None
    except ValueError as e:
        raise OptionsError(f"cannot open {url}: {e}") from None


@contextlib.contextmanager
def local_input(location: str) -> Iterator[Path]:
    """A local path holding the file at `location` (a path, or a URL copied to a temporary folder)."""
    folder = Folder(location)
    if folder.local:
        yield Path(folder.root)
        return
    with tempfile.TemporaryDirectory(prefix="lora-resize-in-") as tmp:
        local = Path(tmp) / Path(str(folder.root)).name
        folder.fs.get_file(folder.root, str(local))
        yield local


@contextlib.contextmanager
def local_output(location: str) -> Iterator[Path]:
    """A local path to write the output for `location` to: the place itself, or a file in a temporary folder
    whose contents (the output and any companion files) are uploaded beside `location` when the block succeeds."""
    folder = Folder(location)
    if folder.local:
        Path(folder.root).parent.mkdir(parents=True, exist_ok=True)
        yield Path(folder.root)
        return
    fs, remote = folder.fs, str(folder.root)
    parent, name = remote.rsplit("/", 1) if "/" in remote else ("", remote)
    with tempfile.TemporaryDirectory(prefix="lora-resize-out-") as tmp:
        yield Path(tmp) / name
        if parent:
            fs.makedirs(parent, exist_ok=True)
        companions = sorted(p for p in Path(tmp).iterdir() if p.name != name)
        for p in companions:
            fs.put_file(str(p), f"{parent}/{p.name}" if parent else p.name)
        fs.put_file(str(Path(tmp) / name), remote)  # the output last: once it is there, the file is done
