"""io.paths.name_problem: names that are not one file on every platform (Windows' rules are the narrowest); the
CLI refuses them on Windows (where `a:b` writes an alternate data stream of `a`), the ComfyUI nodes everywhere."""
from __future__ import annotations

import os

import pytest

from lora_resize.errors import OutputFileError
from lora_resize.io.paths import check_output_path, name_problem


@pytest.mark.parametrize("name", ["a:b.safetensors", "x<y.safetensors", 'q".pt', "a|b.safetensors", "what?.pt",
                                  "st*r.safetensors", "back\\slash.pt", "sl/ash.pt", "tab\t.pt", "x.", "x ",
                                  "NUL.safetensors", "con", "Com1.pt", "lpt9.x.safetensors", "", " ", ".",
                                  "a" * 250 + ".safetensors"])
def test_names_that_are_not_portable(name):
    assert name_problem(name)


@pytest.mark.parametrize("name", ["model.safetensors", "x_resized_2.safetensors", "Caf\u00e9 v1.0.pt",
                                  "console.safetensors", "com10.pt", "a" * 243 + ".safetensors", ".hidden.pt"])
def test_portable_names(name):
    assert name_problem(name) is None


def test_the_cli_refuses_them_on_windows_only(tmp_path, monkeypatch):
    src = tmp_path / "in.safetensors"
    src.write_bytes(b"x")
    dst = tmp_path / "out:v2.safetensors"
    check_output_path(src, dst)  # a legal name on Linux and macOS
    monkeypatch.setattr(os, "name", "nt")
    try:
        with pytest.raises(OutputFileError) as e:
            check_output_path(src, dst)
    finally:
        monkeypatch.undo()
    assert "out:v2.safetensors" in str(e.value) and "Windows" in str(e.value)


def test_free_name_never_picks_a_taken_one():
    from lora_resize.io.paths import free_name
    taken = {"a_resized.safetensors", "a_resized_2.safetensors", "a_resized_4.safetensors"}
    assert free_name("a_resized.safetensors", taken.__contains__) == "a_resized_3.safetensors"
    assert free_name("b.safetensors", taken.__contains__) == "b.safetensors"
    assert free_name("v1.0.pt", {"v1.0.pt"}.__contains__) == "v1.0_2.pt"  # the suffix kept, dots in the stem too
