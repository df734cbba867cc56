"""One validated options object, shared by the CLI and the Python API."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import OptionsError
from .policies import RULES, get_policy

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}
PRECISION_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "fp32": "float", "float32": "float"}
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ResizeOptions:
    """How to resize. `rank` is the fixed rank, or the cap of a dynamic method (None: no cap);
    `conv_rank` the same for 4-D (conv) layers, defaulting to `rank`; `precision` None keeps the input's dtype."""
    rank: int | None = None
    conv_rank: int | None = None
    method: str | None = None
    param: float | None = None
    rule: str = "exact"
    precision: str | None = None
    device: str = "auto"
    threads: int | None = None  # layers decomposed at once on the CPU; None: one per available core

    def __post_init__(self) -> None:
        if self.method in (None, "", "fixed", "none"):
            self.method = None
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
            if self.rank is None:
                raise OptionsError("give a rank (--rank N) or a dynamic method (--method sv_fro --param 0.9)")
            if self.param is not None:
                raise OptionsError("--param is only used with a dynamic method (--method sv_ratio|sv_cumulative|sv_fro)")
        if self.rule not in RULES:
            raise OptionsError(f"rank rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if self.precision is not None:
            p = PRECISION_ALIASES.get(self.precision, self.precision)
            if p not in PRECISIONS:
                raise OptionsError(f"precision must be one of fp16, bf16, float, got {self.precision!r}")
            self.precision = p
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise OptionsError(f"threads must be a whole number >= 1, got {self.threads!r}")
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise OptionsError(f"device must be auto, cpu or cuda, got {self.device!r}")

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
