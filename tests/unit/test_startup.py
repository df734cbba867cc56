"""Start-up: `--help`, `--version`, a bad flag and a batch rerun with nothing left to do never import torch (most of
the CLI's start-up time when they did: 1.5-3 s here)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import write_lora

PROBE = ("import sys\nfrom lora_resize.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
         "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")


def imports_torch(*argv: str) -> bool:
    p = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    return p.stdout.strip().splitlines()[-1] == "TORCH"


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["resize", "--bogus"], ["convert", "--help"],
                                  ["resize", "--help"], ["analyze", "--help"], ["merge", "--help"],
                                  ["average", "--help"], ["merge", "a.safetensors", "--merge-method", "bogus"], []])
def test_the_command_line_starts_without_torch(argv):
    assert not imports_torch(*argv)


def test_a_batch_rerun_with_nothing_to_do_starts_without_torch(tmp_path):
    import torch
    src = tmp_path / "in"
    src.mkdir()
    write_lora(src / "a.safetensors", {"lora_unet_x.lora_down.weight": torch.randn(4, 8),
                                       "lora_unet_x.lora_up.weight": torch.randn(8, 4)})
    argv = ["batch", str(src), str(tmp_path / "out"), "--rank", "2", "-q"]
    assert imports_torch(*argv)  # the first run resizes
    assert not imports_torch(*argv)  # the rerun finds it done
