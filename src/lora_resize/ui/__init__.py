"""The local web page (`lora-resize ui`, app.py): an optional extra, `pip install 'lora-resize[ui]'` (Gradio)."""
