"""ComfyUI's entry point when this repository is cloned into `ComfyUI/custom_nodes/` (ComfyUI-Manager's install
from a git URL, or `git clone`): ComfyUI imports a custom-node folder's `__init__.py` and registers its
NODE_CLASS_MAPPINGS (ComfyUI nodes.py, load_custom_node). The nodes live in comfyui_lora_resize/; the library they
call is this clone's own src/, put first on the import path, so the nodes and the library always come from the same
commit (an update is one `git pull`) without a pip install of lora-resize. Its dependencies are requirements.txt
(which ComfyUI-Manager installs), torch being ComfyUI's own.

Anywhere else this file does nothing: ComfyUI has imported its `folder_paths` before it loads any custom node, and
without it (pytest >= 8 imports a root `__init__.py` while collecting; the package is built from src/) there is
nothing to register."""
import os
import sys

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

if "folder_paths" in sys.modules:  # inside ComfyUI
    _SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
    if os.path.isdir(os.path.join(_SRC, "lora_resize")) and _SRC not in sys.path:
        sys.path.insert(0, _SRC)
    from .comfyui_lora_resize import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
