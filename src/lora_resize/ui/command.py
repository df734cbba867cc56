"""`lora-resize ui [--host H] [--port P]`: the local web page (Gradio; `pip install 'lora-resize[ui]'`). The
subcommand lives in this room, the top one (the page parses flags with the CLI's parser); cli/ dispatches to it by
name, as to its own subcommands."""
from __future__ import annotations

import argparse

HELP = "open a local web page: analyze, pick a setting on the curve, resize, merge, convert"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    p.add_argument("--browser", action="store_true", help="open it in the default browser")


def run(args: argparse.Namespace) -> int:
    from ..errors import OptionsError
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise OptionsError("the web page needs Gradio: pip install 'lora-resize[ui]'") from None
    from .app import serve
    serve(args.host, args.port, args.browser)
    return 0
