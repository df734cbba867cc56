"""ComfyUI custom nodes for lora-resize: clone the repository into `ComfyUI/custom_nodes/` (its root `__init__.py`
imports this package with the clone's library), or place or link this folder there and `pip install lora-resize`
into ComfyUI's Python. The nodes call the `lora_resize` library; nothing of it is copied here. Nodes: Resize LoRA,
Analyze LoRA (a size/fidelity picture and the table, before any file is written), Merge LoRAs, Convert LoRA, Apply
resized LoRA and Sweep resized LoRA (a setting applied in memory, no file written), Tile images with labels - all
under "lora-resize" in the node menu, reading from and writing to the loras folder."""
import importlib.util
import sys

if importlib.util.find_spec("lora_resize") is None:  # ComfyUI logs this line under "IMPORT FAILED"
    raise ImportError(f"lora-resize is not installed in ComfyUI's Python ({sys.executable}): run "
                      f"'{sys.executable} -m pip install <the lora-resize folder>' and restart ComfyUI")

TORCH_MINIMUM = (2, 5)  # pyproject.toml's torch>=2.5 (tests/unit/test_torch_minimum.py keeps the two equal)


def _torch_release(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as '2.4.1+cu121'."""
    major, minor = (version.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


if importlib.util.find_spec("torch") is not None:
    import torch
    if _torch_release(torch.__version__) < TORCH_MINIMUM:  # an old ComfyUI's torch: one line, not an AttributeError
        raise ImportError(f"lora-resize needs torch >= {'.'.join(map(str, TORCH_MINIMUM))}; ComfyUI's Python has "
                          f"{torch.__version__}: update ComfyUI (or its torch) and restart it")

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
