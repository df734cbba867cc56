"""Per-block rules and explicit per-layer ranks: what decides one layer's rank before (or instead of) the method.

A rule is ``PATTERN=RANK`` (that fixed rank), ``PATTERN=cap:RANK`` (the method runs with this cap instead of
--rank/--conv-rank) or ``PATTERN=drop`` (the module is left out of the output). PATTERN is a shell-style glob
(fnmatch, case-sensitive) over module names such as ``lora_unet_down_blocks_0_attentions_0_proj_in``. Rules are
tried in the order given and the first one whose pattern matches a module decides it.

Order of precedence for one layer: a ``drop`` rule, then an explicit rank (``ResizeOptions.ranks``, e.g. the plan
of --target-size), then a ``RANK`` or ``cap:RANK`` rule, then the method with the --rank/--conv-rank cap.
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Iterable, Sequence

from ..errors import OptionsError

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
    """Rules from text or BlockRules (one or many); raises OptionsError naming a malformed one."""
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


def is_dropped(rules: Sequence[BlockRule], name: str) -> bool:
    """A `drop` rule decides module `name`."""
    r = first_match(rules, name)
    return r is not None and r.action == "drop"


@dataclass(frozen=True)
class RuleOutcome:
    """What the rules make of a file's modules: the names kept (in order), those dropped, each rule's hits and the
    warnings for rules that decide nothing."""
    kept: list[str]
    dropped: list[str]
    hits: dict[str, int]
    notes: list[str]


def apply_rules(rules: Sequence[BlockRule], names: Sequence[str]) -> RuleOutcome:
    """Split `names` by the drop rules. Raises OptionsError when every module would be dropped."""
    kept = [n for n in names if not is_dropped(rules, n)]
    if names and not kept:
        raise OptionsError("every module is dropped by the rules; nothing would be left to write")
    return RuleOutcome(kept, [n for n in names if is_dropped(rules, n)], rule_hits(rules, names),
                       rule_notes(rules, names))
