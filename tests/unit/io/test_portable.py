"""The reader and the atomic writer without the POSIX-only calls they may use where they exist (os.preadv, os.pread,
os.fchmod, the os.kill(pid, 0) probe): the same bytes come out, so Windows (which has none of them, and where
os.kill(pid, 0) stops the process) reads and writes what Linux and macOS do."""
from __future__ import annotations

import ctypes
import os
import stat
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lora_resize
from lora_resize.io import files
from lora_resize.io.files import TMP_PREFIX, TMP_SUFFIX, atomic_output
from lora_resize.io.reader import open_tensor_file

from helpers import file_sha, load_st


@pytest.fixture
def mixed_file(tmp_path) -> Path:
    g = torch.Generator().manual_seed(5)
    sd = {"a.f32": torch.randn(37, 11, generator=g), "b.f16": torch.randn(5, 3, 2, generator=g).half(),
          "c.bf16": torch.randn(129, generator=g).bfloat16(), "d.i64": torch.arange(7), "e.empty": torch.zeros(0, 4),
          "f.fp8": torch.randn(16, 16, generator=g).to(torch.float8_e4m3fn), "g.u8": torch.arange(255, dtype=torch.uint8)}
    save_file(sd, tmp_path / "mixed.safetensors", metadata={"k": "v"})
    return tmp_path / "mixed.safetensors"


def _read_all(path: Path) -> dict[str, bytes]:
    with open_tensor_file(path) as r:
        return {k: bytes(r.get(k).reshape(-1).view(torch.uint8).numpy()) for k in r.infos()}


@pytest.mark.parametrize("removed", [("preadv",), ("preadv", "pread")], ids=["no-preadv", "no-pread"])
def test_reader_without_positional_reads_reads_the_same_bytes(mixed_file, monkeypatch, removed):
    expected = _read_all(mixed_file)
    ref, _ = load_st(mixed_file)
    assert expected == {k: bytes(t.reshape(-1).view(torch.uint8).numpy()) for k, t in ref.items()}
    for name in removed:
        monkeypatch.delattr(os, name, raising=False)
    assert _read_all(mixed_file) == expected


