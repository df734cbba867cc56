"""core.parallel.torch_threads: torch's thread count is one setting of the whole process, so jobs overlapping on
threads (the page, the nodes, library users) share it: it stays set while any of them runs and comes back as it was
when the last one ends, whatever order they end in."""
from __future__ import annotations

import contextlib

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
