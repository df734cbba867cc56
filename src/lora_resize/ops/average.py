"""Average the checkpoints of one training run: the weighted mean of their UPDATES, sum_i w_i * dW_i with weights
that sum to 1, never the mean of their factors (mean(up) @ mean(down) adds cross terms up_i @ down_j). It is a
weighted merge (ops.merge, the `sum` method: the stacked factors, reduced by the resize engine without forming a
dense update), so it is exact up to the rank policy and the save dtype.

The weights follow the checkpoints' training steps (`checkpoint_steps`: metadata, else the file names, else
--steps) by one of WEIGHTINGS (`average_weights`):

- uniform: w_i = 1/N (needs no order).
- linear: w_i = i / (N (N + 1) / 2), i = 1..N in step order.
- ema: the recurrence ema_1 = x_1, ema_i = beta * ema_{i-1} + (1 - beta) * x_i over the checkpoints in step
  order: w_1 = beta^(N-1), w_i = (1 - beta) * beta^(N-i) for i >= 2.
- power: the power-function EMA of Karras et al. 2024 (EDM2, arXiv 2312.02696, sec. 3.1 and Algorithm 2): its
  averaging profile is proportional to t^gamma over training steps t, gamma solved from
  sigma_rel = sqrt(gamma + 1) / ((gamma + 2) * sqrt(gamma + 3)) (`sigma_rel_gamma`). Checkpoint i stands for the
  steps (t_{i-1}, t_i] (t_0 = 0), so w_i is proportional to t_i^(gamma+1) - t_{i-1}^(gamma+1). The weights do not
  change when every step is multiplied by one number (epochs of equal length give those of steps).

No torch at import: the CLI builds its flags from WEIGHTINGS."""
from __future__ import annotations

import json
import math
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..errors import OptionsError

WEIGHTINGS = {
    "uniform": "w_i = 1/N (the default; needs no order)",
    "linear": "w_i proportional to i, 1-based, in step order",
    "ema": "the EMA recurrence ema = beta*ema + (1-beta)*x_i from the first checkpoint (--beta)",
    "power": "the power-function EMA of Karras et al. 2024 (EDM2) with --sigma-rel, over the training steps",
}
ORDERED = ("linear", "ema", "power")  # the weightings that need the checkpoints' order
# the step a checkpoint was saved at, by the trainers that write one into the file's metadata:
# sd-scripts (train_network.py `save_model`: metadata["ss_steps"] = str(global step); musubi-tuner's trainers too)
# and ai-toolkit (jobs/process/BaseSDTrainProcess.py `get_training_info`: "training_info" = {"step": ..., ...},
# stored JSON-encoded by toolkit/metadata.py `get_meta_for_safetensors`)
STEP_KEYS = ("ss_steps", "training_info")
# the largest sigma_rel the power function allows: sigma_rel(gamma) peaks where gamma^2 + 3 gamma + 1 = 0
GAMMA_PEAK = (math.sqrt(5) - 3) / 2


