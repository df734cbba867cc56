"""The suite's own rules: a missing browser skips the browser tests with the reason, or fails them under CI=true."""
from __future__ import annotations

import pytest

from helpers import chromium


def test_a_missing_browser_skips_with_the_reason(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("LORA_RESIZE_CHROMIUM", raising=False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Chromium is not installed"):
        chromium()


def test_under_ci_a_missing_browser_fails(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("LORA_RESIZE_CHROMIUM", raising=False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true needs it"):
        chromium()
