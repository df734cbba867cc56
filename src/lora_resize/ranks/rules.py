"""Per-block rules and explicit per-layer ranks: what decides one layer's rank before (or instead of) the method,
and the strength its update is baked in with.

A rule is ``PATTERN=RANK`` (that fixed rank), ``PATTERN=cap:RANK`` (the method runs with this cap instead of
--rank/--conv-rank), ``PATTERN=drop`` (the module is left out of the output) or ``PATTERN=scale:X`` (the module's
update is multiplied by the real number X - negative allowed, 0 drops the module - before its rank is chosen, so
the spectrum, budgets, sizes and the factors written all see the scaled update). PATTERN is a shell-style glob
(fnmatch, case-sensitive) over module names such as ``lora_unet_down_blocks_0_attentions_0_proj_in``.

Two independent first-match lists: the rank/cap/drop rules are tried in the order given and the first one whose
pattern matches a module decides its rank (or drops it); the scale rules are tried in the order given and the first
one that matches gives its strength (1 when none does). So ``--rule '*attn2*=scale:0.5' --rule '*=cap:32'`` halves
every attn2 module and caps every module at 32. A `--block-weights` preset's strength (block_weights.py) and the
first matching scale rule's multiply: a module at 1 in the preset under '*attn2*=scale:0.5' is halved, at 0.5 it
is quartered (as a UI applies a block weight and a LoRA strength together).

Order of precedence for one layer: a ``drop`` rule (or a strength of 0), then an explicit rank
(``ResizeOptions.ranks``, e.g. the plan of --target-size), then a ``RANK`` or ``cap:RANK`` rule, then the method
with the --rank/--conv-rank cap.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Iterable, Mapping, Sequence

from ..errors import OptionsError

RULE_EXAMPLES = "'lora_te_*=8', '*attn2*=cap:64', 'lora_te_*=drop' or '*attn2*=scale:0.5'"


@dataclass(frozen=True)
class BlockRule:
    """One per-block rule: modules whose name matches `pattern` get a fixed rank, a cap, are dropped, or (`scale`)
    have their update multiplied by `value` (a float)."""
    pattern: str
    action: str  # "rank" | "cap" | "drop" | "scale"
    value: int | float | None = None

    def matches(self, name: str) -> bool:
        return fnmatchcase(name, self.pattern)

    @property
    def scales(self) -> bool:
        """A scale rule (matched apart from the rank/cap/drop rules)."""
        return self.action == "scale"

    def __str__(self) -> str:
        if self.action == "drop":
            return f"{self.pattern}=drop"
        if self.scales:
            return f"{self.pattern}=scale:{number_text(self.value)}"
        return f"{self.pattern}={'cap:' if self.action == 'cap' else ''}{self.value}"


def number_text(v: float) -> str:
    """A float as short as it reads back exactly ('0.5', '-1', '0.123456789')."""
    short = f"{v:g}"
    return short if float(short) == v else repr(float(v))


def parse_rule(text: "str | BlockRule") -> BlockRule:
    """'PATTERN=RANK' / 'PATTERN=cap:RANK' / 'PATTERN=drop' / 'PATTERN=scale:X' -> BlockRule (OptionsError naming
    the fix: a malformed rule, a rank below 1, a scale that is not a finite number)."""
    if isinstance(text, BlockRule):
        return text
    if not isinstance(text, str):
        raise OptionsError(f"a rule must be text such as {RULE_EXAMPLES}, got {text!r}")
    pattern, sep, spec = text.rpartition("=")
    pattern, spec = pattern.strip(), spec.strip().lower()
    if not sep or not pattern:
        raise OptionsError(f"rule {text!r} needs the form PATTERN=RANK, PATTERN=cap:RANK, PATTERN=drop or "
                           "PATTERN=scale:X, "
                           f"e.g. {RULE_EXAMPLES}")
    if spec == "drop":
        return BlockRule(pattern, "drop")
    if spec.startswith("scale:"):
        return BlockRule(pattern, "scale", parse_strength(spec[6:], f"rule {text!r}"))
    action = "rank"
    if spec.startswith("cap:"):
        action, spec = "cap", spec[4:].strip()
    if not spec.isdigit() or int(spec) < 1:
        raise OptionsError(f"rule {text!r}: {spec!r} is not a rank; after '=' give a whole number >= 1, "
                           f"cap:N, drop or scale:X (e.g. {RULE_EXAMPLES})")
    return BlockRule(pattern, action, int(spec))


def parse_rules(rules: "Iterable[str | BlockRule] | str | None") -> tuple[BlockRule, ...]:
    """Rules from text or BlockRules (one or many); raises OptionsError naming a malformed one."""
    if rules is None:
        return ()
    if isinstance(rules, (str, BlockRule)):
        rules = [rules]
    return tuple(parse_rule(r) for r in rules)


STRENGTH = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")  # a decimal number (no '1_0', 'inf', '0x10')


def parse_strength(text: str, what: str) -> float:
    """A strength ('0.5', '-1', '2', '1e-3') as a finite float; OptionsError naming `what` for anything else: not a
    decimal number, beyond float64's range, or a nonzero number so small it would read as 0 (and drop the
    module)."""
    t = text.strip()
    value = float(t) if STRENGTH.fullmatch(t) else float("nan")
    if not math.isfinite(value):
        raise OptionsError(f"{what}: {t!r} is not a strength; give a finite decimal number such as 0.5, -1 or 0 "
                           "(0 drops the module)")
    if value == 0 and re.search(r"[1-9]", re.split(r"[eE]", t)[0]):
        raise OptionsError(f"{what}: {t!r} is too small to be told from 0; give 0 to drop the module, or a strength "
                           "of at least 1e-300")
    return value


def first_match(rules: Sequence[BlockRule], name: str) -> BlockRule | None:
    """The rank/cap/drop rule that decides module `name` (the first of those whose pattern matches), or None; scale
    rules are matched apart (first_scale)."""
    for r in rules:
        if not r.scales and r.matches(name):
            return r
    return None


def first_scale(rules: Sequence[BlockRule], name: str) -> BlockRule | None:
    """The scale rule that gives module `name` its strength (the first scale rule whose pattern matches), or None."""
    for r in rules:
        if r.scales and r.matches(name):
            return r
    return None


def strength_of(rules: Sequence[BlockRule], name: str, preset: Mapping[str, float] | None = None) -> float:
    """Module `name`'s strength: its `--block-weights` preset's (`preset`: module name -> strength, for the modules
    the preset covers; 1 elsewhere) times its first scale rule's (1 without one)."""
    r = first_scale(rules, name)
    return float((preset or {}).get(name, 1.0)) * (float(r.value) if r is not None else 1.0)


