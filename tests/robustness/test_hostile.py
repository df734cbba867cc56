"""Hostile files: pickle payloads are never executed, headers and pickles that claim gigabytes are refused before
any large allocation, and outputs that are symbolic links, directories or pipes get a clear error (exit 2)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest
import torch

from lora_resize.cli import main

from helpers import LIN_A, Spec, file_sha, make_state_dict, write_lora

DOWN, UP = ".lora_down.weight", ".lora_up.weight"


def _sd():
    return make_state_dict([Spec(LIN_A, 24, 20, 8, alpha=4.0)], seed=3)


def _run(argv, capsys) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


def _assert_clean_error(rc: int, err: str, *must: str) -> None:
    assert rc == 2, err
    assert err.startswith("lora-resize: error:") and err.endswith("\n") and err.count("\n") == 1, repr(err)
    for m in must:
        assert m in err, err


def _no_temp(folder: Path) -> None:
    assert not [p for p in folder.iterdir() if p.name.startswith(".lora-resize-")]


# ----------------------------------------------------------------------------------------------------------------
# Pickle payloads


class Payload:
    """Unpickling this calls fn(*args): a stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _payloads(marker: Path):
    return {
        "open": (open, (str(marker), "w")),
        "os_system": (os.system, (f"touch {marker}",)),
        "exec": (exec, (f"open({str(marker)!r}, 'w').close()",)),
        "eval": (eval, (f"open({str(marker)!r}, 'w')",)),
    }


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".pth"])
@pytest.mark.parametrize("kind", ["open", "os_system", "exec", "eval"])
@pytest.mark.parametrize("where", ["beside_tensors", "in_wrapper", "whole_file"])
def test_pickle_payload_is_refused_and_never_runs(tmp_path, capsys, suffix, kind, where):
    marker = tmp_path / "pwned"
    fn, args = _payloads(marker)[kind]
    sd = _sd()
    if where == "beside_tensors":
        obj = dict(sd, _payload=Payload(fn, args))
    elif where == "in_wrapper":  # a lightning-style checkpoint with the LoRA under state_dict
        obj = {"state_dict": sd, "callbacks": Payload(fn, args)}
    else:
        obj = Payload(fn, args)
    src = tmp_path / f"evil{suffix}"
    torch.save(obj, src)
    before = file_sha(src)
    dst = tmp_path / "out.safetensors"
    rc, err = _run(["resize", str(src), "-o", str(dst), "--rank", "4"], capsys)
    _assert_clean_error(rc, err, "refusing to load")
    assert not marker.exists(), "the pickle payload ran"
    assert not dst.exists()
    _no_temp(tmp_path)
    assert file_sha(src) == before


