"""Sizes, in one convention for every flag and printout: SI prefixes are powers of 10 (1 MB = 10^6 bytes), binary
ones powers of 2 (1 MiB = 2^20 bytes), as IEC 80000-13 defines them. `--target-size`, `--max-memory` and every size
the tool prints follow it."""
from __future__ import annotations

import math
import re

from .errors import OptionsError

KB, MB, GB, TB = 1000, 1000 ** 2, 1000 ** 3, 1000 ** 4
KiB, MiB, GiB, TiB = 1024, 1024 ** 2, 1024 ** 3, 1024 ** 4
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": KB, "kb": KB, "m": MB, "mb": MB, "g": GB, "gb": GB, "t": TB, "tb": TB,
          "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB}


def parse_size(value: "int | float | str", what: str = "size") -> int:
    """Bytes from 50000000, '50MB' (10^6), '47.7MiB' (2^20), '1.2GB', '8 GiB', ...

    `what` names the flag in the error. Raises OptionsError when the text is not a size or is below 1 byte."""
    if isinstance(value, bool):
        raise OptionsError(f"{what} must be a size such as 50MB, got {value!r}")
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        m = _SIZE_RE.match(str(value))
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS:
            raise OptionsError(f"{what} {value!r} is not a size; write e.g. 50MB (10^6 bytes), 48MiB (2^20 bytes), "
                               "1.2GB or a number of bytes")
        n = float(m.group(1)) * _UNITS[unit]
    if not (math.isfinite(n) and n >= 1):
        raise OptionsError(f"{what} must be at least 1 byte, got {value!r}")
    return int(n)


def format_size(n: float) -> str:
    """A size for people, in SI units (steps of 1000): '512 B', '88.6 MB', '1.2 GB' - the one formatter of every
    size the tool prints (CLI, reports, the page, the nodes). A size that rounds to 1000 of a unit is shown in the
    next one ('1.0 MB', not '1000.0 KB')."""
    if round(abs(n)) < KB:
        return f"{n:.0f} B"
    for unit, size in (("KB", KB), ("MB", MB), ("GB", GB)):
        if round(abs(n) / size, 1) < 1000:
            return f"{n / size:.1f} {unit}"
    return f"{n / TB:.1f} TB"
