"""One validated options object, shared by the CLI and the Python API."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import OptionsError
from .policies import RULES, get_policy
from .rules import parse_rules, parse_size

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}
PRECISION_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "fp32": "float", "float32": "float"}
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ResizeOptions:
    """How to resize. `rank` is the fixed rank, or the cap of a dynamic method (None: no cap);
    `conv_rank` the same for 4-D (conv) layers, defaulting to `rank`; `precision` None keeps the input's dtype.

    `block_rules`: per-block rules 'PATTERN=RANK' / 'PATTERN=cap:RANK' / 'PATTERN=drop' (see rules.py; first match
    wins). `target_size` (bytes, or text such as '50MB') / `target_fro` (global Frobenius retained, scale-aware):
    budget policies that choose every layer's rank together (no method then; `rank`/`conv_rank` still cap).
    `ranks`: explicit ranks for named modules (what a budget plan fills in); they override rules and the method."""
    rank: int | None = None
    conv_rank: int | None = None
    method: str | None = None
    param: float | None = None
    rule: str = "exact"
    precision: str | None = None
    device: str = "auto"
    threads: int | None = None  # layers decomposed at once on the CPU; None: one per available core
    block_rules: tuple = ()
    target_size: int | str | None = None
    target_fro: float | None = None
    ranks: dict[str, int] | None = None
    output_format: str | None = None  # write under another key family's names (formats/convert.py); None: same

    def __post_init__(self) -> None:
        if self.method in (None, "", "fixed", "none"):
            self.method = None
        self.block_rules = parse_rules(self.block_rules)
        if self.target_size is not None and self.target_fro is not None:
            raise OptionsError("give one budget: --target-size or --target-fro, not both")
        if self.target_size is not None:
            self.target_size = parse_size(self.target_size)
        if self.target_fro is not None:
            try:
                self.target_fro = float(self.target_fro)
            except (TypeError, ValueError):
                raise OptionsError(f"--target-fro must be a number in (0, 1], got {self.target_fro!r}") from None
            if not 0 < self.target_fro <= 1:
                raise OptionsError(f"--target-fro must be in (0, 1] (e.g. 0.95), got {self.target_fro}")
        if self.has_target and (self.method is not None or self.param is not None):
            raise OptionsError("--target-size/--target-fro choose every layer's rank themselves: drop --method and "
                               "--param (--rank and --conv-rank still cap each layer)")
        if self.ranks is not None:
            if not isinstance(self.ranks, dict):
                raise OptionsError(f"ranks must map module names to ranks, got {type(self.ranks).__name__}")
            bad = {k: v for k, v in self.ranks.items()
                   if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1}
            if bad:
                k, v = next(iter(bad.items()))
                raise OptionsError(f"ranks[{k!r}] must be a whole number >= 1, got {v!r}")
            self.ranks = {str(k): int(v) for k, v in self.ranks.items()}
        policy = get_policy(self.method)
        for flag, value in (("rank", self.rank), ("conv rank", self.conv_rank)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise OptionsError(f"{flag} must be a whole number >= 1, got {value!r}")
        if self.conv_rank is None:
            self.conv_rank = self.rank
        if policy.needs_param:
            if self.param is None:
                raise OptionsError(f"method {policy.name} needs a parameter: add --param X (--dynamic_param X)")
            try:
                self.param = float(self.param)
            except (TypeError, ValueError):
                raise OptionsError(f"--param must be a number, got {self.param!r}") from None
            why = policy.check_param(self.param)
            if why:
                raise OptionsError(f"--param {self.param} for {policy.name} {why}")
        else:
            if self.rank is None and not self.has_target and not self.ranks:
                raise OptionsError("give a rank (--rank N), a dynamic method (--method sv_fro --param 0.9) or a "
                                   "budget (--target-size 50MB, --target-fro 0.95)")
            if self.param is not None:
                raise OptionsError("--param is only used with a dynamic method (--method sv_ratio|sv_cumulative|sv_fro)")
        if self.rule not in RULES:
            raise OptionsError(f"rank rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if self.precision is not None:
            p = PRECISION_ALIASES.get(self.precision, self.precision)
            if p not in PRECISIONS:
                raise OptionsError(f"precision must be one of fp16, bf16, float, got {self.precision!r}")
            self.precision = p
        if self.output_format not in (None, "kohya", "peft", "diffusers"):
            raise OptionsError(f"--output-format must be kohya, peft or diffusers, got {self.output_format!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise OptionsError(f"threads must be a whole number >= 1, got {self.threads!r}")
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise OptionsError(f"device must be auto, cpu or cuda, got {self.device!r}")

    @property
    def has_target(self) -> bool:
        """A budget policy (--target-size or --target-fro) chooses the ranks."""
        return self.target_size is not None or self.target_fro is not None

    def cap_for(self, conv: bool) -> int | None:
        """The rank (fixed) or cap (dynamic) for a linear or a conv layer."""
        return self.conv_rank if conv else self.rank

    def resolve_device(self) -> torch.device:
        """The torch device to compute on; 'auto' picks CUDA when it is available."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise OptionsError("--device cuda was asked for but CUDA is not available here; use --device cpu or auto")
        return torch.device(self.device)
