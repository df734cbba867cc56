"""ComfyUI custom nodes for lora-resize: place or link this folder into `ComfyUI/custom_nodes/` (and `pip install
lora-resize` into ComfyUI's Python). The nodes call the installed `lora_resize` library; nothing of it is copied
here. Nodes: Resize LoRA, Analyze LoRA (a size/fidelity picture and the table, before any file is written),
Merge LoRAs, Convert LoRA - all under "lora-resize" in the node menu, reading from and writing to the loras folder."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
