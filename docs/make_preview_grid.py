"""Regenerate docs/preview-grid.png, the grid the README shows: `lora-resize preview` with its default settings
(sv_ratio 128, 32, 8, 4, 2) on the tiny SD1.5-like test pipeline (lora_resize.testing.pipelines: random weights,
32 x 32 pictures) and its rank-8 test LoRA, 20 steps, seed 0.

    PYTHONPATH=src python docs/make_preview_grid.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from lora_resize.cli import main
from lora_resize.testing import pipelines

OUT = Path(__file__).resolve().parent / "preview-grid.png"

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        pipe = pipelines.tiny_pipeline("sd1", seed=0)
        base = pipelines.save_folder(pipe, Path(tmp) / "tiny-sd1")
        lora = pipelines.tiny_lora(pipe, Path(tmp) / "tiny-lora.safetensors", rank=8)
        sys.exit(main(["preview", str(lora), "--base", str(base), "--prompt", "a photo of a cat", "--seed", "0",
                       "--steps", "20", "-o", str(OUT), "-q"]))
