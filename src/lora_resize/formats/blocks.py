"""Display groups of module names, for reports: UNet 'down N' / 'mid' / 'up N' (diffusers and sgm names), DiT
'double' / 'single' blocks, 'text encoder' (1, 2, ...), else 'other'."""
from __future__ import annotations

import re

_BLOCK_PATTERNS = [
    (re.compile(r"(?:^|_)(?:down_blocks|input_blocks)_(\d+)"), "down {}"),
    (re.compile(r"(?:^|_)(?:mid_block|middle_block)"), "mid"),
    (re.compile(r"(?:^|_)(?:up_blocks|output_blocks)_(\d+)"), "up {}"),
    (re.compile(r"(?:^|_)double_blocks_(\d+)"), "double"),
    (re.compile(r"(?:^|_)single_blocks_(\d+)"), "single"),
    (re.compile(r"^(?:lora_)?te(\d?)_|^text_encoders?(?:_(\d))?_|^(?:lora_)?text_encoder(?:_(\d))?_"), "te"),
]


def block_of(name: str) -> str:
    """The display group of module `name`."""
    n = name.replace(".", "_")
    for rx, label in _BLOCK_PATTERNS:
        m = rx.search(n)
        if not m:
            continue
        if label == "te":
            digit = next((g for g in m.groups() if g), "")
            return f"text encoder {digit}".strip()
        return label.format(*m.groups()) if m.groups() else label
    return "other"
