"""Disk full, quota and permission errors while writing: one clear line, exit 2, no partial file, and the previous
output at the destination untouched. Simulated by failing the writer mid-way (monkeypatch), and for real with a
file-size limit (RLIMIT_FSIZE) in a child process."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lora_resize.io.files as files
import lora_resize.io.writer as writer
from lora_resize.cli import main

from helpers import LIN_A, Spec, file_sha, load_st, make_state_dict, write_lora

PREVIOUS = b"the previous complete output"
SUFFIXES = [".safetensors", ".pt"]


@pytest.fixture
def src(tmp_path) -> Path:
    specs = [Spec(f"{LIN_A}_{i}", out=256, inp=256, rank=32, alpha=8.0) for i in range(4)]
    return write_lora(tmp_path / "in.safetensors", make_state_dict(specs, seed=11))


def _setup(tmp_path, suffix) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    dst = out / f"model{suffix}"
    dst.write_bytes(PREVIOUS)
    return dst


def _check_failed(rc: int, err: str, dst: Path, src: Path, src_sha: str, *must: str) -> None:
    assert rc == 2, err
    assert err.startswith("lora-resize: error:") and err.endswith("\n") and err.count("\n") == 1, repr(err)
    for m in must:
        assert m in err, err
    assert dst.read_bytes() == PREVIOUS
    assert sorted(p.name for p in dst.parent.iterdir()) == [dst.name], "a partial file was left"
    assert file_sha(src) == src_sha


def _argv(src: Path, dst: Path) -> list[str]:
    return ["resize", str(src), "-o", str(dst), "--rank", "16", "--precision", "float"]


class HalfThenENOSPC:
    """A file whose writes succeed until `budget` bytes have gone through, then fail with ENOSPC (as on a full disk:
    the first part of the data reaches the file)."""

    def __init__(self, f, budget: int):
        self._f, self.budget = f, budget

    def write(self, b) -> int:
        n = len(memoryview(b).cast("B"))
        if n > self.budget:
            self._f.write(memoryview(b).cast("B")[:self.budget])
            self.budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= n
        return self._f.write(b)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("budget", [0, 100, 60_000])  # the output is ~130 kB
def test_disk_full_mid_write(tmp_path, capsys, monkeypatch, src, suffix, budget):
    dst = _setup(tmp_path, suffix)
    sha = file_sha(src)
    real_open = open

    def failing_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return HalfThenENOSPC(f, budget) if "w" in mode else f

    monkeypatch.setattr(writer, "open", failing_open, raising=False)
    rc = main(_argv(src, dst))
    _check_failed(rc, capsys.readouterr().err, dst, src, sha, "No space left on device", "free space")


@pytest.mark.parametrize("budget", [0, 100, 60_000])
def test_disk_full_while_the_output_waits_for_the_write(tmp_path, capsys, monkeypatch, src, budget):
    """The layers' tensors wait in a scratch file beside the output (writer.HeldTensors): a full disk there is the
    same one line, with nothing written."""
    dst = _setup(tmp_path, ".safetensors")
    sha = file_sha(src)
    real = writer.tempfile.TemporaryFile
    monkeypatch.setattr(writer.tempfile, "TemporaryFile", lambda *a, **k: HalfThenENOSPC(real(*a, **k), budget))
    rc = main(_argv(src, dst))
    _check_failed(rc, capsys.readouterr().err, dst, src, sha, "No space left on device", "nothing was written")


def test_a_folder_made_for_the_output_is_removed_when_the_write_fails(tmp_path, capsys, monkeypatch, src):
    real_open = open

    def failing_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return HalfThenENOSPC(f, 100) if "w" in mode else f

    monkeypatch.setattr(writer, "open", failing_open, raising=False)
    rc = main(["resize", str(src), "-o", f"{tmp_path / 'new'}/", "--rank", "16"])
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err and err.count("\n") == 1
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_fsync_fails(tmp_path, capsys, monkeypatch, src, suffix):
    dst = _setup(tmp_path, suffix)
    sha = file_sha(src)

    def fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(writer.os, "fsync", fsync)
    rc = main(_argv(src, dst))
    _check_failed(rc, capsys.readouterr().err, dst, src, sha, "Input/output error")


@pytest.mark.parametrize("err_no", [errno.EACCES, errno.EROFS, errno.EDQUOT])
def test_cannot_create_the_temporary_file(tmp_path, capsys, monkeypatch, src, err_no):
    # a read-only or full folder: refused when the temporary file is created, before anything is written
    dst = _setup(tmp_path, ".safetensors")
    sha = file_sha(src)

    real_open = os.open

    def os_open(path, *a, **k):
        if os.path.basename(path).startswith(files.TMP_PREFIX):
            raise OSError(err_no, os.strerror(err_no))
        return real_open(path, *a, **k)

    monkeypatch.setattr(files.os, "open", os_open)
    rc = main(_argv(src, dst))
    _check_failed(rc, capsys.readouterr().err, dst, src, sha, os.strerror(err_no), "writable output folder")


@pytest.mark.parametrize("err_no", [errno.EACCES, errno.EROFS, errno.EXDEV])
def test_rename_into_place_fails(tmp_path, capsys, monkeypatch, src, err_no):
    dst = _setup(tmp_path, ".safetensors")
    sha = file_sha(src)

    def replace(a, b):
        raise OSError(err_no, os.strerror(err_no))

    monkeypatch.setattr(writer.os, "replace", replace)
    rc = main(_argv(src, dst))
    _check_failed(rc, capsys.readouterr().err, dst, src, sha, os.strerror(err_no))


def test_read_only_folder_for_real(tmp_path, capsys, src):
    out = tmp_path / "ro"
    out.mkdir()
    dst = out / "model.safetensors"
    dst.write_bytes(PREVIOUS)
    os.chmod(out, 0o555)
    try:
        probe = out / "probe"
        try:
            probe.write_bytes(b"")
            probe.unlink()
            pytest.skip("running as root: a read-only mode does not stop writing (covered by the monkeypatched "
                        "tests above)")
        except PermissionError:
            pass
        sha = file_sha(src)
        rc = main(_argv(src, dst))
        _check_failed(rc, capsys.readouterr().err, dst, src, sha, "Permission denied")
    finally:
        os.chmod(out, 0o755)


CHILD = textwrap.dedent("""
    import resource, sys
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past it fail with EFBIG (SIGXFSZ ignored)
    from lora_resize.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_real_file_size_limit(tmp_path, src, suffix):
    """A real short write from the kernel (as on a full disk or an exhausted quota), for both output writers:
    torch.save's own zip writer included, which reports such failures as RuntimeError."""
    dst = _setup(tmp_path, suffix)
    sha = file_sha(src)
    p = subprocess.run([sys.executable, "-c", CHILD, "65536"] + _argv(src, dst), capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, LORA_RESIZE_DEBUG=""))
    _check_failed(p.returncode, p.stderr, dst, src, sha, "File too large", "nothing was written")
    # and with room to write, the same command succeeds
    p = subprocess.run([sys.executable, "-c", CHILD, str(1 << 30)] + _argv(src, dst), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    if suffix == ".safetensors":
        assert load_st(dst)[0]
    assert sorted(x.name for x in dst.parent.iterdir()) == [dst.name]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_output_gets_the_usual_mode_of_a_new_file(tmp_path, capsys, src, mask, suffix):
    # the temporary file is created 0600; the finished output has the mode any new file would get (0666 & ~umask)
    dst = tmp_path / f"out{suffix}"
    old = os.umask(mask)
    try:
        assert main(_argv(src, dst)) == 0, capsys.readouterr().err
    finally:
        os.umask(old)
    assert dst.stat().st_mode & 0o777 == 0o666 & ~mask
