"""Interrupted writes: the CLI is SIGKILLed at random points (and on purpose while its temporary file is being
written) while it replaces a previous complete output. The destination is always either the previous file, byte for
byte, or the complete new one; a killed run's temporary file is removed by the next run.

A warm "zygote" process imports lora_resize and torch once and forks one child per run, so each run costs a fork
rather than a Python start-up; the children are the processes that get killed."""
from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lora_resize.io.files import TMP_PREFIX, TMP_SUFFIX

from helpers import Spec, load_st, make_state_dict, write_lora

ZYGOTE = textwrap.dedent("""
    import json, os, sys
    import torch, lora_resize.ops.resize, lora_resize.report.text, lora_resize.cli, tqdm  # warm imports, no torch work
    from lora_resize.cli import main
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "run":
            pid = os.fork()
            if pid == 0:
                rc = 1
                try:
                    null = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(null, 1)
                    os.dup2(null, 2)
                    rc = main(req["argv"])
                finally:
                    os._exit(rc)
            print(json.dumps({"pid": pid}), flush=True)
        elif req["op"] == "reap":
            _, status = os.waitpid(req["pid"], 0)
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
            print(json.dumps({"status": code}), flush=True)
""")


class Zygote:
    def __init__(self):
        self.p = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, env=dict(os.environ, LORA_RESIZE_DEBUG=""))

    def _ask(self, req: dict, timeout: float = 120.0) -> dict:
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        if not select.select([self.p.stdout], [], [], timeout)[0]:  # a run that hangs fails the test, not CI
            self.p.kill()
            raise AssertionError(f"no answer from the zygote within {timeout} s to {req}")
        line = self.p.stdout.readline()
        assert line, "zygote died"
        return json.loads(line)

    def start(self, argv: list[str]) -> int:
        return self._ask({"op": "run", "argv": argv})["pid"]

    def reap(self, pid: int) -> int:
        return self._ask({"op": "reap", "pid": pid})["status"]

    def run(self, argv: list[str]) -> int:
        return self.reap(self.start(argv))

    def close(self):
        if self.p.poll() is None:
            self.p.stdin.close()
            self.p.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="module")
def big_input(tmp_path_factory) -> Path:
    """~4 MB float32 LoRA: twelve 512x512 layers of rank 64 (the float output is as big, so writing takes a while)."""
    specs = [Spec(f"lora_unet_block_{i}_attn1_to_q", out=512, inp=512, rank=64, alpha=32.0) for i in range(12)]
    d = tmp_path_factory.mktemp("interrupted_in")
    return write_lora(d / "big.safetensors", make_state_dict(specs, seed=5))


def _partials(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(TMP_PREFIX) and p.name.endswith(TMP_SUFFIX))


def _argv(src: Path, dst: Path, rank: int) -> list[str]:
    return ["resize", str(src), "-o", str(dst), "--rank", str(rank), "--precision", "float", "--device", "cpu", "-q"]


