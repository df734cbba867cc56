"""A fixed-seed slice of the fuzz campaign (fuzz/campaign.py): a few hundred mutated LoRA files through the whole
CLI, each ending in a valid output or one clean `lora-resize: error:` line, with no traceback, hang, partial file,
modified input or executed payload. The full campaign (10,000+ cases) is run by hand; see fuzz/RESULTS.md."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

FUZZ_DIR = Path(__file__).resolve().parents[2] / "fuzz"
sys.path.insert(0, str(FUZZ_DIR))  # the worker processes are spawned and inherit sys.path

import campaign  # noqa: E402

pytestmark = pytest.mark.slow

SEED = 20240601
CASES = 300


def test_fuzz_slice():
    c = campaign.run_campaign(CASES, SEED, workers=2, timeout=60.0)
    report = "\n".join(campaign.summary_lines(c, SEED))
    findings = "\n".join(f"{f['outcome']}: {f['description']}\n    {f['detail']}" for f in c.findings[:20])
    assert not c.findings, (f"{len(c.findings)} finding(s); rerun one with "
                            f"`python fuzz/campaign.py --seed {SEED} --replay N`\n{findings}\n{report}")
    assert c.counts["ok_output"] + c.counts["clean_error"] == CASES
    # the slice exercises both ends: mutations that still resize and mutations that are refused
    assert c.counts["ok_output"] > CASES // 10 and c.counts["clean_error"] > CASES // 10, report


def test_cases_are_deterministic(tmp_path):
    a = campaign.make_case(SEED, 17, tmp_path / "a")
    b = campaign.make_case(SEED, 17, tmp_path / "b")
    assert a.mutations == b.mutations and a.src.read_bytes() == b.src.read_bytes()
    assert [x.replace(str(tmp_path / "a"), "") for x in a.argv] == [x.replace(str(tmp_path / "b"), "") for x in b.argv]


def test_harness_reports_hangs_and_crashes():
    # the time bound and crash detection themselves: a case that never ends and one that kills its worker are
    # counted, and the campaign goes on with fresh workers
    c = campaign.run_campaign(6, SEED, workers=2, timeout=8.0, inject={"hang": [1], "crash": [2]})
    assert c.counts["hang"] == 1 and c.counts["worker_crash"] == 1, dict(c.counts)
    assert c.counts["ok_output"] + c.counts["clean_error"] == 4, dict(c.counts)
