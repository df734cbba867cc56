"""`python -m lora_resize.cli ...`, the same as the `lora-resize` command."""
import sys

from . import main

sys.exit(main())