def test_payload_control_is_real(tmp_path):
    # the payload used above does run under an unsafe load: the refusal is what keeps the marker away
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.pt"
    torch.save(dict(_sd(), _payload=Payload(*_payloads(marker)["open"])), src)
    torch.load(src, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind,culprit", [("os_system", "system"), ("open", "open"), ("eval", "eval")])
def test_payload_refusal_names_the_culprit(tmp_path, capsys, kind, culprit):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.pt"
    torch.save(dict(_sd(), _payload=Payload(*_payloads(marker)[kind])), src)
    rc, err = _run(["resize", str(src), "-o", str(tmp_path / "o.safetensors"), "--rank", "4"], capsys)
    _assert_clean_error(rc, err, culprit)  # the refused global, not torch's generic preamble
    # and none of torch's advice to load it unsafely or to allowlist the global
    assert "weights_only` set to `False" not in err and "safe_globals" not in err, err
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# Claims of gigabytes


def _claiming_file(path: Path, shape: list[int], dtype="F32", length_field: int | None = None) -> Path:
    """A tiny safetensors file whose header claims a tensor of `shape` (its data offsets consistent with it)."""
    item = {"F32": 4, "F16": 2}[dtype]
    n = item
    for d in shape:
        n *= d
    header = {"__metadata__": {"a": "b"},
              LIN_A + DOWN: {"dtype": dtype, "shape": shape, "data_offsets": [0, n]},
              LIN_A + UP: {"dtype": dtype, "shape": [4, shape[0]], "data_offsets": [0, 4 * shape[0] * item]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    n_field = len(raw) if length_field is None else length_field
    path.write_bytes(n_field.to_bytes(8, "little") + raw + bytes(64))
    return path


CLAIMS = {
    "16_GiB_tensor": dict(shape=[65536, 65536]),
    "1_TiB_tensor": dict(shape=[1 << 20, 1 << 18]),
    "2^62_bytes": dict(shape=[1 << 30, 1 << 30], dtype="F16"),
    "header_length_99MB": dict(shape=[4, 8], length_field=99_999_999),
    "header_length_2^63": dict(shape=[4, 8], length_field=1 << 63),
}


@pytest.mark.parametrize("claim", list(CLAIMS))
def test_huge_claims_are_refused_without_allocating(tmp_path, capsys, claim):
    src = _claiming_file(tmp_path / "claim.safetensors", **CLAIMS[claim])
    dst = tmp_path / "out.safetensors"
    tracemalloc.start()
    try:
        rc = main(["resize", str(src), "-o", str(dst), "--rank", "4"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    _assert_clean_error(rc, capsys.readouterr().err, "claim.safetensors")
    assert peak < 8 << 20, f"{peak} bytes allocated in Python for a {src.stat().st_size}-byte file"
    assert not dst.exists()


CHILD = textwrap.dedent("""
    import resource, sys
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from lora_resize.cli import main
    rc = main(sys.argv[2:])
    print("MAXRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
    sys.exit(rc)
""")


def _child(argv: list[str], limit: int = 3 << 30) -> subprocess.CompletedProcess:
    """Run the CLI in a child whose address space is capped: an allocation of gigabytes fails there (exit 1)."""
    return subprocess.run([sys.executable, "-c", CHILD, str(limit)] + argv, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, LORA_RESIZE_DEBUG=""))


def _maxrss_kb(stderr: str) -> int:
    return int(stderr.strip().splitlines()[-1].split()[1])


def _split_err(stderr: str) -> str:
    return "\n".join(x for x in stderr.splitlines() if not x.startswith("MAXRSS")) + "\n"


@pytest.mark.slow
def test_huge_claims_in_a_capped_process(tmp_path):
    """Outside Python's allocator too (torch tensors): under a 3 GiB address-space cap, a file that claims 16 GiB or
    a pickle that expands to 4 GiB is refused cleanly, with no more memory than resizing a small valid file."""
    good = write_lora(tmp_path / "good.safetensors", _sd())
    base = _child(["resize", str(good), "-o", str(tmp_path / "good_out.safetensors"), "--rank", "4"])
    assert base.returncode == 0, base.stderr
    base_rss = _maxrss_kb(base.stderr)

    claim = _claiming_file(tmp_path / "claim.safetensors", shape=[65536, 65536])
    bomb = tmp_path / "bomb.pt"  # 4 bytes of storage, broadcast to 2^30 elements (4 GiB) when materialised
    torch.save(dict(_sd(), **{"bomb.weight": torch.zeros(1).expand(1 << 15, 1 << 15)}), bomb)
    shared = tmp_path / "shared.pt"  # one 1 MiB storage under 300 names: 300 MiB when written out
    big = torch.randn(512, 512)
    torch.save(dict(_sd(), **{f"tied.{i}": big for i in range(300)}), shared)
    for src in (claim, bomb, shared):
        dst = tmp_path / f"{src.stem}_out.safetensors"
        p = _child(["resize", str(src), "-o", str(dst), "--rank", "4"])
        err = _split_err(p.stderr)
        _assert_clean_error(p.returncode, err, src.name)
        assert not dst.exists()
        assert _maxrss_kb(p.stderr) < base_rss + 64 * 1024, (src.name, _maxrss_kb(p.stderr), base_rss)


# ----------------------------------------------------------------------------------------------------------------
# Outputs that are links, directories, pipes


def test_symlinked_output_is_refused_and_target_untouched(tmp_path, capsys):
    src = write_lora(tmp_path / "in.safetensors", _sd())
    target = tmp_path / "precious.safetensors"
    target.write_bytes(b"not to be overwritten")
    link = tmp_path / "out.safetensors"
    link.symlink_to(target)
    rc, err = _run(["resize", str(src), "-o", str(link), "--rank", "4"], capsys)
    _assert_clean_error(rc, err, "symbolic link")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == b"not to be overwritten"
    _no_temp(tmp_path)


def test_symlink_to_the_input_is_refused(tmp_path, capsys):
    src = write_lora(tmp_path / "in.safetensors", _sd())
    before = file_sha(src)
    link = tmp_path / "out.safetensors"
    link.symlink_to(src)
    rc, err = _run(["resize", str(src), "-o", str(link), "--rank", "4"], capsys)
    _assert_clean_error(rc, err)
    assert file_sha(src) == before and link.is_symlink()


@pytest.mark.parametrize("target", ["dangling", "directory"])
def test_symlink_to_nothing_or_a_folder_is_refused(tmp_path, capsys, target):
    src = write_lora(tmp_path / "in.safetensors", _sd())
    link = tmp_path / "out.safetensors"
    if target == "dangling":
        link.symlink_to(tmp_path / "nowhere.safetensors")
    else:
        (tmp_path / "folder").mkdir()
        link.symlink_to(tmp_path / "folder")
    rc, err = _run(["resize", str(src), "-o", str(link), "--rank", "4"], capsys)
    _assert_clean_error(rc, err, "symbolic link")
    assert link.is_symlink()
    assert not (tmp_path / "nowhere.safetensors").exists()
    if target == "directory":
        assert not any((tmp_path / "folder").iterdir())


@pytest.mark.parametrize("form", ["modern", "sd_scripts"])
def test_output_that_is_a_directory(tmp_path, capsys, form):
    src = write_lora(tmp_path / "in.safetensors", _sd())
    d = tmp_path / "out.safetensors"
    d.mkdir()
    (d / "keep.txt").write_text("keep")
    argv = (["resize", str(src), "-o", str(d), "--rank", "4"] if form == "modern"
            else ["--model", str(src), "--save_to", str(d), "--new_rank", "4"])
    rc, err = _run(argv, capsys)
    _assert_clean_error(rc, err, "is a directory")
    assert sorted(p.name for p in d.iterdir()) == ["keep.txt"]
    _no_temp(tmp_path)


def _alarm(seconds: int):
    def boom(*_):
        raise TimeoutError("hung")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    return old


def test_input_that_is_a_pipe_does_not_hang(tmp_path, capsys):
    fifo = tmp_path / "in.safetensors"
    os.mkfifo(fifo)
    old = _alarm(20)
    try:
        rc, err = _run(["resize", str(fifo), "-o", str(tmp_path / "out.safetensors"), "--rank", "4"], capsys)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    _assert_clean_error(rc, err, "not a regular file")


def test_output_that_is_a_pipe(tmp_path, capsys):
    src = write_lora(tmp_path / "in.safetensors", _sd())
    fifo = tmp_path / "out.safetensors"
    os.mkfifo(fifo)
    old = _alarm(60)
    try:
        rc = main(["resize", str(src), "-o", str(fifo), "--rank", "4"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    err = capsys.readouterr().err
    # either refused, or the pipe is replaced by a complete file in one rename; never a write into the pipe
    if rc == 2:
        _assert_clean_error(rc, err)
        assert fifo.exists() and not fifo.is_file()
    else:
        assert rc == 0, err
        assert fifo.is_file() and fifo.stat().st_size > 0
    _no_temp(tmp_path)


def test_hostile_key_names_give_one_line_errors(tmp_path, capsys):
    # a key with a newline and a terminal escape: the message stays one printable line
    sd = _sd()
    sd["evil\n\x1b[2J" + DOWN] = torch.randn(2, 3)  # no partner
    src = write_lora(tmp_path / "in.safetensors", sd)
    rc, err = _run(["resize", str(src), "-o", str(tmp_path / "out.safetensors"), "--rank", "4"], capsys)
    _assert_clean_error(rc, err, "evil\\n\\x1b[2J")
    assert "\x1b" not in err


def test_huge_key_name_gives_a_bounded_message(tmp_path, capsys):
    sd = _sd()
    sd["x" * 1_000_000 + DOWN] = torch.randn(2, 3)
    src = write_lora(tmp_path / "in.safetensors", sd)
    rc, err = _run(["resize", str(src), "-o", str(tmp_path / "out.safetensors"), "--rank", "4"], capsys)
    _assert_clean_error(rc, err, "re-export")
    assert len(err) < 5000
