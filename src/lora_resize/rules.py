"""Per-block rules and explicit per-layer ranks: what decides one layer's rank before (or instead of) the method.

A rule is ``PATTERN=RANK`` (that fixed rank), ``PATTERN=cap:RANK`` (the method runs with this cap instead of
--rank/--conv-rank) or ``PATTERN=drop`` (the module is left out of the output). PATTERN is a shell-style glob
(fnmatch, case-sensitive) over module names such as ``lora_unet_down_blocks_0_attentions_0_proj_in``. Rules are
tried in the order given and the first one whose pattern matches a module decides it.

Order of precedence for one layer: a ``drop`` rule, then an explicit rank (``ResizeOptions.ranks``, e.g. the plan
of --target-size), then a ``RANK`` or ``cap:RANK`` rule, then the method with the --rank/--conv-rank cap.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from .errors import OptionsError
from .policies import Policy, RankChoice, choose_rank, get_policy

if TYPE_CHECKING:  # pragma: no cover
    from .options import ResizeOptions

RULE_ACTIONS = ("rank", "cap", "drop")
RULE_EXAMPLES = "'lora_te_*=8', '*attn2*=cap:64' or 'lora_te_*=drop'"


@dataclass(frozen=True)
class BlockRule:
    """One per-block rule: modules whose name matches `pattern` get a fixed rank, a cap, or are dropped."""
    pattern: str
    action: str  # "rank" | "cap" | "drop"
    value: int | None = None

    def matches(self, name: str) -> bool:
        return fnmatchcase(name, self.pattern)

    def __str__(self) -> str:
        if self.action == "drop":
            return f"{self.pattern}=drop"
        return f"{self.pattern}={'cap:' if self.action == 'cap' else ''}{self.value}"


def parse_rule(text: "str | BlockRule") -> BlockRule:
    """'PATTERN=RANK' / 'PATTERN=cap:RANK' / 'PATTERN=drop' -> BlockRule (OptionsError naming the fix)."""
    if isinstance(text, BlockRule):
        return text
    if not isinstance(text, str):
        raise OptionsError(f"a rule must be text such as {RULE_EXAMPLES}, got {text!r}")
    pattern, sep, spec = text.rpartition("=")
    pattern, spec = pattern.strip(), spec.strip().lower()
    if not sep or not pattern:
        raise OptionsError(f"rule {text!r} needs the form PATTERN=RANK, PATTERN=cap:RANK or PATTERN=drop, "
                           f"e.g. {RULE_EXAMPLES}")
    if spec == "drop":
        return BlockRule(pattern, "drop")
    action = "rank"
    if spec.startswith("cap:"):
        action, spec = "cap", spec[4:].strip()
    if not spec.isdigit() or int(spec) < 1:
        raise OptionsError(f"rule {text!r}: {spec!r} is not a rank; after '=' give a whole number >= 1, "
                           f"cap:N or drop (e.g. {RULE_EXAMPLES})")
    return BlockRule(pattern, action, int(spec))


def parse_rules(rules: "Iterable[str | BlockRule] | str | None") -> tuple[BlockRule, ...]:
    if rules is None:
        return ()
    if isinstance(rules, (str, BlockRule)):
        rules = [rules]
    return tuple(parse_rule(r) for r in rules)


def first_match(rules: Sequence[BlockRule], name: str) -> BlockRule | None:
    """The rule that decides module `name` (the first whose pattern matches), or None."""
    for r in rules:
        if r.matches(name):
            return r
    return None


def rule_hits(rules: Sequence[BlockRule], names: Sequence[str]) -> dict[str, int]:
    """How many modules each rule decides (first match wins), keyed by the rule's text, in the rules' order."""
    hits = {str(r): 0 for r in rules}
    for n in names:
        r = first_match(rules, n)
        if r is not None:
            hits[str(r)] += 1
    return hits


def rule_notes(rules: Sequence[BlockRule], names: Sequence[str]) -> list[str]:
    """Warnings for rules that decide nothing: a pattern that matches no module, or only modules an earlier
    rule already decides."""
    notes = []
    hits = rule_hits(rules, names)
    sample = names[0] if names else "?"
    for r in rules:
        if hits[str(r)]:
            continue
        if any(r.matches(n) for n in names):
            notes.append(f"warning: rule {r} is shadowed: every module it matches is decided by an earlier rule")
        else:
            notes.append(f"warning: rule {r} matches no module; check the pattern (names look like {sample})")
    return notes


def kept_names(rules: Sequence[BlockRule], names: Iterable[str]) -> list[str]:
    """Names that no `drop` rule removes."""
    out = []
    for n in names:
        r = first_match(rules, n)
        if r is None or r.action != "drop":
            out.append(n)
    return out


def is_dropped(rules: Sequence[BlockRule], name: str) -> bool:
    r = first_match(rules, name)
    return r is not None and r.action == "drop"


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}


def parse_size(value: "int | float | str") -> int:
    """Bytes from 50000000, '50MB' (10^6), '47.7MiB' (2^20), '1.2GB', ... (OptionsError when unreadable)."""
    if isinstance(value, bool):
        raise OptionsError(f"target size must be a size such as 50MB, got {value!r}")
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        m = _SIZE_RE.match(str(value))
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS:
            raise OptionsError(f"target size {value!r} is not a size; write e.g. 50MB (10^6 bytes), 48MiB "
                               "(2^20 bytes), 1.2GB or a number of bytes")
        n = float(m.group(1)) * _UNITS[unit]
    if not n >= 1 or n != n or n == float("inf"):
        raise OptionsError(f"target size must be at least 1 byte, got {value!r}")
    return int(n)


FIXED = get_policy(None)


def choose_layer_rank(name: str, S: np.ndarray, full_size: int, conv: bool, opts: "ResizeOptions",
                      policy: Policy | None = None) -> RankChoice:
    """The rank of one (kept) layer under `opts`: an explicit rank (opts.ranks), else a RANK/cap:RANK rule,
    else the method with the --rank/--conv-rank cap. Every path goes through policies.choose_rank, so the rank
    rule (exact/kohya), zero layers and the layer's size are handled alike."""
    if opts.ranks and name in opts.ranks:
        return choose_rank(S, full_size, FIXED, None, int(opts.ranks[name]), opts.rule)
    rule = first_match(opts.block_rules, name) if opts.block_rules else None
    if rule is not None and rule.action == "rank":
        return choose_rank(S, full_size, FIXED, None, rule.value, opts.rule)
    cap = rule.value if rule is not None and rule.action == "cap" else opts.cap_for(conv)
    policy = policy or get_policy(opts.method)
    if not policy.needs_param and cap is None:
        raise OptionsError(f"layer {name} has no rank: give --rank N (or a rule or a target that covers it)")
    return choose_rank(S, full_size, policy, opts.param, cap, opts.rule)


def layer_cap(name: str, conv: bool, opts: "ResizeOptions") -> tuple[str, int | None]:
    """For budget policies: ('rank', R) when a RANK rule pins the layer, else ('cap', cap or None)."""
    rule = first_match(opts.block_rules, name) if opts.block_rules else None
    if rule is not None and rule.action == "rank":
        return "rank", rule.value
    if rule is not None and rule.action == "cap":
        return "cap", rule.value
    return "cap", opts.cap_for(conv)