def _decider(r: BlockRule, rules: Sequence[BlockRule], name: str, preset: Mapping[str, float] | None
             ) -> BlockRule | None:
    """The rule of `r`'s kind that decides `name` (a scale rule multiplies a preset's strength: it decides too)."""
    return first_scale(rules, name) if r.scales else first_match(rules, name)


def rule_hits(rules: Sequence[BlockRule], names: Sequence[str], preset: Mapping[str, float] | None = None
              ) -> dict[str, int]:
    """How many modules each rule decides (first match wins; the scale rules among themselves),
    keyed by the rule's text, in the rules' order."""
    hits = {str(r): 0 for r in rules}
    for n in names:
        for r in {_decider(x, rules, n, preset) for x in rules} - {None}:
            hits[str(r)] += 1
    return hits


def rule_notes(rules: Sequence[BlockRule], names: Sequence[str], preset: Mapping[str, float] | None = None
               ) -> list[str]:
    """Warnings for rules that decide nothing: a pattern that matches no module, or only modules an earlier
    rule of its kind already decides."""
    notes = []
    hits = rule_hits(rules, names, preset)
    sample = names[0] if names else "?"
    for r in rules:
        if hits[str(r)]:
            continue
        if any(r.matches(n) for n in names):
            by = "an earlier scale rule or --block-weights" if r.scales else "an earlier rule"
            notes.append(f"warning: rule {r} is shadowed: every module it matches is decided by {by}")
        else:
            notes.append(f"warning: rule {r} matches no module; check the pattern (names look like {sample})")
    return notes


def is_dropped(rules: Sequence[BlockRule], name: str, preset: Mapping[str, float] | None = None) -> bool:
    """A `drop` rule decides module `name`, or its strength is 0."""
    r = first_match(rules, name)
    return (r is not None and r.action == "drop") or strength_of(rules, name, preset) == 0


@dataclass(frozen=True)
class RuleOutcome:
    """What the rules make of a file's modules: the names kept (in order), those dropped, each rule's hits, the
    warnings for rules that decide nothing (and a line counting the modules per strength), and `strengths`: the
    strength of each module whose strength is not 1 (module name -> X; 0: dropped by it), a drop rule's modules
    left out."""
    kept: list[str]
    dropped: list[str]
    hits: dict[str, int]
    notes: list[str]
    strengths: dict[str, float] = field(default_factory=dict)
    preset: Mapping[str, float] | None = None  # the --block-weights strengths they were applied with


def apply_rules(rules: Sequence[BlockRule], names: Sequence[str], preset: Mapping[str, float] | None = None
                ) -> RuleOutcome:
    """Split `names` by the drop rules and strengths of 0, and give each kept module its strength (`preset`: the
    strengths of --block-weights, module name -> X, multiplied by the scale rules'). Raises OptionsError when every
    module would be dropped."""
    dropped = [n for n in names if is_dropped(rules, n, preset)]
    kept = [n for n in names if n not in set(dropped)]
    if names and not kept:
        raise OptionsError("every module is dropped by the rules (or has strength 0); nothing would be left to write")
    ruled_out = {n for n in names if (r := first_match(rules, n)) is not None and r.action == "drop"}
    strengths = {n: s for n in names if n not in ruled_out and (s := strength_of(rules, n, preset)) != 1}
    return RuleOutcome(kept, dropped, rule_hits(rules, names, preset), rule_notes(rules, names, preset) +
                       strength_notes(strengths), strengths, preset)


def strength_notes(strengths: Mapping[str, float]) -> list[str]:
    """One line counting the modules baked in at each strength other than 1 (those at 0 are dropped), or []."""
    counts: dict[float, int] = {}
    for s in strengths.values():
        counts[s] = counts.get(s, 0) + 1
    parts = [f"x{number_text(s)}: {n} module{'s' if n != 1 else ''}" for s, n in sorted(counts.items()) if s != 0]
    if counts.get(0.0):
        parts.append(f"x0: {counts[0.0]} module{'s' if counts[0.0] != 1 else ''} dropped")
    return [f"strengths baked into the factors: {'; '.join(parts)}"] if parts else []
