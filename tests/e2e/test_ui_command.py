"""`lora-resize ui` refuses what it cannot serve in one line (exit 2), without starting anything. (Run in a child
process: a failed launch leaves the web server's event loop to the garbage collector, whose warning would land in
other tests' warning checks.)"""
from __future__ import annotations

import socket
import subprocess
import sys


def ui(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_resize.cli", "ui", *argv], capture_output=True, text=True,
                          timeout=120)


def test_bad_host_port_and_a_taken_port_are_one_line_errors():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        for argv, why in ((["--port", "99999"], "--port must be 1-65535"),
                          (["--host", "256.1.1.1"], "is not an address of this machine"),
                          (["--port", str(port)], "the port is taken"),
                          (["--port", "abc"], "invalid int value")):
            p = ui(*argv)
            lines = p.stderr.strip().splitlines()
            assert p.returncode == 2 and lines[-1].startswith("lora-resize: error:") and why in lines[-1], p.stderr
            assert "Traceback" not in p.stderr
    finally:
        taken.close()