def test_reader_fallback_is_thread_safe(mixed_file, monkeypatch):
    # the seek-and-read fallback shares one file position: threads reading at once must each get their own tensor
    expected = _read_all(mixed_file)
    monkeypatch.delattr(os, "preadv", raising=False)
    monkeypatch.delattr(os, "pread", raising=False)
    keys = [k for k in expected if expected[k]] * 40
    got: list[tuple[str, bytes]] = []
    with open_tensor_file(mixed_file) as r:
        start = threading.Barrier(8)

        def work(part):
            start.wait()
            for k in part:
                got.append((k, bytes(r.get(k).reshape(-1).view(torch.uint8).numpy())))
        threads = [threading.Thread(target=work, args=(keys[i::8],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(got) == len(keys) and all(b == expected[k] for k, b in got)


def test_writer_without_fchmod_writes_the_same_file_with_the_usual_mode(standard_lora, tmp_path, monkeypatch):
    lora_resize.resize(standard_lora, tmp_path / "with.safetensors", rank=4)
    monkeypatch.delattr(os, "fchmod", raising=False)
    lora_resize.resize(standard_lora, tmp_path / "without.safetensors", rank=4)
    assert file_sha(tmp_path / "with.safetensors") == file_sha(tmp_path / "without.safetensors")
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "without.safetensors").stat().st_mode) == 0o666 & ~mask


def _partial(folder: Path, dst_name: str, host: str | None, pid: int) -> Path:
    middle = f"{host}-{pid}-0123456789ab" if host is not None else f"{pid}-k3j2h1g0"
    p = folder / f"{TMP_PREFIX}{dst_name}.{middle}{TMP_SUFFIX}"
    p.write_bytes(b"half a file")
    return p


def _dead_pid() -> int:
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_cleanup_removes_only_dead_runs_of_this_machine(tmp_path):
    dst = tmp_path / "out.safetensors"
    dead = _dead_pid()
    stale = _partial(tmp_path, dst.name, files.HOST_TAG, dead)
    stale_old_form = _partial(tmp_path, dst.name, None, dead)
    reused_pid = _partial(tmp_path, dst.name, files.HOST_TAG, os.getpid())  # ours, but no write of ours holds it
    other_machine = _partial(tmp_path, dst.name, "0badc0de" if files.HOST_TAG != "0badc0de" else "1badc0de", dead)
    live_process = _partial(tmp_path, dst.name, files.HOST_TAG, os.getppid())
    files.remove_stale_partials(dst)
    assert not stale.exists() and not stale_old_form.exists() and not reused_pid.exists()
    assert other_machine.exists() and live_process.exists()


def test_two_threads_writing_one_output_both_succeed(tmp_path):
    # each write sits in its temporary while the others start theirs: none may take another's for a dead run's
    dst = tmp_path / "out.safetensors"
    n = 6
    inside = threading.Barrier(n)
    errors: list[BaseException] = []
    contents = [f"writer {i}".encode() * 1000 for i in range(n)]

    def write(i):
        try:
            with atomic_output(dst) as tmp:
                tmp.write_bytes(contents[i])
                inside.wait(timeout=30)
        except BaseException as e:  # noqa: BLE001 - the test reports it
            errors.append(e)
    threads = [threading.Thread(target=write, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert dst.read_bytes() in contents
    assert [p.name for p in tmp_path.iterdir()] == [dst.name]


def test_threads_resizing_to_one_output_all_succeed(standard_lora, tmp_path):
    # the library's own writes (the page, the nodes, library users on threads), all to one path
    dst = tmp_path / "out.safetensors"
    lora_resize.resize(standard_lora, tmp_path / "ref.safetensors", rank=4)
    errors: list[BaseException] = []

    def work():
        try:
            lora_resize.resize(standard_lora, dst, rank=4)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert file_sha(dst) == file_sha(tmp_path / "ref.safetensors")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_long_output_name_gets_a_temporary(standard_lora, tmp_path):
    # the temporary's name holds the output's: for a name near the 255-byte limit it must still fit
    name = "x" * (250 - len(".safetensors")) + ".safetensors"
    lora_resize.resize(standard_lora, tmp_path / name, rank=4)
    assert (tmp_path / name).is_file()


class _FakeKernel32:
    """What the Windows probe calls, for processes 100 (running), 200 (exited, handle still open), 300 (another
    user's: access denied); any other id does not exist."""
    last_error = 0

    def __init__(self, name, use_last_error=False):
        assert name == "kernel32" and use_last_error

    def OpenProcess(self, access, inherit, pid):
        if pid in (100, 200):
            return pid
        _FakeKernel32.last_error = 5 if pid == 300 else 87
        return 0

    def GetExitCodeProcess(self, handle, code_ref):
        code_ref._obj.value = 259 if handle == 100 else 0
        return 1

    def CloseHandle(self, handle):
        return 1


def test_liveness_probe_on_windows_never_signals(monkeypatch):
    def no_kill(*a):
        raise AssertionError("os.kill(pid, 0) on Windows stops the process")
    monkeypatch.setattr(os, "kill", no_kill)
    monkeypatch.setattr(ctypes, "WinDLL", _FakeKernel32, raising=False)
    monkeypatch.setattr(ctypes, "get_last_error", lambda: _FakeKernel32.last_error, raising=False)
    monkeypatch.setattr(os, "name", "nt")
    try:
        alive = {pid: files.pid_alive(pid) for pid in (100, 200, 300, 400)}
    finally:
        monkeypatch.undo()
    assert alive == {100: True, 200: False, 300: True, 400: False}


def test_liveness_probe_without_the_windows_api_keeps_the_file(monkeypatch):
    # cannot tell (no kernel32): the temporary is taken for a live one's, never removed
    def no_kill(*a):
        raise AssertionError("os.kill(pid, 0) on Windows stops the process")
    monkeypatch.setattr(os, "kill", no_kill)
    monkeypatch.delattr(ctypes, "WinDLL", raising=False)
    monkeypatch.setattr(os, "name", "nt")
    try:
        alive = files.pid_alive(424242)
    finally:
        monkeypatch.undo()
    assert alive is True


def test_a_write_through_a_relative_path_keeps_another_through_an_absolute_one(tmp_path, monkeypatch):
    # one folder, named two ways by two writers of this process: still one live temporary, never removed
    monkeypatch.chdir(tmp_path)
    with atomic_output(tmp_path / "out.safetensors") as first:
        first.write_bytes(b"first")
        with atomic_output(Path("out.safetensors")) as second:
            second.write_bytes(b"second")
        assert first.exists()
    assert (tmp_path / "out.safetensors").read_bytes() == b"first"
