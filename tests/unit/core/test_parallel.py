"""core.parallel.torch_threads: torch's thread count is one setting of the whole process, so jobs overlapping on
threads (the page, the nodes, library users) share it: it stays set while any of them runs and comes back as it was
when the last one ends, whatever order they end in. share_one_heap: the command line's engine workers allocate from
one heap."""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys

import pytest
import torch

from lora_resize.core.parallel import torch_threads


def test_overlapping_blocks_restore_the_setting_from_before_the_first():
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with contextlib.ExitStack() as a, contextlib.ExitStack() as b:
            a.enter_context(torch_threads(1))
            b.enter_context(torch_threads(1))
            a.close()  # the first job ends while the second still runs: its setting holds
            assert torch.get_num_threads() == 1
            b.close()
            assert torch.get_num_threads() == 3
        with torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


ENGINE_HEAPS = """
import ctypes, os, sys, tempfile
from dataclasses import dataclass
import torch
from lora_resize.core.layer import LowRankLayer
from lora_resize.core.schedule import through_engine

libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes, libc.fclose.argtypes = [ctypes.c_int, ctypes.c_void_p], [ctypes.c_void_p]


def heaps():  # glibc's heaps ("arenas") in use, as malloc_info lists them
    fd, path = tempfile.mkstemp()
    os.close(fd)
    fp = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, fp)
    libc.fclose(fp)
    text = open(path).read()
    os.unlink(path)
    return text.count("<heap nr=")


@dataclass
class Job:
    name: str
    nbytes: int = 8 << 20  # each layer alone in its window: the two workers take turns

    def load(self):
        g = torch.Generator().manual_seed(len(self.name))
        return LowRankLayer.with_alpha(torch.randn(512, 64, generator=g), torch.randn(64, 2048, generator=g), 8.0)


if sys.argv[1] == "cli":
    import contextlib, io
    from lora_resize.cli import main
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(["--version"])
before = heaps()
S = list(through_engine([Job(f"l{i}") for i in range(8)], torch.device("cpu"), lambda j, layer, dec: dec.S[0],
                        lambda s: s, threads=2))
print(before, heaps())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's heaps: what share_one_heap sets")
def test_engine_workers_share_one_heap():
    """Under the command line, the engine's two CPU workers allocate from the heap the process already has:
    glibc's default gives each new thread a heap of its own, where the float64 temporaries one worker frees cannot
    serve the other's next layer, and each heap stays as large as the largest layer it met (peak RSS, issue 24).
    The engine alone leaves that setting to its host process (ComfyUI, a library user): its workers get their own
    heaps there. Fresh processes, so no earlier test has set it."""
    for mode, same in (("cli", True), ("library", False)):
        run = subprocess.run([sys.executable, "-c", ENGINE_HEAPS, mode], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert run.returncode == 0, run.stderr
        before, after = map(int, run.stdout.split())
        assert (after == before) is same, (mode, before, after)
