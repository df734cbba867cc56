"""Benchmark: `lora-resize analyze` on the SD1.5 LoCon 512:32:512:16 fp16 case (1.16 GiB): wall time, peak RSS,
the decomposition's and the sweep's share, and a check that one predicted size is the size resize writes.

    python benchmarks/bench_analyze.py            # builds the input under /tmp/lora-resize-bench if missing
"""
from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

from common import ensure_sd15_locon, run_cli, warm

BENCH_DIR = Path("/tmp/lora-resize-bench")


def main() -> int:
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    src = ensure_sd15_locon(BENCH_DIR / "sd15_locon_512_512.safetensors", 512, 512)
    warm(src)
    secs, rss, out = run_cli(["analyze", str(src), "-q", "--method", "sv_fro", "--param", "0.9"])
    head = out.splitlines()[0]
    m = re.search(r"decomposed in ([\d.]+) s, (\d+) settings in ([\d.]+) s", head)
    predicted = int(re.search(r"^\* sv_fro 0\.9\s+([\d,]+)", out, re.M).group(1).replace(",", ""))
    print(f"analyze: {secs:.1f} s wall, peak RSS {rss / 2**20:.0f} MiB; decomposition {m.group(1)} s, "
          f"{m.group(2)} settings in {m.group(3)} s")
    with tempfile.TemporaryDirectory(dir=BENCH_DIR) as d:
        dst = Path(d) / "out.safetensors"
        rsecs, _, _ = run_cli(["resize", str(src), "-o", str(dst), "-q", "--method", "sv_fro", "--param", "0.9"])
        actual = dst.stat().st_size
    print(f"resize sv_fro 0.9: {rsecs:.1f} s; predicted {predicted:,} bytes, written {actual:,} bytes "
          f"({'equal' if predicted == actual else 'DIFFERENT'})")
    return 0 if predicted == actual else 1


if __name__ == "__main__":
    sys.exit(main())
