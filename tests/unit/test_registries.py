"""Plug-ins are one registration each: a new rank policy appears in the CLI's --method choices, analyze's sweep and
the report's legend; duplicate names (and, for key families, tied priorities) are refused."""
from __future__ import annotations

import pytest

from lora_resize.formats import FORMATS, register as register_format
from lora_resize.formats.kohya import Kohya
from lora_resize.ops.analyze import analyze, default_sweep
from lora_resize.ranks import policies
from lora_resize.options import option_fields
from lora_resize.ranks.budgets import BUDGETS, register as register_budget
from lora_resize.ranks.constraints import CONSTRAINTS, register as register_constraint
from lora_resize.report.html import series

from test_options import subparser


@pytest.fixture
def half_policy():
    """A policy that keeps the first half of the singular values above zero (param: unused, must be 1)."""
    p = policies.Policy("sv_half", "first half", "#123456", (1,), lambda x: None if x == 1 else "must be 1",
                        lambda S, x: max(1, int((S > 0).sum()) // 2), lambda S, x: max(2, len(S) // 2))
    policies.register(p)
    try:
        yield p
    finally:
        del policies.POLICIES["sv_half"]


def test_a_new_policy_is_one_registration(half_policy, blocky_lora):
    action = next(a for a in subparser("resize")._actions if a.dest == "method")
    assert "sv_half" in action.choices
    assert default_sweep()["sv_half"] == (1,)
    assert series()["sv_half"] == ("#123456", "first half")
    a = analyze(blocky_lora, sweep={"sv_half": (1,)})
    assert [r.method for r in a.rows] == ["sv_half"] and a.rows[0].args.startswith("--method sv_half --param 1")


def test_duplicates_are_refused():
    with pytest.raises(ValueError, match="policy 'sv_fro' is already registered"):
        policies.register(policies.POLICIES["sv_fro"])
    with pytest.raises(ValueError, match="budget 'target_size' is already registered"):
        register_budget(BUDGETS["target_size"])
    with pytest.raises(ValueError, match="has the priority of 'kohya'"):
        register_format(Kohya())
    clone = Kohya()
    clone.priority = 99
    with pytest.raises(ValueError, match="key family 'kohya' is already registered"):
        register_format(clone)
    assert list(FORMATS) == ["kohya", "lycoris", "peft", "diffusers", "xlabs", "controllora"]


def test_each_rank_constraint_is_one_registration_with_its_option_field_and_flag():
    fields = {f.name: f for f in option_fields()}
    flags = {s for a in subparser("resize")._actions for s in a.option_strings}
    assert list(CONSTRAINTS) == ["rank_multiple", "allowed_ranks", "uniform_rank"]
    for name, c in CONSTRAINTS.items():
        assert name in fields and c.flag == fields[name].metadata["flags"][0] and c.flag in flags
    with pytest.raises(ValueError, match="rank constraint 'rank_multiple' is already registered"):
        register_constraint(CONSTRAINTS["rank_multiple"])
