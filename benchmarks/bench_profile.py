"""Benchmark: where the time of one whole `lora-resize resize` goes - reading, conversion to float64, Gram matrices,
Cholesky/QR, the eigendecomposition, the rest of the engine's core, the new factors, the output checks, writing,
and the rest - plus the start-up of a fresh process, then the same resize as a user runs it (fresh process,
default threads) with its peak RSS.

    python benchmarks/bench_profile.py --dir /tmp/b24          # the blog's SD1.5 LoCon 512:512 fp16, sv_ratio 128
    python benchmarks/bench_profile.py --dir /tmp/b24 --flux   # the Flux-dev rank-128 bf16 LoRA, sv_fro 0.9 cap 64
    python benchmarks/bench_profile.py --input my.safetensors --args "--method sv_fro --param 0.9"

The profiled run is in-process with --threads 1, so every step runs in the main thread; each step is timed by
wrapping the package's functions in this script only (exclusive times: a step called inside another counts once,
for itself). The wrapped run's output must equal the plain run's byte for byte, or the script fails.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ensure_flux_lora, ensure_sd15_locon, run_cli, warm

BLOG_ARGS = "--method sv_ratio --param 128 --rank 128 --precision fp16"
FLUX_ARGS = "--method sv_fro --param 0.9 --rank 64"
STEPS = ["read", "to float64", "Gram matrices", "Cholesky/QR", "eigh", "core (rest)", "factors", "checks", "write",
         "other"]
STARTUP = ("import importlib, lora_resize.cli as c, torch; importlib.import_module(c.MODULES['resize'])")


class StepTimer:
    """Exclusive wall time per step: a wrapped call's time goes to its step, less the time of wrapped calls inside
    it (which go to theirs); calls of a step inside the same step count once. Main thread only."""

    def __init__(self):
        self.seconds = dict.fromkeys(STEPS, 0.0)
        self.stack: list[list] = []  # [step, start, seconds of wrapped calls inside]
        self.main = threading.get_ident()

    def wrap(self, owner, name: str, step: str, only_inside: str | None = None) -> None:
        """Replace owner.name by a timed version (`only_inside`: timed only when called from that step)."""
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            if threading.get_ident() != self.main or (only_inside and (not self.stack
                                                                       or self.stack[-1][0] != only_inside)):
                return fn(*args, **kwargs)
            frame = [step, time.perf_counter(), 0.0]
            self.stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stack.pop()
                spent = time.perf_counter() - frame[1]
                self.seconds[step] += spent - frame[2]
                if self.stack:
                    self.stack[-1][2] += spent
        setattr(owner, name, timed)


# (module, object in it or "", function, step): where the resize path looks each function up
WRAPPED = [("lora_resize.io.reader", "SafetensorsReader", "get", "read"),
           ("lora_resize.core.decompose", "", "_stacked", "to float64"),
           ("lora_resize.core.decompose", "", "_grams", "Gram matrices"),
           ("lora_resize.core.decompose", "", "sym_gram", "Gram matrices"),
           ("lora_resize.core.decompose", "", "_left_basis", "Cholesky/QR"),
           ("lora_resize.core.decompose", "", "_decompose_stack", "core (rest)"),
           ("lora_resize.core.decompose", "Decomposition", "factors", "factors"),
           ("lora_resize.ops.job", "", "truncated_factors", "factors"),
           ("lora_resize.ops.job", "", "on_host", "checks"),
           ("lora_resize.core.truncate", "", "held_precision", "checks"),
           ("lora_resize.io.writer", "", "check_finite", "checks"),
           ("lora_resize.io.writer", "HeldTensors", "__setitem__", "write"),  # a layer's tensors to the scratch file
           ("lora_resize.ops.job", "", "write_output", "write")]


def instrument() -> StepTimer:
    """Wrap the package's functions where the resize path calls them (the names its modules imported); a name
    the code no longer has is said, and its time counts as its caller's step."""
    import importlib

    import torch
    t = StepTimer()
    for module, obj, name, step in WRAPPED:
        owner = importlib.import_module(module)
        owner = getattr(owner, obj, None) if obj else owner
        if hasattr(owner, name):
            t.wrap(owner, name, step)
        else:
            print(f"note: {module}.{obj + '.' if obj else ''}{name} not found: its time counts as its caller's")
    for name in ("eigh", "eigvalsh"):  # torch's, timed only when called from the engine's core
        t.wrap(torch.linalg, name, "eigh", only_inside="core (rest)")
    return t


def profiled(src: Path, dst: Path, args: list[str]) -> tuple[dict[str, float], float]:
    """(seconds per step, wall) of the resize run in this process with --threads 1 and wrapped functions."""
    import lora_resize.cli as cli
    timer = instrument()
    import importlib
    importlib.import_module(cli.MODULES["resize"])  # its imports are start-up, measured on their own
    t = time.perf_counter()
    rc = cli.main(["resize", str(src), "-o", str(dst), *args, "--threads", "1", "-q"])
    wall = time.perf_counter() - t
    if rc:
        sys.exit(f"lora-resize failed ({rc})")
    timer.seconds["other"] = wall - sum(timer.seconds.values())
    return timer.seconds, wall


def startup_seconds(repeats: int = 3) -> float:
    """The fastest of `repeats` fresh processes that start python, import lora_resize.cli, torch and the resize
    command's modules, and exit."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", STARTUP], check=True)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "lora-resize-bench"))
    ap.add_argument("--flux", action="store_true", help="the Flux-dev rank-128 file (sv_fro 0.9, cap 64)")
    ap.add_argument("--input", help="any input file instead of the built ones")
    ap.add_argument("--args", help=f"the resize's settings (default: {BLOG_ARGS!r}; --flux: {FLUX_ARGS!r})")
    a = ap.parse_args()
    folder = Path(a.dir)
    folder.mkdir(parents=True, exist_ok=True)
    if a.input:
        src = Path(a.input)
    elif a.flux:
        src = ensure_flux_lora(folder / "flux_128.safetensors", 128)
    else:
        src = ensure_sd15_locon(folder / "sd15_locon_512_512.safetensors", 512, 512)
    args = shlex.split(a.args or (FLUX_ARGS if a.flux else BLOG_ARGS))
    import torch
    print(f"input: {src} ({src.stat().st_size / 1e9:.3f} GB); settings: {' '.join(args)}; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs")
    warm(src)

    startup = startup_seconds()
    profiled_out, plain_out = folder / "profiled.safetensors", folder / "plain.safetensors"
    steps, wall = profiled(src, profiled_out, args)
    plain_s, plain_rss, _ = run_cli(["resize", str(src), "-o", str(plain_out), *args, "-q"])
    same = filecmp.cmp(profiled_out, plain_out, shallow=False)

    print(f"\nprofiled run (in-process, --threads 1): {wall:.2f} s")
    print(f"{'step':16} {'seconds':>8} {'share':>7}")
    for name in STEPS:
        print(f"{name:16} {steps[name]:8.2f} {steps[name] / wall:7.1%}")
    print(f"{'total':16} {wall:8.2f} {1:7.1%}")
    print(f"{'start-up':16} {startup:8.2f}   (fresh process: python, lora_resize.cli, torch, the resize command's "
          "modules; not in the total)")
    print(f"\nplain run (fresh process, default threads): {plain_s:.2f} s wall, start-up included; peak RSS "
          f"{plain_rss / 1e9:.3f} GB (VmHWM)")
    print(f"profiled output equals the plain run's byte for byte: {same}")
    for p in (profiled_out, plain_out):
        p.unlink()
    if not same:
        sys.exit("the wrappers changed the output")


if __name__ == "__main__":
    main()
