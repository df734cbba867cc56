"""`lora-resize ui [--host H] [--port P] [--loras DIR]`: the local web page (Gradio; `pip install 'lora-resize[ui]'`). The
subcommand lives in this room, the top one (the page parses flags with the CLI's parser); cli/ dispatches to it by
name, as to its own subcommands."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HELP = "open a local web page: analyze, pick a setting on the curve, resize, merge, convert"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.requires(None, "gradio", "the web page")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    p.add_argument("--browser", action="store_true", help="open it in the default browser")
    p.add_argument("--auth", metavar="USER:PASS", default=None,
                   help="ask for this user name and password before the page opens (or set LORA_RESIZE_UI_AUTH, "
                        "which stays out of the process list); needed to serve safely beyond 127.0.0.1")
    p.add_argument("--loras", metavar="DIR", default=None,
                   help="a folder of LoRAs (e.g. ComfyUI's models/loras) to pick from, besides uploading; what is "
                        "made from a picked file is also saved beside it, under a new name")
    p.add_argument("--base", metavar="MODEL", default=None,
                   help="a base model (diffusers folder or single-file SD1.5/SDXL/Flux.1 checkpoint): adds a Preview "
                        "tab with each setting's picture (pip install 'lora-resize[preview]')")
    p.add_argument("--base-config", metavar="DIR", default=None,
                   help="with a single-file --base: a diffusers folder of that model (configs, tokenizers)")
    p.requires("base", "diffusers", "the Preview tab (--base)")
    p.requires("base", "transformers", "the Preview tab (--base)")


def run(args: argparse.Namespace) -> int:
    from ..errors import OptionsError
    import socket
    if args.port is not None and not 0 < args.port < 65536:
        raise OptionsError(f"--port must be 1-65535, got {args.port}")
    try:
        socket.getaddrinfo(args.host, None)
    except OSError:
        raise OptionsError(f"--host {args.host} is not an address of this machine (e.g. 127.0.0.1)") from None
    if args.loras is not None and not Path(args.loras).is_dir():
        raise OptionsError(f"--loras {args.loras}: not a folder")
    if args.base is not None and not Path(args.base).exists():
        raise OptionsError(f"--base {args.base}: no such file or folder")
    if args.base_config is not None and args.base is None:
        raise OptionsError("--base-config gives the configs of a single-file --base: add --base MODEL")
    if args.base is not None:  # what can be checked without loading it: refused now, not when Preview is pressed
        from ..diffusion.pipeline import base_family
        base_family(args.base, args.base_config)
        if Path(args.base).is_file() and args.base_config is None:
            print(f"lora-resize ui: note: --base {args.base} is a single file: the Preview tab will fetch its "
                  "configs and tokenizers from the Hugging Face Hub (give --base-config DIR, a diffusers folder "
                  "of this model, to work offline)", file=sys.stderr, flush=True)
    from .app import AUTH_ENV, serve
    auth = parse_auth(args.auth if args.auth is not None else os.environ.get(AUTH_ENV) or None,
                      "--auth" if args.auth is not None else AUTH_ENV)
    import logging
    logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)  # a failed bind is said once, below
    try:
        serve(args.host, args.port, args.browser, loras=args.loras, auth=auth, base=args.base,
              base_config=args.base_config)
    except OSError:
        where = f"{args.host}:{args.port}" if args.port else f"{args.host} (ports from 7860)"
        raise OptionsError(f"cannot serve on {where}: the port is taken or the address is not this machine's; "
                           "choose another --port (or --host)") from None
    return 0


def parse_auth(text: str | None, where: str) -> tuple[str, str] | None:
    """'USER:PASS' -> (user, password) (the password may hold ':'); None for no text. Raises OptionsError for a
    missing user or password."""
    from ..errors import OptionsError
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise OptionsError(f"{where} must be USER:PASS with both parts, e.g. me:a-long-passphrase")
    return user, password