def edm2_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power-function EMA profile t^gamma (Karras et al. 2024, EDM2, eq. 3):
    sqrt(gamma + 1) / ((gamma + 2) * sqrt(gamma + 3)), for gamma > -1."""
    return math.sqrt(gamma + 1) / ((gamma + 2) * math.sqrt(gamma + 3))


SIGMA_REL_MAX = edm2_sigma_rel(GAMMA_PEAK)  # 0.300283...


def is_number(value) -> bool:
    """A real number given as one (int, float, numpy's), not a string or a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(flag: str, value, example: str) -> None:
    """Refuse (OptionsError, one line) a parameter `flag` given as anything but a number (a string from Python,
    a bool), before its range is judged."""
    if not is_number(value):
        raise OptionsError(f"{flag} must be a number, got {value!r} ({type(value).__name__}): e.g. {flag} {example}")


def sigma_rel_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power-function EMA with relative width `sigma_rel` (Karras et al. 2024,
    Algorithm 2 solves the same cubic gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0 and takes its
    largest real root): the root of edm2_sigma_rel(gamma) = sigma_rel on gamma >= GAMMA_PEAK, where the width
    falls as gamma grows, found by bisection to float64 precision. Raises OptionsError for a value that is not a
    number or lies outside (0, SIGMA_REL_MAX]."""
    check_number("--sigma-rel", sigma_rel, "0.1")
    if not 0 < sigma_rel <= SIGMA_REL_MAX:
        raise OptionsError(f"--sigma-rel {sigma_rel} is out of range: the power-function EMA (Karras et al. 2024) "
                           f"allows 0 < sigma_rel <= {math.floor(SIGMA_REL_MAX * 1e6) / 1e6}; EDM2 uses 0.05-0.15, "
                           "e.g. --sigma-rel 0.1")
    lo, hi = GAMMA_PEAK, max(GAMMA_PEAK, 1 / sigma_rel)  # edm2_sigma_rel(g) < 1 / (g + 2), so it is below at hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if edm2_sigma_rel(mid) > sigma_rel else (lo, mid)
    return (lo + hi) / 2


def check_weighting(weighting: str, beta: float | None = None, sigma_rel: float | None = None) -> None:
    """Refuse (OptionsError, one line) an unknown weighting, a parameter it does not read, a missing one, a
    parameter that is not a number, beta outside (0, 1) or sigma_rel out of the power function's range."""
    if weighting not in WEIGHTINGS:
        raise OptionsError(f"unknown weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
    for name, flag, value, owner in (("beta", "--beta", beta, "ema"), ("sigma_rel", "--sigma-rel", sigma_rel,
                                                                       "power")):
        if value is not None and weighting != owner:
            raise OptionsError(f"{flag} is read only by --weighting {owner}, not {weighting}: drop it or give "
                               f"--weighting {owner}")
        if value is None and weighting == owner:
            raise OptionsError(f"--weighting {owner} needs {flag}, e.g. "
                               f"{'--beta 0.9' if owner == 'ema' else '--sigma-rel 0.1'}")
    if beta is not None:
        check_number("--beta", beta, "0.9")
    if beta is not None and not 0 < beta < 1:
        raise OptionsError(f"--beta {beta} is out of range: the EMA's decay must be strictly between 0 and 1, "
                           "e.g. --beta 0.9")
    if sigma_rel is not None:
        sigma_rel_gamma(sigma_rel)


def average_weights(weighting: str, n: int, steps: Sequence[int] | None = None, beta: float | None = None,
                    sigma_rel: float | None = None) -> list[float]:
    """The N weights (summing to 1, in step order) of `weighting` (module docstring). `steps`: the checkpoints'
    training steps, ascending and distinct (power reads them; the others only the count). Raises OptionsError for
    bad parameters (check_weighting) and for power without steps or with steps that are negative or all 0."""
    check_weighting(weighting, beta, sigma_rel)
    if weighting == "uniform":
        raw = [1.0] * n
    elif weighting == "linear":
        raw = [float(i) for i in range(1, n + 1)]
    elif weighting == "ema":
        raw = [beta ** (n - 1)] + [(1 - beta) * beta ** (n - i) for i in range(2, n + 1)]
    else:
        if steps is None or len(steps) != n:
            raise OptionsError("--weighting power needs each checkpoint's training step: give --steps 100,200,...")
        if steps[0] < 0 or steps[-1] <= 0:
            raise OptionsError(f"--weighting power needs steps >= 0 and a last one > 0, got "
                               f"{', '.join(map(str, steps))}")
        e = sigma_rel_gamma(sigma_rel) + 1
        ends = [0.0] + [(t / steps[-1]) ** e for t in steps]  # relative to the last step: no overflow
        raw = [b - a for a, b in zip(ends, ends[1:])]
    total = math.fsum(raw)
    return [w / total for w in raw]


def metadata_step(metadata: Mapping[str, str]) -> tuple[int | None, str | None]:
    """The training step a trainer recorded in a checkpoint's metadata (STEP_KEYS), and the key it came from;
    (None, None) when there is none or it is not a whole number >= 0."""
    for key in STEP_KEYS:
        text = metadata.get(key)
        if text is None:
            continue
        try:
            value = json.loads(text)
            value = value.get("step") if isinstance(value, dict) else value
            if isinstance(value, bool) or not isinstance(value, (int, str)) or int(value) < 0:
                continue
            return int(value), key
        except (ValueError, TypeError):
            continue
    return None, None


# How trainers number the checkpoints they save, first match wins; each a different count, never mixed:
# OneTrainer (modules/trainer/GenericTrainer.py: '<prefix><date_time>-save-<global step>-<epoch>-<epoch step>',
# TrainProgress.filename_string), sd-scripts' step saves ('<name>-step00001000', train_util.py
# STEP_FILE_NAME), then any last number: sd-scripts' epoch saves ('<name>-000004'), ai-toolkit's ('<name>_000001000')
NAME_FORMS = (("OneTrainer step", re.compile(r"-save-(\d+)-\d+-\d+$")),
              ("step", re.compile(r"step[-_]?(\d+)$", re.IGNORECASE)),
              ("number", re.compile(r"(\d+)(?!.*\d)")))


def name_step(path: Path) -> tuple[int | None, str | None]:
    """The checkpoint number in a file's name (its stem) by NAME_FORMS, and which form it is; (None, None)
    without a number."""
    for form, pattern in NAME_FORMS:
        found = pattern.search(path.stem)
        if found:
            return int(found.group(1)), form
    return None, None


@dataclass(frozen=True)
class Ordered:
    """The checkpoints of an average: `paths` and `steps` (None when unknown) in step order, and where the
    steps came from ('ss_steps', 'training_info', 'file names', '--steps', or None: the order given)."""
    paths: list[Path]
    steps: list[int] | None
    origin: str | None


def checkpoint_steps(paths: Sequence[Path], metadata: Sequence[Mapping[str, str]], weighting: str,
                     steps: Sequence[int] | None = None) -> Ordered:
    """Order checkpoints by training step: `steps` when given (one per path, in the order given), else the step
    every checkpoint's metadata records (one key for all: metadata_step), else every file name's number in one
    form (name_step); one source for all of them, never a mix (names often count epochs, metadata steps; two
    metadata keys, two trainers). Uniform needs no order: without steps it keeps the order given. Raises
    OptionsError when a weighting that needs the order has no step for some checkpoint, or no one source that
    gives every checkpoint's (names that number them in different ways, steps under different metadata keys, or
    some only in metadata and others only in names), when `steps` is not whole numbers >= 0 (checkpoint_step_list)
    or has the wrong count, or when two checkpoints share a step."""
    if steps is not None:
        steps = checkpoint_step_list(steps)
        if len(steps) != len(paths):
            raise OptionsError(f"--steps has {len(steps)} value(s) for {len(paths)} checkpoint(s): give one step "
                               "per checkpoint, in the order of the files")
        found, origin = steps, "--steps"
    else:
        read = [metadata_step(m) for m in metadata]
        keys = {k for _, k in read}
        named = [name_step(p) for p in paths]
        forms = {f for _, f in named}
        if None not in keys and len(keys) == 1:
            found, origin = [s for s, _ in read], keys.pop()
        elif None not in forms and len(forms) == 1:
            found, origin = [n for n, _ in named], "file names"
        elif weighting in ORDERED:
            lacking = [p.name for p, (s, _), (n, _) in zip(paths, read, named) if s is None and n is None]
            if lacking:
                raise OptionsError(f"--weighting {weighting} needs the checkpoints' order, and {lacking[0]} records "
                                   "no step (no ss_steps or training_info in its metadata, no number in its name): "
                                   "give --steps 100,200,... (one per file, in the order given)")
            if None not in forms:
                raise OptionsError(f"--weighting {weighting} needs the checkpoints' order, and their names number "
                                   f"them in different ways ({', '.join(sorted(forms))}: steps and epochs?): give "
                                   "--steps 100,200,... (one per file, in the order given)")
            # every checkpoint has a step, but no one source has all of them: each file's own, metadata first
            first: dict[str, str] = {}
            for p, (_, key), (_, form) in zip(paths, read, named):
                first.setdefault(key or f"the {form} in its name", p.name)
            raise OptionsError(f"--weighting {weighting} needs the checkpoints' order, and their steps come from "
                               f"different sources ({'; '.join(f'{p}: {k}' for k, p in first.items())}), which may "
                               "count differently: give --steps 100,200,... (one per file, in the order given)")
        else:
            return Ordered(list(paths), None, None)
    seen: dict[int, Path] = {}
    for p, s in zip(paths, found):
        if s in seen:
            raise OptionsError(f"{seen[s].name} and {p.name} are both at step {s} (from {origin}): leave one out, "
                               "or give --steps 100,200,... (one per file)")
        seen[s] = p
    order = sorted(range(len(paths)), key=lambda i: found[i])
    return Ordered([paths[i] for i in order], [found[i] for i in order], origin)


def checkpoint_step_list(steps) -> list[int]:
    """`steps` (a list, tuple or other iterable of whole numbers >= 0: ints, numpy's included) as a list of ints;
    OptionsError (one line) for anything else: a string, a float, a bool, a negative step, a lone number."""
    try:
        if isinstance(steps, (str, bytes)):
            raise TypeError
        steps = list(steps)
    except TypeError:
        raise OptionsError(f"--steps must be one whole number per file, e.g. '100,200,300' or [100, 200, 300]; got "
                           f"{steps!r} ({type(steps).__name__})") from None
    for s in steps:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise OptionsError(f"--steps: {s!r} ({type(s).__name__}) is not a whole number; give the steps as "
                               "'100,200,300' or [100, 200, 300] (one per file)")
    if any(s < 0 for s in steps):
        raise OptionsError(f"--steps must be whole numbers >= 0, got {', '.join(map(str, steps))}")
    return [int(s) for s in steps]


def parse_steps(text: str) -> list[int]:
    """'100,200,300' -> [100, 200, 300] (OptionsError naming the bad entry)."""
    out = []
    for part in text.split(","):
        try:
            out.append(int(part.strip()))
        except ValueError:
            raise OptionsError(f"--steps {text}: {part.strip()!r} is not a whole number; write the steps as "
                               "100,200,300 (one per file)") from None
    return out


def average(checkpoints: Sequence[str | os.PathLike], dst: str | os.PathLike, options=None, *,
            weighting: str = "uniform", beta: float | None = None, sigma_rel: float | None = None,
            steps: Sequence[int] | str | None = None, progress=None, on_layer: Callable | None = None,
            **option_fields):
    """Average `checkpoints` (LoRA files of one training run, saved at different steps) into one LoRA at `dst`:
    each layer is the best rank-k approximation (rank options or budget, as resize) of sum_i w_i * dW_i, the
    weighted mean of the checkpoints' updates dW_i = s_i * up_i @ down_i with weights `average_weights` gives in
    step order (`checkpoint_steps`). It is ops.merge.merge with those weights (the `sum` method), so at full rank
    the written update equals the mean to the save dtype.

    Args:
        checkpoints: two or more LoRA files (or adapter folders) of one model.
        dst: the output file.
        options: ResizeOptions, or the option fields as keywords (rank=, method=, param=, target_size=, ...).
        weighting: 'uniform', 'linear', 'ema' (with `beta` in (0, 1)) or 'power' (with `sigma_rel`).
        steps: each checkpoint's training step, in the order of `checkpoints` ('100,200,...' or a sequence of
            ints); without it, from metadata or names.

    Returns:
        merge's ResizeResult; its options also hold 'weighting', 'beta', 'sigma_rel', 'gamma' (power), 'steps_from'
        and 'order' ([{'file', 'step', 'weight'}] in step order); a note lists the order and weights.

    Raises:
        OptionsError: fewer than two checkpoints, a bad weighting or parameter (a string for a number included),
            steps that are not whole numbers >= 0, no order for an ordered weighting, two checkpoints at one step,
            a merge method or its parameters (an average is the weighted sum).
        And whatever merge raises (LoraStructureError for checkpoints of different models, ...)."""
    from ..core.merging import MERGE_PARAMS
    from ..io.paths import local_path, resolve_input
    from ..io.reader import open_tensor_file
    from .merge import Source, merge

    check_weighting(weighting, beta, sigma_rel)
    stray = [k for k in ("merge_method", *MERGE_PARAMS) if k in option_fields]
    if stray:
        raise OptionsError(f"average is the weighted mean of the updates and takes no {', '.join(stray)}: use "
                           "lora-resize merge for other merge methods")
    if isinstance(steps, str):
        steps = parse_steps(steps)
    if steps is not None:
        steps = checkpoint_step_list(steps)  # before any file is read
    paths = [resolve_input(local_path(c, "input")) for c in checkpoints]
    if len(paths) < 2:
        raise OptionsError(f"average needs two or more checkpoints, got {len(paths)}; to resize one, use "
                           "lora-resize resize")
    metadata = []
    for p in paths:
        with open_tensor_file(p) as r:
            metadata.append(dict(r.metadata))
    order = checkpoint_steps(paths, metadata, weighting, steps)
    weights = average_weights(weighting, len(paths), order.steps, beta, sigma_rel)
    known = order.steps or [None] * len(paths)
    result = merge([Source(p, w, step=s) for p, w, s in zip(order.paths, weights, known)], dst, options,
                   progress=progress, on_layer=on_layer, merge_method="sum", **option_fields)
    rows = [{"file": p.name, "step": s, "weight": w} for p, s, w in zip(order.paths, known, weights)]
    result.options.update(weighting=weighting, beta=beta, sigma_rel=sigma_rel,
                          gamma=sigma_rel_gamma(sigma_rel) if weighting == "power" else None,
                          steps_from=order.origin, order=rows)
    result.notes.insert(0, average_note(weighting, beta, sigma_rel, order.origin, rows))
    return result


def average_note(weighting: str, beta: float | None, sigma_rel: float | None, origin: str | None,
                 rows: list[dict]) -> str:
    """The summary's line: the weighting, where the order came from, each checkpoint's step and weight."""
    what = (f"ema, beta {beta:g}" if weighting == "ema" else f"power, sigma_rel {sigma_rel:g}"
            if weighting == "power" else weighting)
    where = f"in step order from {origin}" if origin else "in the order given (no steps known)"
    each = [r["file"] + ("" if r["step"] is None else f" (step {r['step']})") + f" x {r['weight']:.4g}"
            for r in rows]
    return f"average of {len(rows)} checkpoints ({what}), {where}: " + ", ".join(each)