def _finished(pid: int) -> bool:
    """The (zygote's) child `pid` has exited and waits to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _kill_when_writing(dst: Path, pid: int, deadline: float, rng: random.Random) -> bool:
    """SIGKILL `pid` as soon as its temporary file appears (after a random few hundred microseconds);
    False if the run ended first."""
    while time.perf_counter() < deadline:
        if _partials(dst.parent):
            spin = time.perf_counter() + rng.uniform(0, 0.002)
            while time.perf_counter() < spin:
                pass
            os.kill(pid, signal.SIGKILL)
            return True
        if _finished(pid):
            return False
    os.kill(pid, signal.SIGKILL)
    return True


def _differences(got: bytes, old: bytes, new: bytes) -> str:
    """What tells `got` apart from the two expected files (sizes; for safetensors, header and data separately)."""
    def split(b: bytes):
        n = int.from_bytes(b[:8], "little") if len(b) >= 8 else 0
        try:
            return json.loads(b[8:8 + n]), b[8 + n:]
        except ValueError:
            return None, b
    parts = [f"{len(got)} bytes (previous {len(old)}, new {len(new)})"]
    g_head, g_data = split(got)
    for label, ref in (("previous", old), ("new", new)):
        r_head, r_data = split(ref)
        first = next((j for j, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
        parts.append(f"vs {label}: first differing byte {first}, data {'equal' if g_data == r_data else 'differs'}")
        if g_head is not None and r_head is not None:
            g, r = dict(g_head), dict(r_head)
            meta_g, meta_r = g.pop("__metadata__", {}), r.pop("__metadata__", {})
            parts.append(f"tensor entries {'equal' if g == r else 'differ'}; metadata keys differing: "
                         f"{sorted(k for k in set(meta_g) | set(meta_r) if meta_g.get(k) != meta_r.get(k))}")
    return "; ".join(parts)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_sigkill_never_leaves_a_truncated_output(tmp_path, zygote, big_input, suffix):
    rng = random.Random(1234 if suffix == ".safetensors" else 4321)
    out = tmp_path / "out"
    out.mkdir()
    ref_old, ref_new = tmp_path / f"ref_old{suffix}", tmp_path / f"ref_new{suffix}"
    # the previous complete output (another rank) and the complete new one, from unkilled runs
    t0 = time.perf_counter()
    assert zygote.run(_argv(big_input, ref_old, 16)) == 0
    assert zygote.run(_argv(big_input, ref_new, 60)) == 0
    duration = (time.perf_counter() - t0) / 2
    again = tmp_path / f"again{suffix}"
    assert zygote.run(_argv(big_input, again, 60)) == 0
    assert again.read_bytes() == ref_new.read_bytes(), "the output is not deterministic; the test needs it to be"
    old, new = ref_old.read_bytes(), ref_new.read_bytes()
    assert len(new) > 2_000_000

    dst = out / f"model{suffix}"
    kills = 14 if suffix == ".safetensors" else 8
    outcomes = {"previous": 0, "new": 0}
    killed_while_writing = 0
    for i in range(kills):
        dst.write_bytes(old)
        pid = zygote.start(_argv(big_input, dst, 60))
        if i % 2 == 0:  # anywhere in the run, start-up included
            time.sleep(rng.uniform(0, duration * 1.2))
            os.kill(pid, signal.SIGKILL)
        else:  # while the temporary file is being written
            killed_while_writing += _kill_when_writing(dst, pid, time.perf_counter() + 10 * duration + 5, rng)
        status = zygote.reap(pid)
        assert status in (0, -signal.SIGKILL), status
        got = dst.read_bytes()
        assert got in (old, new), f"kill {i}: destination is neither the previous nor the new file: {_differences(got, old, new)}"
        outcomes["previous" if got == old else "new"] += 1
        assert [p.name for p in out.iterdir() if not p.name.startswith(TMP_PREFIX)] == [dst.name]
    assert outcomes["previous"] > 0, outcomes  # some kills did land before the rename
    assert killed_while_writing > 0

    # a later run removes the partial files the killed runs left, and writes the new file
    assert zygote.run(_argv(big_input, dst, 60)) == 0
    assert dst.read_bytes() == new
    assert _partials(out) == []


def test_later_run_removes_a_stale_partial_of_a_killed_run(tmp_path, zygote, big_input):
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "model.safetensors"
    dst.write_bytes(b"previous")
    # kill runs in their write phase until one leaves its temporary file behind (the first try nearly always does)
    stale: list[Path] = []
    for _ in range(20):
        pid = zygote.start(_argv(big_input, dst, 60))
        deadline = time.perf_counter() + 30
        while time.perf_counter() < deadline and not _partials(out):
            pass
        os.kill(pid, signal.SIGSTOP)  # freeze it where it is, then kill it there
        os.kill(pid, signal.SIGKILL)
        zygote.reap(pid)
        stale = _partials(out)
        if stale and dst.read_bytes() == b"previous":
            break
        dst.write_bytes(b"previous")
    assert stale, "no run could be killed while writing"
    assert dst.read_bytes() == b"previous"
    assert str(pid) in stale[0].name  # named after its (now dead) owner, so a later run knows it is stale
    # a partial of a live process writing the same output is left alone
    live = out / f"{TMP_PREFIX}{dst.name}.{os.getpid()}-abcdefgh{TMP_SUFFIX}"
    live.write_bytes(b"someone else's work in progress")
    assert zygote.run(_argv(big_input, dst, 8)) == 0
    assert not any(p.exists() for p in stale)
    assert live.exists()
    tensors, _ = load_st(dst)
    assert tensors and all(t.shape[0] == 8 for k, t in tensors.items() if k.endswith("lora_down.weight"))
    live.unlink()


@pytest.mark.parametrize("name", ["model.safetensors", "model[v2].safetensors", "a*b?.safetensors"])
def test_stale_partial_is_removed_whatever_the_output_name(tmp_path, capsys, name):
    # a partial left by a process that no longer exists, beside an output whose name holds glob characters
    from lora_resize.cli import main

    src = write_lora(tmp_path / "in.safetensors", make_state_dict([Spec("lora_unet_x", 16, 12, 4)], seed=2))
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead = p.pid
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f"{TMP_PREFIX}{name}.{dead}-k3j2h1g0{TMP_SUFFIX}"
    stale.write_bytes(b"half a file")
    other = out / f"{TMP_PREFIX}other.safetensors.{dead}-k3j2h1g0{TMP_SUFFIX}"  # another output's: not ours
    other.write_bytes(b"half of another file")
    assert main(["resize", str(src), "-o", str(out / name), "--rank", "2"]) == 0, capsys.readouterr().err
    assert not stale.exists()
    assert other.exists()
    assert load_st(out / name)[0]
